"""The daemon as a process: SIGKILL and restart, and clients of two other users."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from portbroker.client import open_client
from portbroker.testing import FakeGateway
from portbroker.wire import pcp
from tests.conftest import STARTUP_LIMIT, first_line

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbp-"))
    path.chmod(0o755)  # other users' clients must reach the socket inside
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_daemon(
    directory: Path, server_port: int, *extra: str, wrapper: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A daemon process (run through *wrapper*, e.g. prlimit, when given)."""
    process = subprocess.Popen(
        [
            *wrapper,
            PYTHON,
            "-m",
            "portbroker.cli",
            "daemon",
            "--socket",
            str(directory / "pb.sock"),
            "--state",
            str(directory / "state.json"),
            "--gateway",
            "127.0.0.1",
            "--server-port",
            str(server_port),
            "--methods",
            "pcp,natpmp",
            "--no-announcements",
            "--grace",
            "1",
            "-q",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_accepting(process, directory / "pb.sock")
    return process


def wait_accepting(
    process: subprocess.Popen[bytes], path: Path, limit: float = STARTUP_LIMIT
) -> None:
    """Until the daemon *process* accepts on *path*; AssertionError with its
    stderr if it ends first or is not accepting within *limit* s.

    The limit is the helpers' generous one: CI's loaded machine has taken
    seconds to start a bare Python. It was 20 s, and the stderr of a daemon
    still starting at the limit was read while it ran: the likeliest way
    CI's non-lab session hung for 23 minutes (tests/test_hung_tests.py)."""
    deadline = time.monotonic() + limit
    while not _accepting(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"daemon did not start: {_stderr_of_stopped(process)}")
        time.sleep(0.05)


def _stderr_of_stopped(process: subprocess.Popen[bytes]) -> str:
    """Kill *process* and return its stderr, bounded: a read of the stderr of
    a daemon still running (slow to start, not dead) waits until it ends, for
    ever; so does one a child of its (a wrapper's) still holds open."""
    if process.poll() is None:
        process.kill()
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired as exc:
        process.wait(timeout=10)
        err = exc.stderr or b""
        err += b" [its stderr is still held open by another process]"
    return (err or b"").decode(errors="replace")


def _accepting(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)  # a blocking connect to a full listen queue waits for ever
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    if process.stderr is not None:
        process.stderr.close()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (generously: 30 s) for *condition*: the daemon works in the background."""
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110 - another process's doing: nothing to wait on
            await trio.sleep(0.05)


async def restored_list(path: Path) -> list[dict[str, Any]]:
    """``list``, once no mapping is still being restored (restore runs in the background)."""
    with trio.fail_after(30):
        while True:
            async with open_client(path) as client:
                listed: list[dict[str, Any]] = await client.list()
            if all(m["state"] != "restoring" for m in listed):
                return listed
            await trio.sleep(0.05)


HOLDER = """
import sys, time
from portbroker.client import BlockingClient
with BlockingClient(sys.argv[1]) as client:
    client.map(int(sys.argv[2]), "tcp")
    print("mapped", flush=True)
    time.sleep(600)
"""


async def test_sigkill_and_restart_keeps_persisted_and_drops_orphans(short_dir: Path) -> None:
    gateway = FakeGateway(port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve_udp)
        daemon = start_daemon(short_dir, gateway.port)
        holder = None
        try:
            async with open_client(short_dir / "pb.sock") as client:
                await client.map(7100, "tcp", persist=True)
            live = gateway.mapping_for("tcp", 7100)
            assert live is not None
            nonce = live.nonce
            # A connection-bound mapping whose app will die with the daemon.
            holder = subprocess.Popen(
                [PYTHON, "-c", HOLDER, str(short_dir / "pb.sock"), "7101"],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            assert holder.stdout is not None
            assert (
                await trio.to_thread.run_sync(first_line, holder, "the holder")
            ).strip() == b"mapped"
            assert gateway.mapping_for("tcp", 7101) is not None

            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            holder.kill()
            holder.wait()
            stop(daemon)
            assert (short_dir / "pb.sock").is_socket()  # left behind by the crash

            before = len(gateway.requests)
            daemon = start_daemon(short_dir, gateway.port)  # takes the stale socket over
            listed = await restored_list(short_dir / "pb.sock")
            assert [m["id"] for m in listed] == ["7100/tcp"]
            await until(lambda: gateway.mapping_for("tcp", 7101) is None)
            after = [r for r in gateway.requests[before:] if isinstance(r, pcp.PcpRequest)]
            renewals = [r for r in after if r.data is not None and r.data.internal_port == 7100]
            assert renewals
            assert all(r.data is not None and r.data.nonce == nonce for r in renewals)
            assert gateway.mapping_for("tcp", 7100) is not None
            assert gateway.mapping_for("tcp", 7101) is None  # its app is gone: deleted
        finally:
            stop(daemon)
            if holder is not None:
                if holder.poll() is None:
                    holder.kill()
                holder.wait()
                if holder.stdout is not None:
                    holder.stdout.close()
            nursery.cancel_scope.cancel()


USER_CLIENT = """
import json, sys
from portbroker.client import BlockingClient, DaemonRequestError
out = {}
with BlockingClient(sys.argv[1]) as client:
    out["hello_uid"] = client.hello()["uid"]
    if sys.argv[2] == "map":
        out["mapped"] = client.map(int(sys.argv[3]), "tcp", persist=True)["id"]
    out["list"] = [m["id"] for m in client.list()]
    for op in ("unmap", "map"):
        if sys.argv[2] == "steal":
            try:
                getattr(client, op)(int(sys.argv[3]), "tcp")
                out[op] = "ok"
            except DaemonRequestError as exc:
                out[op] = exc.code
print(json.dumps(out))
"""


def as_user(uid: int, *args: str) -> dict[str, object]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to run a client as another user"
    done = subprocess.run(
        [
            setpriv,
            f"--reuid={uid}",
            "--regid=65534",
            "--clear-groups",
            PYTHON,
            "-c",
            USER_CLIENT,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other users")
def test_two_users_neither_see_nor_unmap_each_other(short_dir: Path) -> None:
    gateway_process = subprocess.Popen(
        [PYTHON, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemon = None
    try:
        port = int(first_line(gateway_process, "the FakeGateway").split()[1])
        daemon = start_daemon(short_dir, port, "--group", "nogroup")
        assert (short_dir / "pb.sock").stat().st_mode & 0o777 == 0o660
        alice = as_user(65534, str(short_dir / "pb.sock"), "map", "7200")
        assert alice == {"hello_uid": 65534, "mapped": "7200/tcp", "list": ["7200/tcp"]}
        bob = as_user(65533, str(short_dir / "pb.sock"), "steal", "7200")
        assert bob == {"hello_uid": 65533, "list": [], "unmap": "not_found", "map": "conflict"}
        alice_again = as_user(65534, str(short_dir / "pb.sock"), "look", "0")
        assert alice_again["list"] == ["7200/tcp"]
    finally:
        if daemon is not None:
            stop(daemon)
        gateway_process.terminate()
        gateway_process.wait(timeout=10)
        if gateway_process.stdout is not None:
            gateway_process.stdout.close()


def test_hold_through_the_daemon_ends_cleanly_on_a_signal_right_after_the_line(
    short_dir: Path,
) -> None:
    # Issue 7 item 11, through the daemon: the CLI's handlers are in place
    # before it prints, so SIGTERM the instant the line appears ends the hold
    # (exit 0), and the daemon lets the mapping go after its grace period.
    gateway_process = subprocess.Popen(
        [PYTHON, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemon = None
    try:
        port = int(first_line(gateway_process, "the FakeGateway").split()[1])
        daemon = start_daemon(short_dir, port)
        # No --gateway (it would bypass the daemon); should the daemon not be
        # found, PORTBROKER_GATEWAY still keeps the CLI on 127.0.0.1.
        hold = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "portbroker.cli",
                "map",
                "7300/tcp",
                "--hold",
                "--json",
                "--socket",
                str(short_dir / "pb.sock"),
                "--server-port",
                str(port),
                "--no-multicast",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PORTBROKER_GATEWAY": "127.0.0.1"},
        )
        try:
            assert hold.stdout is not None
            assert hold.stderr is not None
            line = first_line(hold, "map --hold")
            hold.send_signal(signal.SIGTERM)
            assert json.loads(line)["id"] == "7300/tcp"
            assert hold.wait(timeout=60) == 0, hold.stderr.read()
        finally:
            if hold.poll() is None:
                hold.kill()
            hold.wait()
            for pipe in (hold.stdout, hold.stderr):
                if pipe is not None:
                    pipe.close()

        async def released() -> None:
            with trio.fail_after(60):  # a guard: the grace period is 1 s
                while True:
                    async with open_client(short_dir / "pb.sock") as client:
                        if not await client.list():
                            return
                    await trio.sleep(0.1)

        trio.run(released)
    finally:
        if daemon is not None:
            stop(daemon)
        gateway_process.terminate()
        gateway_process.wait(timeout=10)
        if gateway_process.stdout is not None:
            gateway_process.stdout.close()


# A daemon process with a fault to inject: on SIGUSR1 one of its tasks fails
# (as an EPERM on a send or a RecursionError once did), which ends the
# daemon's nursery: a crash, not a clean stop.
CRASHER = """
import signal, sys, trio
from pathlib import Path
from portbroker.daemon.server import DaemonConfig, serve

async def main():
    here = Path(sys.argv[1])
    config = DaemonConfig(
        socket_path=here / "pb.sock",
        state_path=here / "state.json",
        gateway="127.0.0.1",
        methods=("pcp", "natpmp"),
        grace=1.0,
        broker_options={"port": int(sys.argv[2]), "announce_port": None},
    )
    with trio.open_signal_receiver(signal.SIGUSR1) as crash:
        async with serve(config) as daemon:
            print("ready", flush=True)
            async for _ in crash:
                async def fault():
                    raise RuntimeError("injected crash")
                daemon._nursery.start_soon(fault)
                await trio.sleep_forever()

trio.run(main)
"""


def _deletes(gateway: FakeGateway, since: int) -> list[pcp.PcpRequest]:
    return [
        r
        for r in gateway.requests[since:]
        if isinstance(r, pcp.PcpRequest) and r.data is not None and r.lifetime == 0
    ]


async def test_a_crash_releases_nothing_and_the_next_start_adopts_and_cleans_up(
    short_dir: Path,
) -> None:
    gateway = FakeGateway(port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve_udp)
        crasher = subprocess.Popen(
            [PYTHON, "-c", CRASHER, str(short_dir), str(gateway.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        holder = daemon = None
        try:
            assert crasher.stdout is not None
            assert (
                await trio.to_thread.run_sync(first_line, crasher, "the crasher")
            ).strip() == b"ready"
            async with open_client(short_dir / "pb.sock") as client:
                kept = await client.map(7700, "tcp", persist=True)
            live = gateway.mapping_for("tcp", 7700)
            assert live is not None
            nonce = live.nonce
            holder = subprocess.Popen(
                [PYTHON, "-c", HOLDER, str(short_dir / "pb.sock"), "7701"],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            assert holder.stdout is not None
            assert (
                await trio.to_thread.run_sync(first_line, holder, "the holder")
            ).strip() == b"mapped"
            before = len(gateway.requests)

            crasher.send_signal(signal.SIGUSR1)
            assert await trio.to_thread.run_sync(lambda: crasher.wait(timeout=30)) != 0
            assert crasher.stderr is not None
            assert b"injected crash" in crasher.stderr.read()
            assert _deletes(gateway, before) == []  # nothing released
            assert gateway.mapping_for("tcp", 7700) is not None
            assert gateway.mapping_for("tcp", 7701) is not None
            state = json.loads((short_dir / "state.json").read_text())
            holds = {r["internal_port"]: r["holds"] for r in state["mappings"]}
            assert holds == {
                7700: [{"uid": os.getuid(), "pid": os.getpid(), "persist": True}],
                7701: [{"uid": os.getuid(), "pid": holder.pid, "persist": False}],
            }

            holder.kill()  # the connection-bound mapping's app is gone
            holder.wait()
            before = len(gateway.requests)
            daemon = start_daemon(short_dir, gateway.port)
            listed = await restored_list(short_dir / "pb.sock")
            assert [(m["id"], m["external_port"]) for m in listed] == [
                ("7700/tcp", kept["external_port"])
            ]
            adopted = gateway.mapping_for("tcp", 7700)
            assert adopted is not None
            assert adopted.nonce == nonce
            await until(lambda: gateway.mapping_for("tcp", 7701) is None)
            # One delete, of 7701: a retransmission of it (same nonce, RFC 6887
            # §8.1.1; a loaded CI machine answers late) is the same delete.
            deleted = {
                (r.data.internal_port, r.data.nonce) for r in _deletes(gateway, before) if r.data
            }
            assert [port for port, _nonce in deleted] == [7701]
        finally:
            for process in (crasher, holder, daemon):
                if process is not None:
                    stop(process)
                    if process.stdout is not None:
                        process.stdout.close()
            nursery.cancel_scope.cancel()


def _silent_record(port: int) -> dict[str, Any]:
    return {
        "method": "pcp",
        "protocol": "tcp",
        "internal_address": "127.0.0.1",
        "internal_port": port,
        "external_address": "203.0.113.7",
        "external_port": port,
        "lifetime": 7200,
        "gateway": "127.0.0.1",
        "permanent": False,
        "expires_at_unix": time.time() + 7000,
        "epoch": None,
        "nonce": (port.to_bytes(2, "big") * 6).hex(),
        "owner_uid": 0,
        "holds": [{"uid": 0, "pid": 1, "persist": True}],
        "lifetime_requested": 7200,
    }


async def test_a_daemon_restoring_from_a_silent_gateway_serves_and_stops_on_sigterm(
    short_dir: Path,
) -> None:
    records = [_silent_record(p) for p in range(7800, 7840)]
    (short_dir / "state.json").write_text(json.dumps({"version": 1, "mappings": records}))
    gateway = FakeGateway(port=0, drop_rate=1.0)  # not a word: 8 s per attempt
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve_udp)
        daemon = start_daemon(short_dir, gateway.port)
        try:
            with trio.fail_after(20):  # a guard: restoring one by one took 40 x 8 s
                async with open_client(short_dir / "pb.sock") as client:
                    await client.hello()
                    listed = await client.list()
            assert len(listed) == 40
            assert {m["state"] for m in listed} == {"restoring"}
            daemon.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: daemon.wait(timeout=20)) == 0
            state = json.loads((short_dir / "state.json").read_text())

            def essence(r: dict[str, Any]) -> tuple[Any, ...]:
                return (r["internal_port"], r["external_port"], r["nonce"], r["holds"])

            assert sorted(map(essence, state["mappings"])) == sorted(map(essence, records))
            for was, now in zip(records, state["mappings"], strict=True):
                assert abs(was["expires_at_unix"] - now["expires_at_unix"]) < 60
        finally:
            stop(daemon)
            nursery.cancel_scope.cancel()


def test_nested_json_from_one_client_harms_no_other_client(short_dir: Path) -> None:
    # Issue 8: a 1 KB line of '[' once reached json.loads (RecursionError).
    # Now it is refused before the decoder, as bad_json, and the daemon goes
    # on: another app's live mapping is still there and it still answers.
    gateway_process = subprocess.Popen(
        [PYTHON, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemon = None
    holder = None
    try:
        port = int(first_line(gateway_process, "the FakeGateway").split()[1])
        daemon = start_daemon(short_dir, port)
        holder = subprocess.Popen(
            [PYTHON, "-c", HOLDER, str(short_dir / "pb.sock"), "7500"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert first_line(holder, "the holder").strip() == b"mapped"

        attacker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        attacker.settimeout(30)  # a guard: the reply comes at once
        try:
            attacker.connect(str(short_dir / "pb.sock"))
            for opener in (b"[", b'{"a":'):
                attacker.sendall(opener * 1024 + b"\n")
            reader = attacker.makefile("rb")
            replies = [json.loads(reader.readline()) for _ in range(2)]
            reader.close()
        finally:
            attacker.close()
        for reply in replies:
            assert reply["id"] is None
            assert reply["error"]["code"] == "bad_json"
            assert "nested deeper than 32 levels" in reply["error"]["message"]

        assert daemon.poll() is None
        from portbroker.client import BlockingClient

        with BlockingClient(short_dir / "pb.sock", timeout=30) as client:
            assert [m["id"] for m in client.list()] == ["7500/tcp"]
            assert client.hello()["version"] == 1
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
        if daemon is not None:
            stop(daemon)
        gateway_process.terminate()
        gateway_process.wait(timeout=10)
        if gateway_process.stdout is not None:
            gateway_process.stdout.close()
