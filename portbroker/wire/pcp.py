"""PCP (RFC 6887) messages: bytes <-> frozen objects.

Sans-IO: no sockets, no clock, no trio. The rules applied here are the wire
rules of RFC 6887 §7 (header, options), §11.1 (MAP), §12.1 (PEER), §14.1
(ANNOUNCE) and §9 (version negotiation); what a client *does* with a response
(matching it to a request, the epoch check, acting on the result code) lives
above this layer.

Entry points:

- :func:`encode_request` / :func:`decode_request` (the latter for servers such
  as :class:`portbroker.testing.FakeGateway`);
- :func:`encode_response` / :func:`decode_response`.

Decoders raise :class:`~portbroker.errors.MalformedMessage` (or a subclass) and
nothing else, whatever bytes they are given.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import attrs

from portbroker.errors import MalformedMessage, UnsupportedOpcode, UnsupportedVersion
from portbroker.wire._fields import (
    IPAddress,
    exact_bytes,
    open_member,
    pack_address,
    to_address,
    uint,
    unpack_address,
)

__all__ = [
    "ANNOUNCE_MULTICAST_V4",
    "ANNOUNCE_MULTICAST_V6",
    "CLIENT_PORT",
    "HEADER_SIZE",
    "MAP_DATA_SIZE",
    "MAX_MESSAGE_SIZE",
    "NO_PREFERENCE_V4",
    "NO_PREFERENCE_V6",
    "PEER_DATA_SIZE",
    "SERVER_PORT",
    "VERSION",
    "ErrorClass",
    "Filter",
    "MapData",
    "Opcode",
    "Option",
    "OptionCode",
    "PcpRequest",
    "PcpResponse",
    "PeerData",
    "PreferFailure",
    "ResultCode",
    "ThirdParty",
    "UnknownOption",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "no_preference",
]

VERSION: Final = 2
SERVER_PORT: Final = 5351  # RFC 6887 §19.1
CLIENT_PORT: Final = 5350  # RFC 6887 §19.1: unsolicited ANNOUNCE arrives here
ANNOUNCE_MULTICAST_V4: Final = IPv4Address("224.0.0.1")  # RFC 6887 §14.1
ANNOUNCE_MULTICAST_V6: Final = IPv6Address("ff02::1")
HEADER_SIZE: Final = 24  # RFC 6887 §7.1, §7.2
MAX_MESSAGE_SIZE: Final = 1100  # RFC 6887 §7
MAP_DATA_SIZE: Final = 36  # RFC 6887 §11.1
PEER_DATA_SIZE: Final = 56  # RFC 6887 §12.1
NONCE_SIZE: Final = 12

# RFC 6887 §5 / §11.1: "no preference" is the all-zeros address *of the family
# wanted*: ::ffff:0.0.0.0 asks for an IPv4 external address, :: for IPv6.
NO_PREFERENCE_V4: Final = IPv4Address("0.0.0.0")
NO_PREFERENCE_V6: Final = IPv6Address("::")

_HEADER = struct.Struct("!BBBBII12s")  # response: ver, R|op, rsvd, result, lifetime, epoch, rsvd
_REQUEST_HEADER = struct.Struct("!BBHI16s")  # request: ver, R|op, rsvd, lifetime, client ip
_MAP = struct.Struct("!12sB3xHH16s")
_PEER_TAIL = struct.Struct("!H2x16s")
_OPTION_HEADER = struct.Struct("!BBH")
_R_BIT: Final = 0x80


def no_preference(family_of: IPAddress) -> IPAddress:
    """The "no preference" external address of the same family as *family_of*."""
    return NO_PREFERENCE_V4 if isinstance(family_of, IPv4Address) else NO_PREFERENCE_V6


class Opcode(enum.IntEnum):
    """PCP opcodes (IANA "PCP Opcodes"). Unknown values decode to ``UNKNOWN_<n>``."""

    ANNOUNCE = 0  # RFC 6887 §14.1
    MAP = 1  # RFC 6887 §11
    PEER = 2  # RFC 6887 §12
    # RFC 7652. miniupnpd and libpcpnatpmp use 3 for the draft SADSCP opcode
    # instead; we send neither.
    AUTHENTICATION = 3

    @classmethod
    def _missing_(cls, value: object) -> Opcode | None:
        return open_member(cls, value, 7)


class ErrorClass(enum.Enum):
    """How long a result code says the same request will keep failing (§7.4)."""

    NONE = "none"  # SUCCESS
    SHORT = "short"  # retry after the response Lifetime (RFC suggests 30 s)
    LONG = "long"  # do not retry unchanged for Lifetime (RFC suggests 30 min)
    DEPENDS = "depends"  # CANNOT_PROVIDE_EXTERNAL: the cause decides


class ResultCode(enum.IntEnum):
    """PCP result codes (RFC 6887 §7.4, IANA "PCP Result Codes").

    Codes without a name here (RFC 7652 authentication results, future
    registrations) decode to ``UNKNOWN_<n>`` members and count as long-lifetime
    errors: a client that does not understand a failure must not hammer the
    server with the same request.
    """

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13

    @classmethod
    def _missing_(cls, value: object) -> ResultCode | None:
        return open_member(cls, value, 8)

    @property
    def error_class(self) -> ErrorClass:
        """Short or long lifetime error, per RFC 6887 §7.4."""
        if self == ResultCode.SUCCESS:
            return ErrorClass.NONE
        if self in _SHORT_LIFETIME:
            return ErrorClass.SHORT
        if self == ResultCode.CANNOT_PROVIDE_EXTERNAL:
            return ErrorClass.DEPENDS
        return ErrorClass.LONG

    @property
    def is_short_lifetime(self) -> bool:
        return self.error_class is ErrorClass.SHORT

    @property
    def is_long_lifetime(self) -> bool:
        return self.error_class is ErrorClass.LONG


# RFC 6887 §7.4: the three short-lifetime errors. There is no result code
# named SHORT_LIFETIME; it is the class of these three.
_SHORT_LIFETIME: Final = frozenset(
    {ResultCode.NETWORK_FAILURE, ResultCode.NO_RESOURCES, ResultCode.USER_EX_QUOTA}
)


class OptionCode(enum.IntEnum):
    """PCP option codes (RFC 6887 §7.3, §13; RFC 7652)."""

    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3

    @classmethod
    def _missing_(cls, value: object) -> OptionCode | None:
        return open_member(cls, value, 8)

    @property
    def is_mandatory(self) -> bool:
        """Codes 0-127 must be understood by the server or it answers UNSUPP_OPTION."""
        return self < 128


@attrs.frozen
class ThirdParty:
    """THIRD_PARTY (RFC 6887 §13.1): the mapping is for another host's address.

    Never name yourself with it: servers answer MALFORMED_REQUEST.
    """

    internal_address: IPAddress = attrs.field(converter=to_address)

    code = OptionCode.THIRD_PARTY


@attrs.frozen
class PreferFailure:
    """PREFER_FAILURE (RFC 6887 §13.2): fail rather than map another port.

    Valid in MAP only; answered with CANNOT_PROVIDE_EXTERNAL when the suggested
    external address or port cannot be granted exactly.
    """

    code = OptionCode.PREFER_FAILURE


@attrs.frozen
class Filter:
    """FILTER (RFC 6887 §13.3): only this remote prefix and port may send in.

    Prefix length 0 means "no filter" and clears earlier filters; remote port 0
    means every port.
    """

    prefix_length: int = attrs.field(validator=uint(8))
    remote_peer_port: int = attrs.field(validator=uint(16))
    remote_peer_address: IPAddress = attrs.field(converter=to_address)

    code = OptionCode.FILTER

    @prefix_length.validator
    def _check_prefix(self, _attribute: object, value: int) -> None:
        if value > 128:
            raise ValueError(f"prefix_length must be in 0..128, got {value}")


@attrs.frozen
class UnknownOption:
    """An option this codec has no type for, kept as its code and data.

    Codes below 128 are mandatory-to-process (§7.3): a server that does not
    know one answers UNSUPP_OPTION.
    """

    code: OptionCode = attrs.field(converter=OptionCode, validator=uint(8))
    data: bytes = attrs.field(default=b"")

    @code.validator
    def _check_code(self, _attribute: object, value: int) -> None:
        if value in _OPTION_SIZES:
            raise ValueError(f"option {value} has its own type; use it")

    @data.validator
    def _check_data(self, _attribute: object, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"data must be bytes, got {type(value).__name__}")
        if len(value) > 0xFFFF:
            raise ValueError(f"option data must be at most 65535 bytes, got {len(value)}")


Option = ThirdParty | PreferFailure | Filter | UnknownOption

# Exact data lengths of the options this codec types (RFC 6887 §13).
_OPTION_SIZES: Final = {
    OptionCode.THIRD_PARTY: 16,
    OptionCode.PREFER_FAILURE: 0,
    OptionCode.FILTER: 20,
}


@attrs.frozen
class MapData:
    """MAP opcode data (RFC 6887 §11.1).

    In a request ``external_port`` / ``external_address`` are the *suggested*
    values (0 and the family's all-zeros address: no preference); in a
    response they are the *assigned* ones (on an error, the suggestion copied
    back).
    """

    nonce: bytes = attrs.field(validator=exact_bytes(NONCE_SIZE))
    protocol: int = attrs.field(validator=uint(8))  # IANA number; 0 = all
    internal_port: int = attrs.field(validator=uint(16))  # 0 = all ports
    external_port: int = attrs.field(validator=uint(16))
    external_address: IPAddress = attrs.field(converter=to_address, default=NO_PREFERENCE_V4)


@attrs.frozen
class PeerData:
    """PEER opcode data (RFC 6887 §12.1): MAP's fields plus the remote peer."""

    nonce: bytes = attrs.field(validator=exact_bytes(NONCE_SIZE))
    protocol: int = attrs.field(validator=uint(8))
    internal_port: int = attrs.field(validator=uint(16))
    external_port: int = attrs.field(validator=uint(16))
    external_address: IPAddress = attrs.field(converter=to_address)
    remote_peer_port: int = attrs.field(validator=uint(16))
    remote_peer_address: IPAddress = attrs.field(converter=to_address)


OpcodeData = MapData | PeerData


def _to_options(value: Iterable[Option]) -> tuple[Option, ...]:
    options = tuple(value)
    for option in options:
        if not isinstance(option, ThirdParty | PreferFailure | Filter | UnknownOption):
            raise TypeError(f"not a PCP option: {option!r}")
    return options


def _check_data_for_opcode(opcode: Opcode, data: OpcodeData | None) -> None:
    wanted = {Opcode.MAP: MapData, Opcode.PEER: PeerData}.get(opcode)
    if wanted is None:
        if data is not None:
            raise ValueError(f"{opcode.name} carries no opcode data")
    elif not isinstance(data, wanted):
        raise ValueError(f"{opcode.name} needs {wanted.__name__}, got {type(data).__name__}")


@attrs.frozen
class PcpRequest:
    """A PCP request (RFC 6887 §7.1)."""

    opcode: Opcode = attrs.field(converter=Opcode)
    lifetime: int = attrs.field(validator=uint(32))
    client_address: IPAddress = attrs.field(converter=to_address)
    data: OpcodeData | None = None
    options: tuple[Option, ...] = attrs.field(default=(), converter=_to_options)

    def __attrs_post_init__(self) -> None:
        if self.opcode not in (Opcode.ANNOUNCE, Opcode.MAP, Opcode.PEER):
            raise ValueError(f"cannot build a {self.opcode.name} request")
        _check_data_for_opcode(self.opcode, self.data)


@attrs.frozen
class PcpResponse:
    """A PCP response (RFC 6887 §7.2), or a version-negotiation reply (§9).

    ``version`` is 2 for every ordinary response. A reply with another version
    is the server saying UNSUPP_VERSION and naming a version it speaks; version
    0 there is a NAT-PMP gateway's 8-byte "unsupported version" answer
    (RFC 6886 §3.5), whose Seconds Since Start of Epoch becomes ``epoch``.

    ``data`` is ``None`` for ANNOUNCE, for opcodes this codec does not know and
    for error responses whose opcode data the server cut short (miniupnpd
    answers a truncated MAP with a 36-byte MALFORMED_REQUEST); whatever
    follows the header in those cases is kept, undecoded, in ``opaque``.
    ``reserved`` is the 96-bit field a server fills with the tail of the
    client's address when the request did not parse (§7.2).
    """

    opcode: Opcode = attrs.field(converter=Opcode)
    result_code: ResultCode = attrs.field(converter=ResultCode)
    lifetime: int = attrs.field(validator=uint(32))
    epoch: int = attrs.field(validator=uint(32))
    data: OpcodeData | None = None
    options: tuple[Option, ...] = attrs.field(default=(), converter=_to_options)
    version: int = attrs.field(default=VERSION, validator=uint(8))
    reserved: bytes = attrs.field(default=bytes(12), validator=exact_bytes(12))
    opaque: bytes = b""

    def __attrs_post_init__(self) -> None:
        if self.version != VERSION:
            if self.result_code != ResultCode.UNSUPP_VERSION:
                raise ValueError(f"a version {self.version} reply must be UNSUPP_VERSION")
            if self.data is not None or self.options:
                raise ValueError("a version-negotiation reply carries no opcode data or options")
            return
        size = _DATA_SIZES.get(self.opcode)
        if size is None:
            # An opcode this codec does not know: everything after the header
            # is opaque to us.
            if self.data is not None or self.options:
                raise ValueError(f"{self.opcode.name}: only opaque bytes can follow the header")
            return
        if self.data is None and size:
            # An error reply cut short by the server (§7.2: it could not parse
            # the request), so there is no opcode data to decode.
            if self.result_code == ResultCode.SUCCESS:
                raise ValueError(f"a successful {self.opcode.name} response needs its data")
            if len(self.opaque) >= size or self.options:
                raise ValueError("a cut-short reply holds less than the opcode data, no options")
            return
        _check_data_for_opcode(self.opcode, self.data)
        if self.opaque:
            raise ValueError("opaque is only for undecoded opcode data")

    @property
    def is_natpmp(self) -> bool:
        """True for a NAT-PMP gateway's answer to a PCP request (RFC 6886 §3.5)."""
        return self.version == 0


# -- encoding ----------------------------------------------------------------


def _encode_data(data: OpcodeData | None) -> bytes:
    if data is None:
        return b""
    head = _MAP.pack(
        data.nonce,
        data.protocol,
        data.internal_port,
        data.external_port,
        pack_address(data.external_address),
    )
    if isinstance(data, PeerData):
        head += _PEER_TAIL.pack(data.remote_peer_port, pack_address(data.remote_peer_address))
    return head


def _encode_option(option: Option) -> bytes:
    if isinstance(option, ThirdParty):
        body = pack_address(option.internal_address)
    elif isinstance(option, PreferFailure):
        body = b""
    elif isinstance(option, Filter):
        body = struct.pack(
            "!xBH16s",
            option.prefix_length,
            option.remote_peer_port,
            pack_address(option.remote_peer_address),
        )
    else:
        body = option.data
    # RFC 6887 §7.3: Option Length excludes the padding to a 4-octet boundary.
    padding = -len(body) % 4
    return _OPTION_HEADER.pack(option.code, 0, len(body)) + body + bytes(padding)


def _finish(message: bytes) -> bytes:
    if len(message) % 4:
        raise ValueError(f"PCP message would be {len(message)} bytes, not a multiple of 4")
    if len(message) > MAX_MESSAGE_SIZE:
        raise ValueError(
            f"PCP message would be {len(message)} bytes; RFC 6887 §7 allows {MAX_MESSAGE_SIZE}"
        )
    return message


def encode_request(request: PcpRequest) -> bytes:
    """The wire form of *request*.

    Raises ValueError if the options make it longer than 1100 bytes (§7).
    """
    header = _REQUEST_HEADER.pack(
        VERSION, request.opcode, 0, request.lifetime, pack_address(request.client_address)
    )
    options = b"".join(_encode_option(o) for o in request.options)
    return _finish(header + _encode_data(request.data) + options)


def encode_response(response: PcpResponse) -> bytes:
    """The wire form of *response* (for servers and tests).

    A version-0 response is written as a NAT-PMP gateway writes it (8 bytes,
    opcode 128 + request opcode, per RFC 6886 erratum 3618 and miniupnpd).
    """
    if response.version == 0:
        return (
            struct.pack(
                "!BBHI", 0, _R_BIT | response.opcode, ResultCode.UNSUPP_VERSION, response.epoch
            )
            + response.opaque
        )
    header = _HEADER.pack(
        response.version,
        _R_BIT | response.opcode,
        0,
        response.result_code,
        response.lifetime,
        response.epoch,
        response.reserved,
    )
    options = b"".join(_encode_option(o) for o in response.options)
    return _finish(header + _encode_data(response.data) + response.opaque + options)


# -- decoding ----------------------------------------------------------------


def _check_length(data: bytes, *, result_code: int | None) -> None:
    # RFC 6887 §7, §8.3: at least the 24-byte header, at most 1100 bytes, and
    # always a multiple of 4.
    if len(data) < HEADER_SIZE:
        raise MalformedMessage(
            f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte PCP header",
            result_code=result_code,
        )
    if len(data) > MAX_MESSAGE_SIZE:
        raise MalformedMessage(
            f"{len(data)} bytes is longer than PCP's {MAX_MESSAGE_SIZE}-byte maximum",
            result_code=result_code,
        )
    if len(data) % 4:
        raise MalformedMessage(f"{len(data)} bytes is not a multiple of 4", result_code=result_code)


def _decode_data(opcode: Opcode, body: bytes) -> OpcodeData:
    nonce, protocol, internal_port, external_port, external = _MAP.unpack_from(body)
    if opcode == Opcode.MAP:
        return MapData(nonce, protocol, internal_port, external_port, unpack_address(external))
    remote_port, remote = _PEER_TAIL.unpack_from(body, MAP_DATA_SIZE)
    return PeerData(
        nonce,
        protocol,
        internal_port,
        external_port,
        unpack_address(external),
        remote_port,
        unpack_address(remote),
    )


def _decode_options(buf: bytes, offset: int) -> tuple[Option, ...]:
    options: list[Option] = []
    while offset < len(buf):
        if len(buf) - offset < _OPTION_HEADER.size:
            raise MalformedMessage(
                f"{len(buf) - offset} stray bytes where an option header should be",
                result_code=ResultCode.MALFORMED_OPTION,
            )
        raw_code, _reserved, length = _OPTION_HEADER.unpack_from(buf, offset)
        code = OptionCode(raw_code)
        start = offset + _OPTION_HEADER.size
        end = start + length
        # RFC 6887 §7.3: the option occupies its length rounded up to 4 octets.
        padded_end = start + length + (-length % 4)
        if padded_end > len(buf):
            raise MalformedMessage(
                f"option {code.name} claims {length} bytes but only {len(buf) - start} remain",
                result_code=ResultCode.MALFORMED_OPTION,
            )
        body = buf[start:end]
        want = _OPTION_SIZES.get(code)
        if want is not None and length != want:
            raise MalformedMessage(
                f"option {code.name} must carry {want} bytes, not {length}",
                result_code=ResultCode.MALFORMED_OPTION,
            )
        options.append(_make_option(raw_code, body))
        offset = padded_end
    return tuple(options)


def _make_option(code: int, body: bytes) -> Option:
    # Compared as plain ints: the enum's ad-hoc members are not exhaustive.
    if code == OptionCode.THIRD_PARTY.value:
        return ThirdParty(unpack_address(body))
    if code == OptionCode.PREFER_FAILURE.value:
        return PreferFailure()
    if code == OptionCode.FILTER.value:
        prefix_length = body[1]
        if prefix_length > 128:
            raise MalformedMessage(
                f"FILTER prefix length {prefix_length} is over 128",
                result_code=ResultCode.MALFORMED_OPTION,
            )
        remote_port = int.from_bytes(body[2:4], "big")
        return Filter(prefix_length, remote_port, unpack_address(body[4:20]))
    return UnknownOption(code, body)


_DATA_SIZES: Final = {Opcode.ANNOUNCE: 0, Opcode.MAP: MAP_DATA_SIZE, Opcode.PEER: PEER_DATA_SIZE}


def decode_response(data: bytes | bytearray | memoryview) -> PcpResponse:
    """Decode a datagram received from a PCP server.

    Applies the checks of RFC 6887 §8.3 that need only the bytes, in the order
    of protocols.md §1.12: a version other than 2 with UNSUPP_VERSION is a
    version-negotiation reply (a NAT-PMP gateway's 8-byte answer included, which
    is why it comes before the length rules); then the R bit, the length rules
    and the opcode's data length. Matching the response to a request (nonce,
    protocol, port) and the epoch check are the caller's.

    Raises:
        MalformedMessage: anything else; the datagram must be ignored.
    """
    buf = bytes(data)
    if len(buf) < 4:
        raise MalformedMessage(f"{len(buf)} bytes is too short for any PCP reply")
    version = buf[0]
    if version != VERSION:
        return _decode_version_reply(buf)
    if not buf[1] & _R_BIT:
        # RFC 6887 §8.3: a message without the R bit is a request; drop it.
        raise MalformedMessage("R bit clear: this is a request, not a response")
    _check_length(buf, result_code=None)
    _version, op, _rsvd, result, lifetime, epoch, reserved = _HEADER.unpack_from(buf)
    opcode = Opcode(op & 0x7F)
    result_code = ResultCode(result)
    size = _DATA_SIZES.get(opcode)
    body = buf[HEADER_SIZE:]
    if size is None or (size > len(body) and result_code != ResultCode.SUCCESS):
        # An opcode we do not know, or an error reply to a request the server
        # could not parse, carrying less than the opcode's data: keep the rest.
        return PcpResponse(opcode, result_code, lifetime, epoch, None, (), VERSION, reserved, body)
    if size > len(body):
        raise MalformedMessage(
            f"{opcode.name} response has {len(body)} bytes of opcode data; needs {size}"
        )
    opcode_data = _decode_data(opcode, body) if size else None
    options = _decode_options(buf, HEADER_SIZE + size)
    return PcpResponse(
        opcode, result_code, lifetime, epoch, opcode_data, options, VERSION, reserved
    )


def _decode_version_reply(buf: bytes) -> PcpResponse:
    version = buf[0]
    if version == 0:
        # RFC 6886 §3.5 (and §1.1 on PCP transition): a NAT-PMP gateway answers
        # any request whose version is not 0 with 8 bytes: 00, opcode,
        # result 1 (16-bit), SSSoE. Byte 3 thus reads as PCP's UNSUPP_VERSION.
        # The opcode is 0 in the RFC's figure and 128 + op after erratum 3618
        # and in miniupnpd: accept both.
        if len(buf) < 8:
            raise MalformedMessage(
                f"{len(buf)}-byte NAT-PMP reply; the unsupported-version answer has 8"
            )
        result, sssoe = struct.unpack_from("!HI", buf, 2)
        if result != ResultCode.UNSUPP_VERSION:
            raise MalformedMessage(
                f"NAT-PMP reply with result {result}; only 'unsupported version' "
                "can answer a PCP request"
            )
        return PcpResponse(
            Opcode(buf[1] & 0x7F), ResultCode.UNSUPP_VERSION, 0, sssoe, version=0, opaque=buf[8:]
        )
    # RFC 6887 §9: a server that does not speak our version answers
    # UNSUPP_VERSION with a version it does speak in byte 0. Its header layout
    # is the only part we can rely on.
    if buf[3] != ResultCode.UNSUPP_VERSION or not buf[1] & _R_BIT:
        raise MalformedMessage(f"PCP version {version}; this client speaks version {VERSION}")
    _check_length(buf, result_code=None)
    _v, op, _rsvd, _result, lifetime, epoch, reserved = _HEADER.unpack_from(buf)
    return PcpResponse(
        Opcode(op & 0x7F),
        ResultCode.UNSUPP_VERSION,
        lifetime,
        epoch,
        version=version,
        reserved=reserved,
        opaque=buf[HEADER_SIZE:],
    )


def decode_request(data: bytes | bytearray | memoryview) -> PcpRequest:
    """Decode a datagram received by a PCP server.

    Structural checks only (RFC 6887 §7, §8.2 header and lengths); policy such
    as option placement, protocol-0 rules or THIRD_PARTY naming the sender is
    the server's to judge, because its error reply must still copy the
    request's opcode data.

    Raises:
        UnsupportedVersion: version is not 2 (the server answers UNSUPP_VERSION;
            version 0 is NAT-PMP and belongs to :mod:`portbroker.wire.natpmp`).
        UnsupportedOpcode: an opcode other than ANNOUNCE, MAP or PEER.
        MalformedMessage: anything else wrong; ``result_code`` says what to
            answer, ``None`` means send nothing.
    """
    buf = bytes(data)
    if not buf:
        raise MalformedMessage("empty datagram")
    if buf[0] != VERSION:
        raise UnsupportedVersion(buf[0], result_code=ResultCode.UNSUPP_VERSION)
    if len(buf) < 2:
        raise MalformedMessage("1-byte datagram", result_code=ResultCode.MALFORMED_REQUEST)
    if buf[1] & _R_BIT:
        # RFC 6887 §8.3: a server silently drops messages with R set.
        raise MalformedMessage("R bit set: this is a response, not a request")
    _check_length(buf, result_code=ResultCode.MALFORMED_REQUEST)
    _v, op, _rsvd, lifetime, client = _REQUEST_HEADER.unpack_from(buf)
    opcode = Opcode(op)
    size = _DATA_SIZES.get(opcode)
    if size is None:
        raise UnsupportedOpcode(opcode, result_code=ResultCode.UNSUPP_OPCODE)
    if len(buf) - HEADER_SIZE < size:
        raise MalformedMessage(
            f"{opcode.name} request has {len(buf) - HEADER_SIZE} bytes of opcode data; "
            f"needs {size}",
            result_code=ResultCode.MALFORMED_REQUEST,
        )
    opcode_data = _decode_data(opcode, buf[HEADER_SIZE:]) if size else None
    options = _decode_options(buf, HEADER_SIZE + size)
    return PcpRequest(opcode, lifetime, unpack_address(client), opcode_data, options)
