"""UPnP IGD rules as plain functions: no sockets, no clock, no threads.

What :class:`portbroker.methods.upnp.UpnpMethod` decides, it decides here:

- which SSDP search replies to believe and where their LOCATION may lead
  (UDA 1.1 §1.3.3; ``docs/wire.md``);
- which WAN connection service of a root description to use, and whether its
  control URL stays on the gateway (UDA 1.1 §2.3, IGD:1/IGD:2 device templates);
- the SOAP bytes of each action and what a reply or a fault says (UDA 1.1 §3.2);
- an HTTP/1.x response reader with a size cap (RFC 9112 §6 message framing);
- the remedies for AddPortMapping errors (WANIPConnection:2 §2.4.16) and the
  lease a successful add yields;
- IPv6 pinholes (WANIPv6FirewallControl:1, IGD v2): the service, the
  AddPinhole arguments, which faults mean "no such pinhole", the lease
  (docs/ipv6.md).
"""

from __future__ import annotations

import enum
import html
import re
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv6Address, ip_address
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import attrs

from portbroker.errors import MalformedMessage
from portbroker.types import IPAddress, Lease, MappingRequest
from portbroker.wire import ssdp
from portbroker.wire._fields import to_address

__all__ = [
    "FIREWALL_SERVICE",
    "MAX_DESCRIPTION",
    "MAX_LEASE",
    "MAX_PINHOLE_LEASE",
    "MAX_SOAP_RESPONSE",
    "PINHOLE_GONE",
    "HttpReader",
    "HttpResponse",
    "PortMappingEntry",
    "Remedy",
    "ResponseTooLarge",
    "SoapFault",
    "WanService",
    "accept_search_reply",
    "build_lease",
    "build_pinhole_lease",
    "control_url_problem",
    "find_firewall_service",
    "find_wan_service",
    "firewall_status_problem",
    "granted_lifetime",
    "http_request",
    "location_at_gateway",
    "parse_port_mapping_entry",
    "parse_soap_fault",
    "parse_soap_response",
    "pinhole_args",
    "pinhole_id_of",
    "remedy_for",
    "soap_envelope",
    "upnp_error_code",
    "uptime_of",
]

# Real root descriptions are a few KiB (the largest we have seen, a Huawei
# HG531's, is 8 KiB); a body past this is not a description we will read.
MAX_DESCRIPTION: Final = 64 * 1024
# SOAP replies to the actions we send are under 1 KiB.
MAX_SOAP_RESPONSE: Final = 64 * 1024
# IGD v2 caps leases at a week and reads 0 as "the maximum" (WANIPConnection:2 §2.3.16).
MAX_LEASE: Final = 604800

CONFLICT: Final = 718
PERMANENT_ONLY: Final = 725
INVALID_ARGS: Final = 402
SAME_PORT: Final = 724
NO_SUCH_ENTRY: Final = 714
INVALID_ACTION: Final = 401

# UPnP error descriptions (UDA 1.1 §3.2.2, WANIPConnection:2 §2.5), back to
# their codes, for texts that arrive without a code.
_ERROR_CODES: Final = {
    "Invalid Action": 401,
    "Invalid Args": 402,
    "Action Failed": 501,
    "Argument Value Invalid": 600,
    "Argument Value Out of Range": 601,
    "Optional Action Not Implemented": 602,
    "Out of Memory": 603,
    "Human Intervention Required": 604,
    "String Argument Too Long": 605,
    "Action not authorized": 606,
    "SpecifiedArrayIndexInvalid": 713,
    "NoSuchEntryInArray": 714,
    "WildCardNotPermittedInSrcIP": 715,
    "WildCardNotPermittedInExtPort": 716,
    "ConflictInMappingEntry": 718,
    "SamePortValuesRequired": 724,
    "OnlyPermanentLeasesSupported": 725,
    "RemoteHostOnlySupportsWildcard": 726,
    "ExternalPortOnlySupportsWildcard": 727,
    # WANIPv6FirewallControl:1 §2.5 (its 708 shares WANIPConnection's 715 text,
    # so that text keeps 715); "Wilcarding" is miniupnpd 2.3.1's spelling.
    "PinholeSpaceExhausted": 701,
    "FirewallDisabled": 702,
    "InboundPinholeNotAllowed": 703,
    "NoSuchEntry": 704,
    "ProtocolNotSupported": 705,
    "InternalPortWildcardingNotAllowed": 706,
    "InternalPortWilcardingNotAllowed": 706,
    "ProtocolWildcardingNotAllowed": 707,
    "NoPacketSent": 709,
}


def upnp_error_code(message: str) -> int | None:
    """The UPnP error code behind an error description (or miniupnpc's text for it)."""
    return _ERROR_CODES.get(message.strip())


# -- SSDP replies and where they lead ---------------------------------------------


def _host_for_url(gateway: IPAddress) -> str:
    return f"[{gateway}]" if isinstance(gateway, IPv6Address) else str(gateway)


def location_at_gateway(location: str, gateway: IPAddress) -> str | None:
    """*location* with its host replaced by *gateway*; None if not a usable http URL.

    Devices advertise stale or odd hosts in LOCATION (tailscale issue 5502); a
    reply that came from the gateway is taken to describe the gateway, and
    nothing is ever fetched from another host.
    """
    try:
        parts = urlsplit(location.strip())
        port = parts.port or 80
    except ValueError:
        return None
    if parts.scheme.lower() != "http" or not parts.hostname:
        return None
    host = _host_for_url(gateway)
    return urlunsplit(("http", f"{host}:{port}", parts.path or "/", parts.query, ""))


def accept_search_reply(
    data: bytes, source_address: str, gateway: IPAddress
) -> ssdp.SearchResponse | None:
    """The search reply in *data* if it came from *gateway*, LOCATION pointed at it.

    Only the source *address* is checked: UDA 1.1 §1.3.3 has the device answer
    to the requester's address and port, from whatever port it likes, and
    devices do answer from ephemeral ports. Replies from other hosts, malformed
    replies and unusable LOCATIONs yield None.
    """
    try:
        reply = ssdp.decode_response(data)
        sender = to_address(source_address.split("%")[0])
    except (MalformedMessage, ValueError):
        return None
    if sender != gateway:
        return None  # another device on the link is not our gateway
    location = location_at_gateway(reply.location, gateway)
    if location is None:
        return None
    return attrs.evolve(reply, location=location)


# -- the root description ------------------------------------------------------------


@attrs.frozen
class WanService:
    """The WAN connection service to send SOAP to."""

    service_type: str
    control_url: str


# A whole service type, version included: it goes into the SOAPAction header,
# so a description's "...:1&#13;&#10;X-Injected: 1" (CR LF once unescaped) must
# not pass as WANIPConnection:1 (UDA 1.1 §2.3: urn:...:service:type:v).
_WAN_TYPE: Final = re.compile(r"urn:schemas-upnp-org:service:WAN(?:IP|PPP)Connection:[0-9]{1,3}")
_NS = r"(?:[\w.-]+:)?"  # an optional namespace prefix on a tag name
# Any start, end or empty-element tag. A tag that never ends stops at the next
# "<" ([^<>]), so every "<" is looked at once: linear in the text.
_ANY_TAG: Final = re.compile(r"<(/?)(?:[\w.-]+:)?([\w.-]+)(?:\s[^<>]*?)?(/?)>")


def _elements(text: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(name, content) of each element whose tag name (any prefix) is *wanted*.

    In document order, as ``<name ...>(.*?)</name>`` would find them -- the
    content runs to the first end tag of that name, and an element that is
    never closed is skipped -- but in linear time: a lazy regex rescans to the
    end of the text from every unclosed start tag, O(n^2), and a 64 KiB reply
    of ``<service>`` repeated took seconds of CPU on the event loop.
    """
    tags = list(_ANY_TAG.finditer(text))
    last_end: dict[str, int] = {}
    for index, tag in enumerate(tags):
        if tag.group(1):
            last_end[tag.group(2)] = index
    current: tuple[str, int] | None = None
    for index, tag in enumerate(tags):
        closing, name, empty = tag.group(1), tag.group(2), tag.group(3)
        if current is not None:
            if closing and name == current[0]:
                yield name, text[current[1] : tag.start()]
                current = None
            continue
        if closing or not wanted(name):
            continue
        if empty:
            yield name, ""
        elif last_end.get(name, -1) > index:
            current = (name, tag.end())


def _text(name: str, text: str) -> str | None:
    """The content of the first *name* element in *text*, unescaped, or None."""
    for _name, content in _elements(text, name.__eq__):
        return html.unescape(content).strip()
    return None


def _resolve(base: str, url: str) -> str:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        return url
    # As miniupnpc does (igd_desc_parse.c / miniupnpc.c url_cpy_or_cat): a
    # relative control URL hangs off the base's host, not its path.
    scheme, sep, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}{sep}{host}{'' if url.startswith('/') else '/'}{url}"


def find_wan_service(description: str, location: str) -> WanService | None:
    """The first WANIPConnection or WANPPPConnection service, in document order.

    That is the one miniupnpc picks (``UPNP_GetIGDFromUrl``). The control URL
    is resolved against URLBase when present, else *location*. Parsing is
    lenient, as device firmware is: tags are found by name whatever their
    namespace prefix, and the rest of the document may be malformed. Services
    of other vendors' types (Huawei's ``urn:dslforum-org``) are not used.
    """
    base = _text("URLBase", description) or location
    for _name, block in _elements(description, "service".__eq__):
        service_type = _text("serviceType", block)
        control = _text("controlURL", block)
        if service_type and control and _WAN_TYPE.fullmatch(service_type):
            return WanService(service_type, _resolve(base, control))
    return None


def control_url_problem(url: str, gateway: IPAddress) -> str | None:
    """Why SOAP must not go to *url* (None when it may): it leads away from the gateway."""
    try:
        parts = urlsplit(url)
        address = to_address(ip_address(parts.hostname or ""))
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        address = None
    if address != gateway or parts.scheme.lower() != "http":
        return f"the IGD's control URL {url!r} leads away from the gateway; refused"
    return None


# -- SOAP ------------------------------------------------------------------------------


def soap_envelope(service_type: str, action: str, args: Sequence[tuple[str, str]]) -> bytes:
    """The SOAP body of *action* (UDA 1.1 §3.2.1), arguments in the order given.

    The bytes miniupnpc sends (miniupnpd's capture in ``docs/wire.md``).
    """
    inner = "".join(f"<{name}>{html.escape(value, quote=False)}</{name}>" for name, value in args)
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{html.escape(service_type)}">{inner}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()


@attrs.frozen
class SoapFault:
    """A UPnPError (UDA 1.1 §3.2.2): the device answered, and said no."""

    code: int | None
    description: str


# WANIPv6FirewallControl:1's out arguments have no "New" prefix.
_OUT_ARG: Final = re.compile(r"New\w+|UniqueID|FirewallEnabled|InboundPinholeAllowed")


def parse_soap_fault(body: bytes) -> SoapFault | None:
    """The UPnPError in *body*, or None if it holds none."""
    text = body.decode("utf-8", "replace")
    if not re.search(rf"<{_NS}Fault\b", text):
        return None
    code_text = _text("errorCode", text)
    description = _text("errorDescription", text) or ""
    code = int(code_text) if code_text and code_text.isdigit() and len(code_text) < 6 else None
    if code is None:
        code = upnp_error_code(description)
    return SoapFault(code, description or "UPnPError")


def parse_soap_response(action: str, body: bytes) -> dict[str, str]:
    """The out arguments of *action*'s response (``New...`` elements), by name.

    Raises:
        ValueError: *body* is not a response to *action*.
    """
    text = body.decode("utf-8", "replace")
    if not re.search(rf"<{_NS}{re.escape(action)}Response\b", text):
        raise ValueError(f"not a {action} response")
    return {
        name: html.unescape(value).strip()
        for name, value in _elements(text, lambda name: _OUT_ARG.fullmatch(name) is not None)
    }


@attrs.frozen
class PortMappingEntry:
    """A GetSpecificPortMappingEntry answer (WANIPConnection:2 §2.4.15)."""

    internal_client: str
    internal_port: int
    lease_remaining: int  # 0: permanent


def parse_port_mapping_entry(values: dict[str, str]) -> PortMappingEntry:
    """Raises ValueError if the answer lacks the client or has unreadable numbers."""
    client = values.get("NewInternalClient", "")
    if not client:
        raise ValueError("GetSpecificPortMappingEntry answer without NewInternalClient")
    lease_text = values.get("NewLeaseDuration", "") or "0"
    return PortMappingEntry(client, int(values.get("NewInternalPort", "0") or 0), int(lease_text))


def uptime_of(values: dict[str, str]) -> int | None:
    """GetStatusInfo's NewUptime (NewUpTime on some dslforum-typed routers), if readable."""
    for name, value in values.items():
        if name.lower() == "newuptime" and value.isdigit() and len(value) < 12:
            return int(value)
    return None


# -- HTTP/1.x --------------------------------------------------------------------------


def http_request(
    method: str, url: str, *, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """An HTTP/1.1 request for *url* with ``Connection: close`` (as miniupnpc sends)."""
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = parts.netloc
    if parts.port == 80:
        host = host.rsplit(":", 1)[0]
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"no line breaks allowed in an HTTP header: {line!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@attrs.frozen
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; the first of duplicates
    body: bytes


_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ResponseTooLarge(ValueError):
    """The response would pass the reader's cap."""


class HttpReader:
    """Reads one HTTP/1.x response fed in pieces, keeping at most *cap* bytes.

    Framing per RFC 9112 §6.3: chunked, then Content-Length, else up to the
    close. :meth:`feed` returns the response as soon as it is complete;
    :meth:`close` when the peer closed. Raise :class:`ResponseTooLarge` or
    ValueError (malformed).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buffer = bytearray()
        self._head: tuple[int, str, dict[str, str]] | None = None
        self._body_start = 0
        self._chunk_at = 0  # where the next chunk-size line starts
        self._chunks = bytearray()  # chunk data decoded so far

    def feed(self, data: bytes) -> HttpResponse | None:
        self._buffer += data
        if len(self._buffer) > self.cap + 16 * 1024:  # room for the headers
            raise ResponseTooLarge(f"response larger than {self.cap // 1024} KiB")
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            sep = 4
            if end < 0:
                end, sep = self._buffer.find(b"\n\n"), 2
            if end < 0:
                return None
            self._head = self._parse_head(bytes(self._buffer[:end]))
            self._body_start = end + sep
        return self._complete(eof=False)

    def close(self) -> HttpResponse:
        if self._head is None:
            raise ValueError("connection closed before the response headers ended")
        response = self._complete(eof=True)
        if response is None:
            raise ValueError("connection closed in the middle of the response body")
        return response

    @staticmethod
    def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        version, _, rest = lines[0].strip().partition(" ")
        code, _, reason = rest.strip().partition(" ")
        if not version.upper().startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        return int(code), reason.strip(), headers

    def _complete(self, *, eof: bool) -> HttpResponse | None:
        # Lengths are checked before anything is copied, and chunks are
        # decoded where the last call stopped: no work grows with the square
        # of the response (a peer may send it a byte per segment).
        assert self._head is not None
        status, reason, headers = self._head
        available = len(self._buffer) - self._body_start
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._dechunk()
            if body is None:
                return None
        elif "content-length" in headers:
            length_text = headers["content-length"]
            if not length_text.isdigit():
                raise ValueError(f"unreadable Content-Length {length_text[:20]!r}")
            length = int(length_text)
            if length > self.cap:
                raise ResponseTooLarge(f"response of {length} bytes; the limit is {self.cap}")
            if available < length:
                return None
            body = bytes(self._buffer[self._body_start : self._body_start + length])
        elif available > self.cap:
            raise ResponseTooLarge(f"response larger than {self.cap // 1024} KiB")
        elif not eof:
            return None
        else:
            body = bytes(self._buffer[self._body_start :])
        return HttpResponse(status, reason, headers, body)

    def _dechunk(self) -> bytes | None:
        """Decode the chunks received so far; the body once the last chunk arrived."""
        raw = self._buffer
        if self._chunk_at < self._body_start:
            self._chunk_at = self._body_start
        while True:
            at = self._chunk_at
            line_end = raw.find(b"\n", at)
            if line_end < 0:
                if len(raw) - at > 1024:
                    raise ValueError("chunk size line too long")
                return None
            size_text = bytes(raw[at:line_end]).split(b";", 1)[0].strip()
            # RFC 9112 §7.1: chunk-size = 1*HEXDIG. int(x, 16) also takes "-6",
            # "+6", "0x6" and "6_0"; a negative size would step back onto this
            # very line and loop for ever without a checkpoint.
            if _CHUNK_SIZE.fullmatch(size_text) is None:
                raise ValueError(f"unreadable chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                return bytes(self._chunks)  # trailers, if any, are not needed
            if len(self._chunks) + size > self.cap:
                raise ResponseTooLarge(f"response larger than {self.cap // 1024} KiB")
            start = line_end + 1
            end = start + size
            if len(raw) < end + 1:
                return None
            # The line end after the chunk data.
            if raw[end : end + 2] == b"\r\n":
                after = end + 2
            elif raw[end : end + 1] == b"\n":
                after = end + 1
            elif raw[end : end + 1] == b"\r":
                return None  # its LF is still to come
            else:
                raise ValueError("chunk data not followed by a line end")
            self._chunks += raw[start:end]
            self._chunk_at = after


# -- AddPortMapping and its remedies ---------------------------------------------------


class Remedy(enum.Enum):
    """What to try after AddPortMapping failed with an error code."""

    PERMANENT_LEASE = "permanent-lease"  # send lease 0; we then own the delete
    INTERNAL_PORT = "internal-port"  # 724: external port = internal port
    ANY_PORT = "any-port"  # 718 on IGD v2: AddAnyPortMapping
    RANDOM_PORT = "random-port"  # 718 (v1, or AddAnyPortMapping refused): another port
    GIVE_UP = "give-up"


def remedy_for(
    code: int | None,
    *,
    lease: int,
    port: int,
    internal_port: int,
    exact: bool,
    tried_any: bool,
) -> Remedy:
    """The next step after AddPortMapping failed with UPnP error *code*."""
    if code in (PERMANENT_ONLY, INVALID_ARGS) and lease != 0:
        # 725, and 402 from routers that mean the same (tailscale issue 15223).
        return Remedy.PERMANENT_LEASE
    if code == SAME_PORT and port != internal_port and not exact:
        return Remedy.INTERNAL_PORT
    if code != CONFLICT or exact:
        return Remedy.GIVE_UP
    return Remedy.RANDOM_PORT if tried_any else Remedy.ANY_PORT


def granted_lifetime(lease_remaining: int | None, lease_sent: int, requested: int) -> int:
    """The lifetime to record for a mapping added with lease *lease_sent*.

    A finite lease sent is what the gateway took. For lease 0 (permanent, or
    AddAnyPortMapping's 0 that IGD v2 reads as a week), the remaining lease the
    gateway reports, if it reports one; else our own renewal period.
    """
    if lease_sent > 0:
        return lease_sent
    if lease_remaining is not None and lease_remaining > 0:
        # At most IGD v2's week: a gateway reporting 99999999999 s (past a
        # Lease's 32 bits) or 2**32 - 1 still gets renewed within a week.
        return min(lease_remaining, MAX_LEASE)
    return requested


def build_lease(
    request: MappingRequest,
    *,
    client: IPAddress,
    external_address: IPAddress,
    external_port: int,
    lease_sent: int,
    lifetime: int,
    now: float,
    gateway: IPAddress,
    epoch: int | None,
) -> Lease:
    """The :class:`~portbroker.types.Lease` of a successful add."""
    return Lease(
        method="upnp",
        protocol=request.protocol,
        internal_address=client,
        internal_port=request.internal_port,
        external_address=external_address,
        external_port=external_port,
        lifetime=lifetime,
        granted_at=now,
        gateway=gateway,
        epoch=epoch,
        permanent=lease_sent == 0,
    )


# -- IPv6 pinholes (WANIPv6FirewallControl:1) ----------------------------------------

FIREWALL_SERVICE: Final = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
# WANIPv6FirewallControl:1 §2.5.4: LeaseTime is 1..86400 s; miniupnpd 2.3.1
# answers 402 Invalid Args to more (seen in the lab).
MAX_PINHOLE_LEASE: Final = 86400
# Faults to UpdatePinhole / DeletePinhole of a UniqueID the gateway gave us
# that mean "no such pinhole": 704 NoSuchEntry (§2.5), and 402 Invalid Args,
# which miniupnpd 2.3.1 answers for a UniqueID it no longer holds (its log:
# "Failed to convert hostname '...' to IP address"; seen in the lab).
PINHOLE_GONE: Final = frozenset({704, INVALID_ARGS})
_FIREWALL_TYPE: Final = re.compile(
    r"urn:schemas-upnp-org:service:WANIPv6FirewallControl:[0-9]{1,3}"
)


def find_firewall_service(description: str, location: str) -> WanService | None:
    """The WANIPv6FirewallControl service of a root description (IGD v2), or None.

    Resolved like :func:`find_wan_service`; an IGD v1 device has none.
    """
    base = _text("URLBase", description) or location
    for _name, block in _elements(description, "service".__eq__):
        service_type = _text("serviceType", block)
        control = _text("controlURL", block)
        if service_type and control and _FIREWALL_TYPE.fullmatch(service_type):
            return WanService(service_type, _resolve(base, control))
    return None


def firewall_status_problem(values: dict[str, str]) -> str | None:
    """Why GetFirewallStatus's answer rules pinholes out, or None (§2.4.1)."""
    enabled = values.get("FirewallEnabled", "").strip().lower()
    allowed = values.get("InboundPinholeAllowed", "").strip().lower()
    if enabled in ("0", "false", "no"):
        return "the gateway's IPv6 firewall is disabled (GetFirewallStatus): no pinhole to open"
    if allowed in ("0", "false", "no"):
        return "the gateway allows no inbound IPv6 pinholes (GetFirewallStatus)"
    return None


def pinhole_args(
    request: MappingRequest, client: str, lease: int, remote_host: str = ""
) -> list[tuple[str, str]]:
    """AddPinhole's arguments in §2.4.3's order: *remote_host* ("" = any), any port.

    *remote_host* is the one-host filter, as for AddPortMapping's
    NewRemoteHost (``upnp_remote_host``): without it a filtered pinhole would
    be open to everyone. Protocol is the IANA number (6, 17), not "TCP" as
    in AddPortMapping.
    """
    return [
        ("RemoteHost", remote_host),
        ("RemotePort", "0"),
        ("InternalClient", client),
        ("InternalPort", str(request.internal_port)),
        ("Protocol", str(request.protocol.number)),
        ("LeaseTime", str(lease)),
    ]


def pinhole_id_of(values: dict[str, str]) -> int:
    """AddPinhole's UniqueID (ui2). Raises ValueError when missing or out of range."""
    text = values.get("UniqueID", "").strip()
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ValueError(f"AddPinhole answer with UniqueID {text!r}")
    return int(text)


def build_pinhole_lease(
    request: MappingRequest,
    *,
    client: IPAddress,
    lease_time: int,
    pinhole_id: int,
    now: float,
    gateway: IPAddress,
    epoch: int | None,
) -> Lease:
    """The lease of a pinhole: no translation, so the external endpoint is the
    internal one (RFC 6887 §1 on IPv6 firewalls; WANIPv6FirewallControl:1 §1)."""
    return Lease(
        method="upnp",
        protocol=request.protocol,
        internal_address=client,
        internal_port=request.internal_port,
        external_address=client,
        external_port=request.internal_port,
        lifetime=lease_time,
        granted_at=now,
        gateway=gateway,
        epoch=epoch,
        pinhole_id=pinhole_id,
        filters=request.filters,
    )
