"""Value types that travel between portbroker's layers.

Frozen attrs classes validated at construction: a bad port or lifetime fails
here, at the edge, with a message that names the field.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from portbroker.reachability import Reachability, classify
from portbroker.wire._fields import IPAddress, to_address, uint

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "METHOD_NAMES",
    "MIN_LIFETIME",
    "IPAddress",
    "Lease",
    "MappingRequest",
    "ProbeOutcome",
    "ProbeReport",
    "TransportProtocol",
    "lease_json",
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


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    uint(16)(_inst, attribute, value)
    if value == 0:
        raise ValueError(f"{attribute.name} must be 1..65535 (0 would mean every port)")


def _optional_port(
    _inst: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        _port(_inst, attribute, value)  # type: ignore[arg-type]


# Lifetimes, named once: the library, the CLI and the daemon accept the same
# range. 7200 s is RFC 6886 §3.3's recommendation; a week is IGD v2's cap on
# leases (protocols.md §4.5), and no gateway we know grants longer.
DEFAULT_LIFETIME: Final = 7200
MIN_LIFETIME: Final = 1
MAX_LIFETIME: Final = 604800


def _lifetime(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")
    if not MIN_LIFETIME <= value <= MAX_LIFETIME:
        raise ValueError(
            f"{attribute.name} must be {MIN_LIFETIME}..{MAX_LIFETIME} seconds"
            f" (0 would mean delete), got {value}"
        )


@attrs.frozen
class MappingRequest:
    """What an app asks for: "make my *internal_port*/*protocol* reachable".

    *external_port* is a wish unless *exact* is set, in which case a mapping on
    another port is a failure (PCP PREFER_FAILURE, UPnP AddPortMapping).
    *internal_address* None means the host's own address toward the gateway.
    """

    internal_port: int = attrs.field(validator=_port)
    protocol: TransportProtocol = attrs.field(converter=_to_protocol)
    lifetime: int = attrs.field(default=DEFAULT_LIFETIME, validator=_lifetime)
    external_port: int | None = attrs.field(default=None, validator=_optional_port)
    exact: bool = False
    internal_address: IPAddress | None = attrs.field(default=None, converter=_optional_address)
    description: str = "portbroker"

    def __attrs_post_init__(self) -> None:
        if self.exact and self.external_port is None:
            raise ValueError("exact=True needs an external_port")


@attrs.frozen
class Lease:
    """A mapping the gateway granted.

    ``granted_at`` and ``expires_at`` are on the broker's clock (trio time).
    ``nonce`` is PCP's mapping nonce (None for other methods); ``permanent``
    marks a UPnP lease of 0 that only an explicit delete removes.
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
    """A lease's public fields as JSON values (``map --json``, state files)."""
    return {
        "method": lease.method,
        "protocol": lease.protocol.value,
        "internal_address": str(lease.internal_address),
        "internal_port": lease.internal_port,
        "external_address": str(lease.external_address),
        "external_port": lease.external_port,
        "lifetime": lease.lifetime,
        "gateway": str(lease.gateway),
        "permanent": lease.permanent,
    }
