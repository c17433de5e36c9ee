"""Review 12b: deferred confirmation of hints (portbroker/epoch.py, broker._confirm_later).

Memory links and FakeGateways only (127.0.0.1, 127.0.0.2): nothing is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import Any

import pytest
import trio
import trio.testing

import portbroker.broker as broker_module
from portbroker.epoch import CONFIRM_INTERVAL, Confirm, EntryMissing, EpochTracker, GatewaySignal
from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_network import FakeNetwork
from portbroker.wire import natpmp, pcp
from tests.broker_harness import broker_for, wait_for
from tests.test_roaming import A, B, following, gateways


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


def _announces(requests: Sequence[object]) -> int:
    return sum(
        1 for r in requests if isinstance(r, pcp.PcpRequest) and r.opcode is pcp.Opcode.ANNOUNCE
    )


async def test_a_hint_deferred_on_the_old_gateway_is_not_confirmed_on_the_new_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b, follow_settle=0) as broker:
        mapping = await broker.map(8080, "tcp")
        await trio.sleep(60)
        spoof = pcp.encode_response(pcp.PcpResponse(pcp.Opcode.ANNOUNCE, 0, 0, 0))
        for link in list(gw_a.links):
            link.put(spoof, gw_a._source())
        await trio.sleep(0.5)  # confirmed on a at once
        for link in list(gw_a.links):
            link.put(spoof, gw_a._source())  # inside the interval: deferred
        await trio.sleep(0.1)
        assert broker.tracker(A).deferred_until() is not None
        gw_a.drop_rate = 1.0  # off the path now
        network.route_via(B)
        await wait_for(
            lambda: mapping.state is State.ACTIVE and mapping.lease.gateway == B  # type: ignore[union-attr]
        )
        before = _announces(gw_b.requests)
        await trio.sleep(CONFIRM_INTERVAL + 5)
        # a's hint is a's business: b is not asked about it.
        assert _announces(gw_b.requests) == before


def test_a_deferred_hint_is_taken_once_it_is_due_whatever_the_float_rounding() -> None:
    # A time t at which (t + 2.0) - t < 2.0 in floating point.
    last = next(
        t / 8.0 + 0.1
        for t in range(10**7)
        if (t / 8.0 + 0.1 + CONFIRM_INTERVAL) - (t / 8.0 + 0.1) < CONFIRM_INTERVAL
    )
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    assert isinstance(tracker.epoch("pcp", 0, last, solicited=False), Confirm)
    assert tracker.epoch("pcp", 0, last + 0.5, solicited=False) is None
    due = tracker.deferred_until()
    assert due is not None
    # _confirm_later sleeps until *due* and takes it then: None here would have
    # it sleep until the same moment again, for ever under a MockClock.
    assert isinstance(tracker.take_deferred(due), Confirm)


async def test_an_address_announced_inside_the_interval_is_not_settled_by_a_map_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # NAT-PMP: a gateway may change its external address keeping its epoch and
    # its mappings (RFC 6886 §3.2.1 announces the address; §3.6 resets the
    # epoch only on a loss). A MAP answer carries no external address, so it
    # cannot settle an address hint: only the address request can.
    gateway = FakeGateway()
    async with broker_for(gateway, methods=("natpmp",)) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        first = gateway.external_address
        assert mapping.external_address == first
        await trio.sleep(60)
        (link,) = gateway.links
        spoof = natpmp.encode_response(
            natpmp.ExternalAddressResponse(0, gateway.epoch, IPv4Address("192.0.2.66"))
        )
        link.put(spoof, gateway._source())
        await trio.sleep(1)  # confirmed: the address is what it was
        assert mapping.external_address == first
        assert any(isinstance(r, natpmp.ExternalAddressRequest) for r in gateway.requests[-2:])
        gateway.external_address = IPv4Address("198.51.100.7")
        await gateway.announce()  # inside the interval: deferred
        await trio.sleep(0.1)
        other = await broker.map(9000, "udp", lifetime=3600)  # a solicited NAT-PMP answer
        await wait_for(lambda: mapping.external_address == IPv4Address("198.51.100.7"), limit=30)
        await other.release()


async def test_a_signal_from_the_first_gateways_upnp_after_a_move_is_not_the_new_ones(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each gateway's UPnP method reports what it saw through the sink it was
    # opened with. The first gateway's went to whichever gateway the broker
    # was on at the time: after a move, a 714 from a renewal still in flight
    # on the old gateway (or its BOOTID) was a state loss of the new one, and
    # every mapping there was re-created.
    sinks: list[Callable[[GatewaySignal], None]] = []
    real = broker_module.open_methods  # type: ignore[attr-defined]

    def capturing(*args: Any, **kwargs: Any) -> Any:
        sinks.append(kwargs["report"])
        return real(*args, **kwargs)

    monkeypatch.setattr(broker_module, "open_methods", capturing)
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b, follow_settle=0) as broker:
        mapping = await broker.map(8080, "tcp")
        network.route_via(B)
        await wait_for(
            lambda: mapping.state is State.ACTIVE and mapping.lease.gateway == B  # type: ignore[union-attr]
        )
        assert len(sinks) == 2
        granted = mapping.lease
        first_gateways = sinks[0]
        first_gateways(EntryMissing("entry 8080/TCP vanished (714)", trio.current_time()))
        await trio.sleep(10)
        assert broker.tracker(B).incidents == 0
        assert mapping.lease == granted  # not re-created on b
