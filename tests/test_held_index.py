"""Broker._held (the live mappings by endpoint, for _claim) against the old scan.

_claim used to scan every live mapping; it looks the endpoint up in _held
now, kept in _start and _apply. Every way a mapping ends must leave _held as
the scan would have seen _mappings: a stale entry would refuse a legitimate
re-map with AlreadyMapped, a missing one would let a second mapping of the
same endpoint through.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from portbroker.broker import Broker, _endpoint
from portbroker.errors import AlreadyMapped, PortBrokerError
from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_network import FakeNetwork
from portbroker.wire import pcp
from tests.broker_harness import HOUR, broker_for, wait_for
from tests.test_roaming import A, B, following, gateways


def _as_scanned(broker: Broker) -> None:
    assert broker._held == {_endpoint(m.request): m for m in broker._mappings}


async def test_released_failed_cancelled_and_refused_maps_leave_no_stale_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        # Released: the port can be mapped again.
        mapping = await broker.map(7000, "udp", lifetime=120)
        with pytest.raises(AlreadyMapped):
            await broker.map(7000, "udp", lifetime=120)
        await mapping.release()
        _as_scanned(broker)
        mapping = await broker.map(7000, "udp", lifetime=120)
        _as_scanned(broker)

        # FAILED: the gateway refuses the renewal for good.
        gateway.forced_result = int(pcp.ResultCode.NOT_AUTHORIZED)
        await wait_for(lambda: mapping.state is State.FAILED, 3 * HOUR)
        _as_scanned(broker)
        assert _endpoint(mapping.request) not in broker._held
        gateway.forced_result = None
        again = await broker.map(7000, "udp", lifetime=120)
        _as_scanned(broker)

        # A map() cancelled while its request is in flight.
        gateway.delay = 5.0
        with trio.move_on_after(1):
            await broker.map(7002, "udp", lifetime=120)
        gateway.delay = 0.0
        _as_scanned(broker)
        assert not broker._claims
        await broker.map(7002, "udp", lifetime=120)
        _as_scanned(broker)

        # A create the gateway refuses: nothing held, the claim is dropped.
        gateway.forced_result = int(pcp.ResultCode.NOT_AUTHORIZED)
        with pytest.raises(PortBrokerError):
            await broker.map(7001, "udp", lifetime=120)
        gateway.forced_result = None
        _as_scanned(broker)
        assert not broker._claims
        assert again.state is State.ACTIVE


async def test_a_move_to_another_gateway_keeps_the_entry_and_its_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp")
        network.route_via(B)
        await wait_for(
            lambda: mapping.state is State.ACTIVE and mapping.lease.gateway == B  # type: ignore[union-attr]
        )
        _as_scanned(broker)
        with pytest.raises(AlreadyMapped):
            await broker.map(8080, "tcp")
        await mapping.release()
        _as_scanned(broker)
        await broker.map(8080, "tcp")
        _as_scanned(broker)
