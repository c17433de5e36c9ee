"""The daemon's wire protocol: JSON lines, sans-IO.

One JSON object per line, UTF-8, at most :data:`MAX_LINE` bytes, nested at most
:data:`MAX_DEPTH` deep (:mod:`.framing` does the bytes). A request has an
``op`` and an optional ``id`` (a string of at most :data:`MAX_ID` characters,
or a finite number) that the reply echoes. A
reply is ``{"id": ..., "ok": true, ...}`` or ``{"id": ..., "ok": false,
"error": {"code": ..., "message": ...}}``; the codes are stable
(:class:`ErrorCode`). ``watch`` adds event lines ``{"event": ..., "mapping":
{...}}`` to the same connection. docs/daemon-protocol.md is the reference.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Final

import attrs

from portbroker.daemon import framing
from portbroker.daemon.paths import ENV_SOCKET  # the socket path, for clients and the daemon

__all__ = [
    "ENV_SOCKET",
    "MAX_DEPTH",
    "MAX_ID",
    "MAX_LINE",
    "OPS",
    "PROTOCOL_VERSIONS",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "encode",
    "error_reply",
    "id_problem",
    "parse_request",
]

MAX_LINE: Final = framing.MAX_LINE
MAX_DEPTH: Final = framing.MAX_DEPTH
MAX_ID: Final = 256  # characters in a string request id
PROTOCOL_VERSIONS: Final = (1,)
OPS: Final = ("hello", "probe", "map", "unmap", "list", "watch", "publish", "unpublish")


class ErrorCode(enum.Enum):
    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    LINE_TOO_LONG = "line_too_long"
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_MANY_MAPPINGS = "too_many_mappings"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    MAPPING_FAILED = "mapping_failed"
    NO_METHOD = "no_method"
    GATEWAY_SILENT = "gateway_silent"
    INTERNAL = "internal"
    # Limits and policy (issue 8; docs/daemon-protocol.md "Limits").
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_HOLDS = "too_many_holds"
    PRIVILEGED_PORT = "privileged_port"
    GONE = "gone"  # the requester's connection closed before the request was carried out
    IDLE = "idle"  # a connection with nothing held or watched, silent too long
    # A map for another host's address (THIRD_PARTY) by a user who is not
    # root and not in a --third-party-group (docs/third-party-and-filter.md).
    THIRD_PARTY_FORBIDDEN = "third_party_forbidden"
    # DNS-SD publication (issue 9; docs/dnssd.md).
    TOO_MANY_PUBLICATIONS = "too_many_publications"
    PUBLISH_FAILED = "publish_failed"  # zeroconf could not start or refused the records


class ProtocolError(Exception):
    """A request the daemon refuses; becomes an error reply, never a crash."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@attrs.frozen
class Request:
    op: str
    id: Any
    params: dict[str, Any]

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """Parameter *name* of type *kind*, or *default* when absent or null."""
        value = self.params.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{name!r} must be {_kind_name(kind)}, not a boolean"
            )
        if not isinstance(value, kind):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"{name!r} must be {_kind_name(kind)}, not {type(value).__name__}",
            )
        return value

    def port(self, name: str, *, required: bool) -> int | None:
        value = self.get(name, int)
        if value is None:
            if required:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name!r} is required (1..65535)")
            return None
        if not 1 <= value <= 65535:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name!r} must be 1..65535, got {value}")
        return int(value)

    def protocol(self) -> str:
        value = str(self.get("protocol", str, "tcp")).lower()
        if value not in ("tcp", "udp"):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"'protocol' must be 'tcp' or 'udp', not {value!r}"
            )
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) -> :class:`Request`.

    The line goes through :func:`.framing.parse_line` (size, depth and numbers
    bounded before anything else), so whatever it holds this raises nothing
    but :class:`ProtocolError`.

    Raises:
        ProtocolError: BAD_JSON, BAD_REQUEST or UNKNOWN_OP; ``extra["id"]``
            carries the request id when one could be read (and was valid).
    """
    try:
        data = framing.parse_line(line)
    except framing.FramingError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, str(exc)) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"a request is a JSON object, not {_json_type(data)}"
        )
    request_id = data.get("id")
    problem = id_problem(request_id)
    if problem is not None:
        # The reply's id is then null: a peer cannot make us echo a value we refused.
        raise ProtocolError(ErrorCode.BAD_REQUEST, problem)
    op = data.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'op' (a string) is required", id=request_id)
    if op not in OPS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}; ops: {', '.join(OPS)}", id=request_id
        )
    params = {k: v for k, v in data.items() if k not in ("op", "id")}
    return Request(op, request_id, params)


def id_problem(request_id: object) -> str | None:
    """Why *request_id* is not a valid request id, or None when it is.

    An id is null, a string of at most :data:`MAX_ID` characters or a finite
    number (a boolean is not a number here).
    """
    if request_id is None:
        return None
    if isinstance(request_id, str):
        if len(request_id) > MAX_ID:
            return f"'id' may be at most {MAX_ID} characters, not {len(request_id)}"
        return None
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        return None
    if isinstance(request_id, float) and math.isfinite(request_id):
        return None
    return f"'id' must be a string or a finite number, not {_json_type(request_id)}"


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for kind, name in names.items():
        if type(value) is kind:
            return name
    return "a number"


def encode(message: dict[str, Any]) -> bytes:
    """*message* as one line (:func:`.framing.encode`).

    Raises:
        framing.FramingError: it cannot be encoded as valid JSON.
    """
    return framing.encode(message)


def error_reply(request_id: Any, code: ErrorCode, message: str, **extra: Any) -> bytes:
    """An error reply line; an id that is not valid (:func:`id_problem`) is sent as null."""
    error: dict[str, Any] = {"code": code.value, "message": message}
    error.update(extra)
    if id_problem(request_id) is not None:
        request_id = None
    return encode({"id": request_id, "ok": False, "error": error})
