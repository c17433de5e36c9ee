"""Which gateway to ask: an explicit address, PORTBROKER_GATEWAY, or the default route.

RFC 6887 §8.1 and RFC 6886 §3.1: with nothing configured, the PCP server and
the NAT-PMP gateway are the default router. The PCP server may be another
box (a carrier-grade NAT): :func:`choose_pcp_server` takes an explicit one
first, then one DHCP announced (RFC 7291, read by :func:`discover_pcp_servers`
from the DHCP client's lease files), then the gateway (docs/double-nat.md).
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Final

import attrs

from portbroker.errors import GatewayNotFound
from portbroker.pcp_discovery import PcpServer, parse_dhclient_leases
from portbroker.types import IPAddress, unscoped
from portbroker.wire._fields import to_address

__all__ = [
    "DHCP_LEASE_GLOBS",
    "ENV_GATEWAY",
    "PcpServerChoice",
    "checked_address",
    "choose_pcp_server",
    "discover_pcp_servers",
    "find_gateway",
    "parse_ipv6_route",
    "parse_macos_route",
    "parse_proc_net_route",
    "resolve_gateway",
]

ENV_GATEWAY = "PORTBROKER_GATEWAY"
_BROADCAST: Final = IPv4Address("255.255.255.255")
_RTF_GATEWAY = 0x2


def parse_proc_net_route(text: str) -> IPv4Address | None:
    """The IPv4 default gateway from Linux's /proc/net/route, lowest metric first."""
    best: tuple[int, IPv4Address] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags, metric = (
                int(fields[1], 16),
                int(fields[2], 16),
                int(fields[3], 16),
                int(fields[6]),
            )
        except ValueError:
            continue
        if destination != 0 or not flags & _RTF_GATEWAY or gateway == 0:
            continue
        # The kernel prints the address in host byte order (little-endian here).
        address = IPv4Address(struct.pack("<I", gateway))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def parse_ipv6_route(text: str) -> IPv6Address | None:
    """The IPv6 default router from Linux's /proc/net/ipv6_route.

    A link-local router (the usual case: RFC 4861 §4.2 routers advertise
    from fe80::/10) carries its interface as the scope (``fe80::1%eth0``),
    without which no socket can reach it.
    """
    best: tuple[int, IPv6Address] | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        destination, prefix, next_hop, metric, flags = (
            fields[0],
            fields[1],
            fields[4],
            fields[5],
            fields[8],
        )
        try:
            if int(prefix, 16) != 0 or int(destination, 16) != 0:
                continue
            if not int(flags, 16) & _RTF_GATEWAY:
                continue
            address = IPv6Address(bytes.fromhex(next_hop))
            rank = int(metric, 16)
            if address.is_link_local and len(fields) > 9 and fields[9].isprintable():
                address = IPv6Address(f"{address}%{fields[9]}")
        except ValueError:
            continue
        if address.is_unspecified:
            continue
        if best is None or rank < best[0]:
            best = (rank, address)
    return best[1] if best else None


def parse_macos_route(text: str) -> IPAddress | None:
    """The ``gateway:`` line of macOS ``route -n get default``."""
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name == "gateway":
            try:
                return to_address(value.strip().split("%")[0])
            except ValueError:
                return None
    return None


def find_gateway() -> IPAddress:
    """The default gateway of this host (IPv4 preferred).

    Raises:
        GatewayNotFound: no default route, or a platform we cannot read.
    """
    if sys.platform.startswith("linux"):
        for path, parse in (
            ("/proc/net/route", parse_proc_net_route),
            ("/proc/net/ipv6_route", parse_ipv6_route),
        ):
            try:
                found = parse(Path(path).read_text())
            except OSError:
                continue
            if found is not None:
                return found
    elif sys.platform == "darwin":
        try:
            output = subprocess.run(
                ["/sbin/route", "-n", "get", "default"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GatewayNotFound(f"route -n get default failed: {exc}") from exc
        found_mac = parse_macos_route(output)
        if found_mac is not None:
            return found_mac
    else:
        raise GatewayNotFound(
            f"cannot read the default route on {sys.platform}; name the gateway explicitly"
        )
    raise GatewayNotFound("no default route; name the gateway explicitly (--gateway IP)")


def resolve_gateway(explicit: str | IPAddress | None = None) -> IPAddress:
    """The gateway to use: *explicit*, else $PORTBROKER_GATEWAY, else the default route.

    Raises:
        GatewayNotFound: nothing usable; ValueError for a malformed address.
    """
    if explicit is not None:
        return _checked(explicit, "gateway")
    env = os.environ.get(ENV_GATEWAY, "").strip()
    if env:
        return _checked(env, ENV_GATEWAY)
    return find_gateway()


def checked_address(value: str | IPAddress, what: str) -> IPAddress:
    """*value* as an address a server or client can have; ValueError naming *what*."""
    return _checked(value, what)


def _checked(value: str | IPAddress, what: str) -> IPAddress:
    if isinstance(value, str):
        # "[fd77::1]", as IPv6 addresses are written in URLs (RFC 3986 §3.2.2).
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
    try:
        address = to_address(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {value!r} is not an IP address") from exc
    # The limited broadcast address is no server either: a request to it
    # goes to every host of the link (or fails with EACCES).
    if address.is_unspecified or address.is_multicast or address == _BROADCAST:
        raise ValueError(f"{what}: {address} cannot be a gateway")
    if isinstance(address, IPv6Address) and address.is_link_local and not address.scope_id:
        raise ValueError(
            f"{what}: {address} is link-local: name its interface ({address}%eth0),"
            " or better the gateway's global or ULA address (docs/ipv6.md)"
        )
    return address


# -- the PCP server (RFC 7291 discovery) ---------------------------------------------

logger = logging.getLogger("portbroker")

# Where DHCP clients that record option 158 / 86 keep their leases: ISC
# dhclient (Debian, Ubuntu; Fedora, RHEL) and NetworkManager's dhclient
# backend. systemd-networkd and NetworkManager's internal client do not
# record these options at all (docs/double-nat.md).
DHCP_LEASE_GLOBS: Final = (
    "/var/lib/dhcp/dhclient*.leases",
    "/var/lib/dhclient/dhclient*.lease*",
    "/var/lib/NetworkManager/dhclient*.lease",
)


def discover_pcp_servers(
    sources: Sequence[str | os.PathLike[str]] | None = None, *, now: float | None = None
) -> list[PcpServer]:
    """The PCP servers DHCP announced, from dhclient-format lease files.

    *sources* are files or directories (every file in a directory, sorted);
    None means the system's (:data:`DHCP_LEASE_GLOBS`). Unreadable files and
    malformed options are skipped, and logged; *now* (seconds since the
    epoch, default the current time) rules out expired leases.
    """
    when = time.time() if now is None else now
    if sources is None:
        paths = [Path(p) for pattern in DHCP_LEASE_GLOBS for p in sorted(glob.glob(pattern))]
    else:
        paths = []
        for source in sources:
            path = Path(source)
            try:
                paths += (
                    sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
                )
            except OSError as exc:
                logger.warning("PCP server discovery: cannot read %s: %s", path, exc)
    # A file the user named that cannot be read is theirs to hear of; the
    # system's are looked for on every start, and often absent.
    level = logging.INFO if sources is None else logging.WARNING
    found: list[PcpServer] = []
    for path in paths:
        try:
            text = _read_lease_file(path)
        except OSError as exc:
            logger.log(level, "PCP server discovery: cannot read %s: %s", path, exc)
            continue
        servers, problems = parse_dhclient_leases(text, source=str(path), now=when)
        for problem in problems:
            logger.warning("PCP server discovery: %s", problem)
        found += servers
    return _not_this_host(found) if found else found


def _not_this_host(servers: list[PcpServer]) -> list[PcpServer]:
    """*servers* without this host's own addresses: a lease (or a rogue DHCP
    server) naming the host itself would have us map on whatever listens on
    its port 5351, as a loopback address would (RFC 7291 §4.2)."""
    from portbroker.p2p import interface_addresses  # p2p imports the broker

    try:
        own = {entry.address for entry in interface_addresses()}
    except OSError:
        return servers  # cannot tell; the family and usability checks still hold
    out = []
    for server in servers:
        kept = tuple(a for a in server.addresses if unscoped(a) not in own)
        if len(kept) < len(server.addresses):
            logger.warning(
                "PCP server discovery: %s names this host's own address; ignored", server.source
            )
        if kept:
            out.append(attrs.evolve(server, addresses=kept))
    return out


# dhclient appends a lease block per renewal and rewrites the file when it
# starts, so a file is a few KiB; a long-lived one can grow. Its tail holds the
# current leases (the last block of each interface counts).
MAX_LEASE_FILE = 1 << 20


def _read_lease_file(path: Path) -> str:
    """A lease file's text, or its last :data:`MAX_LEASE_FILE` octets from
    the first whole ``lease`` block on.

    Opened non-blocking and read only when it is a regular file: a path that
    is a fifo (which would block the open and every read) or a device
    (/dev/zero: an endless read) raises OSError, as an unreadable file does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        tail = info.st_size > MAX_LEASE_FILE
        if tail:
            file.seek(info.st_size - MAX_LEASE_FILE)
        data = file.read(MAX_LEASE_FILE)
    if tail:
        # Cut mid-block: start at the first block that begins in what was read.
        start = min(
            (i for i in (data.find(b"\nlease {"), data.find(b"\nlease6 {")) if i >= 0),
            default=len(data),
        )
        data = data[start:]
        logger.info(
            "PCP server discovery: %s is %d octets; reading its last %d",
            path,
            info.st_size,
            MAX_LEASE_FILE,
        )
    return data.decode("utf-8", errors="replace")


@attrs.frozen
class PcpServerChoice:
    """The PCP server to use and why (``source``, in words)."""

    address: IPAddress
    source: str


def choose_pcp_server(
    explicit: str | IPAddress | None,
    gateway: IPAddress,
    discovered: Sequence[PcpServer] = (),
) -> PcpServerChoice:
    """An explicit server, else the first DHCP-announced one of the gateway's
    family, else the gateway (RFC 6887 §8.1). Of the announced servers, one
    from a lease whose routers (option 3) include *gateway* comes first: with
    leases on several interfaces (wired and Wi-Fi), the default route's
    network is the one whose NAT we map on.

    Explicit configuration wins over DHCP: it is the only way to overrule a
    stale or wrong lease, and RFC 7488 §4 leaves the order of configured
    and discovered servers to the implementation (docs/double-nat.md). Of a
    server's addresses the first of the gateway's family is used.

    Raises:
        ValueError: *explicit* is not a usable address.
    """
    if explicit is not None:
        return PcpServerChoice(_checked(explicit, "pcp_server"), "configured (--pcp-server)")
    ours = [s for s in discovered if gateway in s.routers]
    for server in ours + [s for s in discovered if s not in ours]:
        for address in server.addresses:
            if address.version == gateway.version:
                return PcpServerChoice(address, server.source)
    return PcpServerChoice(gateway, "the gateway")
