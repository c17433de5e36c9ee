"""The `portbroker` command against a FakeGateway on 127.0.0.1 (its own process).

Every call pins --gateway 127.0.0.1: no test relies on default-route discovery.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PYTHON = sys.executable


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fake_gateway() -> Iterator[int]:
    process = subprocess.Popen(
        [PYTHON, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("port "), line
        yield int(line.split()[1])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


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
        assert set(outcome) == {"available", "rtt_ms", "external_address", "epoch", "error"}
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
        (["map", "80", "--lifetime", "0"], "must be 1..604800"),
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


def test_no_service_is_a_one_line_failure(tmp_path: Path) -> None:
    # Nothing listens on 127.0.0.1:<free port>: every method is refused at once.
    done = cli("map", "8080", server_port=_free_udp_port(), state=tmp_path / "s", check_rc=1)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("portbroker: map failed:")
    for method in ("pcp", "natpmp", "upnp"):
        assert method in lines[0]


def test_hold_renews_until_sigterm_then_deletes(fake_gateway: int, tmp_path: Path) -> None:
    argv = [
        PYTHON,
        "-m",
        "portbroker.cli",
        "map",
        "5000/udp",
        "--hold",
        "--json",
        "--via",
        "natpmp",
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(fake_gateway),
        "--no-multicast",
        "--state-file",
        str(tmp_path / "s"),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert (first["event"], first["method"], first["external_port"]) == (
            "Acquired",
            "natpmp",
            5000,
        )
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in process.stdout.read().splitlines()]
        assert rest[-1] == {"event": "Released", "confirmed": True}
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    # Held mappings are not recorded for unmap: they were deleted.
    assert (
        not (tmp_path / "s").exists() or json.loads((tmp_path / "s").read_text())["mappings"] == []
    )


def test_corrupt_state_file_is_set_aside(fake_gateway: int, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    done = cli("map", "6000/udp", server_port=fake_gateway, state=state, check_rc=0)
    assert "unreadable" in done.stderr
    assert list(tmp_path.glob("state.json.corrupt-*"))
    assert json.loads(state.read_text())["mappings"][0]["internal_port"] == 6000
    assert os.access(state, os.R_OK)
