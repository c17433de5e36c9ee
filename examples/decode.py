"""Decode a PCP, NAT-PMP or SSDP datagram given as hex (or a file for SSDP).

    python examples/decode.py pcp 0281000000001c20...
    python examples/decode.py natpmp 00800000000002cc0b16212c
    python examples/decode.py ssdp reply.http

Handy when a router's capture puzzles you: it prints the decoded object or the
codec's reason for refusing it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from portbroker.errors import MalformedMessage
from portbroker.wire import natpmp, pcp, ssdp


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("pcp", "natpmp", "ssdp"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, value = argv
    try:
        if kind == "ssdp":
            print(ssdp.decode(Path(value).read_bytes()))
            return 0
        data = bytes.fromhex(value)
    except (OSError, ValueError) as exc:
        print(f"cannot read {value!r}: {exc}", file=sys.stderr)
        return 2
    except MalformedMessage as exc:
        print(f"not SSDP: {exc.reason}", file=sys.stderr)
        return 1
    decoders = {
        "pcp": (pcp.decode_response, pcp.decode_request),
        "natpmp": (natpmp.decode_response, natpmp.decode_request),
    }[kind]
    reasons = []
    for decoder in decoders:
        try:
            print(decoder(data))
            return 0
        except MalformedMessage as exc:
            reasons.append(f"{decoder.__name__}: {exc.reason}")
    print("not decodable:\n  " + "\n  ".join(reasons), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
