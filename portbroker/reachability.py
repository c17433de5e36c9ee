"""Is an external address reachable from the Internet? A sans-IO classification.

A gateway that reports a private, shared or otherwise non-global external
address is itself behind another NAT (a router behind an ISP modem, a
carrier-grade NAT): a mapping on it works, but nobody on the Internet can use
it. :func:`classify` says so, and why, for every address a gateway may report
(docs/double-nat.md).

The special-purpose blocks are the IANA IPv4 and IPv6 Special-Purpose Address
Registries (RFC 6890 and its updates), written out here rather than taken from
``ipaddress``'s ``is_global`` / ``is_private``: those changed between Python
versions (3.11.10 / 3.12.4 / 3.13 corrected several blocks; before that
``is_private`` and ``is_global`` were both False for 100.64.0.0/10, and
``is_private`` was True for the documentation blocks), and a reason needs the
block's name, which they do not give.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final

import attrs

__all__ = ["AddressKind", "Reachability", "classify"]


class AddressKind(enum.Enum):
    """What kind of address an external address is."""

    GLOBAL = "global"  # publicly routable
    PRIVATE = "private"  # RFC 1918
    SHARED = "shared"  # RFC 6598, carrier-grade NAT
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    UNIQUE_LOCAL = "unique-local"  # IPv6 ULA, RFC 4193
    DOCUMENTATION = "documentation"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    RESERVED = "reserved"  # every other special-purpose block


@attrs.frozen
class Reachability:
    """Whether an external address is publicly reachable, and if not, why.

    ``reason`` is None when ``public``; otherwise a sentence for a user.
    """

    address: IPv4Address | IPv6Address
    kind: AddressKind
    public: bool
    reason: str | None

    def json(self) -> dict[str, object]:
        """As JSON values (``probe --json``, ``map --json``)."""
        return {"public": self.public, "kind": self.kind.value, "reason": self.reason}


_BEHIND: Final = "another NAT lies beyond this gateway (double NAT)"

# (block, kind, what it is). First match wins, so the narrow global
# exceptions come before the reserved blocks that hold them.
_V4: Final[tuple[tuple[IPv4Network, AddressKind, str], ...]] = tuple(
    (IPv4Network(net), kind, what)
    for net, kind, what in (
        ("192.0.0.9/32", AddressKind.GLOBAL, ""),  # PCP anycast, RFC 7723
        ("192.0.0.10/32", AddressKind.GLOBAL, ""),  # TURN anycast, RFC 8155
        ("0.0.0.0/8", AddressKind.UNSPECIFIED, '"this network" (RFC 791)'),
        ("10.0.0.0/8", AddressKind.PRIVATE, "a private address (RFC 1918)"),
        (
            "100.64.0.0/10",
            AddressKind.SHARED,
            "in the shared address space of carrier-grade NATs (RFC 6598)",
        ),
        ("127.0.0.0/8", AddressKind.LOOPBACK, "a loopback address"),
        ("169.254.0.0/16", AddressKind.LINK_LOCAL, "a link-local address (RFC 3927)"),
        ("172.16.0.0/12", AddressKind.PRIVATE, "a private address (RFC 1918)"),
        ("192.0.0.0/24", AddressKind.RESERVED, "IETF protocol assignments (RFC 6890)"),
        ("192.0.2.0/24", AddressKind.DOCUMENTATION, "a documentation address (RFC 5737)"),
        ("192.88.99.0/24", AddressKind.RESERVED, "the deprecated 6to4 relay anycast (RFC 7526)"),
        ("192.168.0.0/16", AddressKind.PRIVATE, "a private address (RFC 1918)"),
        ("198.18.0.0/15", AddressKind.RESERVED, "benchmarking space (RFC 2544)"),
        ("198.51.100.0/24", AddressKind.DOCUMENTATION, "a documentation address (RFC 5737)"),
        ("203.0.113.0/24", AddressKind.DOCUMENTATION, "a documentation address (RFC 5737)"),
        ("224.0.0.0/4", AddressKind.MULTICAST, "a multicast address"),
        ("240.0.0.0/4", AddressKind.RESERVED, "reserved (RFC 1112), or the broadcast address"),
    )
)

_V6: Final[tuple[tuple[IPv6Network, AddressKind, str], ...]] = tuple(
    (IPv6Network(net), kind, what)
    for net, kind, what in (
        ("::/128", AddressKind.UNSPECIFIED, "the unspecified address"),
        ("::1/128", AddressKind.LOOPBACK, "the loopback address"),
        ("64:ff9b:1::/48", AddressKind.RESERVED, "local-use NAT64 (RFC 8215)"),
        ("100::/64", AddressKind.RESERVED, "discard-only (RFC 6666)"),
        ("2001:1::1/128", AddressKind.GLOBAL, ""),  # PCP anycast, RFC 7723
        ("2001:1::2/128", AddressKind.GLOBAL, ""),  # TURN anycast, RFC 8155
        ("2001:1::3/128", AddressKind.GLOBAL, ""),  # DNS-SD SRP anycast, RFC 9665
        ("2001:3::/32", AddressKind.GLOBAL, ""),  # AMT, RFC 7450
        ("2001:4:112::/48", AddressKind.GLOBAL, ""),  # AS112, RFC 7535
        ("2001:20::/28", AddressKind.GLOBAL, ""),  # ORCHIDv2, RFC 7343
        ("2001:30::/28", AddressKind.GLOBAL, ""),  # DRIP, RFC 9374
        ("2001:db8::/32", AddressKind.DOCUMENTATION, "a documentation address (RFC 3849)"),
        ("2001::/23", AddressKind.RESERVED, "IETF protocol assignments (RFC 2928), Teredo"),
        ("3fff::/20", AddressKind.DOCUMENTATION, "a documentation address (RFC 9637)"),
        ("5f00::/16", AddressKind.RESERVED, "SRv6 SIDs (RFC 9602)"),
        ("fc00::/7", AddressKind.UNIQUE_LOCAL, "a unique local address (RFC 4193)"),
        ("fe80::/10", AddressKind.LINK_LOCAL, "a link-local address"),
        ("ff00::/8", AddressKind.MULTICAST, "a multicast address"),
    )
)
# Global unicast is 2000::/3 (RFC 4291 §2.4); the rest is unassigned or
# special (site-local fec0::/10 is deprecated, RFC 3879).
_V6_GLOBAL_UNICAST: Final = IPv6Network("2000::/3")


def classify(address: IPv4Address | IPv6Address | str) -> Reachability:
    """The reachability of *address* as an external (public-facing) address.

    An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, RFC 4291 §2.5.5.2, as
    PCP carries every IPv4 address) is judged as its IPv4 address.
    A 6to4 address (2002::/16) or one in NAT64's well-known prefix
    (64:ff9b::/96) is judged by the IPv4 address it embeds.

    Raises:
        ValueError: *address* is not an IP address.
    """
    parsed = ip_address(address) if isinstance(address, str) else address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    embedded = _embedded_ipv4(parsed)
    if embedded is not None:
        # A 6to4 (RFC 3056 §2) or NAT64 well-known-prefix (RFC 6052 §2.1)
        # address reaches the Internet only through its IPv4 address: a
        # 6to4 prefix built from a router's private WAN address (behind
        # another NAT) leads nowhere, whatever 2002::/16's place in 2000::/3.
        kind, what = _lookup(embedded)
        what = f"the IPv4 address {embedded} within it is {what}"
        subject = f"{parsed}:"
    else:
        kind, what = _lookup(parsed)
        subject = f"{parsed} is"
    if kind is AddressKind.GLOBAL:
        return Reachability(parsed, kind, True, None)
    if kind in (AddressKind.PRIVATE, AddressKind.SHARED, AddressKind.UNIQUE_LOCAL):
        why = f"{subject} {what}: {_BEHIND}"
    else:
        why = f"{subject} {what}, not an address the Internet can reach"
    return Reachability(parsed, kind, False, f"not publicly reachable: {why}")


_6TO4: Final = IPv6Network("2002::/16")
_NAT64_WKP: Final = IPv6Network("64:ff9b::/96")


def _embedded_ipv4(address: IPv4Address | IPv6Address) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return None
    if address in _6TO4:
        return address.sixtofour
    if address in _NAT64_WKP:
        return IPv4Address(address.packed[12:])
    return None


def _lookup(address: IPv4Address | IPv6Address) -> tuple[AddressKind, str]:
    if isinstance(address, IPv4Address):
        for v4, kind, what in _V4:
            if address in v4:
                return kind, what
        return AddressKind.GLOBAL, ""
    for v6, kind, what in _V6:
        if address in v6:
            return kind, what
    if address in _V6_GLOBAL_UNICAST:
        return AddressKind.GLOBAL, ""
    return AddressKind.RESERVED, "outside global unicast 2000::/3 (RFC 4291)"
