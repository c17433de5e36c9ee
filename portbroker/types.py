"""Value types that travel between portbroker's layers.

Frozen attrs classes validated at construction: a bad port or lifetime fails
here, at the edge, with a message that names the field.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, Final

import attrs

from portbroker._basics import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME, format_endpoint
from portbroker.reachability import Reachability, classify
from portbroker.wire._fields import IPAddress, to_address, uint

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_FILTERS",
    "MAX_LIFETIME",
    "METHOD_NAMES",
    "MIN_LIFETIME",
    "IPAddress",
    "Lease",
    "MappingRequest",
    "ProbeOutcome",
    "ProbeReport",
    "RemoteFilter",
    "TransportProtocol",
    "format_endpoint",
    "lease_json",
    "no_host_reason",
    "unscoped",
]

METHOD_NAMES: Final = ("pcp", "natpmp", "upnp")


class TransportProtocol(enum.Enum):
    """The transport protocol of a mapping."""

    TCP = "tcp"
    UDP = "udp"

    @property
    def number(self) -> int:
        """The IANA protocol number PCP carries (6, 17)."""
        return 6 if self is TransportProtocol.TCP else 17

    @classmethod
    def parse(cls, value: object) -> TransportProtocol:
        """``"tcp"``, ``"UDP"``, 6, 17 or a member -> member; ValueError otherwise."""
        if isinstance(value, TransportProtocol):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        if value == 6:
            return cls.TCP
        if value == 17:
            return cls.UDP
        raise ValueError(f"protocol must be 'tcp' or 'udp', got {value!r}")


def _to_protocol(value: object) -> TransportProtocol:
    return TransportProtocol.parse(value)


def _optional_address(value: object) -> IPAddress | None:
    return None if value is None else to_address(value)


def unscoped(address: IPAddress) -> IPAddress:
    """*address* without an IPv6 scope (``fe80::5%eth0`` -> ``fe80::5``).

    A gateway never sees one (the wire holds 16 bytes): two spellings that
    differ only in it name one host, one gateway entry. A datagram's source
    names the zone as the kernel does, or not at all (a memory link), so the
    transport compares sources without it too.
    """
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        return IPv6Address(address.packed)
    return address


def _optional_internal_address(value: object) -> IPAddress | None:
    return None if value is None else unscoped(to_address(value))


def _optional_remote(value: object) -> tuple[IPAddress, int] | None:
    """``(address, port)`` of a PEER's remote peer (RFC 6887 §12.1), or None."""
    if value is None:
        return None
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"remote must be (address, port), got {value!r}")
    address, port = value
    try:
        remote_address = to_address(address)
    except (TypeError, ValueError):
        raise ValueError(f"remote address must be an IP address, got {address!r}") from None
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        # §12.1: the remote peer port must not be 0 (PEER names one flow).
        raise ValueError(f"remote port must be 1..65535, got {port!r}")
    if remote_address.is_unspecified:
        raise ValueError(f"remote address must name a host, not {remote_address}")
    return (remote_address, port)


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    uint(16)(_inst, attribute, value)
    if value == 0:
        raise ValueError(f"{attribute.name} must be 1..65535 (0 would mean every port)")


def _optional_port(
    _inst: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        _port(_inst, attribute, value)  # type: ignore[arg-type]


def _lifetime(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")
    if not MIN_LIFETIME <= value <= MAX_LIFETIME:
        raise ValueError(
            f"{attribute.name} must be {MIN_LIFETIME}..{MAX_LIFETIME} seconds"
            f" (0 would mean delete), got {value}"
        )


def _network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        network = value
    elif isinstance(value, str):
        try:
            network = ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(
                f"not an address prefix: {value!r} ({exc}; e.g. 11.0.0.2/32 or 11.0.0.0/24)"
            ) from None
    else:
        raise TypeError(f"expected an address prefix, got {type(value).__name__}")
    if isinstance(network, IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            # ::ffff:11.0.0.2 is 11.0.0.2 (RFC 4291 §2.5.5.2): an IPv4
            # filter, so that UPnP's NewRemoteHost and duplicates see it so,
            # and ::ffff:0.0.0.0/96 is the /0 refused below.
            network = IPv4Network((mapped, network.prefixlen - 96))
    if network.prefixlen == 0:
        # RFC 6887 §13.3: prefix length 0 means "no filter" (and clears the
        # others): never a filter that admits one peer.
        raise ValueError(f"{network} admits every remote host; leave the filter out instead")
    return network


def no_host_reason(address: IPAddress) -> str | None:
    """Why *address* cannot be another lan host's (a third-party mapping), or None."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_loopback:
        return "loopback: every host's own"
    if address == _LIMITED_BROADCAST:
        return "the broadcast address"
    return None


_LIMITED_BROADCAST: Final = IPv4Address("255.255.255.255")


def _filter_port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    uint(16)(_inst, attribute, value)


@attrs.frozen
class RemoteFilter:
    """Only remote peers in *network* (and from *port*, 0 = any) may use a mapping.

    PCP sends it as a FILTER option (RFC 6887 §13.3); UPnP IGD can express
    one single host with any port (``NewRemoteHost``); NAT-PMP none
    (docs/third-party-and-filter.md).
    """

    network: IPv4Network | IPv6Network = attrs.field(converter=_network)
    port: int = attrs.field(default=0, validator=_filter_port)

    @classmethod
    def parse(cls, text: str) -> RemoteFilter:
        """``11.0.0.2``, ``11.0.0.0/24``, ``11.0.0.2/32:5000``, ``[2001:db8::/64]:443``.

        Raises:
            ValueError: what is wrong with *text*, in words.
        """
        if not isinstance(text, str):
            raise TypeError(f"a filter is text like 11.0.0.2/32[:port], not {text!r}")
        spec = text.strip()
        port = 0
        if spec.startswith("["):
            inside, sep, rest = spec[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad filter {text!r}: write [IPv6-prefix]:port")
            spec, port_text = inside, rest[1:]
            if rest:
                port = _filter_port_number(text, port_text)
        elif spec.count(":") == 1:
            spec, port_text = spec.split(":")
            port = _filter_port_number(text, port_text)
        try:
            return cls(spec, port)
        except ValueError as exc:
            raise ValueError(f"bad filter {text!r}: {exc}") from None

    @property
    def is_host(self) -> bool:
        """One address (a /32 or /128)."""
        return self.network.prefixlen == self.network.max_prefixlen

    @property
    def wire_prefix_length(self) -> int:
        """FILTER's Prefix Length (RFC 6887 §13.3) over the 128-bit field of §5.

        An IPv4 prefix travels IPv4-mapped (::ffff:a.b.c.d), so its length
        counts the 96 mapped bits too: 11.0.0.0/24 is 120.
        """
        extra = 96 if isinstance(self.network, IPv4Network) else 0
        return self.network.prefixlen + extra

    def __str__(self) -> str:
        if not self.port:
            return str(self.network)
        if isinstance(self.network, IPv6Network):
            return f"[{self.network}]:{self.port}"
        return f"{self.network}:{self.port}"


def _filter_port_number(text: str, port_text: str) -> int:
    # isascii: str.isdigit() admits "²", which int() then refuses with a traceback's words.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(
            f"bad filter {text!r}: the remote port must be 1..65535 (leave it out for any port)"
        )
    return int(port_text)


# At most this many remote-peer filters per mapping: PCP fits about 42 in
# 1,100 bytes (RFC 6887 §7; more would fail in the encoder, an "internal
# error"), UPnP takes one.
MAX_FILTERS: Final = 32


def _to_filters(value: object) -> tuple[RemoteFilter, ...]:
    if isinstance(value, str | RemoteFilter):
        value = (value,)
    if not isinstance(value, tuple | list | frozenset | set):
        raise TypeError(f"filters must be a sequence of RemoteFilter, got {type(value).__name__}")
    if len(value) > MAX_FILTERS:
        raise ValueError(f"at most {MAX_FILTERS} remote-peer filters, not {len(value)}")
    out = tuple(v if isinstance(v, RemoteFilter) else RemoteFilter.parse(v) for v in value)
    if len(set(out)) != len(out):
        raise ValueError("the same filter is given twice")
    return out


@attrs.frozen
class MappingRequest:
    """What an app asks for: "make my *internal_port*/*protocol* reachable".

    *external_port* is a wish unless *exact* is set, in which case a mapping on
    another port is a failure (PCP PREFER_FAILURE, UPnP AddPortMapping).
    *remote* ``(address, port)`` makes it a PCP PEER request (RFC 6887 §12):
    the binding of the outbound flow to that remote peer, not an inbound
    mapping (docs/peer.md).
    *internal_address* None means the host's own address toward the gateway;
    another host's address makes it a third-party mapping (PCP THIRD_PARTY,
    RFC 6887 §13.1; UPnP NewInternalClient). *filters*, when given, restrict
    which remote peers may use it (PCP FILTER, §13.3); a method that cannot
    enforce them refuses the request rather than map without them
    (docs/third-party-and-filter.md).
    """

    internal_port: int = attrs.field(validator=_port)
    protocol: TransportProtocol = attrs.field(converter=_to_protocol)
    lifetime: int = attrs.field(default=DEFAULT_LIFETIME, validator=_lifetime)
    external_port: int | None = attrs.field(default=None, validator=_optional_port)
    exact: bool = False
    internal_address: IPAddress | None = attrs.field(
        default=None, converter=_optional_internal_address
    )
    description: str = "portbroker"
    remote: tuple[IPAddress, int] | None = attrs.field(default=None, converter=_optional_remote)
    filters: tuple[RemoteFilter, ...] = attrs.field(default=(), converter=_to_filters)

    def __attrs_post_init__(self) -> None:
        if self.exact and self.external_port is None:
            raise ValueError("exact=True needs an external_port")
        if self.exact and self.remote is not None:
            # §12.1: PREFER_FAILURE is not allowed in PEER (it behaves so anyway).
            raise ValueError("exact=True is for MAP; a PEER request cannot carry it")
        if self.internal_address is not None and (
            self.internal_address.is_unspecified or self.internal_address.is_multicast
        ):
            raise ValueError(f"internal_address {self.internal_address} names no host")


@attrs.frozen
class Lease:
    """A mapping the gateway granted.

    ``granted_at`` and ``expires_at`` are on the broker's clock (trio time).
    ``nonce`` is PCP's mapping nonce (None for other methods); ``permanent``
    marks a UPnP lease of 0 that only an explicit delete removes.
    ``pinhole_id`` is the UniqueID of a UPnP IPv6 firewall pinhole
    (WANIPv6FirewallControl:1 AddPinhole; docs/ipv6.md), None otherwise: its
    renewal and delete name the pinhole by it. ``remote`` is a PCP PEER's
    remote peer (RFC 6887 §12); None for a MAP. ``filters``
    are the remote-peer filters the gateway enforces for it (empty: anyone
    may connect); a method grants a filtered request only when it can say so.
    """

    method: str
    protocol: TransportProtocol
    internal_address: IPAddress = attrs.field(converter=to_address)
    internal_port: int = attrs.field(validator=uint(16))
    external_address: IPAddress = attrs.field(converter=to_address)
    external_port: int = attrs.field(validator=uint(16))
    lifetime: int = attrs.field(validator=uint(32))
    granted_at: float
    gateway: IPAddress = attrs.field(converter=to_address)
    epoch: int | None = None
    nonce: bytes | None = None
    permanent: bool = False
    pinhole_id: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(uint(16))
    )
    remote: tuple[IPAddress, int] | None = attrs.field(default=None, converter=_optional_remote)
    filters: tuple[RemoteFilter, ...] = attrs.field(default=(), converter=_to_filters)

    @property
    def expires_at(self) -> float:
        return self.granted_at + self.lifetime

    @property
    def reachability(self) -> Reachability:
        """Whether the Internet can reach the external address (docs/double-nat.md)."""
        return classify(self.external_address)


@attrs.frozen
class ProbeOutcome:
    """How one method fared when probed."""

    method: str
    available: bool
    rtt: float | None = None  # seconds
    external_address: IPAddress | None = attrs.field(default=None, converter=_optional_address)
    epoch: int | None = None
    error: str | None = None
    # Unavailable only because nothing came back in time (not a refusal): on a
    # lossy link another try may well get through.
    silent: bool = False

    @property
    def reachability(self) -> Reachability | None:
        """Whether the reported external address is publicly reachable (None: none reported)."""
        return None if self.external_address is None else classify(self.external_address)


@attrs.frozen
class ProbeReport:
    """All methods' outcomes and the one chosen (None: nothing works)."""

    gateway: IPAddress = attrs.field(converter=to_address)
    selected: str | None
    outcomes: tuple[ProbeOutcome, ...]

    def outcome(self, method: str) -> ProbeOutcome | None:
        return next((o for o in self.outcomes if o.method == method), None)


def lease_json(lease: Lease) -> dict[str, Any]:
    """A lease's public fields as JSON values (``map --json``, state files).

    A PEER's lease adds ``remote_address`` and ``remote_port``; a filtered
    one ``filters``.
    """
    out: dict[str, Any] = {
        "method": lease.method,
        "protocol": lease.protocol.value,
        "internal_address": str(lease.internal_address),
        "internal_port": lease.internal_port,
        "external_address": str(lease.external_address),
        "external_port": lease.external_port,
        "lifetime": lease.lifetime,
        "gateway": str(lease.gateway),
        "permanent": lease.permanent,
        # Only for a UPnP IPv6 pinhole: every other lease's JSON is unchanged.
        **({} if lease.pinhole_id is None else {"pinhole_id": lease.pinhole_id}),
    }
    if lease.remote is not None:
        out["remote_address"] = str(lease.remote[0])
        out["remote_port"] = lease.remote[1]
    if lease.filters:
        out["filters"] = [str(f) for f in lease.filters]
    return out
