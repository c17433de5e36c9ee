"""SSDP (UPnP Device Architecture 1.1 §1) search requests and replies.

Sans-IO. Builds M-SEARCH requests exactly as miniupnpc and tailscale send them,
and parses search responses and NOTIFY messages the way real devices write
them: any header case, stray whitespace, bare LF line ends, missing optional
headers, quoted or spaced ``max-age``.

Decoders raise :class:`~portbroker.errors.MalformedMessage` and nothing else.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import attrs

from portbroker.errors import MalformedMessage
from portbroker.wire._fields import uint

__all__ = [
    "MULTICAST_V4",
    "MULTICAST_V6_LINK",
    "PORT",
    "SEARCH_TARGETS",
    "ST_IGD_V1",
    "ST_IGD_V2",
    "ST_WAN_IP_CONNECTION_V1",
    "ST_WAN_IP_CONNECTION_V2",
    "ST_WAN_PPP_CONNECTION_V1",
    "MSearch",
    "Notify",
    "SearchResponse",
    "decode",
    "decode_msearch",
    "decode_notify",
    "decode_response",
    "encode_msearch",
]

PORT: Final = 1900
MULTICAST_V4: Final = IPv4Address("239.255.255.250")
MULTICAST_V6_LINK: Final = IPv6Address("ff02::c")

ST_IGD_V1: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
ST_IGD_V2: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
ST_WAN_IP_CONNECTION_V1: Final = "urn:schemas-upnp-org:service:WANIPConnection:1"
ST_WAN_IP_CONNECTION_V2: Final = "urn:schemas-upnp-org:service:WANIPConnection:2"
ST_WAN_PPP_CONNECTION_V1: Final = "urn:schemas-upnp-org:service:WANPPPConnection:1"

# What we search for, most capable first (protocols.md §4.1).
SEARCH_TARGETS: Final = (
    ST_IGD_V2,
    ST_WAN_IP_CONNECTION_V2,
    ST_IGD_V1,
    ST_WAN_IP_CONNECTION_V1,
    ST_WAN_PPP_CONNECTION_V1,
)

# A datagram larger than this is not an SSDP message we will read.
MAX_MESSAGE_SIZE: Final = 8192
_MAX_AGE = re.compile(r"(?:^|[,;\s])max-age\s*=\s*\"?\s*(\d+)", re.IGNORECASE)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _host_text(host: str | IPv4Address | IPv6Address, port: int) -> str:
    if isinstance(host, IPv6Address) or (isinstance(host, str) and ":" in host):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def encode_msearch(
    st: str,
    *,
    host: str | IPv4Address | IPv6Address = MULTICAST_V4,
    port: int = PORT,
    mx: int | None = 2,
) -> bytes:
    """An M-SEARCH request (UDA 1.1 §1.3.2).

    For the multicast form keep the default *host* and give *mx* (UDA 1.1: at
    least 1, at most 5). For a unicast search to a device, pass its address as
    *host* and ``mx=None``: unicast M-SEARCH carries no MX and is answered at
    once.
    """
    if not st or any(c in st for c in "\r\n"):
        raise ValueError(f"not a usable search target: {st!r}")
    if mx is not None and not 1 <= mx <= 120:
        raise ValueError(f"MX must be 1..120 seconds (UDA 1.1 wants 1..5), got {mx}")
    lines = [
        "M-SEARCH * HTTP/1.1",
        f"HOST: {_host_text(host, port)}",
        f"ST: {st}",
        'MAN: "ssdp:discover"',  # the quotes are part of the value
    ]
    if mx is not None:
        lines.append(f"MX: {mx}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _headers(tuples: tuple[tuple[str, str], ...]) -> dict[str, str]:
    # First occurrence wins, as in most HTTP parsers facing duplicates.
    out: dict[str, str] = {}
    for name, value in tuples:
        out.setdefault(name, value)
    return out


def _optional_uint(value: str | None, bits: int) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        return None
    number = int(value)
    return number if number < (1 << bits) else None


@attrs.frozen
class _Common:
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of header *name* (any case), or None."""
        return _headers(self.headers).get(name.lower())

    @property
    def usn(self) -> str | None:
        return self.header("usn")

    @property
    def server(self) -> str | None:
        return self.header("server")

    @property
    def max_age(self) -> int | None:
        """CACHE-CONTROL max-age in seconds, or None when absent or unreadable."""
        value = self.header("cache-control")
        if value is None:
            return None
        match = _MAX_AGE.search(value)
        return int(match.group(1)) if match else None

    @property
    def boot_id(self) -> int | None:
        """BOOTID.UPNP.ORG (UDA 1.1 §1.2.2): 31-bit, goes up on every reboot."""
        return _optional_uint(self.header("bootid.upnp.org"), 31)

    @property
    def config_id(self) -> int | None:
        """CONFIGID.UPNP.ORG: changes whenever the descriptions change (0..16777215)."""
        return _optional_uint(self.header("configid.upnp.org"), 24)

    @property
    def search_port(self) -> int | None:
        """SEARCHPORT.UPNP.ORG: where unicast M-SEARCH goes if not 1900."""
        return _optional_uint(self.header("searchport.upnp.org"), 16)

    @property
    def uuid(self) -> str | None:
        """The device UUID from USN (``uuid:<this>::<type>``), lower-cased."""
        usn = self.usn
        if usn is None or not usn.lower().startswith("uuid:"):
            return None
        return usn[5:].split("::", 1)[0].strip().lower() or None


@attrs.frozen
class SearchResponse(_Common):
    """An ``HTTP/1.1 200 OK`` answer to M-SEARCH (UDA 1.1 §1.3.3).

    ``headers`` keeps every header, names lower-cased, in order.
    """

    location: str
    st: str


@attrs.frozen
class Notify(_Common):
    """A ``NOTIFY * HTTP/1.1`` advertisement (UDA 1.1 §1.2).

    ``nts`` is ``ssdp:alive``, ``ssdp:byebye`` or ``ssdp:update``; byebye
    carries no LOCATION.
    """

    nt: str
    nts: str
    location: str | None

    @property
    def next_boot_id(self) -> int | None:
        """NEXTBOOTID.UPNP.ORG of an ``ssdp:update``."""
        return _optional_uint(self.header("nextbootid.upnp.org"), 31)


@attrs.frozen
class MSearch:
    """A decoded M-SEARCH request (for a fake gateway's SSDP server)."""

    st: str
    man: str
    mx: int | None = attrs.field(validator=attrs.validators.optional(uint(8)))
    host: str | None


def _split(data: bytes | bytearray | memoryview) -> tuple[str, tuple[tuple[str, str], ...]]:
    buf = bytes(data)
    if len(buf) > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"{len(buf)} bytes is larger than any SSDP message we read")
    try:
        text = buf.decode("utf-8")
    except UnicodeDecodeError:
        # Devices put Latin-1 in SERVER strings; headers we use are ASCII.
        text = buf.decode("latin-1")
    # Tolerate bare LF (and stray CR) line ends; stop at the blank line.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise MalformedMessage("empty SSDP message")
    start = lines[0].strip()
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line.strip():
            break
        if line[:1] in (" ", "\t") and headers:
            # obsolete line folding (RFC 7230 §3.2.4): continue the last value
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not _TOKEN.match(name):
            raise MalformedMessage(f"not an SSDP header line: {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return start, tuple(headers)


def _require(headers: dict[str, str], name: str, what: str) -> str:
    value = headers.get(name)
    if not value:
        raise MalformedMessage(f"{what} without {name.upper()}")
    return value


def decode_response(data: bytes | bytearray | memoryview) -> SearchResponse:
    """Parse an M-SEARCH reply. LOCATION and ST are required; the rest optional."""
    start, headers = _split(data)
    parts = start.split(None, 2)
    if len(parts) < 2 or not parts[0].upper().startswith("HTTP/1."):
        raise MalformedMessage(f"not an SSDP search response: {start[:80]!r}")
    if parts[1] != "200":
        raise MalformedMessage(f"search response with status {parts[1][:10]!r}, not 200")
    table = _headers(headers)
    return SearchResponse(
        headers,
        _require(table, "location", "search response"),
        _require(table, "st", "search response"),
    )


def decode_notify(data: bytes | bytearray | memoryview) -> Notify:
    """Parse a NOTIFY. NT and NTS are required; LOCATION too unless byebye."""
    start, headers = _split(data)
    if start.split(None, 1)[0:1] != ["NOTIFY"]:
        raise MalformedMessage(f"not an SSDP NOTIFY: {start[:80]!r}")
    table = _headers(headers)
    nts = _require(table, "nts", "NOTIFY")
    location = table.get("location") or None
    if location is None and nts.lower() != "ssdp:byebye":
        raise MalformedMessage(f"NOTIFY {nts} without LOCATION")
    return Notify(headers, _require(table, "nt", "NOTIFY"), nts, location)


def decode(data: bytes | bytearray | memoryview) -> SearchResponse | Notify:
    """Parse whatever a client's SSDP socket receives: a search reply or a NOTIFY."""
    head = bytes(data[:8]).lstrip().upper()
    if head.startswith(b"NOTIFY"):
        return decode_notify(data)
    return decode_response(data)


def decode_msearch(data: bytes | bytearray | memoryview) -> MSearch:
    """Parse an M-SEARCH request. ST and MAN ``"ssdp:discover"`` are required."""
    start, headers = _split(data)
    if start.split(None, 1)[0:1] != ["M-SEARCH"]:
        raise MalformedMessage(f"not an M-SEARCH: {start[:80]!r}")
    table = _headers(headers)
    man = _require(table, "man", "M-SEARCH")
    if man.strip('"').lower() != "ssdp:discover":
        raise MalformedMessage(f'M-SEARCH with MAN {man[:40]!r}, not "ssdp:discover"')
    mx = _optional_uint(table.get("mx"), 8)
    return MSearch(_require(table, "st", "M-SEARCH"), man, mx, table.get("host"))
