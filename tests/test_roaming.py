"""A broker that follows its gateway (portbroker.roaming, lifecycle rules 12 and 13).

Two FakeGateways in memory (127.0.0.1 and 127.0.0.2: memory links, nothing
is sent anywhere) and a FakeNetwork whose default route the test moves,
under trio's MockClock.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from portbroker.broker import Broker, open_broker
from portbroker.errors import GatewayNotFound
from portbroker.lifecycle import (
    Acquired,
    Delete,
    ExternalAddressChanged,
    Failed,
    Failure,
    FailureKind,
    GatewayChanged,
    Lost,
    MappingLifecycle,
    ReachabilityChanged,
    Recreate,
    Renew,
    Renewed,
    Restored,
    Sleep,
    State,
    Step,
    Trigger,
)
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.testing.fake_network import FakeNetwork
from portbroker.types import IPAddress, Lease, TransportProtocol
from tests.broker_harness import HOUR, Recorder, wait_for

A = IPv4Address("127.0.0.1")
B = IPv4Address("127.0.0.2")


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # $PORTBROKER_GATEWAY would pin the broker (and these tests need it unpinned).
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


def gateways() -> tuple[FakeGateway, FakeGateway]:
    return (
        FakeGateway(address=A, external_address="203.0.113.1"),
        FakeGateway(address=B, external_address="198.51.100.2"),
    )


def links_to(
    *fakes: FakeGateway,
) -> Callable[[IPAddress, int], Awaitable[MemoryLink]]:
    """A link factory that reaches each fake at its own address."""
    by_address = {fake.address: fake for fake in fakes}

    async def factory(address: IPAddress, _port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        return by_address[address].memory_link("192.168.1.100")

    return factory


@asynccontextmanager
async def following(
    network: FakeNetwork, *fakes: FakeGateway, gateway: str | None = None, **kwargs: Any
) -> AsyncIterator[Broker]:
    async with open_broker(
        gateway,
        ("pcp", "natpmp"),
        link_factory=links_to(*fakes),
        announce_port=None,
        seed=7,
        dhcp_leases=(),
        network_monitor=network,
        **kwargs,
    ) as broker:
        yield broker


def on(fake: FakeGateway, port: int = 8080) -> bool:
    return fake.mapping_for("tcp", port) is not None


# -- the broker ----------------------------------------------------------------


async def test_a_route_change_moves_every_mapping_to_the_new_gateway(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker, trio.open_nursery() as nursery:
        assert broker.gateway == A
        moves = broker.gateway_changes()
        first = await broker.map(8080, "tcp")
        second = await broker.map(9000, "udp")
        recorders = [Recorder(), Recorder()]
        for recorder, mapping in zip(recorders, (first, second), strict=True):
            await nursery.start(recorder.run, mapping)
        assert first.external_address == IPv4Address("203.0.113.1")
        network.route_via(B)
        await wait_for(lambda: first.state is State.ACTIVE and first.lease.gateway == B)  # type: ignore[union-attr]
        await wait_for(lambda: second.state is State.ACTIVE and second.lease.gateway == B)  # type: ignore[union-attr]
        assert broker.gateway == B
        assert broker.moves == 1
        assert moves.receive_nowait() == GatewayChanged(A, B)
        # Released on the old gateway, re-created on the new one.
        assert gw_a.mappings == {}
        assert on(gw_b)
        assert gw_b.mapping_for("udp", 9000) is not None
        assert first.external_address == IPv4Address("198.51.100.2")
        kinds = [type(event) for _, event in recorders[0].events]
        assert kinds == [GatewayChanged, Restored, ExternalAddressChanged]
        changed = recorders[0].of(ExternalAddressChanged)[0]
        assert (changed.old_address, changed.lease.gateway) == (IPv4Address("203.0.113.1"), B)
        nursery.cancel_scope.cancel()
    assert gw_b.mappings == {}  # the broker's exit released them where they are


async def test_a_broker_with_no_mappings_still_reports_its_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        moves = broker.gateway_changes()
        network.route_via(B)
        assert await moves.receive() == GatewayChanged(A, B)
        mapping = await broker.map(8080, "tcp")
        assert mapping.lease is not None
        assert mapping.lease.gateway == B
        assert not on(gw_a)


async def test_a_pinned_gateway_never_moves(autojump_clock: trio.testing.MockClock) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(B)  # the route says b; the caller said a
    async with following(network, gw_a, gw_b, gateway=str(A)) as broker:
        mapping = await broker.map(8080, "tcp")
        events = mapping.events()
        network.route_via(A)
        network.route_via(B)
        await trio.sleep(HOUR)
        assert broker.gateway == A
        assert broker.moves == 0
        assert gw_b.requests == []
        assert on(gw_a)
        seen = []
        while True:
            try:
                seen.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        assert seen
        assert not [e for e in seen if isinstance(e, GatewayChanged)]
        assert all(isinstance(e, Renewed) for e in seen)


async def test_a_flapping_route_is_debounced(autojump_clock: trio.testing.MockClock) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b, follow_settle=2.0) as broker:
        await broker.map(8080, "tcp")
        for _ in range(5):  # a failing Wi-Fi roam: b, a, b, a... within the settle time
            network.route_via(B)
            await trio.sleep(0.5)
            network.route_via(A)
            await trio.sleep(0.5)
        await trio.sleep(60)
        assert broker.moves == 0
        assert gw_b.requests == []
        assert on(gw_a)
        for _ in range(3):  # flapping that ends on b: one move, to b
            network.route_via(B)
            await trio.sleep(0.5)
            network.route_via(A)
            await trio.sleep(0.5)
        network.route_via(B)
        await wait_for(lambda: broker.moves == 1 and on(gw_b))
        await trio.sleep(60)
        assert broker.moves == 1
        assert broker.gateway == B
        assert not on(gw_a)


async def test_a_route_change_during_a_move_moves_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp")
        events = mapping.events()
        gw_a.delay = 3.0  # the old gateway takes its time over the delete: the move lasts
        network.route_via(B)
        await wait_for(lambda: broker.gateway == B)
        assert broker.moves == 1
        gw_a.delay = 0.0
        network.route_via(A)  # back, while a's delete is still in flight
        await wait_for(lambda: broker.moves == 2 and mapping.state is State.ACTIVE)
        await wait_for(lambda: mapping.lease is not None and mapping.lease.gateway == A)
        await trio.sleep(60)
        assert broker.gateway == A
        assert broker.moves == 2
        assert on(gw_a)
        assert not on(gw_b)
        moved = []
        while True:
            try:
                event = events.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(event, GatewayChanged):
                moved.append((event.old_gateway, event.new_gateway))
        assert moved == [(A, B), (B, A)]


async def test_a_mapping_made_across_a_move_follows_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    # a answers the map (within the 2 s probe timeout) after the route has
    # moved and settled (0.1 s + 1 s).
    gw_a.delay = 1.5
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker, trio.open_nursery() as nursery:
        made: list[Any] = []
        seen = broker.events()

        async def make() -> None:
            made.append(await broker.map(8080, "tcp"))

        nursery.start_soon(make)
        await trio.sleep(0.1)
        network.route_via(B)
        await wait_for(lambda: bool(made))
        mapping = made[0]
        await wait_for(lambda: mapping.state is State.ACTIVE and on(gw_b))
        assert broker.moves == 1
        assert mapping.lease.gateway == B
        await trio.sleep(10)
        assert not on(gw_a)
        kinds = []
        while True:
            try:
                kinds.append(type(seen.receive_nowait().event))
            except trio.WouldBlock:
                break
        # (203.0.113.1 and 198.51.100.2 are documentation addresses: not public.)
        assert kinds == [
            Acquired,
            ReachabilityChanged,
            GatewayChanged,
            Restored,
            ExternalAddressChanged,
        ]


async def test_a_probe_race_the_move_cut_short_leaves_nothing_on_the_old_gateway(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    gw_a.delay = 3.0  # a makes the mapping, but answers after the 2 s probe timeout
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker, trio.open_nursery() as nursery:
        made: list[Any] = []

        async def make() -> None:
            made.append(await broker.map(8080, "tcp"))

        nursery.start_soon(make)
        await trio.sleep(0.1)
        network.route_via(B)  # moves at 1.1 s, while the first race waits for a
        await wait_for(lambda: bool(made))
        assert made[0].lease.gateway == B
        await trio.sleep(30)
        assert on(gw_b)
        assert not on(gw_a)


async def test_an_unreachable_old_gateway_is_forgotten_after_one_attempt(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp")
        gw_a.drop_rate = 1.0  # a is gone from the path: nothing comes back
        asked = len(gw_a.requests)
        with caplog.at_level(logging.INFO, logger="portbroker"):
            network.route_via(B)
            await wait_for(lambda: mapping.state is State.ACTIVE and on(gw_b))
            await trio.sleep(10)  # the one bounded delete attempt is over
        deletes_then = len(gw_a.requests)
        assert deletes_then > asked  # it was asked (and retransmitted) once
        assert "not deleted on gateway 127.0.0.1, which the broker left" in caplog.text
        assert broker.undeleted() == []  # not retried in the background
        await trio.sleep(2 * HOUR)
        assert len(gw_a.requests) == deletes_then  # never asked again


async def test_a_new_gateway_without_a_method_reports_lost_then_the_way_back_restores(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    gw_b.closed = True  # no PCP, no NAT-PMP: ICMP port unreachable
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(8080, "tcp")
        recorder = Recorder()
        await nursery.start(recorder.run, mapping)
        network.route_via(B)
        await wait_for(lambda: bool(recorder.of(Lost)))
        assert mapping.state is State.LOST
        assert not on(gw_a)  # released on a when the route left it
        assert "re-creation on the new gateway failed" in recorder.of(Lost)[0].reason
        await trio.sleep(600)
        assert not recorder.of(Failed)  # still trying, with the backoff of rule 7
        network.route_via(A)
        await wait_for(lambda: mapping.state is State.ACTIVE)
        assert on(gw_a)
        assert mapping.lease is not None
        assert mapping.lease.gateway == A
        kinds = [type(event) for _, event in recorder.events]
        assert kinds == [GatewayChanged, Lost, GatewayChanged, Restored]
        nursery.cancel_scope.cancel()


async def test_a_link_bounce_on_the_same_gateway_renews_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        events = mapping.events()
        await trio.sleep(600)  # the first renewal is due at 3600 s or later
        asked = len(gw_a.requests)
        network.link("eth0", False)
        await trio.sleep(30)
        assert len(gw_a.requests) == asked  # down: nothing gets through, nothing sent
        network.link("eth0", True)
        renewed = await events.receive()
        assert isinstance(renewed, Renewed)
        assert trio.current_time() - renewed.lease.granted_at < 1
        assert renewed.lease.granted_at < 700
        network.address("eth0", "192.168.1.101", added=True)
        again = await events.receive()
        assert isinstance(again, Renewed)
        assert again.lease.granted_at < 700
        network.link("docker0", True)  # another interface: not the route's
        await trio.sleep(60)
        assert len(gw_a.requests) == asked + 2
        assert broker.moves == 0
        assert gw_b.requests == []


async def test_a_route_back_to_the_same_gateway_re_checks_without_a_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp")
        events = mapping.events()
        await trio.sleep(100)
        network.route_via(None)  # the route goes away (link lost)...
        await trio.sleep(0.2)
        network.route_via(A)  # ...and comes back to the same gateway
        renewed = await events.receive()
        assert isinstance(renewed, Renewed)
        await trio.sleep(60)
        assert broker.moves == 0
        assert gw_b.requests == []


async def test_without_a_default_route_in_the_monitor_there_is_no_gateway() -> None:
    network = FakeNetwork.routed_via(A)
    network.route_via(None)
    with pytest.raises(GatewayNotFound, match="no IPv4 default route"):
        async with following(network):
            pass  # pragma: no cover


async def test_a_delete_retried_on_a_gateway_left_behind_ends_when_its_methods_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    gw_c = FakeGateway(address="127.0.0.3", external_address="192.0.2.33")
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b, gw_c) as broker:
        network.route_via(B)
        await wait_for(lambda: broker.gateway == B)
        mapping = await broker.map(8080, "tcp")
        gw_b.drop_rate = 1.0
        await mapping.release()  # its delete goes unanswered: retried in the background
        assert [lease.gateway for lease in broker.undeleted()] == [B]
        network.route_via(A)
        await wait_for(lambda: broker.gateway == A)
        await trio.sleep(30)
        # b was just left: its methods stay open, the retries go on there.
        assert [lease.gateway for lease in broker.undeleted()] == [B]
        network.route_via(gw_c.address)
        await wait_for(lambda: broker.gateway == gw_c.address)
        asked = len(gw_b.requests)
        await trio.sleep(600)  # the next retry is due within minutes, the lease lasts 2 h
        # b's methods closed with the move to c: the retry gives up, sends nothing.
        assert broker.undeleted() == []
        assert len(gw_b.requests) == asked
        assert gw_c.requests == []  # and nothing meant for b went to c


# -- the lifecycle (rules 12 and 13) ---------------------------------------------------


def lease(gateway: IPAddress = A, port: int = 8080, at: float = 0.0) -> Lease:
    return Lease(
        "pcp",
        TransportProtocol.TCP,
        IPv4Address("192.168.1.100"),
        8080,
        IPv4Address("203.0.113.1") if gateway == A else IPv4Address("198.51.100.2"),
        port,
        3600,
        at,
        gateway,
    )


def active() -> MappingLifecycle:
    machine = MappingLifecycle(random.Random(1))
    machine.fire(Trigger.GRANTED, 0.0, token=0, lease=lease())
    return machine


def test_moved_re_creates_afresh_at_once() -> None:
    machine = active()
    step = machine.fire(Trigger.MOVED, 100.0, old_gateway=A, new_gateway=B)
    assert step.events == [GatewayChanged(A, B)]
    assert isinstance(step.action, Recreate)
    assert step.action.previous is None
    assert machine.state is State.REQUESTING
    done = machine.fire(Trigger.GRANTED, 101.0, token=step.action.token, lease=lease(B, at=101.0))
    assert [type(e) for e in done.events] == [Restored, ExternalAddressChanged]


def test_a_grant_from_before_the_move_is_deleted_quietly() -> None:
    machine = active()
    renewal = machine.fire(Trigger.TIMER, 2000.0, token=machine.token)
    assert isinstance(renewal.action, Renew)
    moved = machine.fire(Trigger.MOVED, 2001.0, old_gateway=A, new_gateway=B)
    assert isinstance(moved.action, Recreate)
    late = machine.fire(Trigger.GRANTED, 2002.0, token=renewal.action.token, lease=lease())
    assert late == Step([], Delete(lease(), machine.token, quiet=True))
    assert machine.state is State.REQUESTING


def test_moved_is_ignored_once_released() -> None:
    machine = active()
    machine.fire(Trigger.DETACH, 10.0)
    assert machine.fire(Trigger.MOVED, 11.0, old_gateway=A, new_gateway=B) == Step([], None)


def test_network_changed_renews_an_active_mapping_now_but_not_within_4_s_of_its_grant() -> None:
    machine = active()
    early = machine.fire(Trigger.NETWORK_CHANGED, 1.0)
    assert isinstance(early.action, Sleep)
    assert early.action.until == 4.0
    assert machine.state.value == "active"
    now = machine.fire(Trigger.NETWORK_CHANGED, 100.0)
    assert isinstance(now.action, Renew)
    assert machine.state.value == "renewing"
    # With the renewal in flight it waits for the answer.
    assert machine.fire(Trigger.NETWORK_CHANGED, 101.0) == Step([], None)


def test_network_changed_cuts_a_lost_mappings_backoff_short() -> None:
    machine = active()
    lost = machine.fire(Trigger.STATE_LOST, 100.0, reason="reboot")
    assert isinstance(lost.action, Sleep)
    retry = machine.fire(Trigger.TIMER, lost.action.until, token=lost.action.token)
    assert isinstance(retry.action, Recreate)
    failed = machine.fire(
        Trigger.FAILED, 110.0, token=retry.action.token, failure=Failure(FailureKind.SILENT, "x")
    )
    assert isinstance(failed.action, Sleep)
    assert failed.action.until > 111.0
    now = machine.fire(Trigger.NETWORK_CHANGED, 111.0)
    assert isinstance(now.action, Sleep)
    assert now.action.until == 111.0


# -- the command -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "follows"),
    [
        (["map", "8080/tcp", "--hold"], True),
        (["peer", "5000/udp", "--remote", "192.0.2.9:7000", "--hold"], True),
        (["map", "8080/tcp", "--hold", "--gateway", "127.0.0.1"], False),  # pinned
        (["map", "8080/tcp", "--hold", "--no-follow"], False),
        (["map", "8080/tcp"], False),  # exits at once: nothing to follow
        (["map", "8080/tcp", "--hold", "--outer-gateway", "127.0.0.9"], False),
        (["probe"], False),
    ],
)
def test_which_commands_follow_the_default_route(argv: list[str], follows: bool) -> None:
    from portbroker import cli

    assert cli._follows(cli._parser().parse_args(argv)) is follows


def test_watch_shows_both_gateways_of_a_move() -> None:
    from portbroker import cli

    line = cli._describe_watch_event(
        {
            "event": "GatewayChanged",
            "mapping": {"id": "8080/tcp", "state": "requesting", "owner_uid": 0, "holders": 1},
            "detail": {"old_gateway": "192.168.77.1", "new_gateway": "192.168.77.254"},
        }
    )
    assert line == (
        "GatewayChanged: 8080/tcp -> requesting (uid 0, 1 holder(s));"
        " gateway 192.168.77.1 -> 192.168.77.254"
    )


# -- the lab's two-gateway lan (no namespaces needed for these) -------------------------


def test_the_labs_roaming_moves_a_route_only_to_its_own_gateways(tmp_path: Path) -> None:
    from portbroker.testing.lab import (
        ROAMING_B_GATEWAY_ADDRESS,
        Lab,
        LabError,
        Roaming,
        Variant,
    )

    a = Lab(Variant.FULL, "aaaaaa", tmp_path)
    b = Lab(Variant.FULL, "bbbbbb", tmp_path, lan_gateway=ROAMING_B_GATEWAY_ADDRESS)
    assert (a.gateway_address, b.gateway_address) == (
        IPv4Address("192.168.77.1"),
        IPv4Address("192.168.77.254"),
    )
    roaming = Roaming(a, b, "pb-sw-x", "pb-wan-x", IPv4Address("11.0.0.2"))
    with pytest.raises(LabError, match=r"roaming\.a or roaming\.b"):
        roaming.use_gateway(Lab(Variant.FULL, "cccccc", tmp_path))
