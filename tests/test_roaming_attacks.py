"""Adversarial cases for following the default route (issue 11 review).

Same setting as tests/test_roaming.py: two FakeGateways on memory links
(127.0.0.1, 127.0.0.2 — nothing leaves the process), a FakeNetwork the
test moves, trio's MockClock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from portbroker.lifecycle import ExternalAddressChanged, GatewayChanged, Restored, State
from portbroker.netmon import NetworkChange, NetworkSnapshot
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_network import FakeNetwork
from tests.broker_harness import Recorder, wait_for
from tests.test_roaming import A, B, following, gateways, on


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


@pytest.mark.parametrize("delay", [0.0, 0.7])
async def test_a_route_flapping_slower_than_the_settle_time_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock, delay: float
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mappings = [await broker.map(8080 + i, "tcp") for i in range(3)]
        # delay: both answer slowly, so the moves overlap their creates and deletes
        gw_a.delay = gw_b.delay = delay
        for flip in range(55):  # every 1.1 s for a minute: each one settles
            network.route_via(B if flip % 2 == 0 else A)
            await trio.sleep(1.1)
        await trio.sleep(30)
        home = gw_a if broker.gateway == A else gw_b
        away = gw_b if home is gw_a else gw_a
        for mapping in mappings:
            assert mapping.state is State.ACTIVE
            assert mapping.lease is not None
            assert mapping.lease.gateway == broker.gateway
        assert len(home.mappings) == 3
        assert away.mappings == {}
        assert len(broker._gateways_held) <= 2  # no methods pile up per move
        # Bounded: a move costs a create per mapping and a delete per
        # mapping left behind, a few retries at most.
        print(
            "flapping:", broker.moves, "moves,", len(gw_a.requests) + len(gw_b.requests), "requests"
        )
        assert len(gw_a.requests) + len(gw_b.requests) < 55 * 3 * 2 * 2
    assert gw_a.mappings == {}
    assert gw_b.mappings == {}


async def test_a_new_gateway_with_the_same_external_address_says_moved_and_restored_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a = FakeGateway(address=A, external_address="203.0.113.1")
    gw_b = FakeGateway(address=B, external_address="203.0.113.1")  # two routers, one uplink
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(8080, "tcp")
        recorder = Recorder()
        await nursery.start(recorder.run, mapping)
        network.route_via(B)
        await wait_for(lambda: mapping.lease is not None and mapping.lease.gateway == B)
        await trio.sleep(30)
        kinds = [type(event) for _, event in recorder.events]
        assert kinds == [GatewayChanged, Restored]
        assert not recorder.of(ExternalAddressChanged)
        assert gw_a.mappings == {}
        nursery.cancel_scope.cancel()


async def test_leaving_mid_move_deletes_every_mapping_on_both_gateways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        for i in range(4):
            await broker.map(8080 + i, "tcp")
        gw_a.delay = 0.5  # the old gateway's deletes are in flight
        gw_b.delay = 0.5  # and so are the new one's creates
        network.route_via(B)
        await wait_for(lambda: broker.gateway == B)
        await trio.sleep(0.2)
        # the app exits now
    await trio.sleep(10)
    assert gw_a.mappings == {}
    assert gw_b.mappings == {}


async def test_a_move_while_a_peer_is_held_moves_the_peer_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        peer = await broker.peer(8080, "tcp", remote=("192.0.2.7", 443))
        network.route_via(B)
        await wait_for(lambda: peer.lease is not None and peer.lease.gateway == B)
        await trio.sleep(30)
        assert peer.state is State.ACTIVE
        remote = ("192.0.2.7", 443)
        assert gw_a.peer_for("tcp", 8080, remote) is None
        assert gw_b.peer_for("tcp", 8080, remote) is not None
    assert gw_a.peer_for("tcp", 8080, remote) is None
    assert gw_b.peer_for("tcp", 8080, remote) is None


class _DyingWatch:
    """A network watch whose stream fails (the netlink socket broke)."""

    def __init__(self, inner: FakeNetwork, fail_after: float) -> None:
        self.inner = inner
        self.fail_after = fail_after

    def snapshot(self) -> NetworkSnapshot:
        return self.inner.snapshot()

    def __aiter__(self) -> AsyncIterator[NetworkChange]:
        return self._run()

    async def _run(self) -> AsyncIterator[NetworkChange]:
        await trio.sleep(self.fail_after)
        raise OSError(9, "Bad file descriptor")
        yield  # type: ignore[unreachable]  # (makes this an async generator)


async def test_the_monitor_failing_does_not_take_the_app_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    caplog.set_level(logging.WARNING, "portbroker")
    async with following_watch(_DyingWatch(network, 5.0), gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp")
        await trio.sleep(60)
        assert mapping.state is State.ACTIVE
    assert "network" in caplog.text
    assert "Bad file descriptor" in caplog.text


def following_watch(watch: Any, *fakes: FakeGateway) -> Any:
    from portbroker.broker import open_broker
    from tests.test_roaming import links_to

    return open_broker(
        None,
        ("pcp", "natpmp"),
        link_factory=links_to(*fakes),
        announce_port=None,
        seed=7,
        dhcp_leases=(),
        network_monitor=watch,
    )


async def test_the_hosts_monitor_breaking_is_reopened_and_a_move_in_between_followed(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # broker._follow's own monitor, replaced: nothing reads the host's routes.
    import contextlib

    import portbroker.netmon

    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    opened: list[str] = []

    @contextlib.asynccontextmanager
    async def monitors(**_kwargs: Any) -> AsyncIterator[Any]:
        opened.append("monitor")
        if len(opened) == 1:
            async with trio.open_nursery() as nursery:

                async def socket_breaks() -> None:
                    await trio.sleep(5)
                    raise OSError(9, "Bad file descriptor")

                nursery.start_soon(socket_breaks)
                yield network
        else:  # the route moved to b while nothing watched
            yield FakeNetwork.routed_via(B)

    monkeypatch.setattr(portbroker.netmon, "open_network_monitor", monitors)
    monkeypatch.setattr("portbroker.broker.resolve_gateway", lambda _gateway: A)
    caplog.set_level(logging.WARNING, "portbroker")
    from portbroker.broker import open_broker
    from tests.test_roaming import links_to

    async with open_broker(
        None,
        ("pcp", "natpmp"),
        link_factory=links_to(gw_a, gw_b),
        announce_port=None,
        seed=7,
        dhcp_leases=(),
        follow=True,
    ) as broker:
        mapping = await broker.map(8080, "tcp")
        await trio.sleep(6)  # the first monitor broke
        await wait_for(lambda: mapping.lease is not None and mapping.lease.gateway == B)
        assert opened == ["monitor", "monitor"]
        assert broker.moves == 1
        assert not on(gw_a)
        assert on(gw_b)
    assert "Bad file descriptor" in caplog.text


@pytest.mark.parametrize("refusal", ["not-authorized", "silent"])
async def test_an_old_gateway_refusing_deletes_costs_one_attempt_each(
    autojump_clock: trio.testing.MockClock, refusal: str
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mappings = [await broker.map(8080 + i, "tcp") for i in range(3)]
        if refusal == "silent":
            gw_a.silent_deletes = True
        else:
            gw_a.forced_result = 2  # NOT_AUTHORIZED, to every request
        before = len(gw_a.requests)
        network.route_via(B)
        await wait_for(lambda: all(m.lease is not None and m.lease.gateway == B for m in mappings))
        await trio.sleep(600)
        assert all(m.state is State.ACTIVE for m in mappings)
        assert len(gw_b.mappings) == 3
        # One bounded attempt per lease left behind (a few retransmissions
        # of it at most), then forgotten: no retry loop at the old gateway.
        assert 3 <= len(gw_a.requests) - before <= 3 * 5
        settled = len(gw_a.requests)
        await trio.sleep(3600)
        assert len(gw_a.requests) == settled
    assert gw_b.mappings == {}


async def test_a_gateway_pinned_by_the_environment_never_moves(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORTBROKER_GATEWAY", str(A))
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        await broker.map(8080, "tcp")
        for flip in range(6):
            network.route_via(B if flip % 2 == 0 else A)
            await trio.sleep(10)
        network.route_via(B)
        await trio.sleep(60)
        assert broker.gateway == A
        assert broker.moves == 0
        assert on(gw_a)
        assert gw_b.requests == []


async def test_a_third_party_mapping_moves_with_its_internal_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp", internal_address="192.168.1.50")
        network.route_via(B)
        await wait_for(lambda: mapping.lease is not None and mapping.lease.gateway == B)
        await trio.sleep(30)
        assert gw_a.mappings == {}
        (key,) = gw_b.mappings
        assert "192.168.1.50" in str(key)
    assert gw_b.mappings == {}


async def test_the_monitor_breaking_mid_move_still_deletes_what_the_move_left_behind(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import portbroker.netmon

    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    breaks = trio.Event()

    @contextlib.asynccontextmanager
    async def monitors(**_kwargs: Any) -> AsyncIterator[Any]:
        async with trio.open_nursery() as nursery:

            async def socket_breaks() -> None:
                await breaks.wait()
                raise OSError(9, "Bad file descriptor")

            nursery.start_soon(socket_breaks)
            yield network

    monkeypatch.setattr(portbroker.netmon, "open_network_monitor", monitors)
    monkeypatch.setattr("portbroker.broker.resolve_gateway", lambda _gateway: A)
    from portbroker.broker import open_broker
    from tests.test_roaming import links_to

    async with open_broker(
        None,
        ("pcp", "natpmp"),
        link_factory=links_to(gw_a, gw_b),
        announce_port=None,
        seed=7,
        dhcp_leases=(),
        follow=True,
    ) as broker:
        mappings = [await broker.map(8080 + i, "tcp") for i in range(3)]
        gw_a.delay = 1.0  # the deletes on the old gateway are in flight...
        network.route_via(B)
        await wait_for(lambda: broker.gateway == B)
        await trio.sleep(0.2)
        breaks.set()  # ...when the monitor's socket fails
        await trio.sleep(30)
        assert all(m.lease is not None and m.lease.gateway == B for m in mappings)
        assert gw_a.mappings == {}
        assert len(gw_b.mappings) == 3


async def test_container_chatter_while_offline_does_not_re_check_the_mappings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A, "wlan0")
    async with following(network, gw_a, gw_b) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7200)
        network.route_via(None)  # Wi-Fi lost: no default route
        await trio.sleep(10)
        before = len(gw_a.requests)
        for i in range(30):  # a container restarting in a loop meanwhile
            network.link(f"veth{i}", True)
            network.address(f"veth{i}", f"172.17.0.{i + 2}", 16, added=True)
            await trio.sleep(2)
            network.link(f"veth{i}", False)
            await trio.sleep(2)
        # Its links and addresses are not the way to any gateway: nothing to re-check.
        assert len(gw_a.requests) == before
        network.link("wlan0", False)
        await trio.sleep(2)
        network.link("wlan0", True)  # the Wi-Fi's own link is: it re-checks
        await wait_for(lambda: len(gw_a.requests) > before)
        assert mapping.state is State.ACTIVE


async def test_an_ipv6_only_host_does_not_move_off_its_link_local_router(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RFC 4861 routers are link-local: gateway.py names the router with its
    # interface (fe80::1%eth0), and so must the monitor, or the two never
    # agree and the broker "moves" to an unscoped fe80::1 no socket reaches.
    import contextlib
    from ipaddress import IPv6Address

    import portbroker.netmon
    from portbroker import netmon_wire as nl
    from portbroker.netmon import snapshot_from_records

    router = IPv6Address("fe80::1%eth0")
    fake = FakeGateway(address=router, external_address="2001:db8::1")
    records: list[nl.Record] = [
        nl.LinkRecord(nl.Change.NEW, 2, "eth0", nl.IFF_UP | nl.IFF_RUNNING),
        nl.RouteRecord(
            nl.Change.NEW,
            nl.AF_INET6,
            0,
            nl.RT_TABLE_MAIN,
            nl.RTN_UNICAST,
            0,
            IPv6Address("fe80::1"),
            2,
            1024,
        ),
    ]
    network = FakeNetwork(snapshot_from_records(records))
    assert network.snapshot().default_gateway(6) == router

    @contextlib.asynccontextmanager
    async def monitors(**_kwargs: Any) -> AsyncIterator[Any]:
        yield network

    monkeypatch.setattr(portbroker.netmon, "open_network_monitor", monitors)
    monkeypatch.setattr("portbroker.broker.resolve_gateway", lambda _gateway: router)
    from portbroker.broker import open_broker

    reached: list[Any] = []

    async def link(address: Any, _port: int) -> Any:
        await trio.lowlevel.checkpoint()
        reached.append(address)
        return fake.memory_link("fe80::100")

    async with open_broker(
        None, ("pcp",), link_factory=link, announce_port=None, seed=7, dhcp_leases=(), follow=True
    ) as broker:
        await trio.sleep(30)
        assert broker.moves == 0
        assert broker.gateway == router
        assert set(reached) == {router}  # never an unscoped fe80::1
