"""Names the command line needs before anything runs, importing nothing heavy.

:mod:`portbroker.types` re-exports them (import them from there). They live
here so that ``portbroker list`` through the daemon imports neither attrs nor
the types built with it (benchmarks/cli_daemon.py).
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_LIFETIME", "MAX_LIFETIME", "MIN_LIFETIME", "format_endpoint"]

# Lifetimes, named once: the library, the CLI and the daemon accept the same
# range. 7200 s is RFC 6886 §3.3's recommendation; a week is IGD v2's cap on
# leases (protocols.md §4.5), and no gateway we know grants longer.
DEFAULT_LIFETIME: Final = 7200
MIN_LIFETIME: Final = 1
MAX_LIFETIME: Final = 604800


def format_endpoint(address: object, port: object) -> str:
    """``address:port``, with an IPv6 address in brackets (``[fd77::2]:8080``, RFC 3986 §3.2.2)."""
    text = str(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
