"""The network monitor: default-route, address and link changes, settled (docs/roaming.md).

One seam, trio-friendly::

    async with open_network_monitor() as monitor:
        print(monitor.snapshot().default_gateway(4))
        async for change in monitor:      # RouteChanged, AddressAdded, ...
            ...

What comes out is computed from two snapshots — the one the consumer last
saw and a fresh one taken after the network has been quiet for *quiet*
seconds — never by replaying kernel messages. A DHCP renewal, a Wi-Fi roam
or a VPN coming up sends a burst of messages (and the kernel does not even
announce every consequence: IPv4 routes flushed by a link going down get no
RTM_DELROUTE); the consumer gets the net difference once. A network that
never goes quiet is still reported every *max_delay* seconds.

Where the changes come from (:class:`NetlinkSource`, :class:`PollingSource`):

- **Linux: rtnetlink**, read by a small reader of our own
  (:mod:`portbroker.netmon_wire`, sans-IO, fuzzed) on an ``AF_NETLINK``
  socket subscribed to ``RTMGRP_LINK``, ``RTMGRP_IPV4_IFADDR``,
  ``RTMGRP_IPV6_IFADDR``, ``RTMGRP_IPV4_ROUTE`` and ``RTMGRP_IPV6_ROUTE``;
  snapshots are ``RTM_GETLINK`` / ``RTM_GETADDR`` / ``RTM_GETROUTE`` dumps on
  a second socket. A kernel message only says "something changed"; the dump
  says what. ``ENOBUFS`` (the socket's buffer overflowed: messages were
  lost) is therefore harmless: it counts as a change, and the next dump
  resyncs (:attr:`NetworkMonitor.overruns` counts them).

  Why not pyroute2 (0.9.7, maintained, the usual choice): it is 5.3 MB and
  ~54,000 lines, ``import pyroute2`` took 0.25-0.5 s here (the whole CLI
  through the daemon takes ~90 ms), and its async API is built on asyncio,
  so under trio it would need a thread and a second event loop. The monitor
  needs five message types and a dozen attributes: ~300 lines (and 50 of
  encoders for tests), no dependency, parsed without I/O so tests feed it
  bytes.

- **Elsewhere, or when netlink is unavailable: polling.** Every
  *poll_interval* seconds a snapshot is taken — addresses and links from
  ``getifaddrs(3)`` (:func:`portbroker.p2p.interface_addresses`), default
  routes from ``/proc/net/route`` and ``/proc/net/ipv6_route`` where they
  exist (Linux without netlink). On macOS and the BSDs polling sees no
  routes (the routing socket is not read yet): a roaming laptop still shows
  up as address and link changes.

Only the main routing table's default routes count: a VPN that steers
traffic with a policy rule and a table of its own (WireGuard's ``wg-quick``,
Tailscale) is seen through its addresses and link, not as a route change.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

import attrs
import trio

from portbroker import netmon_wire as wire
from portbroker.wire._fields import IPAddress

__all__ = [
    "Address",
    "AddressAdded",
    "AddressRemoved",
    "DefaultRoute",
    "Link",
    "LinkDown",
    "LinkUp",
    "NetlinkSource",
    "NetworkChange",
    "NetworkChanged",
    "NetworkMonitor",
    "NetworkMonitorError",
    "NetworkSnapshot",
    "PollingSource",
    "RouteChanged",
    "Settler",
    "changes_between",
    "current_snapshot",
    "open_network_monitor",
    "snapshot_from_records",
]

logger = logging.getLogger("portbroker")

DEFAULT_QUIET: Final = 1.0
DEFAULT_MAX_DELAY: Final = 5.0
DEFAULT_POLL_INTERVAL: Final = 5.0
_DUMP_TIMEOUT: Final = 5.0
_DUMP_ATTEMPTS: Final = 5


class NetworkMonitorError(OSError):
    """The kernel's network state could not be read (netlink refused or never answered)."""


# -- the state: snapshots ------------------------------------------------------------


def _address_key(address: IPAddress) -> tuple[int, int]:
    return (address.version, int(address))


@attrs.frozen
class DefaultRoute:
    """A default route in the main table: where traffic to the internet leaves.

    *gateway* is None for a route straight onto an interface (a
    point-to-point VPN: ``default dev wg0``).
    """

    family: int  # 4 or 6
    gateway: IPAddress | None
    interface: str
    metric: int = 0

    def _key(self) -> tuple[int, int, str, tuple[int, int]]:
        gateway = (0, 0) if self.gateway is None else _address_key(self.gateway)
        return (self.family, self.metric, self.interface, gateway)


@attrs.frozen
class Address:
    """A usable address on an interface (tentative IPv6 addresses are not usable yet)."""

    interface: str
    address: IPAddress
    prefix_length: int

    def _key(self) -> tuple[str, tuple[int, int], int]:
        return (self.interface, _address_key(self.address), self.prefix_length)


@attrs.frozen
class Link:
    """An interface and whether it can carry traffic (up and with carrier)."""

    interface: str
    up: bool


def _sorted_routes(routes: Iterable[DefaultRoute]) -> tuple[DefaultRoute, ...]:
    return tuple(sorted(routes, key=DefaultRoute._key))


def _address_set(addresses: Iterable[Address]) -> frozenset[Address]:
    return frozenset(addresses)


def _link_set(links: Iterable[Link]) -> frozenset[Link]:
    return frozenset(links)


@attrs.frozen
class NetworkSnapshot:
    """The host's default routes, addresses and links at one moment (in its network namespace)."""

    routes: tuple[DefaultRoute, ...] = attrs.field(default=(), converter=_sorted_routes)
    addresses: frozenset[Address] = attrs.field(default=frozenset(), converter=_address_set)
    links: frozenset[Link] = attrs.field(default=frozenset(), converter=_link_set)

    def default_route(self, family: int = 4) -> DefaultRoute | None:
        """The default route of *family* (4 or 6) the kernel prefers: the lowest metric."""
        for route in self.routes:
            if route.family == family:
                return route
        return None

    def default_gateway(self, family: int = 4) -> IPAddress | None:
        """The preferred default route's gateway (None: no route, or a route without one)."""
        route = self.default_route(family)
        return None if route is None else route.gateway

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (``python -m portbroker.netmon`` prints it)."""
        return {
            "routes": [
                {
                    "family": r.family,
                    "gateway": None if r.gateway is None else str(r.gateway),
                    "interface": r.interface,
                    "metric": r.metric,
                }
                for r in self.routes
            ],
            "addresses": [
                f"{a.interface} {a.address}/{a.prefix_length}"
                for a in sorted(self.addresses, key=Address._key)
            ],
            "links": {link.interface: link.up for link in sorted(self.links, key=str)},
        }


def _scoped(gateway: IPAddress | None, interface: str) -> IPAddress | None:
    """A link-local IPv6 router with its interface as the zone (``fe80::1%eth0``).

    Routers advertise from link-local addresses (RFC 4861 §4.2), which no
    socket reaches without the zone, and :func:`portbroker.gateway.resolve_gateway`
    names them so: a broker compares its gateway with the monitor's.
    """
    if (
        isinstance(gateway, ipaddress.IPv6Address)
        and gateway.is_link_local
        and not gateway.scope_id
        and interface
    ):
        return ipaddress.IPv6Address(f"{gateway}%{interface}")
    return gateway


def snapshot_from_records(records: Iterable[wire.Record]) -> NetworkSnapshot:
    """The snapshot a link, address and route dump describes (records in any order)."""
    names: dict[int, str] = {}
    links: list[Link] = []
    addresses: list[wire.AddressRecord] = []
    routes: list[wire.RouteRecord] = []
    for record in records:
        if isinstance(record, wire.LinkRecord) and record.change is wire.Change.NEW:
            names[record.index] = record.name or f"if{record.index}"
            links.append(Link(names[record.index], record.up))
        elif isinstance(record, wire.AddressRecord) and record.change is wire.Change.NEW:
            addresses.append(record)
        elif isinstance(record, wire.RouteRecord) and record.is_default:
            routes.append(record)

    def name(index: int, label: str = "") -> str:
        return names.get(index) or label or f"if{index}"

    return NetworkSnapshot(
        routes=[
            DefaultRoute(
                4 if r.family == wire.AF_INET else 6,
                _scoped(r.gateway, name(r.oif)),
                name(r.oif),
                r.priority,
            )
            for r in routes
            if r.family in (wire.AF_INET, wire.AF_INET6)
        ],
        addresses=[
            Address(name(a.index, a.label), a.address, a.prefix_length)
            for a in addresses
            if a.usable
        ],
        links=links,
    )


# -- what changed ------------------------------------------------------------------


@attrs.frozen
class RouteChanged:
    """The preferred default route of *family* moved: another gateway, interface, or none.

    None for a gateway means no route, or a route without a gateway; the
    interfaces say which (empty: no route).
    """

    family: int
    old_gateway: IPAddress | None
    new_gateway: IPAddress | None
    interface: str  # the new route's interface ("" when the route went away)
    old_interface: str = ""


@attrs.frozen
class AddressAdded:
    """A usable address appeared on *interface*."""

    interface: str
    address: IPAddress
    prefix_length: int


@attrs.frozen
class AddressRemoved:
    """An address left *interface* (removed, or its interface went away)."""

    interface: str
    address: IPAddress
    prefix_length: int


@attrs.frozen
class LinkUp:
    """*interface* can carry traffic again (or appeared, up)."""

    interface: str


@attrs.frozen
class LinkDown:
    """*interface* went down, lost its carrier, or went away."""

    interface: str


NetworkChange = RouteChanged | AddressAdded | AddressRemoved | LinkUp | LinkDown


@attrs.frozen
class NetworkChanged:
    """One settled burst: the snapshots either side and the changes between them."""

    before: NetworkSnapshot
    after: NetworkSnapshot
    changes: tuple[NetworkChange, ...]


def changes_between(before: NetworkSnapshot, after: NetworkSnapshot) -> tuple[NetworkChange, ...]:
    """What differs from *before* to *after*, in a fixed order.

    Losses first (LinkDown, AddressRemoved), then gains (LinkUp,
    AddressAdded), then RouteChanged (IPv4, IPv6): by the time a consumer
    sees the route move, it has seen the addresses the new route uses.
    """
    was_up = {link.interface for link in before.links if link.up}
    now_up = {link.interface for link in after.links if link.up}
    out: list[NetworkChange] = [LinkDown(name) for name in sorted(was_up - now_up)]
    out += [
        AddressRemoved(a.interface, a.address, a.prefix_length)
        for a in sorted(before.addresses - after.addresses, key=Address._key)
    ]
    out += [LinkUp(name) for name in sorted(now_up - was_up)]
    out += [
        AddressAdded(a.interface, a.address, a.prefix_length)
        for a in sorted(after.addresses - before.addresses, key=Address._key)
    ]
    for family in (4, 6):
        old, new = before.default_route(family), after.default_route(family)
        old_hop = None if old is None else (old.gateway, old.interface)
        new_hop = None if new is None else (new.gateway, new.interface)
        if old_hop != new_hop:
            out.append(
                RouteChanged(
                    family,
                    None if old is None else old.gateway,
                    None if new is None else new.gateway,
                    "" if new is None else new.interface,
                    "" if old is None else old.interface,
                )
            )
    return tuple(out)


# -- debouncing (sans-IO) -----------------------------------------------------------


@attrs.define
class Settler:
    """When a burst of changes has settled: *quiet* seconds without one, or *max_delay* after the first.

    Pure: the caller passes the time. :meth:`poke` on every sign of change,
    sleep until :meth:`deadline`, then :meth:`take`.
    """

    quiet: float = attrs.field(default=DEFAULT_QUIET)
    max_delay: float = attrs.field(default=DEFAULT_MAX_DELAY)
    _first: float | None = attrs.field(default=None, init=False)
    _last: float | None = attrs.field(default=None, init=False)

    @quiet.validator
    def _check_quiet(self, _attribute: object, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"quiet must be a non-negative number of seconds, not {value!r}")

    @max_delay.validator
    def _check_max_delay(self, _attribute: object, value: float) -> None:
        if not value >= self.quiet:
            raise ValueError(f"max_delay ({value!r}) must be at least quiet ({self.quiet!r})")

    def poke(self, now: float) -> None:
        """Something changed at *now*."""
        if self._first is None:
            self._first = now
        self._last = now

    def deadline(self) -> float | None:
        """When the burst counts as settled; None when nothing is pending."""
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def take(self, now: float) -> bool:
        """True (and forget the burst) when it has settled by *now*."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self._first = self._last = None
        return True


# -- sources ----------------------------------------------------------------------


class Source(Protocol):
    """Where snapshots and the signs of change come from."""

    overruns: int

    async def snapshot(self) -> NetworkSnapshot:
        """The current state, read now."""
        ...

    async def watch(
        self, poke: Callable[[], None], *, task_status: trio.TaskStatus[None] = ...
    ) -> None:
        """Call *poke* on every sign of change, until cancelled; started once listening."""
        ...


_DUMP_KINDS: Final = (wire.RTM_GETLINK, wire.RTM_GETADDR, wire.RTM_GETROUTE)


@attrs.define
class _Dump:
    """A link, address and route dump, one request at a time (a netlink socket runs one dump)."""

    seq_base: int = 1
    records: list[wire.Record] = attrs.Factory(list)
    interrupted: bool = False
    _step: int = 0

    def request(self) -> bytes | None:
        """The next request to send; None when the dump is complete."""
        if self._step >= len(_DUMP_KINDS):
            return None
        return wire.dump_request(_DUMP_KINDS[self._step], self.seq_base + self._step)

    def feed(self, data: bytes) -> None:
        """One datagram of the answer; raises NetworkMonitorError if the kernel refused."""
        seq = self.seq_base + self._step
        for record in wire.parse_messages(data):
            if isinstance(record, wire.Done) and record.seq == seq:
                self.interrupted = self.interrupted or record.interrupted
                self._step += 1
            elif isinstance(record, wire.Failed) and record.seq == seq:
                raise NetworkMonitorError(
                    record.errno, f"the kernel refused a netlink dump: {record.errno}"
                )
            elif isinstance(record, wire.Malformed):
                self.interrupted = True  # take it again rather than trust half of it
            else:
                self.records.append(record)


def _netlink_socket(groups: int = 0, receive_buffer: int | None = None) -> socket.socket:
    try:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
    except (OSError, AttributeError) as exc:
        raise NetworkMonitorError(errno.EAFNOSUPPORT, f"no rtnetlink socket: {exc}") from exc
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def _from_kernel(address: object) -> bool:
    # recvfrom() on AF_NETLINK gives (port id, groups); the kernel is port 0.
    # Any local process may send to our port id; only the kernel is believed.
    return isinstance(address, tuple) and bool(address) and address[0] == 0


async def _netlink_dump() -> NetworkSnapshot:
    for _attempt in range(_DUMP_ATTEMPTS):
        dump = _Dump()
        with _netlink_socket() as sock, trio.move_on_after(_DUMP_TIMEOUT) as timeout:
            while (request := dump.request()) is not None:
                sock.send(request)
                while dump.request() == request:
                    await trio.lowlevel.wait_readable(sock)
                    with contextlib.suppress(BlockingIOError):
                        data, sender = sock.recvfrom(1 << 16)
                        if _from_kernel(sender):
                            dump.feed(data)
        if timeout.cancelled_caught:
            raise NetworkMonitorError(errno.ETIMEDOUT, "the kernel never finished a netlink dump")
        if not dump.interrupted:
            return snapshot_from_records(dump.records)
    raise NetworkMonitorError(errno.EAGAIN, "the network kept changing during every netlink dump")


def _netlink_dump_blocking() -> NetworkSnapshot:
    for _attempt in range(_DUMP_ATTEMPTS):
        dump = _Dump()
        with _netlink_socket() as sock:
            sock.settimeout(_DUMP_TIMEOUT)
            while (request := dump.request()) is not None:
                sock.send(request)
                while dump.request() == request:
                    try:
                        data, sender = sock.recvfrom(1 << 16)
                    except TimeoutError as exc:
                        raise NetworkMonitorError(
                            errno.ETIMEDOUT, "the kernel never finished a netlink dump"
                        ) from exc
                    if _from_kernel(sender):
                        dump.feed(data)
        if not dump.interrupted:
            return snapshot_from_records(dump.records)
    raise NetworkMonitorError(errno.EAGAIN, "the network kept changing during every netlink dump")


def _relevant(record: wire.Record) -> bool:
    if isinstance(record, wire.RouteRecord):
        # Only default routes matter; a VPN's or a container's other routes
        # would otherwise cost a dump each.
        return record.dst_len == 0 and record.table == wire.RT_TABLE_MAIN
    return not isinstance(record, wire.Done | wire.Failed)


@attrs.define
class NetlinkSource:
    """rtnetlink (Linux): multicast notifications say when, dumps say what.

    *receive_buffer* sets the subscription socket's SO_RCVBUF (the kernel
    doubles it; the default is the system's): smaller overflows sooner,
    which tests use to provoke ENOBUFS.
    """

    receive_buffer: int | None = None
    overruns: int = 0
    _socket: socket.socket | None = attrs.field(default=None, init=False)

    def open(self) -> None:
        """Subscribe now, so that nothing between the first snapshot and :meth:`watch` is missed."""
        if self._socket is None:
            self._socket = _netlink_socket(wire.MONITOR_GROUPS, self.receive_buffer)

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def snapshot(self) -> NetworkSnapshot:
        """A fresh dump (raises NetworkMonitorError if the kernel refuses or never answers)."""
        return await _netlink_dump()

    async def watch(
        self,
        poke: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poke on every relevant kernel message and on every overflow, until cancelled."""
        self.open()
        sock = self._socket
        assert sock is not None
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, sender = sock.recvfrom(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # Messages were lost; the dump after the quiet
                    # interval reads the state afresh.
                    self.overruns += 1
                    poke()
                    continue
                if _from_kernel(sender) and any(map(_relevant, wire.parse_messages(data))):
                    poke()


def _proc_default_routes(proc: Path = Path("/proc/net")) -> list[DefaultRoute]:
    """Linux's main-table default routes from /proc (no netlink, no ``ip route``)."""
    routes: list[DefaultRoute] = []
    rtf_up, rtf_reject, rtf_cache = 0x1, 0x200, 0x01000000  # linux/route.h, ipv6_route.h
    with contextlib.suppress(OSError):
        for line in (proc / "route").read_text().splitlines()[1:]:
            f = line.split()
            with contextlib.suppress(ValueError, IndexError, struct.error):
                flags = int(f[3], 16)
                if int(f[1], 16) == 0 and int(f[7], 16) == 0 and flags & rtf_up:
                    hop = ipaddress.IPv4Address(struct.pack("<I", int(f[2], 16)))
                    routes.append(DefaultRoute(4, hop if int(hop) else None, f[0], int(f[6])))
    with contextlib.suppress(OSError):
        for line in (proc / "ipv6_route").read_text().splitlines():
            f = line.split()
            with contextlib.suppress(ValueError, IndexError):
                flags = int(f[8], 16)
                if int(f[0], 16) or int(f[1], 16) or not flags & rtf_up:
                    continue
                if flags & (rtf_reject | rtf_cache):
                    continue
                hop6 = ipaddress.IPv6Address(bytes.fromhex(f[4]))
                router = _scoped(hop6, f[9]) if int(hop6) else None
                routes.append(DefaultRoute(6, router, f[9], int(f[5], 16)))
    return routes


def polled_snapshot() -> NetworkSnapshot:
    """A snapshot without netlink: getifaddrs(3), and /proc's routes where there is a /proc."""
    from portbroker.p2p import interface_addresses  # only the fallback pays for this import

    entries = interface_addresses()
    up: dict[str, bool] = {}
    for entry in entries:
        up[entry.interface] = up.get(entry.interface, False) or entry.up
    return NetworkSnapshot(
        routes=_proc_default_routes() if sys.platform == "linux" else [],
        addresses=[
            Address(e.interface, e.address, e.prefix_length) for e in entries if not e.tentative
        ],
        links=[Link(name, is_up) for name, is_up in up.items()],
    )


@attrs.define
class PollingSource:
    """Polling (no netlink): a snapshot every *interval* seconds; a difference is a poke."""

    interval: float = DEFAULT_POLL_INTERVAL
    read: Callable[[], NetworkSnapshot] = polled_snapshot
    overruns: int = 0  # never: nothing is buffered

    async def snapshot(self) -> NetworkSnapshot:
        """The current state (getifaddrs is quick; it runs in the event loop's thread)."""
        return self.read()

    async def watch(
        self,
        poke: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Compare a fresh snapshot with the last one every *interval* seconds, until cancelled."""
        last = self.read()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            now = self.read()
            if now != last:
                poke()
            last = now


# -- the monitor -----------------------------------------------------------------


@attrs.define(eq=False)
class NetworkMonitor:
    """A running monitor (from :func:`open_network_monitor`); iterate it for changes.

    ``async for change in monitor`` yields each :data:`NetworkChange`;
    ``async for batch in monitor.batches()`` yields one
    :class:`NetworkChanged` per settled burst instead. Use one or the
    other: they share the stream. A slow consumer loses nothing: while it is
    busy, bursts merge into the next difference.
    """

    source: Source
    settler: Settler
    _current: NetworkSnapshot
    _send: trio.MemorySendChannel[NetworkChanged]
    _receive: trio.MemoryReceiveChannel[NetworkChanged]
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    _pending: collections.deque[NetworkChange] = attrs.Factory(collections.deque)
    failures: int = 0
    """Reads of the network that failed and were retried (logged as warnings)."""

    def snapshot(self) -> NetworkSnapshot:
        """The state the consumer has been told about: the last batch's *after* (or the first)."""
        return self._current

    @property
    def overruns(self) -> int:
        """How often the kernel's messages overflowed the socket (each one resynced by a dump)."""
        return self.source.overruns

    def batches(self) -> AsyncIterator[NetworkChanged]:
        """Each settled burst, as a whole: ``async for batch in monitor.batches()``."""
        return _Batches(self)

    async def next_batch(self) -> NetworkChanged:
        """Wait for the next settled burst (raises StopAsyncIteration once the monitor is closed)."""
        try:
            batch = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        self._current = batch.after
        return batch

    def __aiter__(self) -> NetworkMonitor:
        return self

    async def __anext__(self) -> NetworkChange:
        while not self._pending:
            self._pending.extend((await self.next_batch()).changes)
        return self._pending.popleft()

    def _poke(self) -> None:
        self.settler.poke(trio.current_time())
        self._wakeup.set()

    async def _settle(self) -> None:
        seen = self._current  # what the consumer has (or is being handed)
        with self._send:
            while True:
                deadline = self.settler.deadline()
                if deadline is None or trio.current_time() < deadline:
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self._wakeup.wait()
                        self._wakeup = trio.Event()
                    continue
                if not self.settler.take(trio.current_time()):
                    continue
                try:
                    after = await self.source.snapshot()
                except OSError as exc:  # NetworkMonitorError, or the socket itself
                    # A dump the kernel refused or never finished: try again
                    # after another quiet interval rather than stop watching.
                    logger.warning(
                        "network monitor: reading the network failed (%s); retrying", exc
                    )
                    self.failures += 1
                    self.settler.poke(trio.current_time())
                    continue
                changes = changes_between(seen, after)
                if changes:
                    # A rendezvous (buffer 0): while the consumer is busy this
                    # waits, pokes pile up in the settler, and the next
                    # difference is taken from what the consumer got.
                    await self._send.send(NetworkChanged(seen, after, changes))
                    seen = after


@attrs.define
class _Batches:
    monitor: NetworkMonitor

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> NetworkChanged:
        return await self.monitor.next_batch()


def _pick_source(poll_interval: float) -> Source:
    if sys.platform == "linux":
        source = NetlinkSource()
        try:
            source.open()
        except OSError:
            pass
        else:
            return source
    return PollingSource(poll_interval)


@contextlib.asynccontextmanager
async def open_network_monitor(
    *,
    quiet: float = DEFAULT_QUIET,
    max_delay: float = DEFAULT_MAX_DELAY,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    source: Source | None = None,
) -> AsyncIterator[NetworkMonitor]:
    """Watch the host's network (in the caller's network namespace) until the block exits.

    A burst of changes is reported once it has been *quiet* seconds without
    another, or *max_delay* seconds after it began. The source is rtnetlink
    on Linux, else polling every *poll_interval* seconds (module docstring);
    tests pass their own *source*.

    Raises:
        NetworkMonitorError: the first snapshot could not be read.
        ValueError: *quiet* is negative or *max_delay* is below it.
    """
    settler = Settler(quiet, max_delay)
    if source is None:
        source = _pick_source(poll_interval)
    try:
        first = await source.snapshot()
        send, receive = trio.open_memory_channel[NetworkChanged](0)
        monitor = NetworkMonitor(source, settler, first, send, receive)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.watch, monitor._poke)
            nursery.start_soon(monitor._settle)
            try:
                yield monitor
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if isinstance(source, NetlinkSource):
            source.close()


def current_snapshot() -> NetworkSnapshot:
    """The network's state now, read synchronously (rtnetlink on Linux, else polling's reader).

    Raises NetworkMonitorError when netlink exists but cannot be read.
    """
    if sys.platform == "linux" and hasattr(socket, "AF_NETLINK"):
        try:
            return _netlink_dump_blocking()
        except NetworkMonitorError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                raise
    return polled_snapshot()


# -- python -m portbroker.netmon: print the snapshot, then changes, as JSON lines ----


def _change_json(change: NetworkChange) -> dict[str, object]:
    fields = attrs.asdict(change, value_serializer=lambda _i, _a, v: v)
    out: dict[str, object] = {"change": type(change).__name__}
    for key, value in fields.items():
        out[key] = (
            str(value)
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
            else value
        )
    return out


async def _print_changes(quiet: float, poll: bool, receive_buffer: int | None) -> None:
    import json

    source: Source | None = None
    if poll:
        source = PollingSource(1.0)
    elif receive_buffer is not None:
        source = NetlinkSource(receive_buffer)
    async with open_network_monitor(quiet=quiet, max_delay=10 * quiet, source=source) as monitor:
        print(json.dumps({"snapshot": monitor.snapshot().to_json()}), flush=True)
        async for batch in monitor.batches():
            for change in batch.changes:
                print(json.dumps(_change_json(change)), flush=True)
            print(
                json.dumps({"settled": len(batch.changes), "overruns": monitor.overruns}),
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    """``python -m portbroker.netmon [--quiet S] [--poll] [--receive-buffer N]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m portbroker.netmon",
        description="Print this host's default routes, addresses and links, then every "
        "settled change, as JSON lines (docs/roaming.md). Sends no traffic.",
    )
    parser.add_argument("--quiet", type=float, default=DEFAULT_QUIET, help="settle time, seconds")
    parser.add_argument("--poll", action="store_true", help="poll instead of rtnetlink")
    parser.add_argument("--receive-buffer", type=int, help="netlink SO_RCVBUF, bytes")
    args = parser.parse_args(argv)
    if not args.quiet >= 0:
        parser.error(f"--quiet must be a non-negative number of seconds, not {args.quiet}")
    if args.receive_buffer is not None and args.receive_buffer <= 0:
        parser.error(
            f"--receive-buffer must be a positive number of bytes, not {args.receive_buffer}"
        )
    failed: list[OSError] = []
    interrupted = False
    try:
        trio.run(_print_changes, args.quiet, args.poll, args.receive_buffer)
    except* OSError as group:
        failed.extend(e for e in group.exceptions if isinstance(e, OSError))
    except* KeyboardInterrupt:
        # Ctrl-C is how this ends. It comes out of the monitor's nursery in a
        # group, which a plain `except KeyboardInterrupt` let through as a
        # traceback and exit status 1 (caught by the lab test's stop).
        interrupted = True
    if interrupted:
        return 0
    if failed:
        print(f"python -m portbroker.netmon: cannot read the network: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
