"""Reachability candidates for a peer-to-peer stack (docs/p2p.md).

A P2P stack that holds one local socket (port, protocol) wants to know every
transport address a peer might reach it at, best first, and to hear when that
set changes. This module answers with ICE's vocabulary (RFC 8445), so the
stack can feed the list to its own connectivity checks without knowing which
method (PCP, NAT-PMP, UPnP) made a mapping:

- **host** candidates (RFC 8445 §5.1.1.1): the host's own addresses with the
  socket's port — IPv4, and IPv6 global or unique-local; never loopback,
  link-local, multicast, unspecified, IPv4-mapped, or an IPv6 address that
  is tentative, deprecated or failed duplicate address detection;
- **server-reflexive** candidates (RFC 8445 §5.1.1.2, there learnt from a STUN
  server; here from the gateway that made the mapping): the mapping's external
  address and port, with its method, lifetime and expiry, and whether the
  address is publicly routable (a double NAT's or a CGN's 10.x / 100.64.x is
  not).

Each has a priority computed as RFC 8445 §5.1.2.1 says (:func:`priority`);
the list is ordered by it, highest first. The choices (type preferences,
local preferences) are in :func:`local_preference` and docs/p2p.md.

:func:`open_candidates` maps the port through a :class:`~portbroker.broker.Broker`
(or takes a mapping the stack already holds), and :meth:`CandidateGatherer.changes`
streams a :class:`CandidateChange` whenever the list changes: the mapping lost,
restored, moved to another external address, given up on, or an interface
address added or removed (polled, debounced).

Interfaces are enumerated by :func:`interface_addresses`: libc's
``getifaddrs(3)`` through ctypes — no new dependency, no subprocess per poll
(``ip -j addr`` would fork every few seconds and need iproute2), no netlink
message parser to maintain, both address families in one call (``SIOCGIFCONF``
knows only IPv4), the same call on Linux (glibc, musl), the BSDs and macOS,
and it runs in the caller's network namespace. On Linux,
``/proc/net/if_inet6`` adds the IPv6 address flags ``getifaddrs`` does not
carry. Tests replace it: every function here that enumerates takes an
*addresses* callable.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import functools
import hashlib
import ipaddress
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.broker import Broker, Mapping
from portbroker.errors import AlreadyMapped, PortBrokerError
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    Lost,
    MappingEvent,
    Released,
    Renewed,
    Restored,
    State,
)
from portbroker.reachability import classify
from portbroker.types import DEFAULT_LIFETIME, IPAddress, Lease, TransportProtocol
from portbroker.wire._fields import to_address

__all__ = [
    "CHANGES_BUFFER",
    "DEBOUNCE",
    "POLL_INTERVAL",
    "REMAP_INTERVAL",
    "TYPE_PREFERENCE",
    "AddressSource",
    "Candidate",
    "CandidateChange",
    "CandidateGatherer",
    "CandidateKind",
    "ChangeReason",
    "InterfaceAddress",
    "build_candidates",
    "host_addresses",
    "interface_addresses",
    "local_preference",
    "open_candidates",
    "priority",
]

logger = logging.getLogger("portbroker.p2p")

# How often the interface addresses are read, and how long a change must hold
# before it is reported: an address that comes and goes within DEBOUNCE (a
# DHCP renewal that drops and re-adds it, a flapping link) is no change.
POLL_INTERVAL: Final = 5.0
DEBOUNCE: Final = 2.0
# After the first map failed (no method works here) or the mapping was given
# up on (Failed), ask again this often: a gateway switched on later, or UPnP
# enabled, still yields a server-reflexive candidate.
REMAP_INTERVAL: Final = 60.0
# Changes one stream holds unread. Each carries the whole list, so a stream
# left unread (a forgotten changes() call) under an address or mapping event
# storm would grow without end; one this far behind is ended instead.
CHANGES_BUFFER: Final = 256


class CandidateKind(enum.Enum):
    """RFC 8445 §5.1.1 candidate types (the ones a port mapping can give)."""

    HOST = "host"
    SERVER_REFLEXIVE = "server-reflexive"

    @property
    def ice_name(self) -> str:
        """The SDP ``typ`` token (RFC 8839 §5.1): ``host`` / ``srflx``."""
        return "host" if self is CandidateKind.HOST else "srflx"


# RFC 8445 §5.1.2.2's recommended type preferences (0..126). Host before
# server-reflexive, as in ICE: a host pair that works (two peers on one lan)
# is the shorter path; across sites the host checks fail fast and the
# mapped endpoint's pair wins.
TYPE_PREFERENCE: Final = {CandidateKind.HOST: 126, CandidateKind.SERVER_REFLEXIVE: 100}


def priority(kind: CandidateKind, local_pref: int, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: 2^24 * type preference + 2^8 * local preference + (256 - component)."""
    if not 0 <= local_pref <= 0xFFFF:
        raise ValueError(f"local preference must be 0..65535, got {local_pref}")
    if not 1 <= component <= 256:
        raise ValueError(f"component must be 1..256, got {component}")
    return (TYPE_PREFERENCE[kind] << 24) + (local_pref << 8) + (256 - component)


def local_preference(public: bool, address: IPAddress, rank: int) -> int:
    """This module's local preference (RFC 8445 §5.1.2.1: 0..65535, unique per type).

    - bit 15: the address is publicly routable (:func:`_is_public`): a peer
      anywhere may reach it; a private or shared one only from its own site;
    - bit 14: IPv6 before IPv4 (RFC 8421 §4: a dual-stack agent prefers IPv6;
      no NAT on the way, and a pinhole keeps the address);
    - bits 0-13: 16383 - *rank*, the candidate's place among those of its type
      with the same two bits (interface index, then address), so that each
      candidate of a type has its own preference, as §5.1.2.1 requires.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return (public << 15) | ((address.version == 6) << 14) | max(0, 0x3FFF - rank)


def _is_public(address: IPAddress) -> bool:
    """Whether *address* is reachable from the whole internet (not private, shared, reserved).

    The broker's one rule (:func:`portbroker.reachability.classify`, the IANA
    special-purpose registries of RFC 6890 as a table), so a candidate and
    its mapping never disagree.
    """
    return classify(address).public


@attrs.frozen
class InterfaceAddress:
    """One address configured on an interface, as the enumeration saw it (unfiltered)."""

    interface: str
    index: int  # the interface index (0 when unknown)
    address: IPAddress = attrs.field(converter=to_address)
    prefix_length: int
    loopback: bool = False  # the interface is a loopback (IFF_LOOPBACK)
    up: bool = True  # IFF_UP
    # IPv6 only (Linux /proc/net/if_inet6): not usable as a source, RFC 4862 §5.4 / §5.5.4
    tentative: bool = False
    deprecated: bool = False


AddressSource = Callable[[], Sequence[InterfaceAddress]]


@attrs.frozen
class Candidate:
    """A transport address a peer may try to reach the socket at (RFC 8445 §5.1.1).

    *base_address*/*base_port* are the socket's own (RFC 8445 "base"): the
    host candidate itself, or the mapping's internal endpoint. *method*,
    *gateway*, *lifetime* and *expires_at* (trio clock, like
    :class:`~portbroker.types.Lease`) describe the mapping behind a
    server-reflexive candidate, or behind a host candidate whose address the
    gateway mapped unchanged (an IPv6 pinhole); None otherwise.
    """

    kind: CandidateKind
    protocol: TransportProtocol
    address: IPAddress
    port: int
    priority: int
    public: bool
    base_address: IPAddress
    base_port: int
    foundation: str
    component: int = 1
    interface: str | None = None
    method: str | None = None
    gateway: IPAddress | None = None
    lifetime: int | None = None
    expires_at: float | None = None

    @property
    def key(self) -> tuple[CandidateKind, IPAddress, int]:
        """What identifies a candidate across changes (its priority may move)."""
        return (self.kind, self.address, self.port)

    def to_json(self) -> dict[str, Any]:
        """The fields a remote peer needs, as JSON values (``expires_at`` is local, left out)."""
        return {
            "kind": self.kind.value,
            "protocol": self.protocol.value,
            "address": str(self.address),
            "port": self.port,
            "priority": self.priority,
            "public": self.public,
            "foundation": self.foundation,
            "component": self.component,
            "method": self.method,
            "lifetime": self.lifetime,
        }


class ChangeReason(enum.Enum):
    MAPPING_ACQUIRED = "mapping-acquired"  # a map that had failed worked later
    MAPPING_LOST = "mapping-lost"  # the broker is restoring it (Lost)
    MAPPING_RESTORED = "mapping-restored"
    EXTERNAL_ADDRESS_CHANGED = "external-address-changed"
    MAPPING_ENDED = "mapping-ended"  # given up on (Failed) or released by its owner
    ADDRESS_ADDED = "address-added"
    ADDRESS_REMOVED = "address-removed"


@attrs.frozen
class CandidateChange:
    """The candidate list changed: what went, what came, and the whole new list."""

    reason: ChangeReason
    added: tuple[Candidate, ...]
    removed: tuple[Candidate, ...]
    candidates: tuple[Candidate, ...]
    detail: str = ""


# -- the host's addresses ----------------------------------------------------------


def _usable_host_address(entry: InterfaceAddress) -> bool:
    """RFC 8445 §5.1.1.1's exclusions, and what a remote peer could never use."""
    address = entry.address
    if entry.loopback or not entry.up or entry.tentative or entry.deprecated:
        return False
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        # RFC 8445 §5.1.1.1: no IPv4-mapped, no deprecated IPv4-compatible
        # (::/96), no site-local (fec0::/10, RFC 3879) addresses.
        if address.ipv4_mapped is not None or address.is_site_local:
            return False
        if int(address) >> 32 == 0:
            return False
    return True


def host_addresses(entries: Iterable[InterfaceAddress]) -> list[InterfaceAddress]:
    """The usable ones, one per address (the first interface that has it), in index order."""
    seen: set[IPAddress] = set()
    usable: list[InterfaceAddress] = []
    for entry in sorted(
        entries, key=lambda e: (e.index, e.interface, e.address.version, int(e.address))
    ):
        if _usable_host_address(entry) and entry.address not in seen:
            seen.add(entry.address)
            usable.append(entry)
    return usable


def _foundation(kind: CandidateKind, base: IPAddress, server: IPAddress | None) -> str:
    # RFC 8445 §5.1.1.3: equal for the same type, base IP address, server
    # (here: the gateway) and transport protocol; the protocol is one per list.
    text = f"{kind.value}|{base}|{server or ''}"
    return hashlib.blake2s(text.encode(), digest_size=4).hexdigest()


def build_candidates(
    port: int,
    protocol: TransportProtocol,
    hosts: Sequence[InterfaceAddress],
    lease: Lease | None,
    *,
    component: int = 1,
) -> tuple[Candidate, ...]:
    """The ordered candidate list for a socket on *port* (sans-IO: plain values in, values out).

    *hosts* are usable addresses (:func:`host_addresses`); *lease* the
    mapping's current lease, or None while it is lost, failed or absent. A
    lease whose external address and port are a host candidate's (RFC 8445
    §5.1.3: redundant) adds no server-reflexive candidate: the host candidate
    carries the mapping's fields instead, since the mapping (a pinhole) is
    what makes it reachable.
    """
    host_keys = {(h.address, port) for h in hosts}
    reflexive = (
        lease is not None
        and not lease.external_address.is_unspecified
        and lease.external_port != 0
        and (lease.external_address, lease.external_port) not in host_keys
    )
    pinhole = lease if lease is not None and not reflexive else None

    def mapping_fields(of: Lease | None) -> dict[str, Any]:
        if of is None:
            return {}
        return {
            "method": of.method,
            "gateway": of.gateway,
            "lifetime": None if of.permanent else of.lifetime,
            "expires_at": None if of.permanent else of.expires_at,
        }

    # Ranks count within (type, public, family): each gets its own local preference.
    ranks: dict[tuple[CandidateKind, bool, int], int] = {}

    def next_rank(kind: CandidateKind, public: bool, address: IPAddress) -> int:
        group = (kind, public, address.version)
        ranks[group] = ranks.get(group, -1) + 1
        return ranks[group]

    out: list[Candidate] = []
    for host in hosts:
        public = _is_public(host.address)
        local = local_preference(
            public, host.address, next_rank(CandidateKind.HOST, public, host.address)
        )
        covered = (
            pinhole if pinhole is not None and pinhole.external_address == host.address else None
        )
        out.append(
            Candidate(
                CandidateKind.HOST,
                protocol,
                host.address,
                port,
                priority(CandidateKind.HOST, local, component),
                public,
                host.address,
                port,
                _foundation(CandidateKind.HOST, host.address, None),
                component,
                interface=host.interface,
                **mapping_fields(covered),
            )
        )
    if reflexive:
        assert lease is not None
        public = _is_public(lease.external_address)
        kind = CandidateKind.SERVER_REFLEXIVE
        local = local_preference(
            public, lease.external_address, next_rank(kind, public, lease.external_address)
        )
        out.append(
            Candidate(
                kind,
                protocol,
                lease.external_address,
                lease.external_port,
                priority(kind, local, component),
                public,
                lease.internal_address,
                lease.internal_port,
                _foundation(kind, lease.internal_address, lease.gateway),
                component,
                **mapping_fields(lease),
            )
        )
    out.sort(key=lambda c: -c.priority)
    return tuple(out)


# -- enumerating interfaces: getifaddrs(3) ---------------------------------------------


class _IfAddrs(ctypes.Structure):
    pass


# struct ifaddrs (getifaddrs(3)): the same leading fields on Linux and the BSDs.
_IfAddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_IfAddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]

_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
# /proc/net/if_inet6 flags (linux/if_addr.h)
_IFA_F_DADFAILED: Final = 0x08
_IFA_F_DEPRECATED: Final = 0x20
_IFA_F_TENTATIVE: Final = 0x40
_BSD_SOCKADDR: Final = sys.platform != "linux"  # sa_len (1 byte) before sa_family


def _sockaddr(pointer: int | None) -> IPAddress | None:
    """An AF_INET / AF_INET6 sockaddr's address; None for any other family."""
    if not pointer:
        return None
    if _BSD_SOCKADDR:
        family = ctypes.c_uint8.from_address(pointer + 1).value
    else:
        family = ctypes.c_uint16.from_address(pointer).value
    if family == socket.AF_INET:  # sin_addr at offset 4
        return ipaddress.IPv4Address(ctypes.string_at(pointer + 4, 4))
    if family == socket.AF_INET6:  # sin6_addr at offset 8
        return ipaddress.IPv6Address(ctypes.string_at(pointer + 8, 16))
    return None


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _inet6_flags(path: Path = Path("/proc/net/if_inet6")) -> dict[tuple[str, IPAddress], int]:
    """Linux: (interface, address) -> IFA_F_* flags; empty elsewhere or when unreadable."""
    flags: dict[tuple[str, IPAddress], int] = {}
    try:
        text = path.read_text()
    except OSError:
        return flags
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6:
            continue
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            flags[(fields[5], address)] = int(fields[4], 16)
        except ValueError:
            continue
    return flags


def interface_addresses() -> list[InterfaceAddress]:
    """Every IPv4 and IPv6 address on this host's interfaces (getifaddrs(3)), unfiltered.

    In the caller's network namespace. Raises OSError when getifaddrs fails.
    """
    libc = _libc()
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"getifaddrs failed: {errno}")
    inet6 = _inet6_flags()
    found: list[InterfaceAddress] = []
    try:
        node = head
        while node:
            entry = node.contents
            address = _sockaddr(entry.ifa_addr)
            name = (entry.ifa_name or b"").decode(errors="replace")
            if address is not None:
                netmask = _sockaddr(entry.ifa_netmask)
                prefix = bin(int(netmask)).count("1") if netmask is not None else 0
                try:
                    index = socket.if_nametoindex(name)
                except OSError:
                    index = 0
                flags = inet6.get((name, address), 0)
                found.append(
                    InterfaceAddress(
                        name,
                        index,
                        address,
                        prefix,
                        loopback=bool(entry.ifa_flags & _IFF_LOOPBACK),
                        up=bool(entry.ifa_flags & _IFF_UP),
                        tentative=bool(flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED)),
                        deprecated=bool(flags & _IFA_F_DEPRECATED),
                    )
                )
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found


# -- the gatherer -------------------------------------------------------------------


def _endpoint(lease: Lease) -> tuple[IPAddress, int]:
    return (lease.external_address, lease.external_port)


def _live_lease(mapping: Mapping | None) -> Lease | None:
    if mapping is None or mapping.state not in (State.ACTIVE, State.RENEWING):
        return None
    return mapping.lease


class CandidateGatherer:
    """The candidates of one socket, kept current. Create with :func:`open_candidates`."""

    def __init__(
        self,
        *,
        port: int,
        protocol: TransportProtocol,
        addresses: AddressSource,
        component: int,
        bound_address: IPAddress | None,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.component = component
        self._addresses = addresses
        self._bound = bound_address
        self.mapping: Mapping | None = None
        self._owned = False  # we made the mapping: we release it
        # Why there is no mapping (the last map attempt's error), if there is none.
        self.mapping_error: PortBrokerError | None = None
        self._lease: Lease | None = None
        self._lost_endpoint: tuple[IPAddress, int] | None = None  # the endpoint before a Lost
        self._hosts: list[InterfaceAddress] = []
        self._candidates: tuple[Candidate, ...] = ()
        self._subscribers: list[trio.MemorySendChannel[CandidateChange]] = []
        self._mapping_over = trio.Event()
        self._closed = False

    def candidates(self) -> tuple[Candidate, ...]:
        """The current candidates, highest priority first."""
        return self._candidates

    def changes(self) -> trio.MemoryReceiveChannel[CandidateChange]:
        """Every change from now on, until the gatherer closes (then the stream ends).

        A stream that falls :data:`CHANGES_BUFFER` changes behind ends too
        (logged as a warning): its reader can take :meth:`candidates` and
        call ``changes()`` again.
        """
        send, receive = trio.open_memory_channel[CandidateChange](CHANGES_BUFFER)
        if self._closed:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    # -- inputs ---------------------------------------------------------------

    def _read_hosts(self, *, strict: bool = False) -> list[InterfaceAddress]:
        try:
            entries = self._addresses()
        except OSError as exc:
            if strict:
                raise
            # Keep the last known list: a transient failure is no removal.
            logger.warning("enumerating interface addresses failed: %s", exc)
            return self._hosts
        usable = host_addresses(entries)
        if self._bound is not None and not self._bound.is_unspecified:
            usable = [h for h in usable if h.address == self._bound]
        elif self._bound is not None:
            usable = [h for h in usable if h.address.version == self._bound.version]
        return usable

    def _refresh(self) -> tuple[tuple[Candidate, ...], tuple[Candidate, ...]]:
        """Recompute the list from the current inputs; what came and what went."""
        new = build_candidates(
            self.port, self.protocol, self._hosts, self._lease, component=self.component
        )
        old_keys = {c.key: c for c in self._candidates}
        new_keys = {c.key: c for c in new}
        self._candidates = new
        added = tuple(c for k, c in new_keys.items() if k not in old_keys)
        removed = tuple(c for k, c in old_keys.items() if k not in new_keys)
        return added, removed

    def _update(self, reason: ChangeReason, detail: str = "", *, always: bool = False) -> None:
        added, removed = self._refresh()
        new = self._candidates
        if not added and not removed and not always:
            return  # an event the list already reflects
        change = CandidateChange(reason, added, removed, new, detail)
        logger.info(
            "candidates %s: +%d -%d (%d now)", reason.value, len(added), len(removed), len(new)
        )
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(change)
            except trio.WouldBlock:
                logger.warning(
                    "a candidate change stream fell %d changes behind: ended", CHANGES_BUFFER
                )
                channel.close()
                self._subscribers.remove(channel)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def _on_event(self, event: MappingEvent) -> None:
        if isinstance(event, Renewed):
            # A renewal refreshes the lifetime and expiry only; one that moved
            # the endpoint is followed by ExternalAddressChanged, which reports it.
            if self._lease is not None and _endpoint(self._lease) == _endpoint(event.lease):
                self._lease = event.lease
                self._refresh()
        elif isinstance(event, Acquired):
            self._lease = event.lease
            self._update(ChangeReason.MAPPING_ACQUIRED)
        elif isinstance(event, Restored):
            self._lease = event.lease
            detail = f"at {event.lease.external_address}:{event.lease.external_port}"
            before = self._lost_endpoint
            if before is not None and before != _endpoint(event.lease):
                # miniupnpd 2.3.1 announces a new external address with a PCP
                # epoch of 0 (seen in the lab): a loss, then this restore.
                detail += f", no longer {before[0]}:{before[1]}"
            self._update(ChangeReason.MAPPING_RESTORED, detail)
        elif isinstance(event, ExternalAddressChanged):
            self._lease = event.lease
            self._update(
                ChangeReason.EXTERNAL_ADDRESS_CHANGED,
                f"{event.old_address}:{event.old_port} -> "
                f"{event.lease.external_address}:{event.lease.external_port}",
            )
        elif isinstance(event, Lost):
            if self._lease is not None:
                self._lost_endpoint = _endpoint(self._lease)
            self._lease = None
            self._update(ChangeReason.MAPPING_LOST, event.reason)
        elif isinstance(event, Failed | Released):
            self._lease = None
            detail = event.reason if isinstance(event, Failed) else "released"
            if isinstance(event, Failed):
                self.mapping_error = PortBrokerError(f"the mapping was given up on: {event.reason}")
            # Said even when a loss already took the candidate away: no
            # restore will follow (only a later map, see _remap).
            self._update(ChangeReason.MAPPING_ENDED, detail, always=True)

    def _watch(self, mapping: Mapping) -> trio.MemoryReceiveChannel[MappingEvent]:
        """Adopt *mapping*: subscribe first, then read its state (no event in between)."""
        events = mapping.events()
        self.mapping = mapping
        self.mapping_error = None
        self._lease = _live_lease(mapping)
        return events

    async def _follow(self, events: trio.MemoryReceiveChannel[MappingEvent]) -> None:
        async with events:
            async for event in events:
                self._on_event(event)
        self._mapping_over.set()

    async def _poll_interfaces(self, interval: float, debounce: float) -> None:
        while True:
            await trio.sleep(interval)
            seen = self._read_hosts()
            if seen == self._hosts:
                continue
            # Debounce: report only a list that held for *debounce* seconds.
            while True:
                await trio.sleep(debounce)
                again = self._read_hosts()
                if again == seen:
                    break
                seen = again
            self._apply_hosts(seen)

    def _apply_hosts(self, hosts: list[InterfaceAddress]) -> None:
        old = {h.address for h in self._hosts}
        new = {h.address for h in hosts}
        gone = old - new
        if gone:
            self._hosts = [h for h in self._hosts if h.address not in gone]
            self._update(ChangeReason.ADDRESS_REMOVED, ", ".join(sorted(map(str, gone))))
        came = ", ".join(str(a) for a in sorted(new - old, key=lambda a: (a.version, a)))
        self._hosts = hosts
        self._update(ChangeReason.ADDRESS_ADDED, came)

    def _close(self) -> None:
        self._closed = True
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()


async def _remap(
    gatherer: CandidateGatherer,
    broker: Broker,
    map_kwargs: dict[str, Any],
    interval: float,
    nursery: trio.Nursery,
) -> None:
    """Map again every *interval* while there is no mapping (none yet, or given up on)."""
    while True:
        if gatherer.mapping is not None and gatherer.mapping.state not in (
            State.FAILED,
            State.RELEASED,
        ):
            await gatherer._mapping_over.wait()
        await trio.sleep(interval)
        try:
            mapping = await broker.map(gatherer.port, gatherer.protocol, **map_kwargs)
        except PortBrokerError as exc:
            gatherer.mapping_error = exc
            logger.info("mapping %d/%s again failed: %s", gatherer.port, gatherer.protocol, exc)
            continue
        gatherer._mapping_over = trio.Event()
        gatherer._owned = True
        events = gatherer._watch(mapping)
        gatherer._update(ChangeReason.MAPPING_ACQUIRED, f"via {mapping.method}")
        nursery.start_soon(gatherer._follow, events)


@contextlib.asynccontextmanager
async def open_candidates(
    broker: Broker | None,
    port: int,
    protocol: str | TransportProtocol = "udp",
    *,
    mapping: Mapping | None = None,
    lifetime: int = DEFAULT_LIFETIME,
    external_port: int | None = None,
    require_mapping: bool = False,
    bound_address: IPAddress | str | None = None,
    component: int = 1,
    addresses: AddressSource = interface_addresses,
    poll_interval: float = POLL_INTERVAL,
    debounce: float = DEBOUNCE,
    remap_interval: float | None = REMAP_INTERVAL,
) -> AsyncIterator[CandidateGatherer]:
    """Gather the candidates of the local socket *port*/*protocol* and keep them current.

    With a *broker*, the port is mapped (``broker.map(port, protocol,
    lifetime=..., external_port=...)``) and the mapping released on exit;
    with *mapping*, that one is followed and left to its owner. A map that
    fails (no method works with this gateway, a refusal) is not fatal unless
    *require_mapping*: the list then holds host candidates only,
    :attr:`CandidateGatherer.mapping_error` says why, and the map is tried
    again every *remap_interval* seconds (None: never), as after a mapping
    given up on. *broker* None and no *mapping*: host candidates only.

    *bound_address*: the address the socket is bound to; a specific one
    keeps only that host candidate, a wildcard (``0.0.0.0``, ``::``) only its
    family. *addresses* is the enumeration seam (default
    :func:`interface_addresses`), read every *poll_interval* seconds; a
    change is reported once the new list has held for *debounce* seconds.

    Raises:
        ValueError: a bad port, protocol, lifetime, component or interval.
        AlreadyMapped: the broker already maps this port (pass that mapping).
        PortBrokerError: the map failed and *require_mapping* was set.
        OSError: the interfaces could not be enumerated at all.
    """
    protocol = TransportProtocol.parse(protocol)
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port must be 1..65535, got {port}")
    if not 1 <= component <= 256:
        raise ValueError(f"component must be 1..256 (RFC 8445 §5.1.2.1), got {component}")
    if not (poll_interval > 0 and debounce >= 0):
        raise ValueError(
            f"poll_interval must be > 0 and debounce >= 0, got {poll_interval}, {debounce}"
        )
    if remap_interval is not None and not remap_interval > 0:
        raise ValueError(f"remap_interval must be > 0 or None, got {remap_interval}")
    if mapping is not None and (mapping.internal_port, mapping.protocol) != (port, protocol):
        raise ValueError(
            f"the mapping is for {mapping.internal_port}/{mapping.protocol.value},"
            f" not {port}/{protocol.value}"
        )
    bound = None if bound_address is None else to_address(bound_address)
    gatherer = CandidateGatherer(
        port=port,
        protocol=protocol,
        addresses=addresses,
        component=component,
        bound_address=bound,
    )
    gatherer._hosts = gatherer._read_hosts(strict=True)
    map_kwargs: dict[str, Any] = {"lifetime": lifetime, "external_port": external_port}
    if mapping is None and broker is not None:
        try:
            gatherer.mapping = await broker.map(port, protocol, **map_kwargs)
            gatherer._owned = True
        except AlreadyMapped as exc:
            # Not the gateway's doing: this broker already maps the port.
            raise AlreadyMapped(f"{exc}; pass it as open_candidates(mapping=...)") from None
        except PortBrokerError as exc:
            if require_mapping:
                raise
            gatherer.mapping_error = exc
            logger.info("no mapping for %d/%s: %s", port, protocol.value, exc)
    elif mapping is not None:
        gatherer.mapping = mapping
    try:
        with collapse_single():  # the caller's own exceptions keep their type
            async with trio.open_nursery() as nursery:
                if gatherer.mapping is not None:
                    nursery.start_soon(gatherer._follow, gatherer._watch(gatherer.mapping))
                gatherer._refresh()  # the first list: nobody is subscribed yet
                nursery.start_soon(gatherer._poll_interfaces, poll_interval, debounce)
                # Only a mapping of our own is made again; the owner of one handed
                # to us decides what to do when it ends.
                if broker is not None and mapping is None and remap_interval is not None:
                    nursery.start_soon(
                        _remap, gatherer, broker, map_kwargs, remap_interval, nursery
                    )
                try:
                    yield gatherer
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        gatherer._close()
        if gatherer._owned and gatherer.mapping is not None:
            with trio.CancelScope(shield=True):
                await gatherer.mapping.release()
