"""Loaders for tests/data (captures from real gateways and clients; origins and
licences in tests/data/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

REALDATA = Path(__file__).resolve().parent / "data"


def realdata(*parts: str) -> Path:
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the tests read real captures from tests/data "
            "(see tests/data/README.md)"
        )
    return path


@attrs.frozen
class Exchange:
    source: str
    name: str
    request: bytes
    response: bytes | None

    @property
    def id(self) -> str:
        return f"{self.source}:{self.name}"


_HEX = re.compile(r"^[0-9a-fA-F]+$")


def _hex_or_none(text: str) -> bytes | None:
    text = text.strip()
    return bytes.fromhex(text) if _HEX.match(text) else None


def load_exchanges() -> list[Exchange]:
    """Every request/response pair in tests/data/pcp_natpmp/*.txt."""
    out: list[Exchange] = []
    for path in sorted(realdata("pcp_natpmp").glob("*.txt")):
        source = path.name.split("_")[0]
        name: str | None = None
        request: bytes | None = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(None, 2)
            if len(words) == 3 and words[1] in ("REQ", "RESP"):
                # libpcp layout: "<name> REQ <hex>"
                name, kind, value = words
            elif words[0] in ("REQ", "RESP"):
                kind, value = words[0], line[len(words[0]) :]
            else:
                name = line
                continue
            assert name is not None
            if kind == "REQ":
                request = _hex_or_none(value)
                assert request is not None, f"{path.name}: bad REQ for {name}"
            else:
                assert request is not None, f"{path.name}: RESP before REQ for {name}"
                out.append(Exchange(source, name, request, _hex_or_none(value)))
                request = None
    return out


def load_ndpi() -> list[tuple[str, bytes]]:
    """(direction, payload) from tests/data/ndpi: 'req' to port 5351, 'resp' from it."""
    out: list[tuple[str, bytes]] = []
    for line in realdata("ndpi", "natpmp.pcap.payloads.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        direction = "resp" if parts[1].endswith(":5351") else "req"
        out.append((direction, bytes.fromhex(parts[5])))
    return out


def ssdp_replies() -> list[tuple[str, bytes]]:
    """Every captured SSDP search reply, one datagram each."""
    out: list[tuple[str, bytes]] = []
    for path in sorted(realdata("tailscale").glob("*.http")):
        out.append((f"tailscale/{path.name}", path.read_bytes()))
    for path in sorted(realdata("miniupnpd-2.3.1-live").glob("ssdp_*.txt")):
        # Several datagrams in one file, separated by a "----" line.
        chunks = re.split(rb"\r?\n----\r?\n", path.read_bytes())
        for i, chunk in enumerate(chunks):
            end = chunk.find(b"\r\n\r\n")
            if end >= 0:
                out.append((f"miniupnpd/{path.name}#{i}", chunk[: end + 4]))
    return out
