"""Field helpers shared by the codecs: integer ranges, addresses, open enums.

Internal to :mod:`portbroker.wire`.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeVar

import attrs

IPAddress = IPv4Address | IPv6Address

# RFC 6887 §5: an IPv4 address travels as ::ffff:a.b.c.d; all 96 leading bits
# must be checked ("checking only bits 81-96 is not enough").
V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def to_address(value: object) -> IPAddress:
    """attrs converter: text or address object -> address, IPv4-mapped -> IPv4.

    Normalising ``::ffff:a.b.c.d`` to IPv4 keeps the 128-bit wire form and the
    Python value one-to-one, so encode and decode are exact inverses.
    """
    if isinstance(value, str | bytes | int):
        # ip_address accepts an int as an address; refuse that surprise.
        if isinstance(value, int):
            raise TypeError(f"expected an IP address, got the integer {value!r}")
        try:
            value = ip_address(value.decode() if isinstance(value, bytes) else value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not an IP address: {value!r}") from exc
    if isinstance(value, IPv6Address):
        mapped = value.ipv4_mapped
        return mapped if mapped is not None else value
    if isinstance(value, IPv4Address):
        return value
    raise TypeError(f"expected an IP address, got {type(value).__name__}")


def to_ipv4(value: object) -> IPv4Address:
    """attrs converter for fields that only hold IPv4 (NAT-PMP)."""
    address = to_address(value)
    if not isinstance(address, IPv4Address):
        raise ValueError(f"expected an IPv4 address, got {address}")
    return address


def pack_address(address: IPAddress) -> bytes:
    """The 128-bit wire form of RFC 6887 §5."""
    if isinstance(address, IPv4Address):
        return V4_MAPPED_PREFIX + address.packed
    return address.packed


def unpack_address(data: bytes) -> IPAddress:
    """Inverse of :func:`pack_address`; *data* must be 16 bytes."""
    if data[:12] == V4_MAPPED_PREFIX:
        return IPv4Address(data[12:16])
    return IPv6Address(data)


def uint(bits: int) -> Any:
    """attrs validator: an ``int`` (not bool) in 0 .. 2**bits - 1."""
    top = (1 << bits) - 1

    def check(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attribute.name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= top:
            raise ValueError(f"{attribute.name} must be in 0..{top}, got {value}")

    return check


def exact_bytes(length: int) -> Any:
    """attrs validator: ``bytes`` of exactly *length* octets."""

    def check(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attribute.name} must be bytes, got {type(value).__name__}")
        if len(value) != length:
            raise ValueError(f"{attribute.name} must be {length} bytes, got {len(value)}")

    return check


E = TypeVar("E", bound=enum.IntEnum)


def open_member(cls: type[E], value: object, bits: int) -> E | None:
    """``_missing_`` helper: an ad-hoc member for a value the enum lacks.

    Protocol registries grow; a decoder must still carry a code it has no name
    for (a client treats it by its class, a server by its rules), so unknown
    values in range become members named ``UNKNOWN_<value>``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        return None
    member = int.__new__(cls, value)
    member._name_ = f"UNKNOWN_{value}"
    member._value_ = value
    return member
