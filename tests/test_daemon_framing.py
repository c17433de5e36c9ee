"""JSON lines framed once (portbroker.daemon.framing) and the daemon's use of it.

The framer and the bounded parse are tested with plain bytes; the daemon's
reader and answer path in-process, through a real Unix socket.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from portbroker.daemon import framing
from portbroker.daemon import protocol as proto
from portbroker.daemon.protocol import ErrorCode, ProtocolError
from portbroker.testing import FakeGateway
from tests.test_daemon import running


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def strict(line: bytes) -> Any:
    """Parse *line* as RFC 8259 JSON: NaN and the infinities are not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in {line!r}: invalid JSON")

    return json.loads(line, parse_constant=refuse)


# -- the framer -----------------------------------------------------------------


def feed_all(framer: framing.LineFramer, chunks: list[bytes]) -> list[bytes | framing.LineTooLong]:
    out: list[bytes | framing.LineTooLong] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.binary(max_size=40) | st.just(b"\n") | st.binary(min_size=60, max_size=90),
        max_size=20,
    ),
    st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
def test_any_split_of_a_stream_gives_the_same_lines(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    whole = feed_all(framing.LineFramer(50), [stream])
    points = sorted({c for c in cuts if c <= len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert feed_all(framing.LineFramer(50), chunks) == whole
    # And byte by byte, the worst split there is.
    assert feed_all(framing.LineFramer(50), [bytes([b]) for b in stream]) == whole
    # What it gives is the stream's lines, the long ones reported instead,
    # the unfinished last one too once it is known to be too long.
    *lines, unfinished = stream.split(b"\n")
    expected: list[bytes | framing.LineTooLong] = [
        line if len(line) <= 50 else framing.LineTooLong(50) for line in lines
    ]
    if len(unfinished) > 50:
        expected.append(framing.LineTooLong(50))
    assert whole == expected


def test_an_overlong_line_is_reported_once_before_its_newline_and_skipped() -> None:
    framer = framing.LineFramer(100)
    assert framer.feed(b'{"op":"list"}\n' + b"x" * 60) == [b'{"op":"list"}']
    assert framer.feed(b"x" * 60) == [framing.LineTooLong(100)]  # no newline yet
    for _ in range(1000):
        assert framer.feed(b"y" * 1000) == []  # still the same line: said once
        assert framer.buffered == 0  # and none of it kept
    assert framer.feed(b'yyy\n{"op":"hello"}\n') == [b'{"op":"hello"}']


def test_a_peer_that_never_sends_a_newline_costs_at_most_one_line() -> None:
    framer = framing.LineFramer(framing.MAX_LINE)
    reports = []
    for _ in range(200):  # 12.5 MB, no newline
        reports.extend(framer.feed(b"[" * 65536))
        assert framer.buffered <= framing.MAX_LINE
    assert reports == [framing.LineTooLong(framing.MAX_LINE)]


def test_a_line_of_exactly_the_limit_is_a_line() -> None:
    framer = framing.LineFramer(10)
    assert framer.feed(b"0123456789\n01234567890\n") == [
        b"0123456789",
        framing.LineTooLong(10),
    ]


def test_the_unterminated_last_line_is_given_at_the_end() -> None:
    framer = framing.LineFramer(10)
    assert framer.feed(b"a\nbc") == [b"a"]
    assert framer.close() == b"bc"
    assert framer.close() is None
    framer.feed(b"x" * 11)
    assert framer.close() is None  # a line too long stays skipped


# -- the bounded parse ---------------------------------------------------------------


def test_one_kilobyte_of_nesting_is_refused_before_the_decoder_recurses() -> None:
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        line = opener * 1024 + closer * 1024
        with pytest.raises(ProtocolError) as info:
            proto.parse_request(line)
        assert info.value.code is ErrorCode.BAD_JSON
        assert f"deeper than {proto.MAX_DEPTH}" in info.value.message


def test_nesting_up_to_the_limit_is_accepted() -> None:
    deep = b"[" * (framing.MAX_DEPTH - 1) + b"]" * (framing.MAX_DEPTH - 1)
    request = proto.parse_request(b'{"op": "list", "x": ' + deep + b"}")
    assert request.op == "list"
    with pytest.raises(ProtocolError, match="deeper than"):
        proto.parse_request(b'{"op": "list", "x": [' + deep + b"]}")


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = '[[[{{{"\\"]]]' + "[" * 5000 + "\\\\"
    request = proto.parse_request(json.dumps({"op": "list", "id": "x", "pad": text}).encode())
    assert request.params["pad"] == text


_TRICKY_TEXT = st.text(alphabet='[]{}"\\\\/ax\u00e9\n', max_size=12)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=20,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.booleans())
def test_the_depth_scan_is_the_decoders_depth(value: Any, ascii_only: bool) -> None:
    line = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert framing.nesting_depth(line) == depth_of(value)
    if depth_of(value) <= framing.MAX_DEPTH:
        assert framing.parse_line(line) == value


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_nan_infinity_and_overflowing_numbers_are_refused(constant: str) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.parse_request(f'{{"id": {constant}, "op": "list"}}'.encode())
    assert info.value.code is ErrorCode.BAD_JSON
    assert "id" not in info.value.extra
    assert constant.lstrip("-") in info.value.message


@pytest.mark.parametrize("digits", [framing.MAX_INT_DIGITS + 1, 1000, 5000, 60000])
def test_integers_too_long_to_convert_are_refused_in_words(digits: int) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.parse_request(b'{"op": "map", "port": -' + b"9" * digits + b"}")
    assert info.value.code is ErrorCode.BAD_JSON
    assert f"{digits} digits is too long" in info.value.message
    assert "sys.set_int_max_str_digits" not in info.value.message


def test_a_long_integer_within_the_limit_is_a_number() -> None:
    request = proto.parse_request(b'{"op": "map", "port": ' + b"9" * framing.MAX_INT_DIGITS + b"}")
    assert request.params["port"] == int("9" * framing.MAX_INT_DIGITS)


# Text that looks like JSON: the parse's edge cases are in the tokens.
_TOKENS = st.sampled_from(
    [
        b"[",
        b"]",
        b"{",
        b"}",
        b'"',
        b"\\",
        b'\\"',
        b":",
        b",",
        b"1",
        b"-",
        b"e999",
        b"NaN",
        b"Infinity",
        b"true",
        b"null",
        b'"op"',
        b'"list"',
        b'"id"',
        b"\xff",
        b"\xc3",
        b" ",
    ]
)
_JSONISH = st.one_of(
    st.binary(max_size=200),
    st.lists(_TOKENS, max_size=80).map(b"".join),
    st.tuples(st.integers(0, 3000), st.lists(_TOKENS, max_size=10).map(b"".join)).map(
        lambda t: b"[" * t[0] + t[1]
    ),
    st.tuples(st.integers(0, 6000), st.sampled_from([b"1", b"-1", b"1.5e"])).map(
        lambda t: b'{"op": "list", "x": ' + t[1] + b"7" * t[0] + b"}"
    ),
)


@settings(max_examples=500, deadline=None)
@given(_JSONISH)
def test_the_parse_raises_nothing_but_the_protocol_error(line: bytes) -> None:
    outcome: object
    try:
        outcome = framing.parse_line(line)
    except framing.FramingError as exc:
        outcome = exc
    if isinstance(outcome, framing.FramingError):
        assert str(outcome)
    try:
        outcome = proto.parse_request(line)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.message
        # Whatever it was, the error reply is one valid JSON line.
        extra = dict(outcome.extra)
        reply = proto.error_reply(extra.pop("id", None), outcome.code, outcome.message, **extra)
        assert strict(reply)["ok"] is False
    else:
        assert isinstance(outcome, proto.Request)
        assert outcome.op in proto.OPS


# -- request ids and the one encoder -------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    [True, False, [1], {"a": 1}, "x" * (proto.MAX_ID + 1)],
    ids=["true", "false", "list", "object", "long-string"],
)
def test_an_id_neither_string_nor_number_is_bad_request_and_not_echoed(request_id: Any) -> None:
    line = json.dumps({"id": request_id, "op": "list"}).encode()
    with pytest.raises(ProtocolError) as info:
        proto.parse_request(line)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "'id'" in info.value.message
    assert "id" not in info.value.extra  # the reply's id is null


@pytest.mark.parametrize("request_id", [None, 0, -7, 2.5, "", "x" * proto.MAX_ID])
def test_strings_finite_numbers_and_null_are_ids(request_id: Any) -> None:
    line = json.dumps({"id": request_id, "op": "list"}).encode()
    assert proto.parse_request(line).id == request_id


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, [1]])
def test_an_error_reply_never_echoes_an_id_that_is_not_one(bad: Any) -> None:
    reply = strict(proto.error_reply(bad, ErrorCode.BAD_REQUEST, "no"))
    assert reply["id"] is None


def test_the_encoder_refuses_nan_instead_of_writing_invalid_json() -> None:
    with pytest.raises(framing.FramingError, match="cannot encode"):
        proto.encode({"id": 1, "ok": True, "rtt": float("nan")})
    assert proto.encode({"id": 1, "ok": True}) == b'{"id":1,"ok":true}\n'


# -- the daemon's reader and answers, in-process --------------------------------------------


async def exchange(path: Path, payload: bytes, *, eof: bool = False) -> list[bytes]:
    """Send *payload* (then EOF if asked), read reply lines until the daemon closes."""
    stream = await trio.open_unix_socket(str(path))
    buffer = b""
    async with stream:
        await stream.send_all(payload)
        if eof:
            await stream.send_eof()
        with trio.fail_after(30):  # a guard, not a measure
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                if not eof and buffer.count(b"\n") >= payload.count(b"\n"):
                    break
    return buffer.splitlines()


async def test_the_daemon_answers_nested_json_with_bad_json_and_goes_on(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(short_dir, FakeGateway()):
        lines = await exchange(
            short_dir / "pb.sock", b"[" * 1024 + b"\n" + b'{"id": 2, "op": "list"}\n'
        )
    replies = [strict(line) for line in lines]
    assert replies[0]["id"] is None
    assert replies[0]["error"]["code"] == "bad_json"
    assert "nested deeper than 32" in replies[0]["error"]["message"]
    assert replies[1] == {"id": 2, "ok": True, "mappings": []}
    assert "a bug" not in caplog.text


@pytest.mark.parametrize(
    "line",
    [
        b'{"id": NaN, "op": "list"}',
        b'{"id": Infinity, "op": "list"}',
        b'{"id": -1e400, "op": "list"}',
        b'{"id": true, "op": "list"}',
        b'{"id": [1, 2], "op": "list"}',
    ],
)
async def test_every_reply_is_valid_json_whatever_the_id(short_dir: Path, line: bytes) -> None:
    async with running(short_dir, FakeGateway()):
        lines = await exchange(short_dir / "pb.sock", line + b'\n{"id": "next", "op": "list"}\n')
    replies = [strict(reply) for reply in lines]
    assert replies[0]["ok"] is False
    assert replies[0]["id"] is None
    assert replies[0]["error"]["code"] in ("bad_json", "bad_request")
    assert replies[1]["id"] == "next"


async def test_a_reply_that_cannot_be_encoded_is_an_internal_error_logged_with_its_traceback(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from portbroker.daemon.server import Daemon

    handle = Daemon.handle

    async def nan_in_list(self: Daemon, client: Any, request: proto.Request) -> dict[str, Any]:
        if request.op == "list":
            return {"mappings": [{"rtt_ms": float("nan")}]}
        return await handle(self, client, request)

    monkeypatch.setattr(Daemon, "handle", nan_in_list)
    async with running(short_dir, FakeGateway()):
        lines = await exchange(
            short_dir / "pb.sock", b'{"id": 1, "op": "list"}\n{"id": 2, "op": "hello"}\n'
        )
    replies = {r["id"]: r for r in (strict(line) for line in lines)}
    assert replies[1]["error"]["code"] == "internal"
    assert replies[2]["ok"] is True
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert logged, "the failure was not logged with its traceback"


async def test_a_client_that_half_closes_gets_every_answer(short_dir: Path) -> None:
    # A probe waits on the gateway, so it is still running when EOF arrives;
    # the last request has no newline (printf '...' | socat).
    async with running(short_dir, FakeGateway()):
        lines = await exchange(
            short_dir / "pb.sock",
            b'{"id": 1, "op": "probe"}\n{"id": 2, "op": "list"}',
            eof=True,
        )
    replies = {r["id"]: r for r in (strict(line) for line in lines)}
    assert set(replies) == {1, 2}
    assert replies[1]["ok"] is True
    assert replies[1]["selected"] == "pcp"
    assert replies[2] == {"id": 2, "ok": True, "mappings": []}
