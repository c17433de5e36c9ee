"""rtnetlink messages (Linux ``netlink(7)``, ``rtnetlink(7)``): bytes in, records out.

Sans-IO: :func:`parse_messages` turns what one ``recv`` on a ``NETLINK_ROUTE``
socket returned into :class:`LinkRecord`, :class:`AddressRecord`,
:class:`RouteRecord`, :class:`Done` and :class:`Failed` records, and
:func:`dump_request` builds the ``RTM_GET*`` dump requests the snapshot is
made from. Nothing here opens a socket; :mod:`portbroker.netmon` does.

Only what the network monitor needs is decoded (docs/roaming.md): a link's
index, name and up/running flags; an address's interface, value, prefix
length and whether it is usable yet (not tentative); a route's family,
destination length, table, type, gateway, output interface and metric.
Every other message type and attribute is skipped.

The kernel is trusted to send well-formed messages, but the parser is not
trusted to be right about every kernel: a message that is too short for its
header, or whose length field lies, becomes a :class:`Malformed` record and
parsing stops (or skips that one attribute) — never an exception
(tests/test_netmon_wire.py fuzzes this). Netlink is in host byte order
(``netlink(7)``), hence ``=`` in every struct format.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final

import attrs

from portbroker.wire._fields import IPAddress

__all__ = [
    "AddressRecord",
    "Done",
    "Failed",
    "LinkRecord",
    "Malformed",
    "Record",
    "RouteRecord",
    "dump_request",
    "encode_address",
    "encode_done",
    "encode_link",
    "encode_route",
    "parse_messages",
]

# linux/socket.h: the address families as Linux numbers them (rtnetlink is
# Linux's; the socket module's values differ elsewhere, AF_INET6 is 30 on macOS).
AF_UNSPEC: Final = 0
AF_INET: Final = 2
AF_INET6: Final = 10

# linux/netlink.h
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ROOT: Final = 0x100
NLM_F_MATCH: Final = 0x200
NLM_F_DUMP: Final = NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR: Final = 0x10  # the dump changed while it was read: redo it

# linux/rtnetlink.h
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26

# multicast groups (the RTMGRP_* bit masks, for bind())
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV6_ROUTE: Final = 0x400
MONITOR_GROUPS: Final = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)

# linux/if.h
IFF_UP: Final = 0x1
IFF_LOOPBACK: Final = 0x8
IFF_RUNNING: Final = 0x40
# linux/if_link.h
IFLA_IFNAME: Final = 3
# linux/if_addr.h
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_LABEL: Final = 3
IFA_FLAGS: Final = 8
IFA_F_DADFAILED: Final = 0x08
IFA_F_TENTATIVE: Final = 0x40
# linux/rtnetlink.h, route attributes and values
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_PRIORITY: Final = 6
RTA_MULTIPATH: Final = 9
RTA_TABLE: Final = 15
RTA_VIA: Final = 18
RT_TABLE_MAIN: Final = 254
RTN_UNICAST: Final = 1
RTM_F_CLONED: Final = 0x200

_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG: Final = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, ...
_RTATTR: Final = struct.Struct("=HH")  # len, type
_RTNEXTHOP: Final = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_NLMSGERR: Final = struct.Struct("=i")  # negative errno (0: an acknowledgement)
_U32: Final = struct.Struct("=I")


def _align(length: int) -> int:
    return (length + 3) & ~3


class Change(enum.Enum):
    """Whether a record says the object now exists (NEW, also every dump entry) or is gone."""

    NEW = "new"
    DELETED = "deleted"


@attrs.frozen
class LinkRecord:
    """RTM_NEWLINK / RTM_DELLINK: an interface, ``rtnetlink(7)`` ``ifinfomsg``."""

    change: Change
    index: int
    name: str
    flags: int  # IFF_* (linux/if.h)
    seq: int = 0

    @property
    def up(self) -> bool:
        """Administratively up and with carrier (IFF_UP and IFF_RUNNING): it can carry traffic."""
        return self.change is Change.NEW and self.flags & (IFF_UP | IFF_RUNNING) == (
            IFF_UP | IFF_RUNNING
        )


@attrs.frozen
class AddressRecord:
    """RTM_NEWADDR / RTM_DELADDR: an address on an interface, ``ifaddrmsg``."""

    change: Change
    index: int
    address: IPAddress
    prefix_length: int
    flags: int  # IFA_F_* (the 32-bit IFA_FLAGS attribute when present)
    label: str = ""
    seq: int = 0

    @property
    def usable(self) -> bool:
        """Not tentative and not failed duplicate address detection (RFC 4862 §5.4)."""
        return not self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)


@attrs.frozen
class RouteRecord:
    """RTM_NEWROUTE / RTM_DELROUTE, ``rtmsg``: only what tells a default route apart."""

    change: Change
    family: int  # AF_INET or AF_INET6 (Linux's numbers, above)
    dst_len: int
    table: int
    type: int  # RTN_*
    flags: int  # RTM_F_*
    gateway: IPAddress | None
    oif: int  # 0: none given
    priority: int  # the metric; 0 when absent
    seq: int = 0

    @property
    def is_default(self) -> bool:
        """A unicast route to everything (0.0.0.0/0, ::/0) in the main table, not a cache entry.

        Policy-routing tables (a VPN's own table selected by an ``ip rule``)
        are left out: docs/roaming.md says why.
        """
        return (
            self.change is Change.NEW
            and self.dst_len == 0
            and self.table == RT_TABLE_MAIN
            and self.type == RTN_UNICAST
            and not self.flags & RTM_F_CLONED
        )


@attrs.frozen
class Done:
    """NLMSG_DONE: the end of a dump."""

    seq: int
    interrupted: bool = False  # NLM_F_DUMP_INTR on any part of it: redo the dump


@attrs.frozen
class Failed:
    """NLMSG_ERROR with a non-zero errno (a request refused), or NLMSG_OVERRUN."""

    seq: int
    errno: int


@attrs.frozen
class Malformed:
    """What could not be parsed, and why; the caller skips it (and may resync)."""

    reason: str


Record = LinkRecord | AddressRecord | RouteRecord | Done | Failed | Malformed


def dump_request(message_type: int, seq: int, family: int = AF_UNSPEC) -> bytes:
    """An ``RTM_GETLINK`` / ``RTM_GETADDR`` / ``RTM_GETROUTE`` dump request for *family*."""
    if message_type == RTM_GETLINK:
        body = _IFINFOMSG.pack(family, 0, 0, 0, 0)
    elif message_type == RTM_GETADDR:
        body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
    elif message_type == RTM_GETROUTE:
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    else:
        raise ValueError(f"not a dump request type: {message_type}")
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), message_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def _attributes(data: bytes, start: int, end: int) -> tuple[dict[int, bytes], str | None]:
    """The rtattrs in ``data[start:end]`` (the first of each type), and a problem if any.

    A lying attribute length ends the walk: what came before it is kept.
    """
    found: dict[int, bytes] = {}
    offset = start
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return found, f"attribute {kind} claims {length} bytes, {end - offset} left"
        # NLA_F_NESTED / NLA_F_NET_BYTEORDER live in the top two bits of the type.
        found.setdefault(kind & 0x3FFF, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return found, None


def _address(family: int, raw: bytes | None) -> IPAddress | None:
    if raw is None:
        return None
    if family == AF_INET and len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if family == AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    return None


def _u32(raw: bytes | None) -> int | None:
    if raw is None or len(raw) < 4:
        return None
    value: int = _U32.unpack_from(raw)[0]
    return value


def _name(raw: bytes | None) -> str:
    if raw is None:
        return ""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _link(change: Change, data: bytes, start: int, end: int, seq: int) -> Record:
    if end - start < _IFINFOMSG.size:
        return Malformed(f"link message of {end - start} bytes, need {_IFINFOMSG.size}")
    _family, _type, index, flags, _mask = _IFINFOMSG.unpack_from(data, start)
    attrs_, _problem = _attributes(data, start + _IFINFOMSG.size, end)
    return LinkRecord(change, index, _name(attrs_.get(IFLA_IFNAME)), flags, seq)


def _addr(change: Change, data: bytes, start: int, end: int, seq: int) -> Record:
    if end - start < _IFADDRMSG.size:
        return Malformed(f"address message of {end - start} bytes, need {_IFADDRMSG.size}")
    family, prefix_length, flags, _scope, index = _IFADDRMSG.unpack_from(data, start)
    attrs_, problem = _attributes(data, start + _IFADDRMSG.size, end)
    # IPv4: IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
    # peer's on a point-to-point link (rtnetlink(7), linux/if_addr.h).
    address = _address(family, attrs_.get(IFA_LOCAL)) or _address(family, attrs_.get(IFA_ADDRESS))
    if address is None:
        return Malformed(problem or f"address message (family {family}) without an address")
    wide = _u32(attrs_.get(IFA_FLAGS))
    max_prefix = 32 if family == AF_INET else 128
    if prefix_length > max_prefix:
        return Malformed(f"prefix length {prefix_length} for a /{max_prefix} address")
    label = _name(attrs_.get(IFA_LABEL))
    return AddressRecord(
        change, index, address, prefix_length, flags if wide is None else wide, label, seq
    )


def _first_hop(family: int, raw: bytes) -> tuple[IPAddress | None, int]:
    """RTA_MULTIPATH (an ECMP route): the first next hop's gateway and interface."""
    if len(raw) < _RTNEXTHOP.size:
        return None, 0
    length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(raw)
    if length < _RTNEXTHOP.size or length > len(raw):
        return None, 0
    inner, _problem = _attributes(raw, _RTNEXTHOP.size, length)
    return _gateway(family, inner), ifindex


def _gateway(family: int, attrs_: dict[int, bytes]) -> IPAddress | None:
    gateway = _address(family, attrs_.get(RTA_GATEWAY))
    via = attrs_.get(RTA_VIA)
    if gateway is None and via is not None and len(via) >= 2:
        # An IPv4 route via an IPv6 next hop (RFC 5549): struct rtvia is
        # a family (u16) and the address.
        via_family = struct.unpack_from("=H", via)[0]
        gateway = _address(via_family, via[2:])
    return gateway


def _route(change: Change, data: bytes, start: int, end: int, seq: int) -> Record:
    if end - start < _RTMSG.size:
        return Malformed(f"route message of {end - start} bytes, need {_RTMSG.size}")
    family, dst_len, _src_len, _tos, table, _proto, _scope, kind, flags = _RTMSG.unpack_from(
        data, start
    )
    attrs_, _problem = _attributes(data, start + _RTMSG.size, end)
    table = _u32(attrs_.get(RTA_TABLE)) or table  # RTA_TABLE holds tables above 255
    gateway = _gateway(family, attrs_)
    oif = _u32(attrs_.get(RTA_OIF)) or 0
    multipath = attrs_.get(RTA_MULTIPATH)
    if gateway is None and multipath is not None:
        gateway, hop_oif = _first_hop(family, multipath)
        oif = oif or hop_oif
    priority = _u32(attrs_.get(RTA_PRIORITY)) or 0
    return RouteRecord(change, family, dst_len, table, kind, flags, gateway, oif, priority, seq)


_PARSERS: Final = {
    RTM_NEWLINK: (Change.NEW, _link),
    RTM_DELLINK: (Change.DELETED, _link),
    RTM_NEWADDR: (Change.NEW, _addr),
    RTM_DELADDR: (Change.DELETED, _addr),
    RTM_NEWROUTE: (Change.NEW, _route),
    RTM_DELROUTE: (Change.DELETED, _route),
}


def parse_messages(data: bytes) -> list[Record]:
    """Every netlink message in *data* (one datagram), decoded; unknown types are left out.

    Never raises: a header too short or longer than what is left ends the
    walk with a :class:`Malformed` record; a body too short for its struct
    is one :class:`Malformed` in its place.
    """
    records: list[Record] = []
    offset = 0
    interrupted = False
    size = len(data)
    while offset < size:
        if size - offset < _NLMSGHDR.size:
            records.append(Malformed(f"{size - offset} trailing bytes, shorter than a header"))
            break
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > size:
            records.append(Malformed(f"message claims {length} bytes, {size - offset} left"))
            break
        start, end = offset + _NLMSGHDR.size, offset + length
        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
        parser = _PARSERS.get(kind)
        if parser is not None:
            change, parse = parser
            records.append(parse(change, data, start, end, seq))
        elif kind == NLMSG_DONE:
            records.append(Done(seq, interrupted))
        elif kind == NLMSG_ERROR:
            if end - start < _NLMSGERR.size:
                records.append(Malformed("error message without an errno"))
            else:
                error = -_NLMSGERR.unpack_from(data, start)[0]
                if error:
                    records.append(Failed(seq, error))
        elif kind == NLMSG_OVERRUN:
            records.append(Failed(seq, 0))
        offset += _align(length)
    return records


# -- building messages (tests, benchmarks: what the kernel would send) -------------


def _rtattr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _message(kind: int, body: bytes, *, seq: int = 0, flags: int = 0) -> bytes:
    raw = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def encode_link(record: LinkRecord) -> bytes:
    """*record* as the kernel sends it (for tests and benchmarks)."""
    kind = RTM_NEWLINK if record.change is Change.NEW else RTM_DELLINK
    body = _IFINFOMSG.pack(AF_UNSPEC, 1, record.index, record.flags, 0)
    body += _rtattr(IFLA_IFNAME, record.name.encode() + b"\0")
    return _message(kind, body, seq=record.seq, flags=NLM_F_MULTI if record.seq else 0)


def encode_address(record: AddressRecord) -> bytes:
    """*record* as the kernel sends it (for tests and benchmarks)."""
    kind = RTM_NEWADDR if record.change is Change.NEW else RTM_DELADDR
    family = AF_INET if record.address.version == 4 else AF_INET6
    body = _IFADDRMSG.pack(family, record.prefix_length, record.flags & 0xFF, 0, record.index)
    body += _rtattr(IFA_ADDRESS, record.address.packed)
    if family == AF_INET:
        body += _rtattr(IFA_LOCAL, record.address.packed)
    if record.label:
        body += _rtattr(IFA_LABEL, record.label.encode() + b"\0")
    body += _rtattr(IFA_FLAGS, _U32.pack(record.flags))
    return _message(kind, body, seq=record.seq, flags=NLM_F_MULTI if record.seq else 0)


def encode_route(record: RouteRecord) -> bytes:
    """*record* as the kernel sends it (for tests and benchmarks)."""
    kind = RTM_NEWROUTE if record.change is Change.NEW else RTM_DELROUTE
    table_byte = record.table if record.table < 256 else 252  # RT_TABLE_COMPAT
    body = _RTMSG.pack(
        record.family, record.dst_len, 0, 0, table_byte, 4, 0, record.type, record.flags
    )
    body += _rtattr(RTA_TABLE, _U32.pack(record.table))
    if record.priority:
        body += _rtattr(RTA_PRIORITY, _U32.pack(record.priority))
    if record.gateway is not None:
        body += _rtattr(RTA_GATEWAY, record.gateway.packed)
    if record.oif:
        body += _rtattr(RTA_OIF, _U32.pack(record.oif))
    return _message(kind, body, seq=record.seq, flags=NLM_F_MULTI if record.seq else 0)


def encode_done(seq: int, *, interrupted: bool = False) -> bytes:
    """NLMSG_DONE closing the dump *seq* (for tests)."""
    flags = NLM_F_MULTI | (NLM_F_DUMP_INTR if interrupted else 0)
    return _message(NLMSG_DONE, _NLMSGERR.pack(0), seq=seq, flags=flags)
