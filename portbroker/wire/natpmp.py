"""NAT-PMP (RFC 6886) messages: bytes <-> frozen objects.

Sans-IO. NAT-PMP has no transaction ID: a client matches a map response to its
request by opcode and internal port (§3.3), which is the caller's business.

Entry points: :func:`encode_request`, :func:`decode_response` for clients;
:func:`decode_request`, :func:`encode_response` for servers and tests.
Decoders raise :class:`~portbroker.errors.MalformedMessage` (or a subclass)
and nothing else.
"""

from __future__ import annotations

import enum
import struct
from ipaddress import IPv4Address
from typing import Final

import attrs

from portbroker.errors import MalformedMessage, UnsupportedOpcode, UnsupportedVersion
from portbroker.wire._fields import open_member, to_ipv4, uint

__all__ = [
    "ANNOUNCE_MULTICAST",
    "CLIENT_PORT",
    "SERVER_PORT",
    "VERSION",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "MapRequest",
    "MapResponse",
    "NatPmpRequest",
    "NatPmpResponse",
    "Opcode",
    "ResultCode",
    "ShortResponse",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

VERSION: Final = 0
SERVER_PORT: Final = 5351  # RFC 6886 §3.1
CLIENT_PORT: Final = 5350  # RFC 6886 §3.2.1: announcements arrive here
ANNOUNCE_MULTICAST: Final = IPv4Address("224.0.0.1")
_RESPONSE_BIT: Final = 0x80

_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_SHORT = struct.Struct("!BBHI")


class Opcode(enum.IntEnum):
    """Request opcodes (RFC 6886 §3.2, §3.3); a response carries 128 + opcode."""

    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2

    @classmethod
    def _missing_(cls, value: object) -> Opcode | None:
        return open_member(cls, value, 7)


class ResultCode(enum.IntEnum):
    """RFC 6886 §3.5 result codes (16 bits on the wire, unlike PCP's 8).

    Any other value decodes to an ``UNKNOWN_<n>`` member; the RFC says a client
    treats a code it does not know as a fatal error for that request.
    """

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    # The box can map ports but the feature is off; also the answer to
    # deleting a static mapping.
    NOT_AUTHORIZED = 2
    # e.g. no DHCP lease yet. miniupnpd also sends it when its own external
    # address is private or reserved (a double NAT).
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5

    @classmethod
    def _missing_(cls, value: object) -> ResultCode | None:
        return open_member(cls, value, 16)


@attrs.frozen
class ExternalAddressRequest:
    """Ask for the gateway's external IPv4 address (RFC 6886 §3.2): 2 bytes."""

    opcode = Opcode.EXTERNAL_ADDRESS


def _map_opcode(value: int) -> Opcode:
    opcode = Opcode(value)
    if opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise ValueError(f"a map request's opcode is MAP_UDP or MAP_TCP, not {opcode.name}")
    return opcode


@attrs.frozen
class MapRequest:
    """Create, renew (same request again) or delete (lifetime 0) a mapping (§3.3, §3.4).

    A delete must send suggested external port 0. Internal port 0 with
    lifetime 0 deletes all of this client's mappings of that protocol.
    """

    opcode: Opcode = attrs.field(converter=_map_opcode)
    internal_port: int = attrs.field(validator=uint(16))
    suggested_external_port: int = attrs.field(validator=uint(16))
    lifetime: int = attrs.field(validator=uint(32))

    @property
    def protocol(self) -> str:
        return "udp" if self.opcode == Opcode.MAP_UDP else "tcp"


NatPmpRequest = ExternalAddressRequest | MapRequest


@attrs.frozen
class ExternalAddressResponse:
    """Reply to :class:`ExternalAddressRequest`, and the unsolicited announcement
    a gateway multicasts on boot or address change (§3.2.1): 12 bytes.

    ``epoch`` is the Seconds Since Start of Epoch (SSSoE). On an error the
    address is undefined (sent as 0.0.0.0).
    """

    result_code: ResultCode = attrs.field(converter=ResultCode, validator=uint(16))
    epoch: int = attrs.field(validator=uint(32))
    external_address: IPv4Address = attrs.field(converter=to_ipv4)

    opcode = Opcode.EXTERNAL_ADDRESS


@attrs.frozen
class MapResponse:
    """Reply to :class:`MapRequest` (§3.3): 16 bytes.

    On success ``external_port`` is the mapped port and ``lifetime`` the
    granted one; a confirmed delete has both 0.
    """

    opcode: Opcode = attrs.field(converter=_map_opcode)
    result_code: ResultCode = attrs.field(converter=ResultCode, validator=uint(16))
    epoch: int = attrs.field(validator=uint(32))
    internal_port: int = attrs.field(validator=uint(16))
    external_port: int = attrs.field(validator=uint(16))
    lifetime: int = attrs.field(validator=uint(32))


@attrs.frozen
class ShortResponse:
    """The 8-byte error form: version, 128 + opcode, result, SSSoE.

    Gateways send it for an unsupported version (§3.5; ``opcode`` is whatever
    the request had) and an unsupported opcode (miniupnpd and koalatux/natpmp
    send 8 bytes where the RFC would echo the whole request), and some send it
    for any error.
    """

    opcode: Opcode = attrs.field(converter=Opcode)
    result_code: ResultCode = attrs.field(converter=ResultCode, validator=uint(16))
    epoch: int = attrs.field(validator=uint(32))

    @result_code.validator
    def _check_error(self, _attribute: object, value: int) -> None:
        if value == ResultCode.SUCCESS:
            raise ValueError("a successful reply is never the 8-byte form")


NatPmpResponse = ExternalAddressResponse | MapResponse | ShortResponse


def encode_request(request: NatPmpRequest) -> bytes:
    """The wire form of *request*."""
    if isinstance(request, ExternalAddressRequest):
        return bytes((VERSION, Opcode.EXTERNAL_ADDRESS))
    return _MAP_REQUEST.pack(
        VERSION,
        request.opcode,
        0,
        request.internal_port,
        request.suggested_external_port,
        request.lifetime,
    )


def encode_response(response: NatPmpResponse) -> bytes:
    """The wire form of *response* (for servers and tests)."""
    op = _RESPONSE_BIT | response.opcode
    if isinstance(response, ExternalAddressResponse):
        return _ADDRESS_RESPONSE.pack(
            VERSION, op, response.result_code, response.epoch, response.external_address.packed
        )
    if isinstance(response, MapResponse):
        return _MAP_RESPONSE.pack(
            VERSION,
            op,
            response.result_code,
            response.epoch,
            response.internal_port,
            response.external_port,
            response.lifetime,
        )
    return _SHORT.pack(VERSION, op, response.result_code, response.epoch)


def decode_response(data: bytes | bytearray | memoryview) -> NatPmpResponse:
    """Decode a datagram received from a NAT-PMP gateway (or its announcement).

    Lengths are exact (2/12/16 bytes per §3.2-§3.3); an error may also come in
    the 8-byte form. The address check of §3.1 (only the gateway may answer)
    is the caller's.

    Raises:
        MalformedMessage: anything that is not a NAT-PMP response.
    """
    buf = bytes(data)
    if len(buf) < _SHORT.size:
        raise MalformedMessage(f"{len(buf)} bytes is shorter than any NAT-PMP response")
    version, op, result, epoch = _SHORT.unpack_from(buf)
    if version != VERSION:
        raise MalformedMessage(f"version {version} is not NAT-PMP (0)")
    result_code = ResultCode(result)
    if not op & _RESPONSE_BIT:
        # RFC 6886 §3.5 as published drew the unsupported-version reply with
        # opcode 0; erratum 3618 made it 128. Accept the published form too,
        # but nothing else without the response bit: that is a request.
        if len(buf) == _SHORT.size and result_code == ResultCode.UNSUPPORTED_VERSION:
            return ShortResponse(Opcode(op), result_code, epoch)
        raise MalformedMessage(f"opcode {op} has no response bit: this is a request")
    opcode = Opcode(op & 0x7F)
    if len(buf) == _SHORT.size and result_code != ResultCode.SUCCESS:
        return ShortResponse(opcode, result_code, epoch)
    if opcode == Opcode.EXTERNAL_ADDRESS and len(buf) == _ADDRESS_RESPONSE.size:
        return ExternalAddressResponse(result_code, epoch, IPv4Address(buf[8:12]))
    if opcode in (Opcode.MAP_UDP, Opcode.MAP_TCP) and len(buf) == _MAP_RESPONSE.size:
        *_head, internal, external, lifetime = _MAP_RESPONSE.unpack(buf)
        return MapResponse(opcode, result_code, epoch, internal, external, lifetime)
    raise MalformedMessage(f"{len(buf)}-byte response to opcode {opcode.name} has no known layout")


def decode_request(data: bytes | bytearray | memoryview) -> NatPmpRequest:
    """Decode a datagram received by a NAT-PMP server.

    Raises:
        UnsupportedVersion: version is not 0 (answer with the 8-byte result 1).
        UnsupportedOpcode: an opcode below 128 that is not 0, 1 or 2 (answer
            result 5).
        MalformedMessage: anything else; ``result_code`` is ``None``, because a
            server ignores requests it cannot parse (miniupnpd sends nothing).
    """
    buf = bytes(data)
    if len(buf) < 2:
        raise MalformedMessage(f"{len(buf)} bytes is shorter than any NAT-PMP request")
    if buf[0] != VERSION:
        raise UnsupportedVersion(buf[0], result_code=ResultCode.UNSUPPORTED_VERSION)
    op = buf[1]
    if op & _RESPONSE_BIT:
        # RFC 6886 §3.5: opcodes >= 128 are responses; a server ignores them.
        raise MalformedMessage(f"opcode {op} is a response, not a request")
    opcode = Opcode(op)
    if opcode == Opcode.EXTERNAL_ADDRESS:
        if len(buf) != 2:
            raise MalformedMessage(f"external-address request of {len(buf)} bytes, not 2")
        return ExternalAddressRequest()
    if opcode in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        if len(buf) != _MAP_REQUEST.size:
            raise MalformedMessage(f"map request of {len(buf)} bytes, not {_MAP_REQUEST.size}")
        _v, _op, _reserved, internal, suggested, lifetime = _MAP_REQUEST.unpack(buf)
        return MapRequest(opcode, internal, suggested, lifetime)
    raise UnsupportedOpcode(opcode, result_code=ResultCode.UNSUPPORTED_OPCODE)
