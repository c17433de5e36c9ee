"""The `portbroker` command against a FakeGateway on 127.0.0.1.

The gateway runs in its own process, or in a thread of the test process when
the test counts what it received (renewals, deletes). A few tests call
``main()`` in-process to inject failures. Every call pins --gateway 127.0.0.1:
no test relies on default-route discovery.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from portbroker import cli as cli_module
from portbroker.errors import LinkError, NoAnswer
from portbroker.testing import FakeGateway
from portbroker.types import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME
from portbroker.wire import natpmp, pcp

PYTHON = sys.executable
# A guard against a hung subprocess, not an expectation of speed.
PATIENCE = 60.0
T = TypeVar("T")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fake_gateway(gateway_port: int) -> int:
    """The FakeGateway process of tests/conftest.py, under this file's name."""
    return gateway_port


class GatewayThread:
    """A FakeGateway on UDP 127.0.0.1, served by trio in a thread of the test process.

    Unlike the ``fake_gateway`` subprocess, a test can ask it what it received
    and what it holds while the CLI runs against it.
    """

    def __init__(self) -> None:
        self.gateway = FakeGateway(port=0)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(self.gateway.serve_udp)
                self._ready.set()

    @property
    def port(self) -> int:
        return self.gateway.port

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(PATIENCE), "the fake gateway did not start"

    def stop(self) -> None:
        if self._scope is not None:
            self.call(self._scope.cancel)
        self._thread.join(PATIENCE)

    def call(self, fn: Callable[[], T]) -> T:
        """Run *fn* in the gateway's trio thread (its state is not thread-safe)."""
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def map_requests(self, internal_port: int) -> list[natpmp.MapRequest | pcp.PcpRequest]:
        """MAP requests (creates, renewals and deletes) for *internal_port*, in order."""

        def collect() -> list[natpmp.MapRequest | pcp.PcpRequest]:
            out: list[natpmp.MapRequest | pcp.PcpRequest] = []
            for request in self.gateway.requests:
                if isinstance(request, natpmp.MapRequest):
                    if request.internal_port == internal_port:
                        out.append(request)
                elif (
                    isinstance(request, pcp.PcpRequest)
                    and isinstance(request.data, pcp.MapData)
                    and request.data.internal_port == internal_port
                ):
                    out.append(request)
            return out

        return self.call(collect)

    def holds(self, internal_port: int) -> bool:
        """True while the gateway has a mapping of *internal_port*, expired or not.

        The raw table, without expiring anything: a mapping that is gone from it
        was deleted, not merely left to run out.
        """
        return self.call(
            lambda: any(m.internal_port == internal_port for m in self.gateway.mappings.values())
        )


@pytest.fixture
def gateway_thread() -> Iterator[GatewayThread]:
    served = GatewayThread()
    served.start()
    try:
        yield served
    finally:
        served.stop()


class Lines:
    """A subprocess's stdout, line by line, without blocking the test forever."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._queue: queue.Queue[str | None] = queue.Queue()
        stdout = process.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self) -> str | None:
        """The next line, or None at the end of the output."""
        return self._queue.get(timeout=PATIENCE)

    def rest(self) -> list[str]:
        out = []
        while (line := self.next()) is not None:
            out.append(line)
        return out


def hold_argv(port: int, server_port: int, state: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "portbroker.cli",
        "map",
        f"{port}/udp",
        "--hold",
        "--json",
        *extra,
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(server_port),
        "--ssdp-port",
        str(_free_udp_port()),
        "--no-multicast",
        "--state-file",
        str(state),
    ]


def _finish(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def cli(
    *args: str, server_port: int, state: Path, check_rc: int | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [
        PYTHON,
        "-m",
        "portbroker.cli",
        *args,
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(server_port),
        # Nothing listens here: UPnP is refused by ICMP at once.
        "--ssdp-port",
        str(_free_udp_port()),
        "--no-multicast",
        "--state-file",
        str(state),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check_rc is not None:
        assert done.returncode == check_rc, (done.stdout, done.stderr)
    return done


def test_help_is_quick_and_imports_nothing_heavy() -> None:
    code = (
        "import sys, portbroker.cli as c\n"
        "c._parser().format_help()\n"
        "print(sorted(m for m in ('miniupnpc', 'zeroconf') if m in sys.modules))"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    help_run = subprocess.run(
        [PYTHON, "-m", "portbroker.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert help_run.returncode == 0
    assert "probe" in help_run.stdout
    assert "map" in help_run.stdout


def test_probe_json(fake_gateway: int, tmp_path: Path) -> None:
    done = cli("probe", "--json", server_port=fake_gateway, state=tmp_path / "s", check_rc=0)
    report = json.loads(done.stdout)
    assert report["gateway"] == "127.0.0.1"
    assert report["selected"] == "pcp"
    assert set(report["methods"]) == {"pcp", "natpmp", "upnp"}
    for outcome in report["methods"].values():
        assert set(outcome) == {
            "available",
            "rtt_ms",
            "external_address",
            "epoch",
            "error",
            "public",
            "reachability",
        }
    assert report["methods"]["natpmp"]["external_address"] == "203.0.113.7"
    assert report["methods"]["upnp"]["available"] is False
    assert (
        "ICMP" in report["methods"]["upnp"]["error"]
        or "nothing listens" in (report["methods"]["upnp"]["error"])
    )


def test_map_leaves_the_mapping_and_unmap_deletes_it(fake_gateway: int, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    done = cli("map", "8080/tcp", "--json", server_port=fake_gateway, state=state, check_rc=0)
    mapped = json.loads(done.stdout)
    assert mapped == {
        "method": "pcp",
        "protocol": "tcp",
        "internal_address": "127.0.0.1",
        "internal_port": 8080,
        "external_address": "203.0.113.7",
        "external_port": 8080,
        "lifetime": 7200,
        "gateway": "127.0.0.1",
        "permanent": False,
        # FakeGateway's address is a documentation one (RFC 5737).
        "public": False,
        "reachability": "not publicly reachable: 203.0.113.7 is a documentation address"
        " (RFC 5737), not an address the Internet can reach",
    }
    record = json.loads(state.read_text())["mappings"][0]
    assert len(bytes.fromhex(record["nonce"])) == 12
    # The mapping outlived the command. Another process (another nonce) is not
    # authorized for it by PCP (RFC 6887 §11.3), so it moves on to NAT-PMP, which
    # knows mappings by internal port and takes the same one over
    # (docs/result-codes.md, NOT_AUTHORIZED): the port is its again.
    other = tmp_path / "other.json"
    again = cli("map", "8080/tcp", "--json", server_port=fake_gateway, state=other, check_rc=0)
    taken = json.loads(again.stdout)
    assert (taken["method"], taken["external_port"]) == ("natpmp", 8080)
    cli("unmap", "8080/tcp", server_port=fake_gateway, state=other, check_rc=0)
    cli("unmap", "8080/tcp", server_port=fake_gateway, state=state, check_rc=0)
    assert json.loads(state.read_text())["mappings"] == []
    cli("map", "8080/tcp", server_port=fake_gateway, state=other, check_rc=0)


def test_unmap_without_a_record_says_so(fake_gateway: int, tmp_path: Path) -> None:
    done = cli("unmap", "9999/udp", server_port=fake_gateway, state=tmp_path / "s", check_rc=1)
    assert "no record of 9999/udp" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "70000"], "port must be 1..65535"),
        (["map", "80/sctp"], "protocol must be tcp or udp"),
        (["map", "http"], "is not a port number"),
        (["map", "80", "--exact"], "--exact needs --external-port"),
        (["map", "80", "--lifetime", "0"], "must be 1..604800 seconds, got 0"),
        (["probe", "--methods", "pcp,carrier-pigeon"], "--methods takes"),
        (["probe", "--timeout", "-1"], "must be more than 0"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    done = cli(*args, server_port=1, state=tmp_path / "s", check_rc=2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_gateway_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "portbroker.cli", "probe", "--gateway", "my-router"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "not an IP address" in done.stderr


@pytest.mark.parametrize(
    ("extra", "methods"),
    [
        ([], ("pcp", "natpmp", "upnp")),
        (["--via", "pcp"], ("pcp",)),
        (["--via", "natpmp"], ("natpmp",)),
    ],
)
def test_no_service_is_a_one_line_failure(
    tmp_path: Path, extra: list[str], methods: tuple[str, ...]
) -> None:
    # Nothing listens on 127.0.0.1:<free port>: every method is refused at once.
    done = cli(
        "map", "8080", *extra, server_port=_free_udp_port(), state=tmp_path / "s", check_rc=1
    )
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("portbroker: map failed:")
    for method in methods:
        assert method in lines[0]
    assert "closed" in lines[0]
    for noise in ("Traceback", "Error(", "Errno", "ExceptionGroup"):
        assert noise not in lines[0]


def _in_process(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str]]:
    """Run ``main()`` in this process against nothing (a free port on 127.0.0.1)."""
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)
    full = [
        *argv,
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(_free_udp_port()),
        "--methods",
        "pcp,natpmp",
        "--no-multicast",
    ]
    code = cli_module.main(full)
    return code, capsys.readouterr().err.strip().splitlines()


def _fail_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    from portbroker.broker import Broker

    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(Broker, "map", fail)


def test_an_unexpected_os_error_is_told_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host firewall refusing our socket (EPERM) surfaces where no code
    # expected it: the CLI still says it in words, in one line.
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(trio.socket, "socket", refused)
    code, lines = _in_process(
        ["map", "8080", "--state-file", str(tmp_path / "s")], capsys, monkeypatch
    )
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("portbroker: map failed:")
    assert "(EPERM)" in lines[0]
    assert "Errno" not in lines[0]
    assert "firewall" in lines[0]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            NoAnswer("pcp: no answer within 8 s", ignored={"nonce mismatch": 12}),
            ["12 replies ignored: nonce mismatch"],
        ),
        (
            LinkError("send to", "127.0.0.1:5351", OSError(errno.ENETUNREACH, "x")),
            ["cannot send to 127.0.0.1:5351", "(ENETUNREACH)"],
        ),
        (
            ExceptionGroup(
                "two at once",
                [
                    NoAnswer("natpmp: no answer within 8 s"),
                    ExceptionGroup(
                        "nested",
                        [OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))],
                    ),
                ],
            ),
            ["natpmp: no answer within 8 s", "(ENOBUFS)"],
        ),
    ],
    ids=["no-answer-with-ignored", "link-error", "exception-group"],
)
def test_every_failure_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    expected: list[str],
) -> None:
    _fail_with(monkeypatch, error)
    code, lines = _in_process(
        ["map", "8080", "--state-file", str(tmp_path / "s")], capsys, monkeypatch
    )
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("portbroker: map failed:")
    for part in expected:
        assert part in lines[0]
    for noise in ("Traceback", "Group", "Errno", "NoAnswer(", "OSError("):
        assert noise not in lines[0]


def test_hold_renews_until_sigterm_then_deletes(
    gateway_thread: GatewayThread, tmp_path: Path
) -> None:
    # A 2 s lifetime is renewed at half-life (too short for RFC 6887 §11.2.1's
    # 4 s gap): the hold must renew at least once before we stop it.
    argv = hold_argv(
        5000, gateway_thread.port, tmp_path / "s", "--via", "natpmp", "--lifetime", "2"
    )
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process)
        first = json.loads(lines.next() or "null")
        assert (first["event"], first["method"], first["external_port"]) == (
            "Acquired",
            "natpmp",
            5000,
        )
        while True:
            line = lines.next()
            assert line is not None, "the hold ended before renewing"
            event = json.loads(line)
            assert event["event"] in ("Renewed", "ExternalAddressChanged"), event
            if event["event"] == "Renewed":
                break
        requests = gateway_thread.map_requests(5000)
        assert len(requests) >= 2  # the create and at least one renewal
        assert all(r.lifetime == 2 for r in requests)
        assert gateway_thread.holds(5000)
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines.rest()]
        assert rest[-1]["event"] == "Released"
        assert rest[-1]["confirmed"] is True
        assert process.wait(timeout=PATIENCE) == 0
    finally:
        _finish(process)
    requests = gateway_thread.map_requests(5000)
    assert requests[-1].lifetime == 0  # RFC 6886 §3.4: a delete
    assert not gateway_thread.holds(5000)
    # Held mappings are not recorded for unmap: they were deleted.
    assert (
        not (tmp_path / "s").exists() or json.loads((tmp_path / "s").read_text())["mappings"] == []
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("via", ["pcp", "natpmp"])
def test_a_signal_right_after_the_first_line_still_deletes(
    gateway_thread: GatewayThread, tmp_path: Path, via: str, signum: int
) -> None:
    # Issue 7 item 11: the signal handlers must be in place before the mapping
    # is printed; the signal goes the instant the line appears.
    port = 5100
    argv = hold_argv(port, gateway_thread.port, tmp_path / "s", "--via", via)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process)
        first = lines.next()
        process.send_signal(signum)
        assert first is not None
        assert json.loads(first)["event"] == "Acquired"
        rest = [json.loads(line) for line in lines.rest()]
        code = process.wait(timeout=PATIENCE)
        assert process.stderr is not None
        assert code == 0, (code, rest, process.stderr.read())
        assert rest[-1]["event"] == "Released"
        assert rest[-1]["confirmed"] is True
    finally:
        _finish(process)
    requests = gateway_thread.map_requests(port)
    assert requests[-1].lifetime == 0  # the delete went out
    assert not gateway_thread.holds(port)


@pytest.mark.parametrize("lifetime", [MIN_LIFETIME, MAX_LIFETIME])
def test_lifetime_edges_are_accepted(
    gateway_thread: GatewayThread, tmp_path: Path, lifetime: int
) -> None:
    cli(
        "map",
        "6100/tcp",
        "--lifetime",
        str(lifetime),
        server_port=gateway_thread.port,
        state=tmp_path / "s",
        check_rc=0,
    )
    assert [r.lifetime for r in gateway_thread.map_requests(6100)] == [lifetime]


def test_lifetime_default_is_the_library_default(
    gateway_thread: GatewayThread, tmp_path: Path
) -> None:
    cli("map", "6101/tcp", server_port=gateway_thread.port, state=tmp_path / "s", check_rc=0)
    assert [r.lifetime for r in gateway_thread.map_requests(6101)] == [DEFAULT_LIFETIME]


@pytest.mark.parametrize("lifetime", ["0", str(MAX_LIFETIME + 1), "-5", "1.5", "week"])
def test_lifetime_out_of_range_names_the_range(tmp_path: Path, lifetime: str) -> None:
    done = cli("map", "80", "--lifetime", lifetime, server_port=1, state=tmp_path / "s", check_rc=2)
    assert f"{MIN_LIFETIME}..{MAX_LIFETIME}" in done.stderr
    assert "--lifetime" in done.stderr
    assert "Traceback" not in done.stderr


def test_corrupt_state_file_is_set_aside(fake_gateway: int, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    done = cli("map", "6000/udp", server_port=fake_gateway, state=state, check_rc=0)
    assert "unreadable" in done.stderr
    assert list(tmp_path.glob("state.json.corrupt-*"))
    assert json.loads(state.read_text())["mappings"][0]["internal_port"] == 6000
    assert os.access(state, os.R_OK)


def test_library_log_lines_are_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    """An internal error logged with its exception reads as one line, not a traceback."""
    import logging

    from portbroker.cli import _one_line_handler

    logger = logging.getLogger("portbroker.test-one-line")
    handler = _one_line_handler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError as exc:
            logger.error("renewal failed", exc_info=exc)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert err.startswith("portbroker: renewal failed (RuntimeError: boom;")
