"""The network monitor: snapshots, their differences, settling, sources (MockClock, fakes)."""

from __future__ import annotations

import errno
import json
import socket
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from portbroker import netmon
from portbroker import netmon_wire as wire
from portbroker.netmon import (
    Address,
    AddressAdded,
    AddressRemoved,
    DefaultRoute,
    Link,
    LinkDown,
    LinkUp,
    NetlinkSource,
    NetworkSnapshot,
    RouteChanged,
    Settler,
    changes_between,
    open_network_monitor,
)

CAPTURE = json.loads((Path(__file__).parent / "data/rtnetlink/capture.json").read_text())

HOME = NetworkSnapshot(
    routes=[DefaultRoute(4, IPv4Address("192.168.1.1"), "wlan0", 600)],
    addresses=[Address("wlan0", IPv4Address("192.168.1.20"), 24)],
    links=[Link("lo", True), Link("wlan0", True)],
)
OFFICE = NetworkSnapshot(
    routes=[DefaultRoute(4, IPv4Address("10.1.0.1"), "wlan0", 600)],
    addresses=[Address("wlan0", IPv4Address("10.1.0.77"), 16)],
    links=[Link("lo", True), Link("wlan0", True)],
)


def test_a_captured_dump_becomes_a_snapshot_without_tentative_addresses() -> None:
    records = [
        r
        for name in ("dump_link", "dump_addr", "dump_route")
        for chunk in CAPTURE[name]
        for r in wire.parse_messages(bytes.fromhex(chunk))
    ]
    snapshot = netmon.snapshot_from_records(records)
    assert snapshot.routes == (
        DefaultRoute(4, IPv4Address("10.9.0.1"), "d0", 0),
        DefaultRoute(6, IPv6Address("fd09::1"), "d0", 1024),
    )
    assert snapshot.addresses == {
        Address("lo", IPv4Address("127.0.0.1"), 8),
        Address("lo", IPv6Address("::1"), 128),
        Address("d0", IPv4Address("10.9.0.2"), 24),
        Address("d0", IPv6Address("fd09::2"), 64),
    }
    assert snapshot.links == {Link("lo", True), Link("d0", True), Link("d1", True)}
    assert snapshot.default_gateway(6) == IPv6Address("fd09::1")


def test_the_default_route_is_the_one_with_the_lowest_metric() -> None:
    snapshot = NetworkSnapshot(
        routes=[
            DefaultRoute(4, IPv4Address("10.0.0.1"), "eth0", 600),
            DefaultRoute(4, IPv4Address("10.8.0.1"), "tun0", 50),
        ]
    )
    assert snapshot.default_gateway(4) == IPv4Address("10.8.0.1")
    assert snapshot.default_route(6) is None
    assert snapshot.default_gateway(6) is None


def test_moving_networks_is_removal_then_addition_then_the_route() -> None:
    assert changes_between(HOME, OFFICE) == (
        AddressRemoved("wlan0", IPv4Address("192.168.1.20"), 24),
        AddressAdded("wlan0", IPv4Address("10.1.0.77"), 16),
        RouteChanged(4, IPv4Address("192.168.1.1"), IPv4Address("10.1.0.1"), "wlan0", "wlan0"),
    )


def test_the_same_snapshot_is_no_change() -> None:
    assert changes_between(HOME, attrs.evolve(HOME)) == ()


def test_a_link_going_down_with_its_route_and_address() -> None:
    down = NetworkSnapshot(links=[Link("lo", True), Link("wlan0", False)])
    assert changes_between(HOME, down) == (
        LinkDown("wlan0"),
        AddressRemoved("wlan0", IPv4Address("192.168.1.20"), 24),
        RouteChanged(4, IPv4Address("192.168.1.1"), None, "", "wlan0"),
    )
    assert changes_between(down, HOME)[0] == LinkUp("wlan0")


def test_an_interface_that_vanishes_is_down_and_one_that_appears_up_is_up() -> None:
    with_vpn = attrs.evolve(HOME, links=[*HOME.links, Link("wg0", True)])
    assert changes_between(HOME, with_vpn) == (LinkUp("wg0"),)
    assert changes_between(with_vpn, HOME) == (LinkDown("wg0"),)


def test_a_backup_route_coming_and_going_is_no_route_change() -> None:
    backup = DefaultRoute(4, IPv4Address("192.168.1.254"), "wlan0", 900)
    assert changes_between(HOME, attrs.evolve(HOME, routes=[*HOME.routes, backup])) == ()


def test_a_vpn_taking_the_default_route_without_a_gateway_is_a_route_change() -> None:
    vpn = attrs.evolve(HOME, routes=[*HOME.routes, DefaultRoute(4, None, "wg0", 10)])
    assert changes_between(HOME, vpn) == (
        RouteChanged(4, IPv4Address("192.168.1.1"), None, "wg0", "wlan0"),
    )


def test_ipv6_route_changes_follow_ipv4_ones() -> None:
    after = attrs.evolve(
        OFFICE, routes=[*OFFICE.routes, DefaultRoute(6, IPv6Address("fe80::1"), "wlan0", 1024)]
    )
    changes = changes_between(HOME, after)
    assert [type(c) for c in changes[-2:]] == [RouteChanged, RouteChanged]
    assert changes[-1] == RouteChanged(6, None, IPv6Address("fe80::1"), "wlan0", "")


# -- Settler ----------------------------------------------------------------------


def test_a_burst_settles_a_quiet_interval_after_its_last_poke() -> None:
    settler = Settler(quiet=1.0, max_delay=5.0)
    assert settler.deadline() is None
    assert not settler.take(100.0)
    settler.poke(10.0)
    settler.poke(10.6)
    assert settler.deadline() == pytest.approx(11.6)
    assert not settler.take(11.5)
    assert settler.take(11.6)
    assert settler.deadline() is None


def test_a_burst_that_never_stops_settles_at_max_delay() -> None:
    settler = Settler(quiet=1.0, max_delay=3.0)
    for tick in range(10):
        settler.poke(10.0 + tick * 0.5)
    assert settler.deadline() == pytest.approx(13.0)


@pytest.mark.parametrize(("quiet", "max_delay"), [(-1.0, 5.0), (2.0, 1.0), (float("nan"), 1.0)])
def test_settler_refuses_nonsense_intervals(quiet: float, max_delay: float) -> None:
    with pytest.raises(ValueError, match=r"quiet|max_delay"):
        Settler(quiet, max_delay)


# -- the monitor, on a scripted source -------------------------------------------


@attrs.define
class ScriptedSource:
    """A source whose state the test sets; every set pokes."""

    state: NetworkSnapshot
    snapshots_taken: int = 0
    overruns: int = 0
    _poke: Callable[[], None] | None = None

    async def snapshot(self) -> NetworkSnapshot:
        self.snapshots_taken += 1
        return self.state

    async def watch(
        self,
        poke: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._poke = poke
        task_status.started()
        await trio.sleep_forever()

    def set(self, state: NetworkSnapshot) -> None:
        self.state = state
        assert self._poke is not None
        self._poke()


async def test_a_burst_of_kernel_messages_is_reported_once_after_it_settles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(HOME)
    no_address = attrs.evolve(HOME, addresses=[])
    async with open_network_monitor(quiet=1.0, source=source) as monitor:
        start = trio.current_time()
        # DHCP moving the lease: the old address goes, the route goes, then the new ones.
        for state in (no_address, attrs.evolve(no_address, routes=[]), OFFICE):
            source.set(state)
            await trio.sleep(0.3)
        batch = await monitor.next_batch()
        assert trio.current_time() - start == pytest.approx(0.6 + 1.0)
        assert batch.before == HOME
        assert batch.after == OFFICE
        assert batch.changes == changes_between(HOME, OFFICE)
        assert monitor.snapshot() == OFFICE
        assert source.snapshots_taken == 2  # the first one, then one after the burst


async def test_a_change_undone_within_the_quiet_interval_is_not_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(HOME)
    async with open_network_monitor(quiet=1.0, source=source) as monitor:
        source.set(OFFICE)
        await trio.sleep(0.5)
        source.set(HOME)  # the flap is over before it settled
        await trio.sleep(5)
        source.set(attrs.evolve(HOME, links=[*HOME.links, Link("wg0", True)]))
        change = await anext(monitor)
        assert change == LinkUp("wg0")


async def test_a_network_that_never_settles_is_still_reported_after_max_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(HOME)
    async with open_network_monitor(quiet=1.0, max_delay=4.0, source=source) as monitor:
        start = trio.current_time()

        async def flap() -> None:
            while True:
                source.set(OFFICE)
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flap)
            batch = await monitor.next_batch()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start == pytest.approx(4.0)
        assert batch.after == OFFICE


async def test_a_slow_consumer_gets_the_net_difference_from_what_it_last_saw(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(HOME)
    with_vpn = attrs.evolve(OFFICE, links=[*OFFICE.links, Link("wg0", True)])
    async with open_network_monitor(quiet=1.0, source=source) as monitor:
        source.set(OFFICE)
        await trio.sleep(3)  # settled and waiting to be taken
        source.set(with_vpn)
        await trio.sleep(3)
        source.set(HOME)  # and back home, all while nobody was reading
        await trio.sleep(3)
        first = await monitor.next_batch()
        second = await monitor.next_batch()
        assert (first.before, first.after) == (HOME, OFFICE)
        # OFFICE -> HOME directly: the VPN came and went unseen.
        assert (second.before, second.after) == (OFFICE, HOME)
        assert second.changes == changes_between(OFFICE, HOME)


# -- the netlink source's reading loop ------------------------------------------


class _FakeNetlink:
    """A socket whose recvfrom() plays a script; readable through a socketpair."""

    def __init__(self, script: list[tuple[bytes, int] | OSError]) -> None:
        self._script = script
        self._reader, self._writer = socket.socketpair()
        self._writer.send(b"x")

    def fileno(self) -> int:
        return self._reader.fileno()

    def recvfrom(self, _size: int) -> tuple[bytes, tuple[int, int]]:
        if not self._script:
            self._reader.recv(1)  # no longer readable: the test has seen it all
            raise BlockingIOError
        step = self._script.pop(0)
        if isinstance(step, OSError):
            raise step
        data, sender = step
        return data, (sender, 0)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


async def _pokes_from(script: list[tuple[bytes, int] | OSError]) -> tuple[int, int]:
    source = NetlinkSource()
    fake = _FakeNetlink(script)
    source._socket = fake  # type: ignore[assignment]
    pokes = 0

    def poke() -> None:
        nonlocal pokes
        pokes += 1

    try:
        with trio.move_on_after(0.5):
            await source.watch(poke)
    finally:
        fake.close()
    return pokes, source.overruns


async def test_an_overflowed_netlink_socket_is_counted_and_pokes_for_a_resync() -> None:
    link = wire.encode_link(wire.LinkRecord(wire.Change.NEW, 3, "eth0", 0))
    pokes, overruns = await _pokes_from([OSError(errno.ENOBUFS, "No buffer space"), (link, 0)])
    assert (pokes, overruns) == (2, 1)


async def test_messages_not_from_the_kernel_are_ignored() -> None:
    link = wire.encode_link(wire.LinkRecord(wire.Change.NEW, 3, "eth0", 0))
    assert await _pokes_from([(link, 4242)]) == (0, 0)


async def test_a_non_default_route_does_not_poke_but_a_default_one_does() -> None:
    def route(dst_len: int) -> bytes:
        return wire.encode_route(
            wire.RouteRecord(wire.Change.NEW, wire.AF_INET, dst_len, 254, 1, 0, None, 3, 0)
        )

    assert await _pokes_from([(route(8), 0)]) == (0, 0)
    assert await _pokes_from([(route(0), 0)]) == (1, 0)


async def test_another_netlink_error_is_raised() -> None:
    with pytest.raises(OSError, match="boom"):
        await _pokes_from([OSError(errno.EBADF, "boom")])


def test_a_refused_dump_is_a_network_monitor_error() -> None:
    dump = netmon._Dump()
    refused = wire._message(wire.NLMSG_ERROR, b"\xff\xff\xff\xff", seq=1)
    with pytest.raises(netmon.NetworkMonitorError, match="refused"):
        dump.feed(refused)


def test_an_interrupted_dump_is_taken_again() -> None:
    dump = netmon._Dump()
    dump.feed(wire.encode_done(1, interrupted=True))
    assert dump.interrupted
    assert dump.request() == wire.dump_request(wire.RTM_GETADDR, 2)


# -- polling ---------------------------------------------------------------------


def test_proc_routes_give_the_default_routes_of_both_families(tmp_path: Path) -> None:
    (tmp_path / "route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    )
    (tmp_path / "ipv6_route").write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n"
    )
    assert netmon._proc_default_routes(tmp_path) == [
        DefaultRoute(4, IPv4Address("192.168.1.1"), "eth0", 100),
        DefaultRoute(6, IPv6Address("fe80::1%eth0"), "eth0", 1024),  # scoped, as gateway.py
    ]


def test_no_proc_means_no_routes(tmp_path: Path) -> None:
    assert netmon._proc_default_routes(tmp_path / "missing") == []


async def test_polling_pokes_when_a_poll_differs(autojump_clock: trio.testing.MockClock) -> None:
    states = iter([HOME, HOME, OFFICE, OFFICE, OFFICE])
    source = netmon.PollingSource(2.0, read=lambda: next(states, OFFICE))
    pokes: list[float] = []
    with trio.move_on_after(9):
        await source.watch(lambda: pokes.append(trio.current_time()))
    assert pokes == [pytest.approx(4.0)]


@pytest.mark.skipif(sys.platform != "linux", reason="rtnetlink is Linux's")
def test_netlink_and_the_polling_fallback_agree_on_this_host() -> None:
    # Read-only: dumps of this namespace's state and getifaddrs(3); nothing is
    # sent. Lab tests beside this one may change the namespace between the
    # reads: only a poll between two equal dumps is compared.
    for _attempt in range(10):
        by_netlink = netmon.current_snapshot()
        by_polling = netmon.polled_snapshot()
        if netmon.current_snapshot() == by_netlink:
            break
    assert by_netlink.routes == by_polling.routes
    assert by_netlink.addresses == by_polling.addresses
    # getifaddrs sees only links with addresses, and up means IFF_UP alone there.
    assert {link.interface for link in by_polling.links} <= {
        link.interface for link in by_netlink.links
    }


def test_changes_print_as_json_with_addresses_as_text() -> None:
    change = RouteChanged(4, IPv4Address("10.0.0.1"), None, "", "eth0")
    assert netmon._change_json(change) == {
        "change": "RouteChanged",
        "family": 4,
        "old_gateway": "10.0.0.1",
        "new_gateway": None,
        "interface": "",
        "old_interface": "eth0",
    }


@attrs.define
class FlakySource(ScriptedSource):
    """A scripted source whose next read fails *failing* times first."""

    failing: int = 0

    async def snapshot(self) -> NetworkSnapshot:
        if self.snapshots_taken and self.failing:
            self.failing -= 1
            raise netmon.NetworkMonitorError(errno.ETIMEDOUT, "no answer")
        return await super().snapshot()


async def test_a_failed_read_is_retried_after_another_quiet_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = FlakySource(HOME, failing=2)
    async with open_network_monitor(quiet=1.0, source=source) as monitor:
        start = trio.current_time()
        source.set(OFFICE)
        batch = await monitor.next_batch()
        assert batch.after == OFFICE
        assert trio.current_time() - start == pytest.approx(3.0)
        assert monitor.failures == 2
    assert "reading the network failed" in caplog.text


def test_the_command_says_what_failed_when_the_network_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def refused() -> NetworkSnapshot:
        raise netmon.NetworkMonitorError(errno.EPERM, "the kernel refused a netlink dump: 1")

    monkeypatch.setattr(netmon, "_netlink_dump", refused)
    monkeypatch.setattr(netmon.PollingSource, "snapshot", lambda self: refused())
    assert netmon.main([]) == 1
    assert capsys.readouterr().err == (
        "python -m portbroker.netmon: cannot read the network: "
        "[Errno 1] the kernel refused a netlink dump: 1\n"
    )


def test_ctrl_c_ends_the_command_quietly_with_status_0() -> None:
    """SIGINT comes out of the monitor's nursery in an exception group: it used
    to end the command with a traceback and status 1."""
    import signal
    import subprocess
    import sys

    from tests.lab.helpers import lines_of, stop_read_process

    process = subprocess.Popen(
        [sys.executable, "-m", "portbroker.netmon", "--poll"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "snapshot" in (lines_of(process).next(30) or "")
    err = stop_read_process(process, signal.SIGINT, timeout=10)
    assert (process.returncode, err) == (0, "")


def test_the_command_refuses_a_negative_quiet_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        netmon.main(["--quiet", "-1"])
    assert exit_.value.code == 2
    assert "--quiet must be a non-negative number of seconds" in capsys.readouterr().err
