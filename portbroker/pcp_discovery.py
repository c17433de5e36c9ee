"""PCP servers announced by DHCP (RFC 7291), read from the DHCP client's lease files.

Sans-IO: the option codecs and the lease-file parser take bytes and text;
:func:`portbroker.gateway.discover_pcp_servers` reads the files. What each DHCP
client records, and which cases work, is in docs/double-nat.md.

- DHCPv4 OPTION_V4_PCP_SERVER (158), RFC 7291 §4: one or more lists, each a
  List-Length octet and that many octets of IPv4 addresses (a multiple of 4);
  each list is one PCP server, its addresses alternatives of the same server.
- DHCPv6 OPTION_V6_PCP_SERVER (86), RFC 7291 §3: 16 octets per address; each
  option instance is one server; an IPv4-mapped address (RFC 4291 §2.5.5.2)
  names an IPv4 PCP server.
- Unusable addresses (unspecified, multicast, loopback, the broadcast
  address) are dropped (RFC 7291 §3.2, §4.2); a malformed option is
  discarded whole.

ISC dhclient (and NetworkManager's dhclient backend, which writes the same
format) records an option it has no definition for as ``option unknown-158
4:c0:a8:1:1;`` (``dhcp6.unknown-86`` for DHCPv6): colon-separated hex octets,
or a quoted string with octal escapes (``"\004\300\250\001\001"``); both
forms are seen in real lease files. An
option defined in dhclient.conf under one of :data:`V4_NAMES` /
:data:`V6_NAMES` (as ``string``, or for DHCPv6 ``array of ip6-address``) is
read too.
"""

from __future__ import annotations

import calendar
import re
import time
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

import attrs

__all__ = [
    "V4_NAMES",
    "V4_OPTION",
    "V6_NAMES",
    "V6_OPTION",
    "PcpServer",
    "decode_v4_option",
    "decode_v6_option",
    "parse_dhclient_leases",
]

V4_OPTION: Final = 158
V6_OPTION: Final = 86
# How dhclient names the options: unknown-N when undefined, else what the
# administrator called it in dhclient.conf (these are the names in use).
V4_NAMES: Final = ("unknown-158", "pcp-server", "pcp-servers", "v4-pcp-server")
V6_NAMES: Final = (
    "dhcp6.unknown-86",
    "dhcp6.pcp-server",
    "dhcp6.pcp-servers",
    "dhcp6.v6-pcp-server",
)

IPAddr = IPv4Address | IPv6Address


@attrs.frozen
class PcpServer:
    """One PCP server announced by DHCP: its addresses (alternatives of the
    same server, RFC 7291 §4), where it was learned, in words, and the
    routers (option 3) of the lease that announced it: which network it is."""

    addresses: tuple[IPAddr, ...]
    source: str
    routers: tuple[IPAddr, ...] = ()


def _usable(address: IPAddr) -> bool:
    # RFC 7291 §3.2 / §4.2: "MUST silently discard multicast and host loopback
    # addresses"; unspecified and broadcast cannot be a server either. A DHCP
    # server (or a rogue one on the link) must not make us send PCP to a
    # service on this host.
    return not (
        address.is_unspecified
        or address.is_multicast
        or address.is_loopback
        or address == IPv4Address("255.255.255.255")
    )


def decode_v4_option(data: bytes) -> tuple[tuple[IPv4Address, ...], ...]:
    """The servers in an OPTION_V4_PCP_SERVER body (without code and length).

    Raises:
        ValueError: the body is malformed (RFC 7291 §4: too short, a
            List-Length that is zero, not a multiple of 4, or past the end).
    """
    if len(data) < 5:
        raise ValueError(f"option 158 is {len(data)} octets; at least 5 are needed")
    servers: list[tuple[IPv4Address, ...]] = []
    at = 0
    while at < len(data):
        length = data[at]
        at += 1
        if length == 0 or length % 4:
            raise ValueError(f"option 158: a List-Length of {length} is not a multiple of 4")
        if at + length > len(data):
            raise ValueError(f"option 158: a list of {length} octets runs past the option's end")
        addresses = tuple(
            IPv4Address(data[i : i + 4]) for i in range(at, at + length, 4)
        )  # a list is one server's addresses
        at += length
        usable = tuple(a for a in addresses if _usable(a))
        if usable:
            servers.append(usable)
    return tuple(servers)


def decode_v6_option(data: bytes) -> tuple[IPAddr, ...]:
    """One OPTION_V6_PCP_SERVER instance's addresses (one server), IPv4-mapped
    ones as IPv4 addresses.

    Raises:
        ValueError: the length is not a non-zero multiple of 16 (RFC 7291 §3).
    """
    if not data or len(data) % 16:
        raise ValueError(f"option 86 is {len(data)} octets, not a multiple of 16")
    out: list[IPAddr] = []
    for i in range(0, len(data), 16):
        address = IPv6Address(data[i : i + 16])
        found: IPAddr = address.ipv4_mapped or address
        if _usable(found):
            out.append(found)
    return tuple(out)


# -- ISC dhclient lease files -----------------------------------------------------

# A quoted string's closing quote is optional: an unterminated one (a
# truncated file, garbage) then ends the file in one token instead of being
# tried again from every later quote, which is quadratic in a file of ``\"``.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[{};]|[^\s{};"]+', re.DOTALL)
_ESCAPE = re.compile(rb"\\([0-7]{1,3}|.)", re.DOTALL)


def _statements(text: str) -> list[tuple[int, list[str]]]:
    """(brace depth, tokens) per statement; ``{`` ends a statement too."""
    text = re.sub(r"#[^\n]*", "", text)  # comments (dhclient writes "# Wed Jan ...")
    out: list[tuple[int, list[str]]] = []
    depth = 0
    current: list[str] = []
    for word in _TOKEN.findall(text):
        if word == "{":
            out.append((depth, [*current, "{"]))
            current = []
            depth += 1
        elif word == "}":
            if current:
                out.append((depth, current))
            current = []
            depth = max(0, depth - 1)
            out.append((depth, ["}"]))
        elif word == ";":
            if current:
                out.append((depth, current))
            current = []
        else:
            current.append(word)
    return out


def _value_bytes(tokens: list[str]) -> bytes:
    """An option's value as dhclient prints it, back to octets."""
    joined = " ".join(tokens)
    if joined.startswith('"') and joined.endswith('"') and len(tokens) == 1:
        raw = joined[1:-1].encode("latin-1")

        def unescape(match: re.Match[bytes]) -> bytes:
            escaped = match.group(1)
            if escaped[:1].isdigit():
                return bytes([int(escaped, 8) & 0xFF])
            return escaped

        return _ESCAPE.sub(unescape, raw)
    parts = joined.replace(" ", "").split(":")
    try:
        octets = bytes(int(part, 16) for part in parts)
    except ValueError:
        raise ValueError(f"not colon-separated hex octets: {joined!r}") from None
    if len(parts) < 2:
        raise ValueError(f"not colon-separated hex octets: {joined!r}")
    return octets


def _v6_addresses(tokens: list[str]) -> tuple[IPAddr, ...]:
    """``array of ip6-address`` (``2001:db8::1,2001:db8::2``) or raw octets."""
    joined = "".join(tokens)
    try:
        listed = [ip_address(part) for part in joined.split(",") if part]
    except ValueError:
        return decode_v6_option(_value_bytes(tokens))
    out: list[IPAddr] = []
    for address in listed:
        found: IPAddr = (
            address.ipv4_mapped or address if isinstance(address, IPv6Address) else address
        )
        if _usable(found):
            out.append(found)
    return tuple(out)


def _expiry(tokens: list[str]) -> float | None:
    """``expire 3 2024/01/17 10:26:43`` (UTC) or ``expire epoch 1705487203``."""
    if len(tokens) >= 3 and tokens[1] == "epoch":
        try:
            return float(tokens[2])
        except ValueError:
            return None
    if len(tokens) >= 4:
        try:
            parsed = time.strptime(f"{tokens[2]} {tokens[3]}", "%Y/%m/%d %H:%M:%S")
        except ValueError:
            return None
        return float(calendar.timegm(parsed))
    return None  # "expire never" and the like


@attrs.define
class _Lease:
    family: str  # "lease" (DHCPv4) or "lease6"
    interface: str = "?"
    expires: float | None = None
    routers: tuple[IPAddr, ...] = ()
    servers: list[tuple[IPAddr, ...]] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)


def parse_dhclient_leases(
    text: str, *, source: str, now: float | None = None
) -> tuple[list[PcpServer], list[str]]:
    """The PCP servers in an ISC dhclient lease file, and what was wrong in it.

    dhclient appends each new lease, so the last ``lease`` (``lease6``) block
    of each interface is the current one; a DHCPv4 lease whose ``expire``
    lies before *now* (seconds since the epoch) is ignored. Returns the
    servers (DHCPv4 first, then DHCPv6, each in file order) and one line per
    malformed option, which was discarded (RFC 7291 §5).
    """
    current: dict[tuple[str, str], _Lease] = {}
    lease: _Lease | None = None
    for depth, tokens in _statements(text):
        if depth == 0 and tokens[-1:] == ["{"] and tokens[0] in ("lease", "lease6"):
            lease = _Lease(tokens[0])
            continue
        if lease is None:
            continue
        if depth == 0 and tokens == ["}"]:
            current.pop((lease.family, lease.interface), None)  # the last one wins
            current[(lease.family, lease.interface)] = lease
            lease = None
            continue
        if depth != 1 or not tokens:
            continue
        keyword = tokens[0]
        if keyword == "interface" and len(tokens) > 1:
            lease.interface = tokens[1].strip('"')
        elif keyword == "expire":
            lease.expires = _expiry(tokens)
        elif keyword == "option" and len(tokens) >= 3 and tokens[1] == "routers":
            lease.routers = _routers(tokens[2:])
        elif keyword == "option" and len(tokens) >= 3:
            _read_option(lease, tokens[1], tokens[2:])
    servers: list[PcpServer] = []
    problems: list[str] = []
    for family in ("lease", "lease6"):
        for (kind, interface), found in current.items():
            if kind != family:
                continue
            problems += [f"{source} ({interface}): {p}" for p in found.problems]
            if now is not None and found.expires is not None and found.expires < now:
                continue
            what = "DHCPv4 option 158" if family == "lease" else "DHCPv6 option 86"
            servers += [
                PcpServer(
                    tuple(_scoped(a, interface) for a in addresses),
                    f"{what} in {source} ({interface})",
                    found.routers,
                )
                for addresses in found.servers
            ]
    return servers, problems


def _scoped(address: IPAddr, interface: str) -> IPAddr:
    """A link-local server is reachable only on the lease's interface: without
    the scope (fe80::1%eth0) no socket can send to it."""
    if (
        isinstance(address, IPv6Address)
        and address.is_link_local
        and not address.scope_id
        and interface != "?"
    ):
        try:
            return IPv6Address(f"{address}%{interface}")
        except ValueError:
            return address
    return address


def _routers(tokens: list[str]) -> tuple[IPAddr, ...]:
    """``option routers 192.168.1.1, 192.168.1.2;``; nothing if malformed."""
    try:
        return tuple(ip_address(part) for part in "".join(tokens).split(",") if part)
    except ValueError:
        return ()


def _read_option(lease: _Lease, name: str, value: list[str]) -> None:
    try:
        if lease.family == "lease" and name in V4_NAMES:
            lease.servers += decode_v4_option(_value_bytes(value))
        elif lease.family == "lease6" and name in V6_NAMES:
            addresses = _v6_addresses(value)
            if addresses:
                lease.servers.append(addresses)
    except ValueError as exc:
        lease.problems.append(f"option {name} discarded: {exc}")
