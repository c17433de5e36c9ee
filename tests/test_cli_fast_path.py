"""`portbroker map` / `list` / `unmap` through a running daemon import only what they need.

Issue 10: a short command through the daemon is mostly its imports, and trio,
attrs and the broker (with every method behind it) were most of that. Each
case runs in a fresh interpreter, so that what this test process imported
does not hide what the command imports; the figure itself is
benchmarks/cli_daemon.py's (tests assert behaviour, never time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import first_line
from tests.test_daemon_processes import start_daemon, stop

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]

# What the daemon path must not import: the event loop, attrs, the broker and
# what only the library needs (zeroconf, miniupnpc).
RUN_COMMANDS = """
import contextlib, io, json, sys
from portbroker.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    results.append({"argv": argv, "code": code, "out": out.getvalue()})
heavy = sorted(
    name for name in sys.modules
    if name.split(".")[0] in {"trio", "attr", "attrs", "zeroconf", "miniupnpc"}
    or name == "portbroker.broker"
)
print(json.dumps({"results": results, "heavy": heavy}))
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_commands(*argvs: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [PYTHON, "-c", RUN_COMMANDS, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_map_list_unmap_through_the_daemon_import_no_trio_attrs_or_broker(
    short_dir: Path, gateway_port: int
) -> None:
    sock = str(short_dir / "pb.sock")
    daemon = start_daemon(short_dir, gateway_port)
    try:
        run = run_commands(
            ["map", "8080/tcp", "--socket", sock],
            ["list", "--socket", sock, "--json"],
            ["unmap", "8080/tcp", "--socket", sock],
            ["list", "--socket", sock],
        )
    finally:
        stop(daemon)
    mapped, listed, unmapped, after = run["results"]
    # The commands did their work, through the daemon (the FakeGateway's
    # documentation address, by PCP), with the usual output.
    assert mapped["code"] == 0, mapped
    assert mapped["out"].startswith("8080/tcp -> 203.0.113.7:8080 via pcp"), mapped
    assert listed["code"] == 0, listed
    (record,) = [json.loads(line) for line in listed["out"].splitlines()]
    assert record["id"] == "8080/tcp"
    assert record["persist"] is True  # without --hold, the mapping outlives map
    assert unmapped == {**unmapped, "code": 0, "out": "unmapped 8080/tcp\n"}
    assert after == {**after, "code": 0, "out": ""}
    assert run["heavy"] == []


def test_the_default_socket_path_imports_no_server_or_trio(short_dir: Path) -> None:
    # No --socket, no $PORTBROKER_SOCKET: the path is looked up
    # (portbroker.daemon.paths), not through the server module. No daemon
    # listens there: the usual one-line failure.
    env = {k: v for k, v in os.environ.items() if k != "PORTBROKER_SOCKET"}
    env["XDG_RUNTIME_DIR"] = str(short_dir)
    done = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys\n"
            "from portbroker.client import socket_path\n"
            "import portbroker.daemon.paths as paths\n"
            "paths.SYSTEM_SOCKET_PATH = paths.Path(sys.argv[1])  # not the host's\n"
            "print(socket_path())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'attr')"
            " or m in ('portbroker.daemon.server', 'portbroker.broker')))\n",
            str(short_dir / "no-system.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path, heavy = done.stdout.splitlines()
    # A user's own socket; root's is the system one (moved into short_dir).
    expected = "portbroker.sock" if os.geteuid() != 0 else "no-system.sock"
    assert path == str(short_dir / expected)
    assert heavy == "[]"


def test_a_missing_daemon_is_still_one_line_without_trio(short_dir: Path) -> None:
    run = run_commands(["list", "--socket", str(short_dir / "none.sock")])
    (listed,) = run["results"]
    assert listed["code"] == 1
    assert run["stderr"].splitlines() == [
        f"portbroker: list failed: no portbroker daemon at {short_dir / 'none.sock'};"
        " start one with `portbroker daemon`"
    ]
    assert run["heavy"] == []


def test_the_package_imports_the_broker_only_when_a_name_needs_it() -> None:
    done = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys, portbroker\n"
            "print('trio' in sys.modules, 'portbroker.broker' in sys.modules)\n"
            "names = {name: getattr(portbroker, name) for name in portbroker.__all__}\n"
            "from portbroker import Broker, open_broker\n"
            "import portbroker.broker as broker\n"
            "print(Broker is broker.Broker and open_broker is broker.open_broker)\n"
            "print(set(portbroker.__all__) <= set(dir(portbroker)))\n"
            "try:\n    portbroker.no_such_name\n"
            "except AttributeError as exc:\n    print(exc)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False False",
        "True",
        "True",
        "module 'portbroker' has no attribute 'no_such_name'",
    ]


# -- a daemon that does not speak the protocol (review of issue 10) ------------------


@contextlib.contextmanager
def answering(path: Path, answer: bytes) -> Iterator[None]:
    """Something on *path* that answers every request line with *answer*, then closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                received = b""
                with contextlib.suppress(OSError):
                    while b"\n" not in received and (chunk := conn.recv(65536)):
                        received += chunk
                    if received:
                        conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        listener.close()


@pytest.mark.parametrize(
    ("argv", "answer"),
    [
        (["list"], b'{"id": 1, "ok": true}\n'),
        (["list", "--json"], b'{"id": 1, "ok": true, "mappings": [1]}\n'),
        (["map", "8080/tcp"], b'{"id": 1, "ok": true, "mapping": []}\n'),
        (["unmap", "8080/tcp"], b'{"id": 1, "ok": true}\n'),
        (["list"], b'{"id": 1, "ok": false, "error": "boom"}\n'),
        (["list"], b'{"error": {"code": ["idle"]}}\n'),
    ],
    ids=[
        "no-mappings",
        "mapping-not-object",
        "mapping-list",
        "no-unmapped",
        "error-string",
        "odd-code",
    ],
)
def test_a_daemon_that_answers_out_of_protocol_gets_one_line_naming_it(
    short_dir: Path, argv: list[str], answer: bytes
) -> None:
    # Not "internal error KeyError ... (a bug in portbroker)": the fault is
    # the daemon's, and the line says so, still without trio.
    sock = short_dir / "odd.sock"
    with answering(sock, answer):
        run = run_commands([*argv, "--socket", str(sock)])
    (result,) = run["results"]
    assert result["code"] == 1
    (line,) = run["stderr"].splitlines()
    assert line.startswith(f"portbroker: {argv[0]} failed: "), line
    assert "internal error" not in line
    assert "is this a portbroker daemon?" in line or "closed the connection" in line, line
    assert run["heavy"] == []


def test_a_socket_path_no_daemon_can_be_at_is_no_daemon_in_words(short_dir: Path) -> None:
    # A symlink loop, a file where a directory should be, a path too long for
    # AF_UNIX: not "cannot use the network: Not a directory (ENOTDIR)".
    (short_dir / "file").touch()
    (short_dir / "loop").symlink_to(short_dir / "loop")
    paths = [short_dir / "file" / "pb.sock", short_dir / "loop", short_dir / ("x" * 120)]
    run = run_commands(*[["list", "--socket", str(p)] for p in paths])
    assert [r["code"] for r in run["results"]] == [1, 1, 1]
    lines = run["stderr"].splitlines()
    assert len(lines) == 3, lines
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"portbroker: list failed: no portbroker daemon at {path} ("), line
        assert line.endswith("); start one with `portbroker daemon`"), line
    assert run["heavy"] == []


def test_a_reader_that_stops_reading_ends_list_quietly(short_dir: Path) -> None:
    # `portbroker list | head -1`: the pipe closes while list still writes.
    # Not "list failed: cannot use the network: Broken pipe (EPIPE)", nor
    # Python's "Exception ignored ... BrokenPipeError" at exit.
    mappings = [
        {"id": f"{port}/tcp", "external_address": "203.0.113.7", "external_port": port}
        for port in range(1024, 9024)  # some 500 kB: more than a pipe holds
    ]
    answer = json.dumps({"id": 1, "ok": True, "mappings": mappings}).encode() + b"\n"
    sock = short_dir / "many.sock"
    with answering(sock, answer):
        process = subprocess.Popen(
            [PYTHON, "-m", "portbroker", "list", "--socket", str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert process.stdout is not None
        first = first_line(process, "list")
        process.stdout.close()
        # Bounded, as a read of its stderr until list ends would not be.
        _, stderr = process.communicate(timeout=60)
        code = process.returncode
    assert first.startswith(b"1024/tcp -> 203.0.113.7:1024")
    assert (code, stderr) == (1, b"")


def test_a_named_socket_with_no_daemon_fails_rather_than_asking_the_gateway(
    short_dir: Path, gateway_port: int
) -> None:
    # --socket PATH (or $PORTBROKER_SOCKET) names the daemon to use: with none
    # there, map must not quietly ask the gateway itself, which a benchmark or
    # test that named its own daemon would then do on the host's real gateway
    # (here: tests/conftest.py's FakeGateway, through $PORTBROKER_GATEWAY, so
    # that the old behaviour, when this fails, asks nobody else).
    env = {**os.environ, "PORTBROKER_GATEWAY": "127.0.0.1"}
    hidden = ["--server-port", str(gateway_port), "--ssdp-port", "9", "--no-multicast"]
    state = ["--state-file", str(short_dir / "state.json"), "--methods", "pcp", *hidden]
    missing = short_dir / "none.sock"
    env_named = {**env, "PORTBROKER_SOCKET": str(missing)}
    run = run_commands(["map", "8080/tcp", "--socket", str(missing), *state], env=env)
    by_env = run_commands(["map", "8080/tcp", *state], env=env_named)
    expected = (
        f"portbroker: map failed: no portbroker daemon at {missing}; start one with"
        " `portbroker daemon`, or use --no-daemon to ask the gateway directly"
    )
    for done in (run, by_env):
        (mapped,) = done["results"]
        assert (mapped["code"], mapped["out"]) == (1, ""), done
        assert done["stderr"].splitlines() == [expected]
    # --no-daemon still asks the gateway (the FakeGateway), socket or not.
    direct = run_commands(["map", "8080/tcp", "--no-daemon", *state], env=env_named)
    assert direct["results"][0]["code"] == 0, direct
