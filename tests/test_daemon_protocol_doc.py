"""docs/daemon-protocol.md's example session, replayed line by line."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import trio

from portbroker.testing import FakeGateway
from tests.test_daemon import running

DOC = Path(__file__).resolve().parents[1] / "docs" / "daemon-protocol.md"
# Depend on the host running the example, not on the protocol.
VOLATILE = {
    "uid",
    "pid",
    "owner_uid",
    "server",
    "gateway",
    "internal_address",
    "external_address",
    "message",
    # Whether the example's external address is publicly reachable depends
    # on the gateway too (the fake reports a documentation address).
    "public",
    "reachability",
}


def session() -> list[tuple[str, str]]:
    text = DOC.read_text()
    block = text.split("## Example session", 1)[1]
    lines = re.findall(r"^([<>]) (.*)$", block, re.MULTILINE)
    pairs = []
    for (kind_a, request), (kind_b, reply) in zip(lines[::2], lines[1::2], strict=True):
        assert (kind_a, kind_b) == (">", "<")
        pairs.append((request, reply))
    return pairs


def same_shape(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(expected) == set(actual)
            and all(k in VOLATILE or same_shape(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(same_shape(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def test_the_session_has_every_kind_of_reply() -> None:
    pairs = session()
    assert len(pairs) >= 8
    assert {json.loads(r)["op"] for r, _ in pairs} >= {"hello", "map", "list", "unmap"}


async def test_the_example_session_works_as_documented() -> None:
    directory = Path(tempfile.mkdtemp(prefix="pbdoc-"))
    try:
        async with running(directory, FakeGateway()):
            stream = await trio.open_unix_socket(str(directory / "pb.sock"))
            async with stream:
                buffer = b""
                for request, expected in session():
                    await stream.send_all(request.encode() + b"\n")
                    with trio.fail_after(10):
                        while b"\n" not in buffer:
                            buffer += await stream.receive_some(65536)
                    line, buffer = buffer.split(b"\n", 1)
                    actual = json.loads(line)
                    assert same_shape(json.loads(expected), actual), (request, actual)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_every_error_code_is_documented() -> None:
    from portbroker.daemon.protocol import ErrorCode

    table = DOC.read_text().split("### Error codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert documented == {code.value for code in ErrorCode}
