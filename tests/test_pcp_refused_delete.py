"""A delete the gateway refuses though the mapping is ours: cut its lease short instead.

miniupnpd 2.3.1's nftables backend (seen in the lab, tests/lab/test_lab_ipv6.py)
answers NOT_AUTHORIZED to the delete of an IPv6 pinhole it has renewed: its
renewal drops the description that names the nonce. Before, the pinhole stayed
open to the whole internet for the rest of its lease (two hours by default).
"""

from __future__ import annotations

import logging
from ipaddress import IPv6Address

import attrs
import pytest
import trio
import trio.testing

from portbroker.broker import open_broker
from portbroker.errors import MappingError
from portbroker.lifecycle import Released
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import broker_for

GATEWAY6 = IPv6Address("fd77::1")
HOST6 = IPv6Address("fd77::2")


async def test_a_renewed_pinhole_whose_delete_is_refused_is_cut_to_the_minimum_lifetime(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway(address=GATEWAY6, renewed_pinholes_undeletable=True)
    async with open_broker(
        GATEWAY6, ("pcp",), link_factory=gateway.link_factory(HOST6), announce_port=None, seed=7
    ) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        await trio.sleep(4000)  # past the renewal at half the lifetime
        entry = gateway.mapping_for("tcp", 8080)
        assert entry is not None
        assert entry.renewed
        with caplog.at_level(logging.WARNING):
            await mapping.release()
        entry = gateway.mapping_for("tcp", 8080)
        assert entry is not None
        # The server's minimum (120 s, RFC 6887 §15's advice), not 3,200 s away.
        assert entry.expires_at <= trio.current_time() + gateway.min_lifetime
        sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)][-2:]
        assert [r.lifetime for r in sent] == [0, 1]  # the delete, then the cut
        assert len({r.data.nonce for r in sent if r.data is not None}) == 1
        assert "refused the delete (NOT_AUTHORIZED) but took a renewal" in caplog.text
        await trio.sleep(gateway.min_lifetime + 1)
        assert gateway.mapping_for("tcp", 8080) is None


async def test_a_refusal_of_the_cut_too_is_the_delete_refused() -> None:
    gateway = FakeGateway(renewed_pinholes_undeletable=True)
    async with broker_for(gateway, methods=("pcp",)) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        assert mapping.lease is not None
        method = broker._methods["pcp"]
        gateway.forced_result = int(pcp.ResultCode.NOT_AUTHORIZED)
        with pytest.raises(MappingError, match="NOT_AUTHORIZED"):
            await method.delete(mapping.lease)
        gateway.forced_result = None
        sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)][-2:]
        assert [r.lifetime for r in sent] == [0, 1]  # the cut was asked for, and refused


async def test_a_refused_delete_of_a_lapsed_lease_is_not_cut_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After our lease lapsed the endpoint may be another client's (another
    nonce): its refusal is right, and cutting would shorten that client's pinhole."""
    gateway = FakeGateway(address=GATEWAY6, renewed_pinholes_undeletable=True)
    async with open_broker(
        GATEWAY6, ("pcp",), link_factory=gateway.link_factory(HOST6), announce_port=None, seed=7
    ) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        await trio.sleep(4000)
        lease = mapping.lease
        assert lease is not None
        method = broker._methods["pcp"]
        lapsed = attrs.evolve(lease, granted_at=trio.current_time() - lease.lifetime)
        with pytest.raises(MappingError, match="NOT_AUTHORIZED"):
            await method.delete(lapsed)
        sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)]
        assert sent[-1].lifetime == 0  # no cut followed the refusal
        entry = gateway.mapping_for("tcp", 8080)
        assert entry is not None
        assert entry.expires_at > trio.current_time() + 3000


async def test_a_cut_granted_past_the_leases_end_is_no_delete(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that answers the 1 s renewal with more than the lease had left
    (its minimum is longer, it ignores the asked lifetime, or a late copy of
    the last grant matched) has made the pinhole live longer, not shorter: the
    release is not confirmed, and the log says until when it stays."""
    gateway = FakeGateway(address=GATEWAY6, renewed_pinholes_undeletable=True)
    async with open_broker(
        GATEWAY6, ("pcp",), link_factory=gateway.link_factory(HOST6), announce_port=None, seed=7
    ) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        events = mapping.events()
        await trio.sleep(4000)  # renewed once: some 3,000 s of its lease left
        lease = mapping.lease
        assert lease is not None
        assert lease.expires_at - trio.current_time() < 7200
        gateway.min_lifetime = 86400  # every grant a day long
        with caplog.at_level(logging.WARNING):
            await mapping.release()
        sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)][-2:]
        assert [r.lifetime for r in sent] == [0, 1]  # the delete, then the cut
        released = [event async for event in events if isinstance(event, Released)]
        assert released == [Released(confirmed=False)]
        assert "86400 s" in caplog.text
        assert "took a renewal" not in caplog.text
