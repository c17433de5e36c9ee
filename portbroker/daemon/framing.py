"""JSON lines, written once: framing, a bounded parse and the one encoder (sans-IO).

The daemon and both clients (:mod:`.client`) speak JSON lines
(docs/daemon-protocol.md, "Framing"); this module is all of it that touches
bytes, so the peers cannot disagree and nothing a peer sends can exhaust the
reader:

- :class:`LineFramer` cuts a byte stream into lines. It holds at most
  ``max_line`` bytes whatever the peer sends (no newline ever included): a line
  over the limit is reported once, as :class:`LineTooLong`, as soon as it is
  known to be too long, and skipped up to its newline without being buffered.
- :func:`parse_line` checks size and nesting depth *before* ``json.loads``
  (whose C scanner recurses once per level and raises RecursionError at about
  1,000), refuses NaN/Infinity, numbers that overflow to infinity and integers
  longer than :data:`MAX_INT_DIGITS`; whatever the line, it returns a value or
  raises :class:`FramingError`, never anything else.
- :func:`encode` is the one encoder: compact, ``allow_nan=False``, so no line a
  peer receives is invalid JSON; a value it cannot encode raises
  :class:`FramingError` instead of writing one.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, Final, NamedTuple

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_LINE",
    "FramingError",
    "LineFramer",
    "LineTooLong",
    "encode",
    "parse_line",
]

MAX_LINE: Final = 64 * 1024  # bytes in one line, its newline not counted
# The protocol's deepest message (a probe report in a reply) is 4 levels; 32
# leaves room for growth and stays far below the decoder's recursion limit.
MAX_DEPTH: Final = 32
# Python refuses int("...") past sys.get_int_max_str_digits() (4,300 by default,
# settable down to 640) with a ValueError, because the conversion is quadratic.
# 640, the smallest limit an interpreter can be set to, so this check always
# speaks first, with our words; no field of the protocol needs a tenth of it.
MAX_INT_DIGITS: Final = 640


class FramingError(Exception):
    """A line that is not acceptable JSON (not UTF-8, not JSON, too deep...).

    ``str(exc)`` says what was wrong in words fit for the peer.
    """


# Not attrs: the daemon's clients import this module, and a short command
# should not pay for attrs (benchmarks/cli_daemon.py).
class LineTooLong(NamedTuple):
    """A line longer than ``limit`` bytes was received and is being skipped."""

    limit: int


class LineFramer:
    """Bytes in, complete lines out (without their newline).

    ``feed(data)`` returns the lines *data* completed, in order, with a
    :class:`LineTooLong` in place of each line over ``max_line`` bytes. Any
    split of a stream into chunks gives the same items. Memory is bounded by
    ``max_line`` plus the chunk being fed.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        self.max_line = max_line
        self._partial = bytearray()
        self._skipping = False  # inside a line already reported as too long

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        out: list[bytes | LineTooLong] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if not self._skipping:
                if len(self._partial) + (end - start) > self.max_line:
                    # Reported now, not at its newline: the peer may never send one.
                    out.append(LineTooLong(self.max_line))
                    self._partial.clear()
                    self._skipping = True
                else:
                    self._partial += data[start:end]
            if newline < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                out.append(bytes(self._partial))
                self._partial.clear()
            start = newline + 1
        return out

    def close(self) -> bytes | None:
        """End of stream: the unterminated last line, if there is one (not too long)."""
        rest = None if self._skipping or not self._partial else bytes(self._partial)
        self._partial.clear()
        self._skipping = False
        return rest

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line (at most ``max_line``)."""
        return len(self._partial)


# A string, escapes included (an unterminated one runs to the end): brackets
# inside strings are not nesting.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Every byte but a bracket is deleted; openers become +1, closers -1 (as signed bytes).
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_SIGNS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_depth(line: bytes) -> int:
    """How deep arrays and objects nest in *line*, at least as deep as a JSON
    decoder would recurse into it (on valid JSON, exactly).

    Done at C speed (a regex, a translate, accumulate), so a line full of
    brackets costs about what decoding it would.
    """
    signs = _STRING.sub(b"", line).translate(_SIGNS, _NOT_BRACKETS)
    # An unmatched closer only lowers the running sum after the point where
    # a decoder stops: it can hide no depth the decoder would reach.
    return max(itertools.accumulate(memoryview(signs).cast("b")), default=0)


def _constant(name: str) -> Any:
    raise FramingError(f"{name} is not a JSON number (NaN and infinities are refused)")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise FramingError(f"the number {text[:40]} is out of range (it overflows to infinity)")
    return value


def _int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise FramingError(
            f"an integer of {digits} digits is too long (at most {MAX_INT_DIGITS} digits)"
        )
    return int(text)


_DECODER: Final = json.JSONDecoder(
    parse_float=_float, parse_int=_int, parse_constant=_constant, strict=True
)


def parse_line(line: bytes, *, max_line: int = MAX_LINE, max_depth: int = MAX_DEPTH) -> Any:
    """One line (without its newline) -> the JSON value it holds.

    Raises:
        FramingError: the only exception: the line is over *max_line* bytes,
            not UTF-8, nested deeper than *max_depth*, not JSON, or holds NaN,
            an infinity, a number that overflows or an over-long integer.
    """
    if len(line) > max_line:
        raise FramingError(f"a line may be at most {max_line} bytes, not {len(line)}")
    # Checked on the bytes, before the decoder recurses into them.
    if nesting_depth(line) > max_depth:
        raise FramingError(f"JSON nested deeper than {max_depth} levels is refused")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FramingError(f"not UTF-8 (byte {exc.start})") from None
    try:
        return _DECODER.decode(text)
    except FramingError:
        raise
    except ValueError as exc:  # json.JSONDecodeError, or int() past the interpreter's limit
        raise FramingError(f"not a JSON line: {exc}") from None
    except RecursionError:
        # Unreachable under MAX_DEPTH; kept so the promise above holds for any max_depth.
        raise FramingError("JSON nested too deeply") from None


def encode(message: Any) -> bytes:
    """*message* as one compact JSON line, with its newline.

    Raises:
        FramingError: it holds NaN, an infinity or something JSON cannot say;
            nothing invalid is ever written.
    """
    try:
        # default=str: an address or enum in an error's details is sent as its text.
        text = json.dumps(message, separators=(",", ":"), allow_nan=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FramingError(f"cannot encode the message as JSON: {exc}") from None
    return text.encode() + b"\n"
