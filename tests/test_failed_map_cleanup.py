"""A map that fails for silence deletes what the gateway may have made all the same.

Seen in the peers benchmark at 60 % loss: the MAP got through, every answer was
lost, ``map`` raised NoAnswer, and the gateway kept a DNAT rule that no Mapping
would ever name or delete (1 in 5 through the daemon, 1 in 5 from the
library). The request reached a gateway whose answers were lost: what it made is
deleted in the background, and a new map of the same port waits for that
delete, so it cannot delete the new mapping (PCP reuses the nonce).
"""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
import trio
import trio.testing

from portbroker.broker import open_broker
from portbroker.errors import AlreadyMapped, NoAnswer
from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from tests.broker_harness import broker_for, wait_for

GATEWAY6 = IPv6Address("fd77::1")
HOST6 = IPv6Address("fd77::2")


@pytest.mark.parametrize("method", ["pcp", "natpmp"])
async def test_a_map_whose_answers_were_all_lost_leaves_nothing_on_the_gateway(
    autojump_clock: trio.testing.MockClock, method: str
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway, methods=(method,)) as broker:
        await (await broker.map(9000, "udp", via=method)).release()  # the method is known
        gateway.drop_rate = 1.0  # from now every request is served, every answer lost
        with pytest.raises(NoAnswer):
            await broker.map(8080, "tcp", lifetime=7200, via=method)
        assert gateway.mappings, "the gateway made the mapping it never told us about"
        # Its answers still lost: the delete needs only to arrive.
        await wait_for(lambda: not gateway.mappings, limit=60)


async def test_a_map_retried_at_once_after_such_a_failure_is_not_deleted_by_the_cleanup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway, methods=("pcp",)) as broker:
        await (await broker.map(9000, "udp", via="pcp")).release()
        gateway.drop_rate = 1.0
        with pytest.raises(NoAnswer):
            await broker.map(8080, "tcp", lifetime=7200, via="pcp")
        gateway.drop_rate = 0.0  # the loss ends; the app tries again at once
        mapping = await broker.map(8080, "tcp", lifetime=7200, via="pcp")
        await trio.sleep(120)  # any cleanup still due has run by now
        assert [m.internal_port for m in gateway.mappings.values()] == [8080]
        assert mapping.lease is not None
        await mapping.release()
        assert not gateway.mappings


@pytest.mark.parametrize("spelled_out", ["first", "second"])
@pytest.mark.parametrize("method", ["pcp", "natpmp"])
async def test_the_retry_waits_though_it_names_the_hosts_own_address_another_way(
    autojump_clock: trio.testing.MockClock, method: str, spelled_out: str
) -> None:
    """``internal_address=`` this host's own address and no address name one gateway
    entry (PCP: one nonce; NAT-PMP: one internal port), so the retry must wait
    for the cleanup all the same (the daemon passes a client's address as given)."""
    gateway = FakeGateway()
    async with broker_for(gateway, methods=(method,)) as broker:
        await (await broker.map(9000, "udp", via=method)).release()
        assert broker.transport is not None
        own = broker.transport.link.local_address
        first, second = (own, None) if spelled_out == "first" else (None, own)
        gateway.drop_rate = 1.0
        with pytest.raises(NoAnswer):
            await broker.map(8080, "tcp", lifetime=7200, via=method, internal_address=first)
        gateway.drop_rate = 0.0
        mapping = await broker.map(8080, "tcp", lifetime=7200, via=method, internal_address=second)
        await trio.sleep(120)  # any cleanup still due has run by now
        assert [m.internal_port for m in gateway.mappings.values()] == [8080]
        await mapping.release()
        assert not gateway.mappings


@pytest.mark.parametrize("method", ["pcp", "natpmp"])
async def test_a_map_during_a_cancelled_maps_cleanup_waits_for_it(
    autojump_clock: trio.testing.MockClock, method: str
) -> None:
    """A cancelled map deletes what it may have made before it returns; a map of
    the same entry meanwhile (another task, the address spelled another way, so
    not AlreadyMapped) waits for that delete as for a failed map's."""
    gateway = FakeGateway()
    async with broker_for(gateway, methods=(method,)) as broker:
        await (await broker.map(9000, "udp", via=method)).release()
        assert broker.transport is not None
        own = broker.transport.link.local_address
        gateway.drop_rate = 1.0
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def cancelled_map() -> None:
                with scope:
                    await broker.map(8080, "tcp", lifetime=7200, via=method, internal_address=own)

            nursery.start_soon(cancelled_map)
            await trio.sleep(1)  # its request served, the answers lost
            scope.cancel()
            await trio.sleep(0.5)  # its delete is out, unanswered so far
            gateway.drop_rate = 0.0
            mapping = await broker.map(8080, "tcp", lifetime=7200, via=method)
        await trio.sleep(120)
        assert [m.internal_port for m in gateway.mappings.values()] == [8080]
        await mapping.release()
        assert not gateway.mappings


async def test_a_lost_ipv6_map_whose_delete_miniupnpd_refuses_is_cut_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every retransmission of a MAP whose answers are lost is a renewal to the
    server, and miniupnpd 2.3.1 refuses the delete of a renewed IPv6 pinhole
    (tests/test_pcp_refused_delete.py): the cleanup cuts it short as a release
    would, or the pinhole stays open for the whole lifetime asked for."""
    gateway = FakeGateway(address=GATEWAY6, renewed_pinholes_undeletable=True)
    async with open_broker(
        GATEWAY6, ("pcp",), link_factory=gateway.link_factory(HOST6), announce_port=None, seed=7
    ) as broker:
        await (await broker.map(9000, "udp")).release()  # PCP is known to answer
        gateway.drop_rate = 1.0
        with pytest.raises(NoAnswer):
            await broker.map(8080, "tcp", lifetime=7200, via="pcp")
        entry = gateway.mapping_for("tcp", 8080)
        assert entry is not None
        assert entry.renewed  # its MAP arrived more than once
        gateway.drop_rate = 0.0
        await trio.sleep(10)  # the cleanup is over
        entry = gateway.mapping_for("tcp", 8080)
        assert entry is None or entry.expires_at <= trio.current_time() + gateway.min_lifetime
        await trio.sleep(gateway.min_lifetime)
        assert gateway.mapping_for("tcp", 8080) is None


@pytest.mark.parametrize("first_names_own", [True, False])
async def test_this_hosts_own_address_and_none_are_one_claim(
    autojump_clock: trio.testing.MockClock, first_names_own: bool
) -> None:
    """Two claims for one gateway entry let a second map renew the first's entry
    under another Mapping; a failed one's cleanup (or a release) then deleted
    the held mapping while it stayed ACTIVE (found by the review)."""
    gateway = FakeGateway()
    async with broker_for(gateway, methods=("pcp",)) as broker:
        (transport,) = broker._method_set.transports.values()
        own = str(transport.link.local_address)
        first, second = (own, None) if first_names_own else (None, own)
        held = await broker.map(8080, "tcp", internal_address=first)
        with pytest.raises(AlreadyMapped):
            await broker.map(8080, "tcp", internal_address=second)
        assert held.state is State.ACTIVE
        assert gateway.mapping_for("tcp", 8080) is not None
