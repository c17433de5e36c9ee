"""A daemon that stops answering does not keep `portbroker list/map/unmap` waiting for ever.

Before, the CLI waited with no timeout: a daemon stopped with SIGSTOP, stuck,
or that sent half a line and no more kept every command hanging.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def _unix_daemon(path: Path, answer: Callable[[socket.socket], None]) -> Iterator[Path]:
    """A Unix socket at *path* whose thread hands each connection to *answer*."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield path
    finally:
        # shutdown() wakes the accept() in the thread (close() alone does not).
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        for conn in held:
            conn.close()


def _half_a_line(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b'{"id": 1, "ok": tr')  # and nothing more, the connection left open


def _read_and_close(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.close()


@pytest.fixture
def half_line_daemon(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that reads a request, sends half a reply line, then nothing."""
    with _unix_daemon(tmp_path / "pb.sock", _half_a_line) as path:
        yield path


def _cli(*args: str, timeout: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORTBROKER_DAEMON_TIMEOUT": timeout}
    return subprocess.run(
        [sys.executable, "-m", "portbroker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command", [["list"], ["map", "8080/tcp"], ["unmap", "8080/tcp"], ["map", "8080/tcp", "--hold"]]
)
def test_a_daemon_that_sends_half_a_line_and_stops_fails_the_command_clearly(
    half_line_daemon: Path, command: list[str]
) -> None:
    done = _cli(*command, "--socket", str(half_line_daemon), timeout="1")
    assert done.returncode == 1, done.stderr
    assert f"the daemon at {half_line_daemon} sent no answer within 1 s" in done.stderr
    assert "Traceback" not in done.stderr
    # The daemon rolls back a map whose client closed its connection
    # (test_daemon.py: test_a_map_whose_client_hung_up_is_rolled_back): no
    # "a map may still complete there" that `list` would seem to confirm.
    if command[0] == "map":
        assert "The daemon undoes the map once it sees this command gone." in done.stderr
    assert "may still complete" not in done.stderr or command[0] == "unmap"


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_daemon_timeout_is_a_usage_error(half_line_daemon: Path, value: str) -> None:
    done = _cli("list", "--socket", str(half_line_daemon), timeout=value)
    assert done.returncode == 2, done.stderr
    assert "$PORTBROKER_DAEMON_TIMEOUT must be a positive number of seconds" in done.stderr


@pytest.fixture
def closing_daemon(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that reads a request and closes the connection."""
    with _unix_daemon(tmp_path / "pb.sock", _read_and_close) as path:
        yield path


@pytest.mark.parametrize("command", [["list"], ["map", "8080/tcp"], ["map", "8080/tcp", "--hold"]])
def test_a_daemon_timeout_of_practically_for_ever_is_one(
    closing_daemon: Path, command: list[str]
) -> None:
    # socket.settimeout(1e10) raises OverflowError (time_t): a user's "wait
    # for ever" must wait (here: until the daemon closes), not crash.
    done = _cli(*command, "--socket", str(closing_daemon), timeout="1e10")
    assert done.returncode == 1, done.stderr
    assert "the daemon closed the connection" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def full_backlog_daemon(tmp_path: Path) -> Iterator[Path]:
    """A daemon that stopped accepting (SIGSTOP, stuck) with its listen queue full."""
    path = tmp_path / "pb.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))  # the one queued connection a backlog of 0 holds
    try:
        yield path
    finally:
        filler.close()
        server.close()


def test_a_daemon_whose_listen_queue_is_full_is_stuck_not_missing(
    full_backlog_daemon: Path,
) -> None:
    # A socket with a timeout connects without blocking: a full queue is
    # EAGAIN at once, which said "no portbroker daemon ... start one".
    done = _cli("list", "--socket", str(full_backlog_daemon), timeout="1")
    assert done.returncode == 1, done.stderr
    assert f"the daemon at {full_backlog_daemon} sent no answer within 1 s" in done.stderr
    assert "start one" not in done.stderr


def test_the_default_socket_check_does_not_block_on_a_full_listen_queue(
    full_backlog_daemon: Path,
) -> None:
    # map/unmap's check for a daemon at the default path connected with no
    # timeout: on a stuck daemon's full queue it blocked for ever. A daemon
    # is there, so the command must go through it (and fail saying it is
    # stuck), never around it to the gateway.
    from portbroker.cli import _daemon_listening

    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(_daemon_listening(full_backlog_daemon)), daemon=True
    )
    thread.start()
    thread.join(10)
    assert result == [True]
