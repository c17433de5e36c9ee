"""The daemon in-process: a real Unix socket, FakeGateway in memory behind it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portbroker.broker import Mapping
from portbroker.client import DaemonRequestError, open_client
from portbroker.daemon.server import Daemon, DaemonConfig, DaemonError, serve
from portbroker.testing import FakeGateway
from portbroker.types import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME
from portbroker.wire import pcp


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="pbd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def config_for(directory: Path, gateway: FakeGateway, **changes: Any) -> DaemonConfig:
    options: dict[str, Any] = {
        "gateway": "127.0.0.1",
        "methods": ("pcp", "natpmp"),
        "socket_path": directory / "pb.sock",
        "state_path": directory / "state.json",
        "grace": 0.3,
        "broker_options": {
            "link_factory": gateway.link_factory(),
            "announce_port": None,
            "seed": 1,
        },
    }
    options.update(changes)
    return DaemonConfig(**options)


@asynccontextmanager
async def running(directory: Path, gateway: FakeGateway, **changes: Any) -> AsyncIterator[Daemon]:
    async with serve(config_for(directory, gateway, **changes)) as daemon:
        yield daemon


async def raw_lines(path: Path, payload: bytes, count: int) -> list[dict[str, Any]]:
    """Send raw bytes, read *count* reply lines."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(payload)
        buffer = b""
        with trio.fail_after(10):
            while buffer.count(b"\n") < count:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
    return [json.loads(line) for line in buffer.splitlines()[:count]]


async def test_hello_map_list_unmap(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon, open_client(short_dir / "pb.sock") as client:
        hello = await client.hello()
        assert hello["version"] == 1
        assert hello["uid"] == os.getuid()
        assert hello["pid"] == os.getpid()
        mapping = await client.map(8080, "tcp", lifetime=600)
        assert (mapping["method"], mapping["external_port"], mapping["holders"]) == ("pcp", 8080, 1)
        assert gateway.mapping_for("tcp", 8080) is not None
        listed = await client.list()
        assert [m["id"] for m in listed] == ["8080/tcp"]
        assert await client.unmap(8080, "tcp") == "8080/tcp"
        assert gateway.mapping_for("tcp", 8080) is None
        assert daemon.shared == {}
        with pytest.raises(DaemonRequestError) as info:
            await client.unmap(8080, "tcp")
        assert info.value.code == "not_found"


async def test_socket_is_private_and_a_second_daemon_refuses(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway):
        assert (short_dir / "pb.sock").stat().st_mode & 0o777 == 0o600
        with pytest.raises(DaemonError, match="already listening"):
            async with running(short_dir, gateway):
                pass
    assert not (short_dir / "pb.sock").exists()


async def test_a_stale_socket_is_taken_over(short_dir: Path) -> None:
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "pb.sock"))
    stale.close()  # a crashed daemon's leftover
    async with running(short_dir, FakeGateway()), open_client(short_dir / "pb.sock") as client:
        assert (await client.hello())["version"] == 1


async def test_two_apps_share_one_gateway_mapping(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        async with (
            open_client(short_dir / "pb.sock") as first,
            open_client(short_dir / "pb.sock") as second,
        ):
            a = await first.map(9000, "udp")
            b = await second.map(9000, "udp")
            assert a["external_port"] == b["external_port"]
            assert b["holders"] == 2
            pcp_maps = [r for r in gateway.requests if getattr(r, "lifetime", 0)]
            assert len(pcp_maps) == 1  # one gateway request for both
            await first.unmap(9000, "udp")
            assert gateway.mapping_for("udp", 9000) is not None  # the second still holds it
            await second.unmap(9000, "udp")
            assert gateway.mapping_for("udp", 9000) is None
        assert daemon.shared == {}


async def test_conflicting_external_port_is_refused(short_dir: Path) -> None:
    async with running(short_dir, FakeGateway()), open_client(short_dir / "pb.sock") as client:
        await client.map(9000, "tcp", external_port=9500)
        with pytest.raises(DaemonRequestError) as info:
            await client.map(9001, "tcp", external_port=9500)
        assert info.value.code == "conflict"
        assert "9500/tcp already maps to 9000/tcp" in info.value.message


# The grace-period tests run under MockClock: they check when things happen in
# the daemon's own time, not how long the machine took.
GRACE = 10.0


@pytest.fixture
def mock_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> trio.testing.MockClock:
    """MockClock, with the state writer's worker thread run inline.

    While a write runs in a thread every task waits, so autojump would move
    the clock on to the next deadline (a renewal an hour away, past every
    grace period) in the middle of a request. Inline, a write takes no time.
    """

    async def inline(fn: Any, *args: Any, **_options: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    return autojump_clock


async def app_gone(daemon: Daemon, key: tuple[str, int]) -> None:
    """Wait until the daemon has seen the app's connection close."""
    await trio.testing.wait_all_tasks_blocked()
    holds = daemon.shared[key].holds
    assert holds
    assert all(h.conn is None and h.grace_until is not None for h in holds)


async def test_disconnect_releases_after_the_grace_period(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway, grace=GRACE) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.map(7000, "tcp")
        await app_gone(daemon, ("tcp", 7000))
        await trio.sleep(GRACE * 0.9)
        assert gateway.mapping_for("tcp", 7000) is not None  # still in grace
        await trio.sleep(GRACE * 0.2)
        assert gateway.mapping_for("tcp", 7000) is None
        assert daemon.shared == {}


async def test_reconnecting_within_the_grace_period_keeps_the_mapping(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway, grace=GRACE) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            first = await client.map(7001, "tcp")
        await app_gone(daemon, ("tcp", 7001))
        await trio.sleep(GRACE / 2)  # the app restarts within the grace period
        async with open_client(short_dir / "pb.sock") as client:
            again = await client.map(7001, "tcp")
            assert again["holders"] == 1  # the old hold, reclaimed
            assert again["external_port"] == first["external_port"]
            await trio.sleep(GRACE * 2)  # well past the old grace deadline
            assert gateway.mapping_for("tcp", 7001) is not None
            (hold,) = daemon.shared[("tcp", 7001)].holds
            assert hold.conn is not None
            assert hold.grace_until is None


async def test_persist_outlives_the_connection(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway, grace=GRACE) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.map(7002, "udp", persist=True)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(GRACE * 3)
        assert gateway.mapping_for("udp", 7002) is not None
        assert ("udp", 7002) in daemon.shared
        async with open_client(short_dir / "pb.sock") as client:
            await client.unmap(7002, "udp")
        assert gateway.mapping_for("udp", 7002) is None


async def test_restart_adopts_persisted_mappings_with_their_nonce(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway), open_client(short_dir / "pb.sock") as client:
        await client.map(7003, "tcp", persist=True)
        await client.map(7004, "tcp")  # connection-bound: gone with the daemon
    live = gateway.mapping_for("tcp", 7003)
    assert live is not None
    nonce = live.nonce
    assert gateway.mapping_for("tcp", 7004) is None
    state = json.loads((short_dir / "state.json").read_text())
    assert [r["internal_port"] for r in state["mappings"]] == [7003]
    before = len(gateway.requests)
    async with running(short_dir, gateway) as daemon:
        assert ("tcp", 7003) in daemon.shared
        with trio.fail_after(10):
            await daemon.restored.wait()  # restore goes on while the socket is served
        renewal = gateway.requests[before]
        assert isinstance(renewal, pcp.PcpRequest)
        assert renewal.data is not None
        assert renewal.data.nonce == nonce
        async with open_client(short_dir / "pb.sock") as client:
            assert [m["id"] for m in await client.list()] == ["7003/tcp"]


async def test_corrupt_state_file_is_set_aside(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (short_dir / "state.json").write_text('{"version": 1, "mappings": [')
    async with running(short_dir, FakeGateway()), open_client(short_dir / "pb.sock") as client:
        assert await client.list() == []
    assert list(short_dir.glob("state.json.corrupt-*"))
    assert "set aside" in caplog.text


async def test_too_many_mappings(short_dir: Path) -> None:
    async with (
        running(short_dir, FakeGateway(), max_mappings=2),
        open_client(short_dir / "pb.sock") as client,
    ):
        await client.map(1, "udp")
        await client.map(2, "udp")
        with pytest.raises(DaemonRequestError) as info:
            await client.map(3, "udp")
        assert info.value.code == "too_many_mappings"


BAD_LINES = [
    (b"not json\n", "bad_json"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"id": 1}\n', "bad_request"),
    (b'{"id": 2, "op": "fly"}\n', "unknown_op"),
    (b'{"id": 3, "op": "map"}\n', "bad_request"),
    (b'{"id": 4, "op": "map", "port": "80"}\n', "bad_request"),
    (b'{"id": 5, "op": "map", "port": 70000}\n', "bad_request"),
    (b'{"id": 6, "op": "map", "port": 80, "protocol": "sctp"}\n', "bad_request"),
    (b'{"id": 7, "op": "map", "port": 80, "lifetime": 0}\n', "bad_request"),
    (b'{"id": 8, "op": "map", "port": 80, "exact": true}\n', "bad_request"),
    (b'{"id": 9, "op": "map", "port": true}\n', "bad_request"),
    (b'{"id": 10, "op": "unmap", "mapping": "x/y"}\n', "bad_request"),
    (b'{"id": 11, "op": "hello", "versions": [99]}\n', "unsupported_version"),
    (b'{"id": 12, "op": "map", "port": 80, "via": "carrier-pigeon"}\n', "bad_request"),
    (b"\xff\xfe\n", "bad_json"),
]


async def test_malformed_lines_get_errors_and_the_connection_stays_usable(short_dir: Path) -> None:
    async with running(short_dir, FakeGateway()):
        payload = b"".join(line for line, _ in BAD_LINES) + b'{"id": "last", "op": "list"}\n'
        replies = await raw_lines(short_dir / "pb.sock", payload, len(BAD_LINES) + 1)
        codes = sorted(r["error"]["code"] for r in replies if not r["ok"])
        assert codes == sorted(code for _, code in BAD_LINES)
        assert any(r["ok"] and r["id"] == "last" for r in replies)
        for reply in replies:
            if not reply["ok"]:
                assert reply["error"]["message"]


async def test_an_overlong_line_is_refused_and_skipped(short_dir: Path) -> None:
    async with running(short_dir, FakeGateway()):
        payload = b'{"op": "list", "pad": "' + b"x" * 70000 + b'"}\n{"id": 2, "op": "list"}\n'
        replies = await raw_lines(short_dir / "pb.sock", payload, 2)
        assert replies[0]["error"]["code"] == "line_too_long"
        assert replies[1] == {"id": 2, "ok": True, "mappings": []}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)  # Infinity is not JSON: bad_json
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    st.sampled_from(["map", "unmap", "list", "probe", "hello", "watch", "x"]),
)
def test_arbitrary_json_never_breaks_the_daemon(value: Any, op: str) -> None:
    async def main() -> None:
        directory = Path(tempfile.mkdtemp(prefix="pbh-"))
        try:
            async with running(directory, FakeGateway()) as daemon:
                request: dict[str, Any] = {"id": 1, "op": op}
                if isinstance(value, dict):
                    request.update({k: v for k, v in value.items() if k not in ("id", "op")})
                else:
                    request["port"] = value
                line = json.dumps(request).encode() + b"\n" + b'{"id": 2, "op": "list"}\n'
                replies = await raw_lines(directory / "pb.sock", line, 2)
                assert {r["id"] for r in replies} == {1, 2}
                for reply in replies:
                    assert reply["ok"] or reply["error"]["code"]
                for entry in list(daemon.shared.values()):
                    assert isinstance(entry.handle, Mapping)
                    await entry.handle.release()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    trio.run(main)


async def test_two_hundred_concurrent_clients(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway, max_mappings=1000, max_connections=1000) as daemon:
        finished: list[int] = []
        watchers = [n for n in range(200) if n % 10 == 0]
        seen_events: dict[int, list[str]] = {}

        async def app(n: int) -> None:
            async with open_client(short_dir / "pb.sock") as client:
                port = 20000 + n
                if n in watchers:
                    # Watch first: the app must then hear of its own mapping.
                    watching = (await client.request("watch"))["watching"]
                    assert watching == ("all" if os.getuid() == 0 else "own")
                mapping = await client.map(port, "udp", lifetime=600)
                assert mapping["internal_port"] == port
                listed = {m["internal_port"] for m in await client.list()}
                assert port in listed
                if n in watchers:
                    mine: list[str] = []
                    with trio.fail_after(30):
                        watch = cast(AsyncGenerator[dict[str, Any], None], client.watch())
                        async with aclosing(watch) as events:
                            async for event in events:
                                if event["mapping"]["id"] == f"{port}/udp":
                                    mine.append(event["event"])
                                    break
                    seen_events[n] = mine
                assert await client.unmap(port, "udp") == f"{port}/udp"
                finished.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(app, n)
        assert sorted(finished) == list(range(200))
        assert seen_events == {n: ["Acquired"] for n in watchers}
        assert daemon.shared == {}
        assert gateway.mappings == {}


async def test_a_client_that_never_reads_is_cut_off(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requests = 200_000
    async with running(short_dir, FakeGateway()):
        greedy = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        batch = b'{"op": "hello", "versions": [1]}\n' * 500
        replies = 0
        with trio.fail_after(60):
            try:
                for _ in range(requests // 500):  # never reading a reply
                    await greedy.send_all(batch)
                # All sent: say so, so that a daemon that buffers every reply
                # ends the connection instead of waiting for more.
                await greedy.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # cut off while we were still sending
            try:
                while chunk := await greedy.receive_some(1 << 20):
                    replies += chunk.count(b"\n")
            except trio.BrokenResourceError:
                pass  # reset by the daemon
        await greedy.aclose()
        # It was cut off: not every request was answered, and the daemon said why.
        assert replies < requests
        assert "does not read its replies: cut off" in caplog.text
        async with open_client(short_dir / "pb.sock") as client:
            assert (await client.hello())["version"] == 1


def _requested_lifetimes(gateway: FakeGateway, port: int) -> list[int]:
    return [
        r.lifetime
        for r in gateway.requests
        if isinstance(r, pcp.PcpRequest)
        and isinstance(r.data, pcp.MapData)
        and r.data.internal_port == port
    ]


@pytest.mark.parametrize("lifetime", [MIN_LIFETIME, MAX_LIFETIME])
async def test_lifetime_edges_are_accepted(short_dir: Path, lifetime: int) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway), open_client(short_dir / "pb.sock") as client:
        await client.map(7100, "udp", lifetime=lifetime)
        assert _requested_lifetimes(gateway, 7100)[0] == lifetime


async def test_lifetime_defaults_to_the_library_default(short_dir: Path) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway), open_client(short_dir / "pb.sock") as client:
        await client.request("map", port=7101, protocol="udp")  # no lifetime
        assert _requested_lifetimes(gateway, 7101)[0] == DEFAULT_LIFETIME


@pytest.mark.parametrize("lifetime", [0, MAX_LIFETIME + 1, -1])
async def test_lifetime_out_of_range_names_the_range(short_dir: Path, lifetime: int) -> None:
    gateway = FakeGateway()
    async with running(short_dir, gateway), open_client(short_dir / "pb.sock") as client:
        with pytest.raises(DaemonRequestError) as info:
            await client.map(7102, "udp", lifetime=lifetime)
        assert info.value.code == "bad_request"
        assert f"{MIN_LIFETIME}..{MAX_LIFETIME}" in info.value.message
        assert _requested_lifetimes(gateway, 7102) == []


async def test_a_local_socket_error_fails_one_request_not_the_daemon(short_dir: Path) -> None:
    # EPERM on send (a host firewall): the transport puts it in words and the
    # methods report it as theirs, so it is "no method", not a crash.
    gateway = FakeGateway()
    memory = gateway.link_factory()

    class Refusing:
        def __init__(self, link: Any) -> None:
            self._link = link

        def __getattr__(self, name: str) -> Any:
            return getattr(self._link, name)

        async def send(self, data: bytes) -> None:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    async def refusing(address: Any, port: int) -> Any:
        return Refusing(await memory(address, port))

    options = {"link_factory": refusing, "announce_port": None, "seed": 1}
    async with running(short_dir, gateway, broker_options=options):
        async with open_client(short_dir / "pb.sock") as client:
            with pytest.raises(DaemonRequestError) as info:
                await client.map(7200, "tcp")
            assert info.value.code == "no_method"
            assert "(EPERM)" in info.value.message
            assert "Errno" not in info.value.message
        async with open_client(short_dir / "pb.sock") as client:
            assert (await client.hello())["version"] == 1


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("boom"),
        ExceptionGroup("two at once", [RuntimeError("boom"), OSError(errno.ENOBUFS, "x")]),
    ],
    ids=["bug", "group"],
)
async def test_a_bug_in_one_request_fails_it_not_the_daemon(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from portbroker.broker import Broker

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(Broker, "map", broken)
    async with running(short_dir, FakeGateway()):
        async with open_client(short_dir / "pb.sock") as client:
            with pytest.raises(DaemonRequestError) as info:
                await client.map(7300, "tcp")
            assert info.value.code == "internal"
            assert "RuntimeError: boom" in info.value.message
            assert "Group" not in info.value.message
        async with open_client(short_dir / "pb.sock") as client:
            assert (await client.hello())["version"] == 1


# -- issue 8: a request whose client left is rolled back ---------------------------------


def map_asked(gateway: FakeGateway, port: int) -> Callable[[], bool]:
    """A condition: a PCP MAP (not a delete) for internal *port* reached *gateway*."""

    def asked() -> bool:
        return any(
            isinstance(r, pcp.PcpRequest)
            and isinstance(r.data, pcp.MapData)
            and r.lifetime > 0
            and r.data.internal_port == port
            for r in gateway.requests
        )

    return asked


async def _wait_for(condition: Any, what: str) -> None:
    """Poll *condition*: the daemon's work is inside it, with no event to wait on."""
    with trio.move_on_after(30):  # a guard, not a measurement
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.02)
    assert condition(), f"no {what} within 30 s"


async def test_a_map_whose_client_hung_up_is_rolled_back(short_dir: Path) -> None:
    # A client that timed out (BlockingClient's timeout, or the app was
    # killed) and closed its socket must not leave behind a persisted mapping
    # that nobody knows of: the daemon cancels what it had not carried out
    # and deletes what the gateway granted meanwhile.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.probe()  # a warm broker: the map is the only request
        gateway.delay = 1.0  # every answer takes a second
        stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        await stream.send_all(b'{"id": 1, "op": "map", "port": 7400, "persist": true}\n')
        await _wait_for(map_asked(gateway, 7400), "the MAP to reach the gateway")
        await stream.aclose()  # gone before the answer

        def rolled_back() -> bool:
            return gateway.mapping_for("tcp", 7400) is None and ("tcp", 7400) not in daemon.shared

        await _wait_for(rolled_back, "the rollback")
        await daemon.synced()
        saved = json.loads((short_dir / "state.json").read_text())
        assert saved["mappings"] == []


async def test_a_half_closed_client_still_gets_its_reply(short_dir: Path) -> None:
    # `printf '{"op":"map",...}\n' | socat - UNIX-CONNECT:...` shuts its
    # sending side after the line and waits for the reply: that is not a
    # client that left.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        gateway.delay = 0.5
        stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        async with stream:
            await stream.send_all(b'{"id": 1, "op": "map", "port": 7401, "persist": true}\n')
            await stream.send_eof()
            buffer = b""
            with trio.fail_after(30):
                while not buffer.endswith(b"\n"):
                    chunk = await stream.receive_some(65536)
                    assert chunk, "closed without a reply"
                    buffer += chunk
        reply = json.loads(buffer)
        assert reply["ok"] is True
        assert reply["mapping"]["id"] == "7401/tcp"
        assert ("tcp", 7401) in daemon.shared
        assert gateway.mapping_for("tcp", 7401) is not None


async def test_a_change_that_could_not_be_saved_says_so(short_dir: Path) -> None:
    # Issue 8: under a descriptor flood the state file could not be opened
    # (EMFILE) while the map was acknowledged as if it were on disk.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:

        def full(records: object) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        daemon.store.save = full  # type: ignore[method-assign]
        async with open_client(short_dir / "pb.sock") as client:
            reply = await client.request("map", port=7700, persist=True)
        assert reply["saved"] is False
        assert "Too many open files" in reply["save_error"]
        assert reply["mapping"]["id"] == "7700/tcp"


async def test_an_unconfirmed_delete_is_recorded_for_the_next_start(short_dir: Path) -> None:
    # A gateway that does not answer an unmap's delete: the broker retries,
    # and should the daemon stop (or die) meanwhile, the state file tells
    # the next start to finish the job.
    gateway = FakeGateway(silent_deletes=True)
    async with running(short_dir, gateway) as daemon, open_client(short_dir / "pb.sock") as app:
        # 7801 is connection-bound: the daemon's clean stop deletes it.
        await app.map(7801, "tcp")
        async with open_client(short_dir / "pb.sock") as client:
            await client.map(7800, "tcp", persist=True)
            await client.unmap(7800, "tcp")
        await daemon.synced()
        saved = json.loads((short_dir / "state.json").read_text())["mappings"]
        assert [(r["internal_port"], r.get("pending_delete")) for r in saved] == [
            (7801, None),
            (7800, True),
        ]
    saved = json.loads((short_dir / "state.json").read_text())["mappings"]
    assert sorted((r["internal_port"], r.get("pending_delete")) for r in saved) == [
        (7800, True),
        (7801, True),
    ]
    # Both still open at the gateway, which never answered the deletes.
    assert gateway.mapping_for("tcp", 7800) is not None
    assert gateway.mapping_for("tcp", 7801) is not None
    gateway.silent_deletes = False
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        assert gateway.mapping_for("tcp", 7800) is None
        assert gateway.mapping_for("tcp", 7801) is None
        assert json.loads((short_dir / "state.json").read_text())["mappings"] == []


async def test_idle_connections_are_closed_but_holders_and_watchers_stay(short_dir: Path) -> None:
    # Issue 8: about a thousand connections that never send anything took all
    # the daemon's descriptors. A connection that holds a mapping or watches
    # is never idle, however quiet it is.
    gateway = FakeGateway()
    async with running(short_dir, gateway, idle_timeout=0.5):
        idle = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        async with idle, open_client(short_dir / "pb.sock") as holder:
            await holder.map(7900, "tcp")
            async with open_client(short_dir / "pb.sock") as watcher:
                await watcher.request("watch")
                buffer = b""
                with trio.fail_after(30):  # a guard: the timeout is 0.5 s
                    while True:
                        chunk = await idle.receive_some(65536)
                        if not chunk:
                            break
                        buffer += chunk
                closing = json.loads(buffer)
                assert closing["error"]["code"] == "idle"
                assert closing["id"] is None
                # Well past the timeout, the other two still work.
                await trio.sleep(1.0)
                assert [m["id"] for m in await holder.list()] == ["7900/tcp"]
                assert (await watcher.hello())["version"] == 1


def test_the_hold_limit_follows_the_mapping_limit() -> None:
    # A user allowed 10,000 mappings (the benchmark's --max-mappings) must be
    # able to hold them: before, holds stopped at 1,024 whatever the quota.
    assert DaemonConfig(max_mappings=10_010).policy().max_holds == 20_020
    assert DaemonConfig().policy().max_holds == 1024


@pytest.mark.parametrize(("address", "public"), [("203.0.113.7", False), ("11.0.0.1", True)])
async def test_a_mapping_says_whether_it_is_publicly_reachable(
    short_dir: Path, address: str, public: bool
) -> None:
    # A daemon client behind a double NAT must learn what `map --json` says
    # (203.0.113.7 is a documentation address: not public).
    gateway = FakeGateway(external_address=address)
    async with running(short_dir, gateway), open_client(short_dir / "pb.sock") as client:
        mapping = await client.map(8080, "tcp")
        assert mapping["public"] is public
        if public:
            assert mapping["reachability"] is None
        else:
            assert "not publicly reachable" in mapping["reachability"]
            assert address in mapping["reachability"]
