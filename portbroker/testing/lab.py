"""A real NAT gateway in network namespaces: miniupnpd + nftables.

The only honest proof that a port mapping works is a packet from outside that
arrives inside. :func:`open_lab` builds a gateway site (see ``docs/lab.md``)::

    lan ns  192.168.77.2 --+
    lan2 ns 192.168.77.3 --+-- gw ns: bridge 192.168.77.1 (gw_lan_if)
    (add_lan_host)                   veth 11.0.0.1 (gw_wan_if) --- wan ns: bridge 11.0.0.2
                                     miniupnpd: PCP + NAT-PMP on 5351,    (add_wan_address,
                                       UPnP IGD (SSDP 1900, HTTP 2189)     add_wan_host)
                                     nftables: forward + DNAT chains

A test maps a port from a lan host, then connects from the wan namespace to
``lab.external_address:<external port>``.

- The lan is a Linux bridge in the gw namespace that holds the gateway's lan
  address, so several hosts share it (:meth:`Lab.add_lan_host`). ``gw_lan_if``
  is the gateway's lan-side interface: that bridge (miniupnpd's
  ``listening_ip`` and the nftables ``iifname`` accept rule name it).
- The wan side is a bridge in the wan namespace holding the wan host's
  11.0.0.2; :meth:`Lab.add_wan_address` gives it more source addresses and
  :meth:`Lab.add_wan_host` plugs in more host namespaces (two distinct remote
  sources for PCP FILTER tests).
- :meth:`Lab.set_external_address` changes the gateway's wan address the way an
  ISP lease change does; miniupnpd 2.3.1 notices by itself (netlink) and
  announces it over NAT-PMP and PCP (details in the method).
- ``open_lab(ipv6=True)`` adds ULA prefixes (lan fd77::/64, wan fd11::/64)
  behind the same drop-policy forward chain, opened only by miniupnpd's
  pinholes.
- A :class:`Lab` is one gateway site; :func:`open_sites` builds two of them
  on one wan segment, :func:`open_series` one behind another (double NAT;
  what miniupnpd does behind a non-global address is in its docstring), both
  with the same building code as :func:`open_lab`. :meth:`Lab.add_dnat`
  installs a port mapping with nftables alone, and
  :meth:`Lab.start_nat_server` runs :class:`NatServer` (PCP + NAT-PMP of the
  lab's own, over those nftables mappings), for gateways miniupnpd cannot
  serve (behind a non-global external address).
- :func:`open_roaming` puts two gateways on one lan (a bridge in a namespace
  of its own) and moves a lan host's default route between them, as a
  laptop that changes networks.

Safety: everything stays inside the namespaces; veths are created directly
in their namespaces, never in the root one. The wan side is 11.0.0.0/24
because miniupnpd 2.3.1 refuses to map behind a private or reserved external
address; while a lab is up a blackhole route for 11.0.0.0/24 (one per lab,
told apart by its metric, so a lab removes only its own) in the root
namespace makes sure nothing addressed there can leave the machine. Names get
a random suffix so parallel or leftover labs never collide; teardown runs in
``finally``; only processes the lab started are stopped, by pid. A lab whose
process was killed before its teardown (SIGKILL, a CI limit's kill-after)
leaves its namespaces, their processes and its blackhole routes; the next lab
opened on the machine removes them (:func:`sweep_stale_labs`).

Needs Linux, root, iproute2 (``ip``, ``ss``), nftables (``nft``) and
miniupnpd with the nftables backend (Debian: ``miniupnpd-nftables``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Final, TypeVar

import attrs

from portbroker.errors import PortBrokerError
from portbroker.wire import natpmp, pcp

__all__ = [
    "EXTERNAL_ADDRESS",
    "EXTERNAL_ADDRESS6",
    "GATEWAY_ADDRESS",
    "GATEWAY_ADDRESS6",
    "HTTP_PORT",
    "LAN_ADDRESS",
    "LAN_ADDRESS6",
    "LAN_NETWORK",
    "LAN_NETWORK6",
    "WAN_ADDRESS",
    "WAN_ADDRESS6",
    "WAN_NETWORK",
    "WAN_NETWORK6",
    "Lab",
    "LabError",
    "LanHost",
    "NatMapping",
    "NatServer",
    "Roaming",
    "Series",
    "Sites",
    "Variant",
    "WanHost",
    "lab_unavailable_reason",
    "main",
    "open_lab",
    "open_roaming",
    "open_series",
    "open_sites",
]

LAN_ADDRESS: Final = IPv4Address("192.168.77.2")
GATEWAY_ADDRESS: Final = IPv4Address("192.168.77.1")
EXTERNAL_ADDRESS: Final = IPv4Address("11.0.0.1")
WAN_ADDRESS: Final = IPv4Address("11.0.0.2")
WAN_NETWORK: Final = "11.0.0.0/24"
LAN_NETWORK: Final = IPv4Network("192.168.77.0/24")
LAN_NETWORK6: Final = IPv6Network("fd77::/64")
WAN_NETWORK6: Final = IPv6Network("fd11::/64")
LAN_ADDRESS6: Final = IPv6Address("fd77::2")
GATEWAY_ADDRESS6: Final = IPv6Address("fd77::1")
EXTERNAL_ADDRESS6: Final = IPv6Address("fd11::1")
WAN_ADDRESS6: Final = IPv6Address("fd11::2")
HTTP_PORT: Final = 2189  # miniupnpd's UPnP HTTP port, fixed so tests know it

_CLONE_NEWNET: Final = 0x40000000
_READY_TIMEOUT: Final = 10.0

T = TypeVar("T")


class LabError(PortBrokerError):
    """The lab could not be built or driven; the message says which step failed."""


class Variant(enum.Enum):
    """Which services the lab's gateway runs."""

    FULL = "full"  # PCP + NAT-PMP + UPnP IGD
    UPNP_ONLY = "upnp-only"
    PCP_NATPMP_ONLY = "pcp-natpmp-only"
    NONE = "none"  # no mapping service: 5351 and 1900 answer ICMP port unreachable

    @property
    def natpmp(self) -> bool:
        return self in (Variant.FULL, Variant.PCP_NATPMP_ONLY)

    @property
    def upnp(self) -> bool:
        return self in (Variant.FULL, Variant.UPNP_ONLY)


def lab_unavailable_reason() -> str | None:
    """Why a lab cannot be built on this machine, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "ss", "nft", "miniupnpd") if _which(tool) is None]
    if missing:
        return (
            f"the lab needs {', '.join(missing)}: apt-get install iproute2 nftables "
            "miniupnpd-nftables"
        )
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(argv: Sequence[str], *, input_text: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run *fn* on a fresh thread that has joined network namespace *netns*.

    setns(2) with CLONE_NEWNET changes only the calling thread, so the rest of
    the process stays where it was. Sockets created by *fn* stay in *netns*
    for their whole life, whichever thread uses them later.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


_NFT_RULESET = """\
table inet filter {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{lan_if}" accept
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    oifname "{wan_if}" meta nfproto ipv4 masquerade
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""
# One `inet` table serves both families: the forward chain (policy drop) is
# also IPv6's firewall, and miniupnpd 2.3.1's nft backend puts IPv6 pinholes
# (PCP MAP over IPv6, UPnP WANIPv6FirewallControl) into the same `miniupnpd`
# chain as its IPv4 forward rules (`upnp_forward_chain`, default "miniupnpd";
# seen here as `iif <wan> ... ip6 daddr <host> ... accept`). IPv6 is routed,
# not translated: masquerade is IPv4 only.

_DNAT_SETUP = """\
table ip pb_dnat {{
  map ports {{
    type inet_proto . inet_service : ipv4_addr . inet_service;
  }}
  chain prerouting {{
    type nat hook prerouting priority -110; policy accept;
    iifname "{wan_if}" dnat to meta l4proto . th dport map @ports
  }}
}}
add set inet filter pb_dnat_forward {{ type ipv4_addr . inet_proto . inet_service; }}
insert rule inet filter forward ip daddr . meta l4proto . th dport @pb_dnat_forward accept
"""
# Lab.add_dnat's own port mappings: a DNAT map in a table of its own and a
# forward accept (the forward chain's drop policy applies to every table).

_MINIUPNPD_CHAINS: Final = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")
_ADDRESS_CHANGE_LINE: Final = "should send external iface address change notification(s)"
_HOST_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _ip(netns: str, *args: str) -> str:
    return _run(["ip", "-n", netns, *args])


def _sysctl(netns: str, setting: str) -> None:
    _run(["ip", "netns", "exec", netns, "sysctl", "-qw", setting])


def _add_address(netns: str, dev: str, address: IPv4Address | IPv6Address, prefixlen: int) -> None:
    if address.version == 6:
        # nodad: the address is usable at once. A tentative address (RFC 4862
        # §5.4, about 1 s here) cannot be bound, so tests would race DAD.
        _ip(netns, "-6", "addr", "add", f"{address}/{prefixlen}", "dev", dev, "nodad")
    else:
        _ip(netns, "addr", "add", f"{address}/{prefixlen}", "dev", dev)


def _check_label(label: str, what: str) -> None:
    if not label or len(label) > 8 or not set(label) <= _HOST_NAME_CHARS:
        raise LabError(f"{what} name {label!r}: use 1 to 8 lowercase letters or digits")


@attrs.frozen
class LanHost:
    """A host namespace on a gateway's lan bridge (see :meth:`Lab.add_lan_host`).

    Its default routes point at the gateway's lan addresses.
    """

    ns: str
    address: IPv4Address
    interface: str  # in ``ns``, the host's end of its veth to the bridge
    address6: IPv6Address | None = None  # with ``ipv6=True``: fd77::2, ...


@attrs.frozen
class WanHost:
    """A host on the wan segment (see :meth:`Lab.add_wan_host`)."""

    ns: str
    address: IPv4Address
    interface: str  # in ``ns``
    address6: IPv6Address | None = None  # with ``ipv6=True``: fd11::2, ...


@attrs.define(eq=False)
class _Segment:
    """An Ethernet segment: a Linux bridge in *ns* that hosts are plugged into.

    Each attached host gets a veth pair created directly in the two
    namespaces (never in the root namespace). Addresses are handed out here
    so that nobody on the segment gets one twice; a host's IPv6 address has
    the same host number as its IPv4 one (.3 and ::3).
    """

    ns: str
    bridge: str
    port_prefix: str  # bridge ports are named port_prefix + a number
    network: IPv4Network
    network6: IPv6Network | None = None
    _used: set[IPv4Address] = attrs.Factory(set)
    _ports: int = 0

    def create(self) -> None:
        # mcast_snooping 0: without an IGMP querier on the segment, snooping
        # can stop multicast (SSDP, NAT-PMP announcements, mDNS) reaching a
        # port; a plain hub is what the tests expect.
        _ip(self.ns, "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip(self.ns, "link", "set", self.bridge, "up")

    def claim(self, address: IPv4Address | None = None) -> IPv4Address:
        """Reserve *address* (or the lowest free one from .2 up) on this segment."""
        if address is None:
            for candidate in self.network.hosts():
                if candidate not in self._used and candidate != self.network[1]:
                    address = candidate
                    break
            else:
                raise LabError(f"no free address left in {self.network}")
        if address not in self.network or address in (
            self.network.network_address,
            self.network.broadcast_address,
        ):
            raise LabError(f"{address} is not a host address of {self.network}")
        if address in self._used:
            raise LabError(f"{address} is already in use on {self.network}")
        self._used.add(address)
        return address

    def release(self, address: IPv4Address) -> None:
        self._used.discard(address)

    def address6(self, address: IPv4Address) -> IPv6Address | None:
        """The IPv6 address with *address*'s host number, if the segment has IPv6."""
        if self.network6 is None:
            return None
        return self.network6[int(address) - int(self.network.network_address)]

    def attach(self, host_ns: str, host_if: str) -> None:
        """Plug a new veth into the bridge; its other end is *host_if* in *host_ns*."""
        self._ports += 1
        port = f"{self.port_prefix}{self._ports}"
        _run(
            [
                "ip", "link", "add", host_if, "netns", host_ns,
                "type", "veth", "peer", "name", port, "netns", self.ns,
            ]
        )  # fmt: skip
        _ip(self.ns, "link", "set", port, "master", self.bridge, "up")
        _ip(host_ns, "link", "set", host_if, "up")

    def add_host_address(self, host_ns: str, dev: str, address: IPv4Address) -> IPv6Address | None:
        """Put *address* (and its IPv6 twin) on *dev*; the IPv6 address, if any."""
        _add_address(host_ns, dev, address, self.network.prefixlen)
        address6 = self.address6(address)
        if address6 is not None:
            assert self.network6 is not None
            _add_address(host_ns, dev, address6, self.network6.prefixlen)
        return address6


@attrs.define(eq=False)
class _Blackholes:
    """Blackhole routes in the root namespace, each with a metric of its own.

    Several labs (also of other test runs) may be up at once and all want
    ``blackhole 11.0.0.0/24``: a route per lab, told apart by its metric, lets
    each lab remove exactly its own and never another lab's.
    """

    metric: int
    routes: list[str] = attrs.Factory(list)

    def add(self, prefix: str) -> None:
        family = "-6" if ":" in prefix else "-4"
        _run(["ip", family, "route", "add", "blackhole", prefix, "metric", str(self.metric)])
        self.routes.append(prefix)

    def remove_all(self) -> None:
        while self.routes:
            prefix = self.routes.pop()
            family = "-6" if ":" in prefix else "-4"
            subprocess.run(
                ["ip", family, "route", "del", "blackhole", prefix, "metric", str(self.metric)],
                capture_output=True,
                check=False,
            )


def _metric(suffix: str) -> int:
    return 1000 + int(suffix, 16)


def _prepare_ns(netns: str, ipv6: bool) -> None:
    _ip(netns, "link", "set", "lo", "up")
    if ipv6:
        # Interfaces created in the namespace from now on skip DAD too (their
        # link-local addresses included), so nothing stays tentative.
        _sysctl(netns, "net.ipv6.conf.default.accept_dad=0")
        _sysctl(netns, "net.ipv6.conf.all.accept_dad=0")


@attrs.define(eq=False)
class _Wan:
    """The wan segment: a bridge in the wan namespace holding the wan host's 11.0.0.2.

    Owned by a single lab (:func:`open_lab`) or shared by the gateways of
    :func:`open_sites`; whoever builds it blackholes its prefixes in the root
    namespace and deletes its namespace.
    """

    ns: str
    segment: _Segment
    host: WanHost
    created_ns: list[str]
    blackholes: _Blackholes

    @classmethod
    def build(cls, suffix: str, *, ipv6: bool) -> _Wan:
        ns = f"pb-wan-{suffix}"
        created: list[str] = []
        blackholes = _Blackholes(_metric(suffix))
        bridge = f"pb{suffix}w"
        segment = _Segment(ns, bridge, f"pb{suffix}q", IPv4Network(WAN_NETWORK))
        wan = cls(ns, segment, WanHost(ns, WAN_ADDRESS, bridge), created, blackholes)
        try:
            _add_namespace(ns, created, ipv6)
            blackholes.add(WAN_NETWORK)
            if ipv6:
                wan.segment.network6 = WAN_NETWORK6
                blackholes.add(str(WAN_NETWORK6))
            wan.segment.create()
            address = wan.segment.claim(WAN_ADDRESS)
            address6 = wan.segment.add_host_address(ns, wan.segment.bridge, address)
            wan.host = WanHost(ns, address, wan.segment.bridge, address6)
        except BaseException:
            wan.close()
            raise
        return wan

    def close(self, *, disown: bool = True) -> list[str]:
        """Delete its namespaces and routes; the errors. Its owner file goes
        only once all is gone (*disown* False: its lab's close decides)."""
        errors = _delete_namespaces(self.created_ns)
        self.blackholes.remove_all()
        if disown and not errors:
            _disown(_suffix_of(self.ns))
        return errors

    def close_checked(self) -> None:
        """:meth:`close`, raising LabError if anything was left."""
        _raise_if_left(self.close())


class _InNamespaces:
    """What a lab, two sites, a series and a roaming lan offer alike: sockets
    and commands inside any of their namespaces."""

    __slots__ = ()

    def socket(
        self, netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
    ) -> socket.socket:
        """A new socket that lives in *netns* (``lab.lan_ns`` and friends)."""
        return in_netns(netns, lambda: socket.socket(family, kind))

    def exec_argv(self, netns: str, argv: Sequence[str]) -> list[str]:
        """*argv* prefixed to run inside *netns*."""
        return ["ip", "netns", "exec", netns, *argv]


@attrs.define(eq=False)
class Lab(_InNamespaces):
    """One gateway site, built: gw ns + lan bridge + wan link + nftables + miniupnpd.

    Create it with :func:`open_lab` (a site with a wan namespace of its own),
    :func:`open_sites` (two sites on one wan segment) or :func:`open_series`
    (a site behind another); everything here is live.

    Names (each in the namespace it is used in):

    - ``gw_lan_if``: the gateway's lan-side interface, the bridge that holds
      the gateway's lan address (192.168.77.1): miniupnpd's ``listening_ip``
      and the nftables ``iifname`` accept rule name it.
    - ``gw_wan_if``: the gateway's wan-side veth (miniupnpd's ``ext_ifname``).
    - ``lan_ns`` / ``lan_if``: the first lan host (192.168.77.2) and its
      interface; ``lan_hosts`` lists it and every host added later.
    - ``wan_ns`` / ``wan_if``: the namespace of the segment upstream of the
      gateway and its bridge. For :func:`open_lab` and :func:`open_sites` that
      bridge holds the wan host's address (11.0.0.2, ``wan_hosts[0]``); for the
      inner gateway of :func:`open_series` it is the outer gateway's lan.
    """

    variant: Variant
    suffix: str
    workdir: Path
    extra_config: tuple[str, ...] = ()
    lan_network: IPv4Network = attrs.field(default=LAN_NETWORK, kw_only=True)
    external_address: IPv4Address = attrs.field(default=EXTERNAL_ADDRESS, kw_only=True)
    """The gateway's current wan address (:meth:`set_external_address` changes it)."""
    ipv6: bool = attrs.field(default=False, kw_only=True)
    lan_network6: IPv6Network = attrs.field(default=LAN_NETWORK6, kw_only=True)
    name: str = attrs.field(default="", kw_only=True)  # a site's label ("a", "inner")
    lan_gateway: IPv4Address | None = attrs.field(default=None, kw_only=True)
    """The gateway's lan address when it is not host 1 of the lan (:func:`open_roaming`'s b)."""
    lan_ns: str = attrs.field(init=False)
    gw_ns: str = attrs.field(init=False)
    wan_ns: str = attrs.field(init=False)
    lan_if: str = attrs.field(init=False)
    gw_lan_if: str = attrs.field(init=False)
    gw_wan_if: str = attrs.field(init=False)
    wan_if: str = attrs.field(init=False)
    lan_hosts: list[LanHost] = attrs.field(init=False, factory=list)
    wan_hosts: list[WanHost] = attrs.field(init=False, factory=list)
    external_address6: IPv6Address | None = attrs.field(init=False, default=None)
    """The gateway's wan-side IPv6 address (fd11::1) with ``ipv6=True``."""
    miniupnpd_pid: int | None = None
    miniupnpd_started: float | None = None
    """When miniupnpd last started (``time.monotonic()``): its PCP epoch counts from here."""
    restarts: int = 0
    _process: subprocess.Popen[bytes] | None = None
    _created_ns: list[str] = attrs.Factory(list)
    _lan: _Segment = attrs.field(init=False)
    _wan: _Segment | None = None
    _own_wan: _Wan | None = None
    _blackholes: _Blackholes = attrs.field(init=False)
    _dnat_ready: bool = False
    _nat_servers: list[NatServer] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        s = self.suffix
        self.gw_ns = f"pb-gw-{s}"
        self.lan_ns = f"pb-lan-{s}"
        self.wan_ns = f"pb-wan-{s}"
        # Interface names are at most 15 characters.
        self.lan_if, self.gw_lan_if = f"pb{s}l", f"pb{s}g"
        self.gw_wan_if, self.wan_if = f"pb{s}x", f"pb{s}w"
        self._lan = _Segment(
            self.gw_ns,
            self.gw_lan_if,
            f"pb{s}p",
            self.lan_network,
            self.lan_network6 if self.ipv6 else None,
        )
        self._blackholes = _Blackholes(_metric(s))

    # -- paths ------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "miniupnpd.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "miniupnpd.conf"

    @property
    def gateway_address(self) -> IPv4Address:
        """The gateway's lan address (192.168.77.1 for the default lan)."""
        if self.lan_gateway is not None:
            return self.lan_gateway
        return self.lan_network[1]

    @property
    def gateway_address6(self) -> IPv6Address | None:
        """The gateway's lan IPv6 address (fd77::1) with ``ipv6=True``."""
        return self._lan.address6(self.gateway_address)

    @property
    def lan_address(self) -> IPv4Address:
        """The first lan host's address (192.168.77.2 for the default lan)."""
        return self.lan_hosts[0].address

    @property
    def wan_address(self) -> IPv4Address:
        """The wan host's address (11.0.0.2), in ``wan_ns``."""
        return self.wan_hosts[0].address

    def log_text(self) -> str:
        """miniupnpd's output so far (empty for the NONE variant)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- building ---------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        _add_namespace(ns, self._created_ns, self.ipv6)

    def _build(
        self,
        uplink: _Wan | _Segment | None = None,
        *,
        upstream: IPv4Address | None = None,
        first_host: bool = True,
        lan: _Segment | None = None,
    ) -> None:
        """Build the site; its wan side plugs into *uplink*.

        *lan*, when given, is a lan segment in a namespace of its own that
        this gateway joins with a veth (``gw_lan_if``) instead of holding the
        lan bridge itself: several gateways on one lan (:func:`open_roaming`).

        Without *uplink* the site gets a wan segment of its own (:class:`_Wan`).
        A :class:`_Wan` holds the wan host; a bare :class:`_Segment` is another
        gateway's lan (:func:`open_series`), where *upstream* (that gateway's
        lan address) becomes this gateway's default route. *first_host*
        False leaves the lan without a host (the outer gateway of a series,
        whose lan host is the inner gateway).
        """
        if uplink is None:
            uplink = self._own_wan = _Wan.build(self.suffix, ipv6=self.ipv6)
        if isinstance(uplink, _Wan):
            self.wan_hosts.append(uplink.host)
            segment = uplink.segment
        else:
            segment = uplink
        if self.ipv6 and segment.network6 is None:
            raise LabError("an IPv6 site needs an IPv6 wan segment")
        self._wan = segment
        self.wan_ns, self.wan_if = segment.ns, segment.bridge
        gw = self.gw_ns
        self._add_ns(gw)
        self.external_address = segment.claim(self.external_address)
        segment.attach(gw, self.gw_wan_if)
        # A lease change adds the new address before it deletes the old one;
        # without promote_secondaries deleting the primary would take the
        # new (secondary) address with it.
        _sysctl(gw, f"net.ipv4.conf.{self.gw_wan_if}.promote_secondaries=1")
        self.external_address6 = segment.add_host_address(gw, self.gw_wan_if, self.external_address)
        if upstream is not None:
            _ip(gw, "route", "add", "default", "via", str(upstream))
        if lan is None:
            self._lan.create()
        else:
            if self.ipv6:
                raise LabError("a gateway on a shared lan segment is IPv4 only")
            self._lan = lan
            lan.attach(gw, self.gw_lan_if)
        self._lan.claim(self.gateway_address)
        self._lan.add_host_address(gw, self.gw_lan_if, self.gateway_address)
        _sysctl(gw, "net.ipv4.ip_forward=1")
        if self.ipv6:
            _sysctl(gw, "net.ipv6.conf.all.forwarding=1")
            self._blackholes.add(str(self.lan_network6))
            # The wan side reaches the lan prefix through this gateway.
            _ip(
                segment.ns,
                "-6",
                "route",
                "add",
                str(self.lan_network6),
                "via",
                str(self.external_address6),
            )
        ruleset = _NFT_RULESET.format(lan_if=self.gw_lan_if, wan_if=self.gw_wan_if)
        _run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input_text=ruleset)
        if first_host:
            self._add_lan_host(self.lan_ns, self.lan_if)
        if self.variant is not Variant.NONE:
            self._write_config()
            self._start_miniupnpd()

    def _add_lan_host(self, ns: str, interface: str) -> LanHost:
        self._add_ns(ns)
        address = self._lan.claim()
        self._lan.attach(ns, interface)
        address6 = self._lan.add_host_address(ns, interface, address)
        _ip(ns, "route", "add", "default", "via", str(self.gateway_address))
        if address6 is not None:
            _ip(ns, "-6", "route", "add", "default", "via", str(self.gateway_address6))
        host = LanHost(ns, address, interface, address6)
        self.lan_hosts.append(host)
        return host

    def add_lan_host(self, name: str | None = None) -> LanHost:
        """Plug another host namespace into the lan bridge and return it.

        It gets the next free lan address (192.168.77.3, .4, ...; fd77::3, ...
        with IPv6) and default routes via the gateway; its namespace is
        ``pb-<name>-<suffix>`` (*name*: up to 8 lowercase letters or digits,
        ``lan<N>`` by default) and is deleted with the lab.
        """
        number = len(self.lan_hosts) + 1
        label = name if name is not None else f"lan{number}"
        _check_label(label, "lan host")
        ns = f"pb-{label}-{self.suffix}"
        if ns in self._created_ns:
            raise LabError(f"this lab already has a host named {label!r}")
        return self._add_lan_host(ns, f"pb{self.suffix}l{number}")

    def _wan_segment(self) -> _Segment:
        if self._wan is None:
            raise LabError("the lab is not built")
        return self._wan

    def add_wan_address(self, address: IPv4Address | None = None) -> IPv4Address:
        """Give the wan namespace another source address (11.0.0.3, ... by default).

        A socket in ``wan_ns`` bound to it connects from a second remote
        source, e.g. to test PCP FILTER (RFC 6887 §13.3). With IPv6 its twin
        (fd11::3, ...) is added too.
        """
        segment = self._wan_segment()
        address = segment.claim(None if address is None else IPv4Address(address))
        segment.add_host_address(segment.ns, segment.bridge, address)
        return address

    def add_wan_host(self, name: str | None = None) -> WanHost:
        """Plug a new host namespace into the wan segment (next free wan address).

        Its namespace is ``pb-<name>-<suffix>`` (``wan<N>`` by default),
        deleted with the lab. It reaches this gateway's wan address directly.
        """
        segment = self._wan_segment()
        number = len(self.wan_hosts) + 1
        label = name if name is not None else f"wan{number}"
        _check_label(label, "wan host")
        ns = f"pb-{label}-{self.suffix}"
        if ns in self._created_ns:
            raise LabError(f"this lab already has a host named {label!r}")
        self._add_ns(ns)
        address = segment.claim()
        interface = f"pb{self.suffix}v{number}"
        segment.attach(ns, interface)
        address6 = segment.add_host_address(ns, interface, address)
        if address6 is not None:
            _ip(
                ns, "-6", "route", "add", str(self.lan_network6), "via", str(self.external_address6)
            )
        host = WanHost(ns, address, interface, address6)
        self.wan_hosts.append(host)
        return host

    def add_dnat(
        self, protocol: str, external_port: int, internal: IPv4Address, internal_port: int
    ) -> None:
        """Map *external_port* on the gateway's wan side to *internal*:*internal_port*.

        A port mapping made with nftables directly, without miniupnpd: a
        DNAT map in a table of the lab's own (``ip pb_dnat``, consulted before
        miniupnpd's chains) and a forward accept for the translated
        destination. For gateways miniupnpd cannot serve, e.g. the inner
        gateway of :func:`open_series` with a non-global external address: a
        PCP or NAT-PMP server of the test's own installs real mappings with
        it. *protocol* is ``"tcp"`` or ``"udp"``. :meth:`remove_dnat` undoes it;
        the namespace's deletion removes the rest.
        """
        protocol = self._check_dnat(protocol, external_port, internal_port)
        if not self._dnat_ready:
            self.nft(self.gw_ns, _DNAT_SETUP.format(wan_if=self.gw_wan_if))
            self._dnat_ready = True
        internal = IPv4Address(internal)
        self.nft(
            self.gw_ns,
            f"add element ip pb_dnat ports {{ {protocol} . {external_port} : "
            f"{internal} . {internal_port} }}\n"
            f"add element inet filter pb_dnat_forward {{ {internal} . {protocol} . {internal_port} }}\n",
        )

    def remove_dnat(
        self, protocol: str, external_port: int, internal: IPv4Address, internal_port: int
    ) -> None:
        """Undo :meth:`add_dnat` (the same arguments)."""
        protocol = self._check_dnat(protocol, external_port, internal_port)
        if not self._dnat_ready:
            raise LabError("no DNAT mapping was added to this gateway")
        self.nft(
            self.gw_ns,
            f"delete element ip pb_dnat ports {{ {protocol} . {external_port} }}\n"
            f"delete element inet filter pb_dnat_forward {{ {IPv4Address(internal)} . "
            f"{protocol} . {internal_port} }}\n",
        )

    @staticmethod
    def _check_dnat(protocol: str, external_port: int, internal_port: int) -> str:
        if protocol not in ("tcp", "udp"):
            raise LabError(f"DNAT protocol {protocol!r}: use 'tcp' or 'udp'")
        for port in (external_port, internal_port):
            if not 1 <= port <= 65535:
                raise LabError(f"DNAT port {port}: use 1..65535")
        return protocol

    def start_nat_server(
        self, reported_address: IPv4Address | None = None, *, max_lifetime: int = 3600
    ) -> NatServer:
        """Serve PCP and NAT-PMP on this gateway with the lab's own server (:class:`NatServer`).

        For a gateway built with ``Variant.NONE`` (miniupnpd must not hold
        port 5351): the inner gateway of :func:`open_series`, which miniupnpd
        2.3.1 refuses to serve behind a non-global address. Mappings are real
        (nftables DNAT on the wan side); *reported_address* (default: the
        gateway's current wan address) is what clients are told.
        """
        server = NatServer(
            self,
            None if reported_address is None else IPv4Address(reported_address),
            max_lifetime,
        )
        server.start()
        self._nat_servers.append(server)
        return server

    def set_external_address(self, new: IPv4Address) -> None:
        """Change the gateway's wan address, as an ISP lease change does.

        The new address is added to ``gw_wan_if``, then the old one is
        removed, so the interface is never without one. Both must lie in the
        wan network (11.0.0.0/24, blackholed in the root namespace).

        What miniupnpd 2.3.1 does (seen in its log here): Debian's build
        watches netlink (``ProcessInterfaceWatchNotify RTM_NEWADDR`` /
        ``RTM_DELADDR`` for ``ext_ifname``), logs "should send external iface
        address change notification(s)" and multicasts, from 192.168.77.1:5351
        to 224.0.0.1:5350 on the lan, a NAT-PMP external-address announcement
        (RFC 6886 §3.2.1) carrying the new address and a PCP ANNOUNCE
        (RFC 6887 §14.1), once per netlink event, so no SIGUSR1 is needed.
        This method returns once the log shows the removal was handled (SIGUSR1,
        which makes miniupnpd announce again, is sent only if that does not
        happen within 5 s). Mappings made before the change keep working on the
        new address: miniupnpd's DNAT rules match the wan interface, not the
        address. miniupnpd resets its epoch at each of those notifications
        (``epoch_origin = now``; one epoch serves NAT-PMP and PCP, citing
        RFC 6887 §8.5): seen here, a lab 4 s old answered epoch 4 before the
        change; of the announcements the first NAT-PMP one (sent before the
        reset) said 4, every later one and every PCP ANNOUNCE said 0; queries
        afterwards count from the change. A client's epoch check therefore
        reports lost state and re-creates its mappings, which miniupnpd still
        holds. A :class:`NatServer` reporting the gateway's address does the
        same: it resets its epoch and announces the new address.
        """
        segment = self._wan_segment()
        new = IPv4Address(new)
        old = self.external_address
        if new == old:
            raise LabError(f"the gateway's external address is {old} already")
        segment.claim(new)
        log_start = len(self.log_text())
        prefix = segment.network.prefixlen
        _run(["ip", "-n", self.gw_ns, "addr", "add", f"{new}/{prefix}", "dev", self.gw_wan_if])
        _run(["ip", "-n", self.gw_ns, "addr", "del", f"{old}/{prefix}", "dev", self.gw_wan_if])
        segment.release(old)
        self.external_address = new
        for server in self._nat_servers:
            if server.reported_address is None:
                server.address_changed()  # as miniupnpd does, below
        if self._process is None:
            return
        if not self._wait_announced(log_start, 5.0):
            assert self.miniupnpd_pid is not None
            os.kill(self.miniupnpd_pid, signal.SIGUSR1)
            if not self._wait_announced(log_start, 5.0):
                raise LabError(
                    f"miniupnpd did not announce the change to {new}; its log:\n"
                    + self.log_text()[log_start:]
                )

    def _wait_announced(self, log_start: int, timeout: float) -> bool:
        """Whether miniupnpd handled the removal of the old address (its log, from *log_start*)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[log_start:]
            removed = text.rfind("RTM_DELADDR")
            if removed >= 0 and _ADDRESS_CHANGE_LINE in text[removed:]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def _write_config(self) -> None:
        yes_no = {True: "yes", False: "no"}
        self.config_path.write_text(
            "\n".join(
                [
                    f"ext_ifname={self.gw_wan_if}",
                    f"listening_ip={self.gw_lan_if}",
                    f"http_port={HTTP_PORT}",
                    f"enable_natpmp={yes_no[self.variant.natpmp]}",
                    f"enable_upnp={yes_no[self.variant.upnp]}",
                    # IPv6 pinholes need no allow line: 2.3.1 rejects IPv6
                    # addresses in permission lines (a parse error, and it exits).
                    f"ipv6_disable={yes_no[not self.ipv6]}",
                    "secure_mode=yes",
                    # The epoch counts from daemon start, so a restart resets it.
                    "system_uptime=no",
                    "notify_interval=60",
                    f"uuid={uuid.uuid4()}",
                    f"allow 1024-65535 {self.lan_network} 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    *self.extra_config,
                    "",
                ]
            )
        )

    def _start_miniupnpd(self) -> None:
        argv = self.exec_argv(
            self.gw_ns,
            [
                _which("miniupnpd") or "miniupnpd",
                "-d",  # foreground, log to stderr
                "-f",
                str(self.config_path),
                "-P",
                str(self.workdir / "miniupnpd.pid"),
            ],
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        # `ip netns exec` execs miniupnpd in place, so this pid is miniupnpd's.
        self.miniupnpd_pid = self._process.pid
        self.miniupnpd_started = time.monotonic()
        self._wait_ready()

    def _listening(self) -> tuple[set[int], set[int]]:
        udp = _run(["ip", "netns", "exec", self.gw_ns, "ss", "-H", "-uln"])
        tcp = _run(["ip", "netns", "exec", self.gw_ns, "ss", "-H", "-tln"])

        def ports(text: str) -> set[int]:
            found = set()
            for line in text.splitlines():
                fields = line.split()
                if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
                    found.add(int(fields[3].rpartition(":")[2]))
            return found

        return ports(udp), ports(tcp)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise LabError(
                    f"miniupnpd exited with {self._process.returncode} at start; its log:\n"
                    + self.log_text()
                )
            udp, tcp = self._listening()
            ready = (not self.variant.natpmp or 5351 in udp) and (
                not self.variant.upnp or (1900 in udp and HTTP_PORT in tcp)
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"miniupnpd not listening after {_READY_TIMEOUT:.0f} s; its log:\n"
                    + self.log_text()
                )
            time.sleep(0.02)

    # -- driving ----------------------------------------------------------

    def stop_miniupnpd(self) -> None:
        """Stop the lab's miniupnpd (by its pid) and wait for it."""
        process, self._process = self._process, None
        self.miniupnpd_pid = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart_miniupnpd(self) -> None:
        """Simulate a gateway reboot: stop miniupnpd, drop every rule it made, start it again.

        A restarted miniupnpd forgets its mappings but the nftables rules it
        inserted stay, so the three miniupnpd chains are flushed in between.
        Its epoch starts again from 0 (``system_uptime=no``).
        """
        if self.variant is Variant.NONE:
            raise LabError("this lab runs no miniupnpd to restart")
        self.stop_miniupnpd()
        for chain in _MINIUPNPD_CHAINS:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.gw_ns,
                    "nft",
                    "flush",
                    "chain",
                    "inet",
                    "filter",
                    chain,
                ]
            )
        self.restarts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n===== portbroker lab: restart {self.restarts} =====\n")
        self._start_miniupnpd()

    def nft_rules(self) -> str:
        """The gateway's nftables ruleset as text (to see miniupnpd's rules)."""
        return _run(["ip", "netns", "exec", self.gw_ns, "nft", "list", "ruleset"])

    def nft(self, netns: str, script: str) -> str:
        """Run an nft script (``nft -f -``) in *netns*: how fault tests drop or count packets.

        Whatever it adds dies with the namespace at teardown.
        """
        return _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input_text=script)

    # -- teardown ---------------------------------------------------------

    def close(self) -> None:
        """Stop miniupnpd, delete the namespaces (and their veths) and the routes.

        Idempotent, and safe on a half-built lab.
        """
        errors: list[str] = []
        while self._nat_servers:
            self._nat_servers.pop().close()
        try:
            self.stop_miniupnpd()
        except Exception as exc:  # noqa: BLE001 - report it, but finish tearing down
            errors.append(f"stopping miniupnpd: {exc}")
        errors.extend(_delete_namespaces(self._created_ns))
        self._blackholes.remove_all()
        if self._own_wan is not None:
            # The same suffix: its owner file stays if anything of the lab's is left.
            errors.extend(self._own_wan.close(disown=False))
        _raise_if_left(errors)
        _disown(self.suffix)


# -- what labs of ended processes left behind -------------------------------------

# Who owns each lab suffix (and so the namespaces pb-*-<suffix> and the
# blackhole routes of metric _metric(suffix)): a file per suffix naming the
# process by pid and start time, so that a reused pid is not taken for it,
# and its pid namespace: a pid means nothing in another one (a container's
# session sharing /run and the network namespaces), whose labs are left alone.
# Written before the first namespace of the suffix exists, removed once the
# teardown has removed everything.
OWNERS_DIR: Final = Path("/run/portbroker-lab")
_SUFFIX_LENGTH: Final = 6


def _process_identity(pid: int) -> str | None:
    """ "<pid> <start time>" of a running process; None once it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # proc(5): the state follows the parenthesized command (which may hold
    # spaces); the start time is field 22, the 20th after the command.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # ended, not yet reaped
        return None
    return f"{pid} {fields[19]}"


def _pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"


def _owner_line() -> str:
    """This process as an owner file names it: "<pid> <start time> <pid namespace>".

    The pid as /proc shows it, which os.getpid() is not in a pid namespace
    whose /proc is its parent's.
    """
    pid = int(Path("/proc/self/stat").read_text().split(" ", 1)[0])
    return f"{_process_identity(pid)} {_pid_namespace()}"


def _suffix_of(ns: str) -> str:
    return ns.rsplit("-", 1)[1]


def _add_namespace(ns: str, created: list[str], ipv6: bool) -> None:
    marker = OWNERS_DIR / _suffix_of(ns)
    if not marker.exists():
        OWNERS_DIR.mkdir(parents=True, exist_ok=True)
        marker.write_text(_owner_line() + "\n")
    # Listed first: an interrupt (SIGTERM, a test's timeout) may come once ip
    # has made it, and an unlisted namespace is never deleted.
    created.append(ns)
    try:
        _run(["ip", "netns", "add", ns])
    except LabError as exc:
        if not isinstance(exc.__cause__, subprocess.TimeoutExpired):
            created.remove(ns)  # ip made nothing (the name taken: not ours to delete)
        raise
    _prepare_ns(ns, ipv6)


def _disown(suffix: str) -> None:
    (OWNERS_DIR / suffix).unlink(missing_ok=True)


def sweep_stale_labs() -> list[str]:
    """Remove what labs of processes that have ended left behind: their
    namespaces (and the processes still running in them: miniupnpd, agents),
    their blackhole routes and their owner files. A lab of a running process
    (another test session's), or of a process in another pid namespace, is
    left alone. Returns the namespaces deleted.

    :func:`open_lab`, :func:`open_sites` and :func:`open_series` call it first.
    """
    try:
        markers = sorted(OWNERS_DIR.iterdir())
    except FileNotFoundError:
        return []
    deleted: list[str] = []
    pid_namespace = _pid_namespace()
    namespaces: list[str] | None = None  # listed once, when the first stale owner is found
    for marker in markers:
        suffix = marker.name
        try:
            owner = marker.read_text().split()
            int(suffix, 16)
        except (OSError, ValueError):
            continue
        if len(suffix) != _SUFFIX_LENGTH or len(owner) not in (2, 3) or not owner[0].isdigit():
            continue
        if owner[2:] and owner[2] != pid_namespace:
            continue  # its pid is not one this process can look up (2 words: older files)
        if _process_identity(int(owner[0])) == " ".join(owner[:2]):
            continue  # its process is running: its lab is in use
        if namespaces is None:
            namespaces = _namespaces()
        for ns in namespaces:
            if ns.startswith("pb-") and _suffix_of(ns) == suffix:
                for pid in _namespace_pids(ns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if not _delete_namespaces([ns]):
                    deleted.append(ns)
        _remove_blackholes(_metric(suffix))
        _disown(suffix)
    return deleted


def _namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    # "pb-gw-1a2b3c (id: 4)" or just the name.
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _namespace_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def blackhole_routes() -> list[tuple[str, str, int]]:
    """The root namespace's blackhole routes: (``-4`` or ``-6``, prefix, metric)."""
    routes = []
    for family in ("-4", "-6"):
        done = subprocess.run(
            ["ip", family, "route", "show", "type", "blackhole"],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in done.stdout.splitlines():
            # "blackhole 11.0.0.0/24 metric 1234",
            # "blackhole fd11::/64 dev lo metric 1234 pref medium"
            words = line.split()
            if "metric" in words[:-1]:
                routes.append((family, words[1], int(words[words.index("metric") + 1])))
    return routes


def _remove_blackholes(metric: int) -> None:
    for family, prefix, route_metric in blackhole_routes():
        if route_metric == metric:
            subprocess.run(
                ["ip", family, "route", "del", "blackhole", prefix, "metric", str(metric)],
                capture_output=True,
                check=False,
            )


def _raise_if_left(errors: list[str]) -> None:
    if errors:
        raise LabError("lab teardown incomplete: " + "; ".join(errors))


def _delete_namespaces(created: list[str]) -> list[str]:
    errors = []
    while created:
        ns = created.pop()
        done = subprocess.run(
            ["ip", "netns", "delete", ns], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            errors.append(f"ip netns delete {ns}: {done.stderr.strip()}")
    return errors


def _check_lab_possible() -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        raise LabError(reason)
    sweep_stale_labs()


@contextlib.contextmanager
def open_lab(
    variant: Variant = Variant.FULL,
    *,
    workdir: Path | None = None,
    extra_config: Sequence[str] = (),
    ipv6: bool = False,
) -> Iterator[Lab]:
    """Build a lab, yield it, and tear it down whatever happens.

    *workdir* receives miniupnpd's config and log (a fresh temporary
    directory by default, removed afterwards). *extra_config* lines are
    appended to miniupnpd's config (``min_lifetime=10`` lets a test see PCP
    renewals within seconds; miniupnpd's default floor is 120 s).

    *ipv6* adds ULA prefixes: lan fd77::/64 (gateway fd77::1, hosts fd77::2,
    ...), wan fd11::/64 (gateway fd11::1, wan host fd11::2), without DAD
    (``nodad``) so no address is tentative; IPv6 forwarding in the gw
    namespace; the same ``inet filter`` forward chain (policy drop) as for
    IPv4, so an inbound IPv6 connection passes only through a pinhole that
    miniupnpd (``ipv6_disable=no``) inserts into its ``miniupnpd`` chain;
    blackhole routes for both prefixes in the root namespace.

    Raises:
        LabError: the machine cannot host a lab (see
            :func:`lab_unavailable_reason`) or a build step failed.
    """
    _check_lab_possible()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pb-lab-")))
        lab = Lab(
            variant, secrets.token_hex(3), workdir, extra_config=tuple(extra_config), ipv6=ipv6
        )
        try:
            lab._build()
            yield lab
        finally:
            lab.close()


# -- a PCP + NAT-PMP server of the lab's own -------------------------------------


@attrs.define
class NatMapping:
    """One mapping a :class:`NatServer` holds (and has installed with nftables)."""

    protocol: str  # "tcp" | "udp"
    internal: IPv4Address
    internal_port: int
    external_port: int
    expires_at: float  # time.monotonic()
    nonce: bytes | None  # PCP's; None for NAT-PMP mappings


_PROTOCOLS: Final = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
_ANNOUNCE_GROUP: Final = ("224.0.0.1", 5350)  # RFC 6886 §3.2.1, RFC 6887 §14.1.1


@attrs.define(eq=False)
class NatServer:
    """A small PCP + NAT-PMP server on a gateway's lan address, port 5351.

    Start it with :meth:`Lab.start_nat_server`. It serves NAT-PMP (RFC 6886:
    external address, MAP_UDP/MAP_TCP, deletes) and PCP (RFC 6887: ANNOUNCE,
    MAP with nonce rules, deletes) and installs each mapping as real
    nftables DNAT with :meth:`Lab.add_dnat`, so a connection from outside
    proves it. Unlike miniupnpd 2.3.1 it maps behind any external address and
    reports :attr:`reported_address` (by default the gateway's current wan
    address: 100.64.0.2 for the inner gateway of :func:`open_series`).
    Lifetimes are granted as asked, at most *max_lifetime*; the epoch counts
    seconds since start or the last address change. Not served: PEER, THIRD_PARTY, FILTER (PCP answers
    UNSUPP_OPCODE / UNSUPP_OPTION). It runs on a thread of its own; it stops
    with the lab.
    """

    lab: Lab
    reported_address: IPv4Address | None = None
    max_lifetime: int = 3600
    mappings: dict[tuple[str, IPv4Address, int], NatMapping] = attrs.Factory(dict)
    requests: int = 0  # datagrams received
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = attrs.Factory(threading.Event)
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _started: float = attrs.Factory(time.monotonic)

    @property
    def epoch(self) -> int:
        """Seconds since the server started (RFC 6886 §3.6, RFC 6887 §8.5)."""
        return int(time.monotonic() - self._started)

    @property
    def address(self) -> IPv4Address:
        """The external address the server reports."""
        return self.reported_address or self.lab.external_address

    def start(self) -> None:
        lab = self.lab

        def bound() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((str(lab.gateway_address), 5351))
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_MULTICAST_IF,
                    socket.inet_aton(str(lab.gateway_address)),
                )
            except OSError:
                sock.close()
                raise
            return sock

        try:
            self._sock = in_netns(lab.gw_ns, bound)
        except OSError as exc:
            raise LabError(
                f"cannot serve on {lab.gateway_address}:5351 in {lab.gw_ns} ({exc}); "
                "build the gateway with Variant.NONE so miniupnpd does not hold the port"
            ) from exc
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name=f"nat-server-{lab.gw_ns}")
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove every mapping's nftables rules."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            for key in list(self.mappings):
                self._remove(key)

    def set_reported_address(self, address: IPv4Address) -> None:
        """Report another external address from now on (see :meth:`address_changed`)."""
        self.reported_address = IPv4Address(address)
        self.address_changed()

    def address_changed(self) -> None:
        """Reset the epoch and announce, as miniupnpd does when its address changes.

        RFC 6887 §8.5 (the epoch restarts when the external address
        changes) and §14.1.1 / RFC 6886 §3.2.1 (unsolicited announcements).
        """
        self._started = time.monotonic()
        self.announce()

    def announce(self) -> None:
        """Multicast a NAT-PMP address announcement and a PCP ANNOUNCE to 224.0.0.1:5350."""
        sock = self._sock
        if sock is None:
            raise LabError("the NAT server is not running")
        sock.sendto(
            natpmp.encode_response(natpmp.ExternalAddressResponse(0, self.epoch, self.address)),
            _ANNOUNCE_GROUP,
        )
        sock.sendto(
            pcp.encode_response(
                pcp.PcpResponse(pcp.Opcode.ANNOUNCE, pcp.ResultCode.SUCCESS, 0, self.epoch)
            ),
            _ANNOUNCE_GROUP,
        )

    # -- serving -----------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while not self._stop.is_set():
            try:
                data, client = sock.recvfrom(2048)
            except TimeoutError:
                data, client = b"", ("", 0)
            except OSError:
                return
            with self._lock:
                self._expire()
                if not data:
                    continue
                self.requests += 1
                try:
                    reply = self._handle(data, IPv4Address(client[0]))
                except LabError:
                    reply = None  # nft failed: stay silent, the client retries
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(reply, client)

    def _handle(self, data: bytes, client: IPv4Address) -> bytes | None:
        from portbroker.errors import MalformedMessage

        if data[0] == natpmp.VERSION:
            try:
                request = natpmp.decode_request(data)
            except MalformedMessage as exc:
                if exc.result_code is None or len(data) < 2:
                    return None
                # RFC 6886 §3.5: result code with the request's opcode + 128.
                return bytes((0, 0x80 | data[1], 0, int(exc.result_code))) + self.epoch.to_bytes(
                    4, "big"
                )
            return natpmp.encode_response(self._natpmp(request, client))
        try:
            pcp_request = pcp.decode_request(data)
        except MalformedMessage as exc:
            if exc.result_code is None or len(data) < 2:
                return None
            opcode = data[1] & 0x7F
            return pcp.encode_response(
                pcp.PcpResponse(
                    opcode if opcode in {int(o) for o in pcp.Opcode} else pcp.Opcode.ANNOUNCE,
                    exc.result_code,
                    30,
                    self.epoch,
                )
            )
        return pcp.encode_response(self._pcp(pcp_request, client))

    def _natpmp(self, request: natpmp.NatPmpRequest, client: IPv4Address) -> natpmp.NatPmpResponse:
        if isinstance(request, natpmp.ExternalAddressRequest):
            return natpmp.ExternalAddressResponse(0, self.epoch, self.address)
        protocol = request.protocol
        if request.lifetime == 0:
            # §3.4: internal port 0 deletes all of this client's mappings of the protocol.
            for key in [
                k
                for k in self.mappings
                if k[0] == protocol and k[1] == client and request.internal_port in (0, k[2])
            ]:
                self._remove(key)
            return natpmp.MapResponse(request.opcode, 0, self.epoch, request.internal_port, 0, 0)
        lifetime = min(request.lifetime, self.max_lifetime)
        mapping = self._grant(
            protocol, client, request.internal_port, request.suggested_external_port, lifetime, None
        )
        if mapping is None:
            return natpmp.MapResponse(
                request.opcode, 4, self.epoch, request.internal_port, 0, 0
            )  # OUT_OF_RESOURCES
        return natpmp.MapResponse(
            request.opcode, 0, self.epoch, request.internal_port, mapping.external_port, lifetime
        )

    def _pcp(self, request: pcp.PcpRequest, client: IPv4Address) -> pcp.PcpResponse:
        def answer(
            code: pcp.ResultCode, lifetime: int, data: pcp.OpcodeData | None = request.data
        ) -> pcp.PcpResponse:
            return pcp.PcpResponse(request.opcode, code, lifetime, self.epoch, data)

        if request.client_address != client:
            return answer(pcp.ResultCode.ADDRESS_MISMATCH, 30)  # RFC 6887 §8.3
        if any(int(option.code) < 128 for option in request.options):
            return answer(pcp.ResultCode.UNSUPP_OPTION, 30)  # §7.3: mandatory, unserved
        if request.opcode is pcp.Opcode.ANNOUNCE:
            return answer(pcp.ResultCode.SUCCESS, 0)
        data = request.data
        if request.opcode is not pcp.Opcode.MAP or not isinstance(data, pcp.MapData):
            return answer(pcp.ResultCode.UNSUPP_OPCODE, 30)
        protocol = _PROTOCOLS.get(data.protocol)
        if protocol is None or data.internal_port == 0:
            return answer(pcp.ResultCode.UNSUPP_PROTOCOL, 30)
        key = (protocol, client, data.internal_port)
        held = self.mappings.get(key)
        if held is not None and held.nonce != data.nonce:
            return answer(pcp.ResultCode.NOT_AUTHORIZED, 30)  # §11.3
        if request.lifetime == 0:
            if held is not None:
                self._remove(key)
            return answer(pcp.ResultCode.SUCCESS, 0)
        lifetime = min(request.lifetime, self.max_lifetime)
        mapping = self._grant(
            protocol, client, data.internal_port, data.external_port, lifetime, data.nonce
        )
        if mapping is None:
            return answer(pcp.ResultCode.NO_RESOURCES, 30)
        granted = attrs.evolve(
            data, external_port=mapping.external_port, external_address=self.address
        )
        return answer(pcp.ResultCode.SUCCESS, lifetime, granted)

    def _grant(
        self,
        protocol: str,
        internal: IPv4Address,
        internal_port: int,
        suggested: int,
        lifetime: int,
        nonce: bytes | None,
    ) -> NatMapping | None:
        key = (protocol, internal, internal_port)
        held = self.mappings.get(key)
        expires = time.monotonic() + lifetime
        if held is not None:
            held.expires_at, held.nonce = expires, nonce if nonce is not None else held.nonce
            return held
        taken = {m.external_port for m in self.mappings.values() if m.protocol == protocol}
        candidates = [p for p in (suggested, internal_port) if p >= 1024]
        candidates += range(1024, 65536)
        port = next((p for p in candidates if p not in taken), None)
        if port is None:
            return None
        self.lab.add_dnat(protocol, port, internal, internal_port)
        mapping = NatMapping(protocol, internal, internal_port, port, expires, nonce)
        self.mappings[key] = mapping
        return mapping

    def _remove(self, key: tuple[str, IPv4Address, int]) -> None:
        mapping = self.mappings.pop(key)
        with contextlib.suppress(LabError):
            self.lab.remove_dnat(
                mapping.protocol, mapping.external_port, mapping.internal, mapping.internal_port
            )

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, m in self.mappings.items() if m.expires_at <= now]:
            self._remove(key)


@attrs.define(eq=False)
class Sites(_InNamespaces):
    """Two gateway sites whose wan sides share one segment (:func:`open_sites`).

    ``a`` and ``b`` are complete :class:`Lab` sites (their own gw namespace,
    lan bridge, lan host, nftables and miniupnpd); ``wan_ns`` holds the shared
    wan bridge and the wan host's 11.0.0.2, e.g. for a rendezvous server.
    """

    a: Lab
    b: Lab
    wan_ns: str
    wan_address: IPv4Address
    wan_address6: IPv6Address | None = None

    @property
    def labs(self) -> tuple[Lab, Lab]:
        return (self.a, self.b)


@attrs.define(eq=False)
class Series(_InNamespaces):
    """Two NAT gateways in series (:func:`open_series`): ``inner`` behind ``outer``.

    ``inner``'s wan side is a host on ``outer``'s lan: ``inner.wan_ns`` is
    ``outer.gw_ns`` and ``outer.lan_hosts[0]`` (also ``outer.lan_ns``) is the
    inner gateway's namespace (its address there is the inner's external
    address at build time; ``inner.external_address`` is the current one).
    ``wan_ns`` is the outer gateway's wan namespace with the wan host 11.0.0.2.
    """

    inner: Lab
    outer: Lab
    wan_ns: str
    wan_address: IPv4Address

    @property
    def labs(self) -> tuple[Lab, Lab]:
        return (self.inner, self.outer)


SITE_B_LAN_NETWORK: Final = IPv4Network("192.168.78.0/24")
SITE_B_EXTERNAL_ADDRESS: Final = IPv4Address("11.0.0.3")
SERIES_OUTER_LAN_NETWORK: Final = IPv4Network("100.64.0.0/24")


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="pb-lab-") as made:
        yield Path(made)


def _subdir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def open_sites(
    variant_a: Variant = Variant.FULL,
    variant_b: Variant = Variant.FULL,
    *,
    workdir: Path | None = None,
    extra_config: Sequence[str] = (),
    ipv6: bool = False,
) -> Iterator[Sites]:
    """Build two gateway sites on one wan segment, yield them, tear them down.

    ::

        site a: lan 192.168.77.0/24 (host .2) -- gw a 11.0.0.1 --+
                                                                 +-- wan ns: bridge, wan host 11.0.0.2
        site b: lan 192.168.78.0/24 (host .2) -- gw b 11.0.0.3 --+

    Each site is a :class:`Lab` built by the same code as :func:`open_lab`
    (miniupnpd logs under ``workdir/a`` and ``workdir/b``); *extra_config*
    goes to both miniupnpds. With *ipv6* site a's lan is fd77::/64, site b's
    fd78::/64, the wan fd11::/64 (gateways fd11::1 and fd11::3).
    All of 11.0.0.0/24 is blackholed in the root namespace.
    """
    _check_lab_possible()
    with _workdir(workdir) as root, contextlib.ExitStack() as stack:
        wan = _Wan.build(secrets.token_hex(3), ipv6=ipv6)
        stack.callback(wan.close_checked)
        sites = []
        for label, variant, lan, lan6, external in (
            ("a", variant_a, LAN_NETWORK, LAN_NETWORK6, EXTERNAL_ADDRESS),
            ("b", variant_b, SITE_B_LAN_NETWORK, IPv6Network("fd78::/64"), SITE_B_EXTERNAL_ADDRESS),
        ):
            site = Lab(
                variant,
                secrets.token_hex(3),
                _subdir(root, label),
                tuple(extra_config),
                lan_network=lan,
                lan_network6=lan6,
                external_address=external,
                ipv6=ipv6,
                name=label,
            )
            stack.callback(site.close)
            site._build(wan)
            sites.append(site)
        yield Sites(sites[0], sites[1], wan.ns, wan.host.address, wan.host.address6)


@contextlib.contextmanager
def open_series(
    inner_variant: Variant = Variant.FULL,
    outer_variant: Variant = Variant.NONE,
    *,
    outer_lan: IPv4Network = SERIES_OUTER_LAN_NETWORK,
    workdir: Path | None = None,
    inner_extra_config: Sequence[str] = (),
    outer_extra_config: Sequence[str] = (),
) -> Iterator[Series]:
    """Build two NAT gateways in series (double NAT), yield them, tear them down.

    ::

        inner lan 192.168.77.0/24 (host .2)
          -- inner gw 192.168.77.1 | ext 100.64.0.2 on the outer's lan
          -- outer gw 100.64.0.1   | ext 11.0.0.1
          -- wan ns, wan host 11.0.0.2

    *outer_lan* is the outer gateway's lan (100.64.0.0/24, shared address
    space as behind a CGN, by default; 192.168.1.0/24 gives the "router
    behind an ISP modem" case). The inner gateway's external address is
    host 2 of it, its default route the outer gateway (host 1). Both
    gateways masquerade, so an inner lan host reaches the wan host through
    both NATs. *outer_variant* chooses the outer gateway's services
    (``Variant.NONE``: a plain NAT; ``Variant.FULL``: miniupnpd too).

    What miniupnpd 2.3.1 does as the inner gateway, its external address
    private or in 100.64.0.0/10 (seen in its log and answers here): it logs
    "Reserved / private IP address 100.64.0.2 on ext interface ...: Port
    forwarding is impossible" and "You are probably behind NAT, enable option
    ext_perform_stun=yes ...", then refuses every mapping: a NAT-PMP
    external-address request answers result 3 (network failure) with
    0.0.0.0, a NAT-PMP MAP result 3, a PCP MAP NO_RESOURCES (lifetime 30; its
    external-address field does say 100.64.0.2). ``ext_ip=<reserved>`` is no
    way around it: "Error: option ext_ip contains reserved / private address
    ..., not public routable", and miniupnpd exits. ``ext_perform_stun=yes``
    exits when STUN fails ("Performing STUN failed. EXITING"), and when it
    works it enables forwarding only behind a full-cone NAT and reports the
    public address STUN found, never the private one. So miniupnpd cannot be
    an inner gateway that maps and reports a non-global external address;
    use ``inner_variant=Variant.NONE`` and a PCP/NAT-PMP server of the test's
    own that installs real mappings with :meth:`Lab.add_dnat`.
    """
    _check_lab_possible()
    with _workdir(workdir) as root, contextlib.ExitStack() as stack:
        outer = Lab(
            outer_variant,
            secrets.token_hex(3),
            _subdir(root, "outer"),
            tuple(outer_extra_config),
            lan_network=outer_lan,
            name="outer",
        )
        stack.callback(outer.close)
        outer._build(first_host=False)
        inner = Lab(
            inner_variant,
            secrets.token_hex(3),
            _subdir(root, "inner"),
            tuple(inner_extra_config),
            external_address=outer_lan[2],
            name="inner",
        )
        stack.callback(inner.close)
        inner._build(outer._lan, upstream=outer.gateway_address)
        # The outer gateway's lan host is the inner gateway.
        outer.lan_hosts.append(LanHost(inner.gw_ns, inner.external_address, inner.gw_wan_if))
        outer.lan_ns, outer.lan_if = inner.gw_ns, inner.gw_wan_if
        yield Series(inner, outer, outer.wan_ns, outer.wan_address)


@attrs.define(eq=False)
class Roaming(_InNamespaces):
    """One lan with two NAT gateways on it (:func:`open_roaming`): ``a`` and ``b``.

    The lan is a bridge in a namespace of its own (``lan_switch_ns``); each
    gateway joins it with a veth (its ``gw_lan_if``, miniupnpd's
    ``listening_ip``), so each miniupnpd sees only its own lan interface and
    bridged traffic crosses no gateway's forward chain. ``host`` (also
    ``a.lan_hosts[0]`` and ``b.lan_hosts[0]``) starts with its default route
    via ``a``; :meth:`use_gateway` moves it, as a laptop that joins another
    network does. Both gateways' wan sides are on one segment with the wan
    host (``wan_ns``, 11.0.0.2), which reaches each external address directly.
    """

    a: Lab
    b: Lab
    lan_switch_ns: str
    wan_ns: str
    wan_address: IPv4Address

    @property
    def labs(self) -> tuple[Lab, Lab]:
        return (self.a, self.b)

    @property
    def host(self) -> LanHost:
        """The lan host (192.168.77.2) in ``a.lan_ns``."""
        return self.a.lan_hosts[0]

    def default_gateway(self, host: LanHost | None = None) -> IPv4Address | None:
        """The gateway of *host*'s IPv4 default route, as its kernel shows it (None: no route)."""
        host = self.host if host is None else host
        words = _ip(host.ns, "-4", "route", "show", "default").split()
        if "via" not in words:
            return None
        return IPv4Address(words[words.index("via") + 1])

    def current_gateway(self, host: LanHost | None = None) -> Lab | None:
        """Which of ``a`` and ``b`` *host*'s default route goes through (None: neither)."""
        gateway = self.default_gateway(host)
        for lab in self.labs:
            if lab.gateway_address == gateway:
                return lab
        return None

    def use_gateway(self, gateway: Lab, host: LanHost | None = None) -> None:
        """Point *host*'s default route at *gateway* (``ip route replace default via ...``).

        One netlink request, so the host is never without a default route:
        the kernel sends RTM_NEWROUTE for the replaced route, which is what
        a network monitor sees when a laptop changes networks.
        """
        if gateway is not self.a and gateway is not self.b:
            raise LabError("use_gateway takes roaming.a or roaming.b")
        host = self.host if host is None else host
        _ip(
            host.ns,
            "route",
            "replace",
            "default",
            "via",
            str(gateway.gateway_address),
            "dev",
            host.interface,
        )


ROAMING_B_GATEWAY_ADDRESS: Final = IPv4Address("192.168.77.254")


@contextlib.contextmanager
def open_roaming(
    variant_a: Variant = Variant.FULL,
    variant_b: Variant = Variant.FULL,
    *,
    workdir: Path | None = None,
    extra_config: Sequence[str] = (),
) -> Iterator[Roaming]:
    """Build one lan with two NAT gateways, yield it (:class:`Roaming`), tear it down.

    ::

                                      +-- gw a: lan 192.168.77.1, ext 11.0.0.1 --+
        lan host 192.168.77.2 -- lan switch                                      +-- wan ns, 11.0.0.2
                                      +-- gw b: lan 192.168.77.254, ext 11.0.0.3 -+

    Each gateway is a :class:`Lab` built by the same code as
    :func:`open_lab` (its own gw namespace, nftables, masquerade and
    miniupnpd; logs under ``workdir/a`` and ``workdir/b``); *extra_config*
    goes to both miniupnpds. The lan switch is a bridge in a namespace with
    no nftables rules, so even with br_netfilter loaded (bridged packets then
    traverse the namespace's IP hooks) nothing filters lan traffic between
    the host and either gateway. IPv4 only. All of 11.0.0.0/24 is
    blackholed in the root namespace while it is up, as for every lab.
    """
    _check_lab_possible()
    with _workdir(workdir) as root, contextlib.ExitStack() as stack:
        suffix = secrets.token_hex(3)
        wan = _Wan.build(suffix, ipv6=False)
        stack.callback(wan.close_checked)
        # The wan's suffix: deleted with the wan, which keeps their owner
        # file if either is left.
        switch_ns = f"pb-sw-{suffix}"
        _add_namespace(switch_ns, wan.created_ns, False)
        switch = _Segment(switch_ns, f"pb{suffix}s", f"pb{suffix}p", LAN_NETWORK)
        switch.create()
        a = Lab(
            variant_a,
            secrets.token_hex(3),
            _subdir(root, "a"),
            tuple(extra_config),
            name="a",
        )
        stack.callback(a.close)
        a._build(wan, lan=switch)
        b = Lab(
            variant_b,
            secrets.token_hex(3),
            _subdir(root, "b"),
            tuple(extra_config),
            external_address=SITE_B_EXTERNAL_ADDRESS,
            lan_gateway=ROAMING_B_GATEWAY_ADDRESS,
            name="b",
        )
        stack.callback(b.close)
        b._build(wan, lan=switch, first_host=False)
        # The lan host is b's too (a built it); its default route stays via a.
        b.lan_hosts.append(a.lan_hosts[0])
        b.lan_ns, b.lan_if = a.lan_ns, a.lan_if
        yield Roaming(a, b, switch_ns, wan.ns, wan.host.address)


# -- the demo -----------------------------------------------------------------


def _demo(variant: Variant, internal_port: int) -> int:
    """Build the lab, ``portbroker map`` from the lan side, connect in from the wan side."""
    import json
    import tempfile

    with open_lab(variant) as lab, tempfile.TemporaryDirectory() as state_dir:
        print(f"lab up: lan {lab.lan_ns}, gateway {lab.gw_ns} (miniupnpd pid {lab.miniupnpd_pid})")
        state = str(Path(state_dir) / "state.json")
        portbroker = [sys.executable, "-m", "portbroker.cli"]
        common = ["--gateway", str(GATEWAY_ADDRESS), "--state-file", state]
        listener = lab.socket(lab.lan_ns, kind=socket.SOCK_STREAM)
        with listener:
            listener.bind((str(LAN_ADDRESS), internal_port))
            listener.listen()
            argv = [*portbroker, "map", f"{internal_port}/tcp", "--json", *common]
            print("$ " + " ".join(["ip netns exec", lab.lan_ns, "portbroker", *argv[3:]]))
            done = subprocess.run(
                lab.exec_argv(lab.lan_ns, argv), capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                print(done.stderr.strip(), file=sys.stderr)
                return 1
            print(done.stdout.strip())
            mapped = json.loads(done.stdout)
            external = (mapped["external_address"], mapped["external_port"])
            outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
            with outside:
                outside.settimeout(5)
                outside.connect(external)
                inside, peer = listener.accept()
                with inside:
                    inside.sendall(b"hello from inside\n")
                    greeting = outside.recv(100)
            print(
                f"connection from {peer[0]}:{peer[1]} (wan side) arrived at {LAN_ADDRESS}:{internal_port}"
            )
            if greeting != b"hello from inside\n":
                print("the connection carried the wrong bytes", file=sys.stderr)
                return 1
            print(
                f"external endpoint {external[0]}:{external[1]} via {mapped['method']}: inbound connection OK"
            )
            argv = [*portbroker, "unmap", f"{internal_port}/tcp", *common]
            print("$ " + " ".join(["ip netns exec", lab.lan_ns, "portbroker", *argv[3:]]))
            done = subprocess.run(
                lab.exec_argv(lab.lan_ns, argv), capture_output=True, text=True, check=False
            )
            print((done.stdout or done.stderr).strip())
            if done.returncode != 0:
                return 1
    print("lab torn down")
    return 0


# -- the chat -----------------------------------------------------------------

_CHAT_TIMEOUT: Final = 60.0  # s for both peers together


def _examples_dir(given: Path | None) -> Path:
    """The repository's ``examples/`` (not in the wheel), or a clear error."""
    candidates = (
        [given]
        if given is not None
        else [Path(__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"]
    )
    for directory in candidates:
        if all((directory / name).is_file() for name in ("p2p_chat.py", "rendezvous_server.py")):
            return directory
    raise LabError(
        "the chat needs examples/p2p_chat.py and examples/rendezvous_server.py from the "
        f"repository (looked in {', '.join(str(c) for c in candidates)}); run it from a "
        "checkout of the repository or pass --examples DIR"
    )


def _shown(netns: str, argv: Sequence[str]) -> str:
    """How a command run in *netns* is printed (the interpreter as ``python``)."""
    import shlex

    words = ["python" if word == sys.executable else word for word in argv]
    return "$ " + shlex.join(["ip", "netns", "exec", netns, *words])


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _chat(port: int, examples: Path) -> int:
    """Two peers behind two NATs chat through ``examples/`` (``open_sites()``)."""
    import json

    with open_sites() as sites:
        a, b = sites.labs
        print(
            f"lab up: site a lan {a.lan_address} behind {a.external_address}, "
            f"site b lan {b.lan_address} behind {b.external_address}, "
            f"rendezvous host {sites.wan_address} ({sites.wan_ns})"
        )
        argv = [
            sys.executable,
            str(examples / "rendezvous_server.py"),
            "--listen",
            str(sites.wan_address),
            "--port",
            "0",
        ]
        print(_shown(sites.wan_ns, argv))
        rendezvous = subprocess.Popen(
            sites.exec_argv(sites.wan_ns, argv), stdout=subprocess.PIPE, text=True
        )
        peers: dict[str, subprocess.Popen[str]] = {}
        try:
            assert rendezvous.stdout is not None
            line = rendezvous.stdout.readline().strip()
            print(line)
            if not line.startswith("rendezvous listening on "):
                print("portbroker-lab: the rendezvous did not start", file=sys.stderr)
                return 1
            address = line.split()[-1]
            for site, name, peer in ((a, "alice", "bob"), (b, "bob", "alice")):
                argv = [
                    sys.executable,
                    str(examples / "p2p_chat.py"),
                    "--name", name,
                    "--peer", peer,
                    "--rendezvous", address,
                    "--gateway", str(site.gateway_address),
                    "--port", str(port),
                    "--say", f"hello from {name}",
                    "--expect", f"hello from {peer}",
                    "--timeout", "15",
                ]  # fmt: skip
                print(_shown(site.lan_ns, argv))
                peers[name] = subprocess.Popen(
                    site.exec_argv(site.lan_ns, argv),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            deadline = time.monotonic() + _CHAT_TIMEOUT
            outputs: dict[str, tuple[str, str]] = {}
            for name, process in peers.items():
                try:
                    outputs[name] = process.communicate(
                        timeout=max(0.1, deadline - time.monotonic())
                    )
                except subprocess.TimeoutExpired:
                    print(f"portbroker-lab: {name} did not finish in time", file=sys.stderr)
                    return 1
        finally:
            for process in [*peers.values(), rendezvous]:
                _stop(process)
            if rendezvous.stdout is not None:
                rendezvous.stdout.close()
        ok = True
        for name, (stdout, stderr) in outputs.items():
            lines = stdout.strip().splitlines()
            for text in lines[:-1]:
                print(f"{name}| {text}")
            for text in stderr.strip().splitlines():
                print(f"{name}! {text}")
            summary: dict[str, object] = {}
            if lines:
                with contextlib.suppress(ValueError):
                    summary = json.loads(lines[-1])
            heard, sources = summary.get("heard"), summary.get("heard_from")
            if peers[name].returncode != 0 or not isinstance(heard, list) or not heard:
                print(
                    f"portbroker-lab: {name} failed (exit {peers[name].returncode})",
                    file=sys.stderr,
                )
                ok = False
                continue
            assert isinstance(sources, list)
            for said, source in zip(heard, sources, strict=False):
                print(f"{name} heard {said!r} from {source}")
        if not ok:
            return 1
        print("both peers talked directly over their mapped endpoints")
    print("lab torn down")
    return 0


def exchange(sock: socket.socket, payload: bytes, decode: Callable[[bytes], T]) -> T:
    """Send *payload* on a connected UDP socket and decode the first answer.

    Retransmits on the RFC 6886 schedule (250 ms doubling), four tries;
    undecodable datagrams are skipped. For the lab and tests, not the broker.

    Raises:
        TimeoutError: no decodable answer.
        ConnectionRefusedError: the gateway answered ICMP port unreachable.
    """
    from portbroker.errors import MalformedMessage

    wait = 0.25
    for _ in range(4):
        sock.send(payload)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            with contextlib.suppress(MalformedMessage):
                return decode(data)
        wait *= 2
    raise TimeoutError("no answer from the gateway")


def main(argv: Sequence[str] | None = None) -> int:
    """``portbroker-lab``: ``demo`` (an inbound connection) or ``chat`` (two peers, two NATs)."""
    parser = argparse.ArgumentParser(
        prog="portbroker-lab",
        description="Build a NAT gateway (miniupnpd + nftables) in network namespaces, "
        "run `portbroker map` on the lan side, connect in from the wan side, unmap, "
        "tear down. Needs root.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="`portbroker map` a port in the lab and prove an inbound connection"
    )
    demo.add_argument("--port", type=int, default=8080, help="internal TCP port (default 8080)")
    demo.add_argument(
        "--variant",
        choices=[v.value for v in Variant if v is not Variant.NONE],
        default=Variant.FULL.value,
        help="which services the gateway runs (default full: PCP, NAT-PMP, UPnP)",
    )
    chat = sub.add_parser(
        "chat",
        help="two peers behind two NATs (two sites) chat directly: examples/p2p_chat.py "
        "with examples/rendezvous_server.py on the shared wan",
    )
    chat.add_argument("--port", type=int, default=40000, help="each peer's UDP port (40000)")
    chat.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="the repository's examples/ directory (found next to the package by default)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1..65535, got {args.port}")
    try:
        if args.command == "chat":
            return _chat(args.port, _examples_dir(args.examples))
        return _demo(Variant(args.variant), args.port)
    except (LabError, OSError) as exc:
        print(f"portbroker-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
