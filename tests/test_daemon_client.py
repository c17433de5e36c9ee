"""The daemon's clients: one sans-IO core under the trio and the blocking client.

The core is tested with plain bytes; the clients against a scripted fake
daemon on a real Unix socket; socket paths and a socket the user may not open
with real users created by the test, against a real daemon process.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import portbroker.client
from portbroker.daemon import client as client_module
from portbroker.daemon import framing
from portbroker.daemon import paths as daemon_paths
from portbroker.daemon import server as daemon_server
from portbroker.daemon.client import (
    BlockingClient,
    ClientCore,
    DaemonAccessDenied,
    DaemonNotRunning,
    DaemonProtocolError,
    DaemonRequestError,
    Event,
    Reply,
    open_client,
    socket_path,
)
from portbroker.errors import PortBrokerError
from tests.conftest import first_line
from tests.test_daemon_processes import start_daemon, stop

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbc-"))
    path.chmod(0o755)  # other users' clients must reach the socket inside
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the core, sans-IO -------------------------------------------------------------


def test_the_core_routes_replies_to_their_ids_and_events_to_the_stream() -> None:
    core = ClientCore()
    first, line = core.request("list", {})
    assert json.loads(line) == {"id": first, "op": "list"}
    second, _ = core.request("watch", {})
    stream = (
        b'{"id":' + str(second).encode() + b',"ok":true,"watching":"own"}\n'
        b'{"event":"Acquired","mapping":{"id":"1/tcp"}}\n'
        b'{"id":999,"ok":true}\n'  # nobody asked: dropped
        b'{"id":' + str(first).encode() + b',"ok":true,"mappings":[]}\n'
    )
    items: list[Reply | Event] = []
    for byte in stream:  # one byte at a time: the split must not matter
        items.extend(core.receive(bytes([byte])))
    assert items == [
        Reply(second, {"id": second, "ok": True, "watching": "own"}),
        Event({"event": "Acquired", "mapping": {"id": "1/tcp"}}),
        Reply(first, {"id": first, "ok": True, "mappings": []}),
    ]


def test_a_reply_to_a_forgotten_request_is_dropped() -> None:
    core = ClientCore()
    request_id, _ = core.request("list", {})
    core.forget(request_id)
    assert core.receive(b'{"id":%d,"ok":true}\n' % request_id) == []


@pytest.mark.parametrize(
    "data",
    [b"not json\n", b"[" * 5000 + b"\n", b'{"id": NaN}\n', b"[1, 2]\n", b"\xff\n"],
    ids=["garbage", "nested", "nan", "array", "not-utf8"],
)
def test_a_malformed_daemon_line_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(DaemonProtocolError, match="the daemon sent"):
        ClientCore().receive(data)


def test_an_overlong_daemon_line_is_a_protocol_error_before_its_newline() -> None:
    core = ClientCore(max_reply_line=framing.MAX_LINE)
    for _ in range(6):  # 60,000 bytes: within the limit, so far
        assert core.receive(b"x" * 10000) == []
    with pytest.raises(DaemonProtocolError, match=f"over {framing.MAX_LINE} bytes"):
        core.receive(b"x" * 10000)


def test_a_connection_ending_mid_line_is_a_protocol_error() -> None:
    core = ClientCore()
    core.receive(b'{"id": 1, "ok"')
    with pytest.raises(DaemonProtocolError, match="middle of a line"):
        core.end()


def test_a_request_json_cannot_carry_is_refused_before_it_is_sent() -> None:
    core = ClientCore()
    with pytest.raises(DaemonRequestError) as info:
        core.request("map", {"port": float("nan")})
    assert info.value.code == "bad_request"
    with pytest.raises(DaemonRequestError) as info:
        core.request("map", {"pad": "x" * framing.MAX_LINE})
    assert info.value.code == "line_too_long"


# -- both clients against a scripted daemon ------------------------------------------------

Script = Callable[[dict[str, Any]], bytes]


@contextlib.asynccontextmanager
async def fake_daemon(path: Path, script: Script) -> AsyncIterator[None]:
    """A daemon that answers each request line with ``script(request)``'s bytes."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()

    async def serve(stream: trio.SocketStream) -> None:
        framer = framing.LineFramer()
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    for line in framer.feed(chunk):
                        assert isinstance(line, bytes)
                        await stream.send_all(script(json.loads(line)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(sock)])
        yield
        nursery.cancel_scope.cancel()


def garbage(_request: dict[str, Any]) -> bytes:
    return b"<html>not a daemon</html>\n"


def endless(_request: dict[str, Any]) -> bytes:
    return b"x" * 200_000  # and never a newline


def echo_ok(request: dict[str, Any]) -> bytes:
    line = json.dumps({"id": request["id"], "ok": True, "mappings": [], "saw": request})
    return line.encode() + b"\n"


@pytest.fixture
def small_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reply lines bounded as requests are (the real bound, 64 MiB, is a lot to send)."""
    monkeypatch.setattr(client_module, "MAX_REPLY_LINE", framing.MAX_LINE)


@pytest.mark.usefixtures("small_replies")
async def test_the_trio_client_reports_a_malformed_daemon_line(short_dir: Path) -> None:
    path = short_dir / "fake.sock"
    for script in (garbage, endless):
        path.unlink(missing_ok=True)
        async with fake_daemon(path, script):
            with trio.fail_after(30), pytest.raises(DaemonProtocolError, match="the daemon sent"):
                async with open_client(path) as client:
                    await client.list()


@pytest.mark.usefixtures("small_replies")
async def test_the_blocking_client_reports_a_malformed_daemon_line(short_dir: Path) -> None:
    path = short_dir / "fake.sock"
    for script in (garbage, endless):
        path.unlink(missing_ok=True)
        async with fake_daemon(path, script):

            def ask() -> None:
                with BlockingClient(path, timeout=20) as client:
                    client.list()

            with pytest.raises(DaemonProtocolError, match="the daemon sent"):
                await trio.to_thread.run_sync(ask)


async def test_both_clients_refuse_to_send_nan(short_dir: Path) -> None:
    def ask() -> str:
        with BlockingClient(path, timeout=20) as client:
            try:
                client.request("list", x=float("inf"))
            except DaemonRequestError as exc:
                return exc.code
            return "sent"

    path = short_dir / "fake.sock"
    with trio.fail_after(30):  # a guard: a request sent with NaN would hang
        async with fake_daemon(path, echo_ok):
            async with open_client(path) as client:
                with pytest.raises(DaemonRequestError) as info:
                    await client.request("list", x=float("nan"))
                assert info.value.code == "bad_request"
                assert (await client.request("list", x=1.5))["saw"]["x"] == 1.5
            assert await trio.to_thread.run_sync(ask) == "bad_request"


async def test_the_trio_client_routes_concurrent_replies_by_id(short_dir: Path) -> None:
    # Replies come back in the reverse order of the requests.
    held: list[dict[str, Any]] = []

    def reverse(request: dict[str, Any]) -> bytes:
        held.append(request)
        if len(held) < 3:
            return b""
        return b"".join(echo_ok(r) for r in reversed(held))

    path = short_dir / "fake.sock"
    async with fake_daemon(path, lambda r: reverse(r)), open_client(path) as client:
        got: dict[int, Any] = {}

        async def ask(n: int) -> None:
            got[n] = (await client.request("list", n=n))["saw"]["n"]

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(ask, n)
                    await trio.sleep(0.01)  # so that they arrive in order
        assert got == {0: 0, 1: 1, 2: 2}


async def test_the_blocking_client_keeps_events_that_come_before_a_reply(short_dir: Path) -> None:
    def with_event(request: dict[str, Any]) -> bytes:
        event = b'{"event":"Renewed","mapping":{"id":"1/tcp"},"detail":{}}\n'
        return event + echo_ok(request) + event

    path = short_dir / "fake.sock"
    async with fake_daemon(path, with_event):

        def ask() -> list[str]:
            with BlockingClient(path, timeout=20) as client:
                client.list()
                names = [e["event"] for e in client.events]
                watch = client.watch()
                names += [next(watch)["event"] for _ in range(3)]
                return names

        assert await trio.to_thread.run_sync(ask) == ["Renewed"] * 4


def test_the_old_import_path_keeps_every_public_name() -> None:
    for name in (
        "open_client",
        "Client",
        "BlockingClient",
        "DaemonNotRunning",
        "DaemonRequestError",
        "DaemonAccessDenied",
        "socket_path",
        "ENV_SOCKET",
    ):
        assert getattr(portbroker.client, name) is not None, name
    assert portbroker.client.DaemonAccessDenied is DaemonAccessDenied
    assert issubclass(DaemonAccessDenied, PortBrokerError)


def test_no_daemon_is_daemon_not_running(short_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match=str(short_dir / "none.sock")):
        BlockingClient(short_dir / "none.sock")


# -- socket paths -----------------------------------------------------------------------------


def test_a_user_connects_to_the_system_socket_when_it_exists_but_binds_their_own(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = short_dir / "system.sock"
    # Where the paths live (clients must not import the server for them).
    monkeypatch.setattr(daemon_paths, "SYSTEM_SOCKET_PATH", system)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir / "user"))
    monkeypatch.delenv("PORTBROKER_SOCKET", raising=False)
    user = short_dir / "user" / "portbroker.sock"
    assert socket_path() == user  # no system daemon
    system.touch()
    assert socket_path() == system
    # The user's own daemon still binds the user's path.
    assert daemon_server.default_socket_path() == user
    assert daemon_server.DaemonConfig().socket_path == user
    # Explicit and $PORTBROKER_SOCKET come first, for clients and the daemon.
    assert socket_path(short_dir / "x.sock") == short_dir / "x.sock"
    monkeypatch.setenv("PORTBROKER_SOCKET", str(short_dir / "env.sock"))
    assert socket_path() == short_dir / "env.sock"
    assert daemon_server.bind_socket_path() == short_dir / "env.sock"


# -- real users, a real daemon --------------------------------------------------------------------


@contextlib.contextmanager
def made_user(name: str, *groups: str) -> Iterator[pwd.struct_passwd]:
    subprocess.run(["userdel", name], capture_output=True, check=False)  # a leftover
    command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    if groups:
        command += ["--groups", ",".join(groups)]
    subprocess.run([*command, name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextlib.contextmanager
def made_group(name: str) -> Iterator[grp.struct_group]:
    subprocess.run(["groupdel", name], capture_output=True, check=False)
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
    try:
        yield grp.getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def run_as(user: pwd.struct_passwd, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run a client as another user"
    return subprocess.run(
        [
            setpriv,
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            PYTHON,
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/nonexistent",
            "PORTBROKER_GATEWAY": "127.0.0.1",  # should it ever go direct: never off the host
        },
        check=False,
    )


CLI = "import sys; from portbroker.cli import main; sys.exit(main(sys.argv[1:]))"

# The system socket moved to where the test put its daemon: the real
# /run/portbroker is not the test's to create.
CLI_WITH_SYSTEM_SOCKET = """
import sys
from pathlib import Path
import portbroker.daemon.paths as paths
paths.SYSTEM_SOCKET_PATH = Path(sys.argv[1])
from portbroker.cli import main
sys.exit(main(sys.argv[2:]))
"""


@needs_root
def test_a_user_outside_the_group_gets_one_clear_line_not_a_traceback(
    short_dir: Path, gateway_port: int
) -> None:
    sock = short_dir / "pb.sock"
    with made_group("pbtest-a8sock"), made_user("pbtest-a8deny") as user:
        daemon = start_daemon(short_dir, gateway_port, "--group", "pbtest-a8sock")
        try:
            for argv in (["list"], ["watch"], ["map", "7400/tcp"], ["unmap", "7400/tcp"]):
                done = run_as(user, CLI, *argv, "--socket", str(sock))
                assert done.returncode == 1, done
                lines = done.stderr.strip().splitlines()
                assert len(lines) == 1, done.stderr
                assert "Traceback" not in done.stderr
                assert "permission denied" in lines[0]
                assert str(sock) in lines[0]
                assert "group 'pbtest-a8sock'" in lines[0]
                assert "--socket" in lines[0]
            # The library says the same, with the group as a value.
            code = (
                "import sys\n"
                "from portbroker.client import BlockingClient, DaemonAccessDenied\n"
                "try:\n    BlockingClient(sys.argv[1])\n"
                "except DaemonAccessDenied as exc:\n    print(exc.group)\n"
            )
            done = run_as(user, code, str(sock))
            assert done.stdout.strip() == "pbtest-a8sock", done.stderr
            # A directory closed to the user (0750, as a hardened /run/portbroker
            # may be) hides the socket itself: its group is the one named.
            os.chown(short_dir, 0, grp.getgrnam("pbtest-a8sock").gr_gid)
            short_dir.chmod(0o750)
            done = run_as(user, CLI, "list", "--socket", str(sock))
            assert done.returncode == 1
            assert f"directory {short_dir}: group pbtest-a8sock, mode 0750" in done.stderr
            assert "group 'pbtest-a8sock'" in done.stderr
        finally:
            stop(daemon)


@needs_root
def test_a_group_member_reaches_the_system_daemon_without_saying_where(
    short_dir: Path, gateway_port: int
) -> None:
    sock = short_dir / "pb.sock"
    with made_group("pbtest-a8sys"), made_user("pbtest-a8member", "pbtest-a8sys") as user:
        daemon = start_daemon(short_dir, gateway_port, "--group", "pbtest-a8sys")
        try:
            mapped = run_as(user, CLI_WITH_SYSTEM_SOCKET, str(sock), "map", "7401/tcp", "--json")
            assert mapped.returncode == 0, mapped.stderr
            assert json.loads(mapped.stdout)["owner_uid"] == user.pw_uid  # via the daemon
            listed = run_as(user, CLI_WITH_SYSTEM_SOCKET, str(sock), "list", "--json")
            assert listed.returncode == 0, listed.stderr
            # Without --hold the CLI's map persists: it is there after the CLI went.
            assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["7401/tcp"]
        finally:
            stop(daemon)


# -- replies of a shape the protocol does not have (review of issue 10) ----------------


def test_a_closing_notice_with_a_code_of_another_type_is_no_crash() -> None:
    # A line with no id and an "error" whose code is a list or an object (not
    # hashable): nothing waits for it, and no TypeError escapes the core.
    core = ClientCore()
    request_id, _ = core.request("list", {})
    stream = (
        b'{"error": {"code": ["too_many_connections"]}}\n'
        b'{"error": {"code": {"a": 1}}}\n'
        b'{"id": %d, "ok": true, "mappings": []}\n' % request_id
    )
    assert core.receive(stream) == [
        Reply(request_id, {"id": request_id, "ok": True, "mappings": []})
    ]
    assert core.closing is None


def _reply(body: dict[str, Any]) -> Script:
    def script(request: dict[str, Any]) -> bytes:
        return json.dumps({"id": request["id"], **body}).encode() + b"\n"

    return script


# (what is asked, the daemon's answer to it): each a line of JSON, none of the
# protocol's (docs/daemon-protocol.md's table of ops and replies).
ODD_REPLIES: list[tuple[str, dict[str, Any]]] = [
    ("list", {"ok": True}),
    ("list", {"ok": True, "mappings": 5}),
    ("list", {"ok": True, "mappings": [1]}),
    ("list", {"ok": True, "mappings": [{"state": "active"}]}),
    ("map", {"ok": True}),
    ("map", {"ok": True, "mapping": []}),
    ("map", {"ok": True, "mapping": {"id": 7}}),
    ("unmap", {"ok": True}),
    ("unmap", {"ok": True, "unmapped": None}),
    ("publish", {"ok": True, "published": "yes"}),
    ("list", {"ok": False}),
    ("list", {"ok": False, "error": "boom"}),
    ("list", {"ok": False, "error": {"code": ["conflict"], "message": "x"}}),
]


def _ask_blocking(client: BlockingClient, op: str) -> object:
    if op == "list":
        return client.list()
    if op == "map":
        return client.map(8080, "tcp")
    if op == "unmap":
        return client.unmap(8080, "tcp")
    return client.publish(8080, "tcp", service_type="_http._tcp", name="web")


async def _ask_trio(client: portbroker.client.Client, op: str) -> object:
    if op == "list":
        return await client.list()
    if op == "map":
        return await client.map(8080, "tcp")
    if op == "unmap":
        return await client.unmap(8080, "tcp")
    return await client.publish(8080, "tcp", service_type="_http._tcp", name="web")


@pytest.mark.parametrize(
    ("op", "body"), ODD_REPLIES, ids=[f"{op}:{json.dumps(b)}" for op, b in ODD_REPLIES]
)
async def test_a_reply_of_the_wrong_shape_is_a_protocol_error_in_both_clients(
    short_dir: Path, op: str, body: dict[str, Any]
) -> None:
    # Not a KeyError or TypeError (the CLI's "internal error ... a bug in
    # portbroker"): the daemon, not portbroker, is at fault, and the one line
    # says so.
    path = short_dir / "fake.sock"

    def ask() -> object:
        with BlockingClient(path, timeout=20) as client:
            return _ask_blocking(client, op)

    with trio.fail_after(30):
        async with fake_daemon(path, _reply(body)):
            with pytest.raises(DaemonProtocolError, match="is this a portbroker daemon"):
                await trio.to_thread.run_sync(ask)
            with pytest.raises(DaemonProtocolError, match="is this a portbroker daemon"):
                async with open_client(path) as client:
                    await _ask_trio(client, op)


async def test_a_well_formed_error_is_still_the_daemons_request_error(short_dir: Path) -> None:
    path = short_dir / "fake.sock"
    body = {"ok": False, "error": {"code": "conflict", "message": "8080/tcp is in use"}}

    def ask() -> tuple[str, str]:
        with BlockingClient(path, timeout=20) as client:
            try:
                client.list()
            except DaemonRequestError as exc:
                return exc.code, exc.message
        return "", ""

    with trio.fail_after(30):
        async with fake_daemon(path, _reply(body)):
            assert await trio.to_thread.run_sync(ask) == ("conflict", "8080/tcp is in use")


# -- where a user's socket is, in odd environments (review of issue 10) -----------------


@pytest.fixture
def a_user(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as uid 1000 (whose home is short_dir/home), with no socket set."""
    monkeypatch.setattr(daemon_paths, "SYSTEM_SOCKET_PATH", short_dir / "no-system.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(short_dir / "home"))
    monkeypatch.delenv("PORTBROKER_SOCKET", raising=False)
    return short_dir / "home" / ".cache" / "portbroker" / "portbroker.sock"


def test_a_runtime_dir_of_someone_else_or_open_to_others_is_not_where_sockets_are(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, a_user: Path
) -> None:
    # $XDG_RUNTIME_DIR=/tmp (or anything another user can write, or owns):
    # whoever put portbroker.sock there first would be this user's daemon.
    # A relative one would move with the working directory.
    mine = short_dir / "mine"
    mine.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(mine, 1000, -1)  # uid 1000's (a_user's), as its login session makes it
    uid = mine.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    for runtime in (str(shared), "run/user", "", str(short_dir / "home" / "x" / ".." / "y")):
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        # (A directory still to be made, the last, is the daemon's to make: its own.)
        expected = (
            a_user
            if runtime in (str(shared), "run/user", "")
            else Path(runtime) / "portbroker.sock"
        )
        assert socket_path() == expected, runtime
        assert daemon_server.default_socket_path() == expected, runtime
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(mine))
    assert socket_path() == mine / "portbroker.sock"
    # Someone else's private directory is not this user's either.
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    assert socket_path() == a_user


def test_a_relative_home_is_not_where_sockets_are(
    monkeypatch: pytest.MonkeyPatch, a_user: Path
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", "relative/home")
    # The password database's home instead (uid 1000 may have none here).
    try:
        home = pwd.getpwuid(1000).pw_dir
    except KeyError:
        with pytest.raises(daemon_paths.NoSocketPath, match="--socket PATH"):
            socket_path()
    else:
        assert socket_path() == Path(home) / ".cache" / "portbroker" / "portbroker.sock"


def test_no_home_and_no_runtime_dir_is_one_line_for_list_and_no_daemon_for_map(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], a_user: Path
) -> None:
    from portbroker import cli

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(os, "geteuid", lambda: 2**31 - 7)  # in no password database
    # Not `internal error RuntimeError: Could not determine home directory`.
    assert cli.main(["list"]) == 1
    assert capsys.readouterr().err == (
        "portbroker: list failed: no socket path for a user's daemon: $XDG_RUNTIME_DIR is"
        " not set (or not a private directory of yours) and there is no home directory;"
        " give one with --socket PATH or $PORTBROKER_SOCKET\n"
    )
    # map: no daemon can be listening, so it asks the gateway itself.
    args = cli._parser().parse_args(["map", "8080/tcp"])
    assert cli._use_daemon(args) is False


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "Renewed"}\n',
        b'{"event": "Renewed", "mapping": "8080/tcp"}\n',
        b'{"event": ["Renewed"], "mapping": {"id": "8080/tcp"}}\n',
    ],
    ids=["no-mapping", "mapping-string", "event-list"],
)
def test_an_event_of_the_wrong_shape_is_a_protocol_error(line: bytes) -> None:
    # `portbroker watch` prints event["event"] and the mapping's fields: an
    # event without them is the daemon's fault, not a KeyError of the CLI's.
    with pytest.raises(DaemonProtocolError, match="is this a portbroker daemon"):
        ClientCore().receive(line)


def test_watch_through_the_cli_names_an_odd_event_in_one_line(short_dir: Path) -> None:
    answer = b'{"id": 1, "ok": true, "watching": "own"}\n{"event": "Renewed"}\n'
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept(); c.recv(65536); c.sendall(sys.argv[2].encode()); c.recv(1)\n"
    )
    sock = short_dir / "odd.sock"
    fake = subprocess.Popen(
        [PYTHON, "-c", script, str(sock), answer.decode()], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first_line(fake, "the odd daemon") == "ready\n"
        done = subprocess.run(
            [PYTHON, "-m", "portbroker", "watch", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
    finally:
        fake.kill()
        fake.wait()
        if fake.stdout is not None:
            fake.stdout.close()
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("portbroker: watch failed: the daemon sent an event"), line
    assert line.endswith("is this a portbroker daemon?"), line
