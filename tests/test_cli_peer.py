"""``portbroker peer`` against a FakeGateway process on 127.0.0.1 (docs/peer.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import PATIENCE, GatewayThread, Lines, _finish, _free_udp_port, cli


@pytest.fixture
def served() -> Iterator[GatewayThread]:
    gateway = GatewayThread()
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_peer_prints_the_flows_external_endpoint(gateway_port: int, tmp_path: Path) -> None:
    done = cli(
        "peer",
        "5000/udp",
        "--remote",
        "198.51.100.20:7000",
        "--lifetime",
        "600",
        "--json",
        server_port=gateway_port,
        state=tmp_path / "s",
        check_rc=0,
    )
    shown = json.loads(done.stdout)
    assert shown["peer"] is True
    assert (shown["remote_address"], shown["remote_port"]) == ("198.51.100.20", 7000)
    assert (shown["method"], shown["protocol"], shown["internal_port"]) == ("pcp", "udp", 5000)
    assert (shown["external_address"], shown["external_port"]) == ("203.0.113.7", 5000)
    assert shown["lifetime"] == 600
    words = cli(
        "peer",
        "5001/udp",
        "--remote",
        "198.51.100.20:7000",
        server_port=gateway_port,
        state=tmp_path / "s",
        check_rc=0,
    )
    assert "to 198.51.100.20:7000 leaves as 203.0.113.7:5001 via pcp" in words.stdout


def test_without_pcp_peer_maps_the_port_and_unmap_deletes_it(
    gateway_port: int, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    args = ("peer", "5002/udp", "--remote", "198.51.100.20:7000", "--methods", "natpmp")
    done = cli(*args, "--json", server_port=gateway_port, state=state, check_rc=0)
    shown = json.loads(done.stdout)
    assert (shown["peer"], shown["method"]) == (False, "natpmp")
    assert "remote_address" not in shown
    cli(
        "unmap",
        "5002/udp",
        "--methods",
        "natpmp",
        server_port=gateway_port,
        state=state,
        check_rc=0,
    )
    only = cli(*args, "--peer-only", server_port=gateway_port, state=state, check_rc=1)
    lines = only.stderr.strip().splitlines()
    assert len(lines) == 1, only.stderr
    assert "PCP is not enabled" in lines[0]
    assert "natpmp: PEER needs PCP" in lines[0]


@pytest.mark.parametrize(
    ("remote", "message"),
    [
        ("11.0.0.2", "--remote must be ADDRESS:PORT"),
        ("11.0.0.2:0", "port must be 1..65535, got 0"),
        ("11.0.0.2:http", "'http' is not a port number"),
        ("example.com:7000", "is not an IP address"),
        ("0.0.0.0:7000", "must name a host"),
        ("2001:db8::2:7000", "put an IPv6 address in brackets"),
        ("[2001:db8::2:7000", "--remote must be ADDRESS:PORT"),
    ],
)
def test_a_bad_remote_is_a_usage_error(remote: str, message: str, tmp_path: Path) -> None:
    done = cli(
        "peer", "5000/udp", "--remote", remote, server_port=1, state=tmp_path / "s", check_rc=2
    )
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_peer_needs_a_remote(tmp_path: Path) -> None:
    done = cli("peer", "5000/udp", server_port=1, state=tmp_path / "s", check_rc=2)
    assert "--remote" in done.stderr


def test_remote_spec_takes_ipv6_in_brackets() -> None:
    from portbroker.cli import _remote_spec

    assert _remote_spec("[2001:db8::2]:7000") == ("2001:db8::2", 7000)
    assert _remote_spec("11.0.0.2:7000") == ("11.0.0.2", 7000)


def test_peer_is_recorded_beside_a_map_of_its_port_and_unmap_remote_deletes_it(
    gateway_port: int, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    cli("map", "5003/udp", server_port=gateway_port, state=state, check_rc=0)
    peer = ("peer", "5003/udp", "--remote", "198.51.100.20:7000")
    cli(*peer, server_port=gateway_port, state=state, check_rc=0)
    records = json.loads(state.read_text())["mappings"]
    assert sorted(r.get("remote_port", 0) for r in records) == [0, 7000]
    assert {r["internal_port"] for r in records} == {5003}
    other = ("unmap", "5003/udp", "--remote", "198.51.100.20:7001")
    missing = cli(*other, server_port=gateway_port, state=state, check_rc=1)
    assert "no record of 5003/udp to 198.51.100.20:7001" in missing.stderr
    done = cli(
        "unmap",
        "5003/udp",
        "--remote",
        "198.51.100.20:7000",
        "--json",
        server_port=gateway_port,
        state=state,
        check_rc=0,
    )
    deleted = json.loads(done.stdout)["deleted"]
    assert (deleted["remote_address"], deleted["remote_port"]) == ("198.51.100.20", 7000)
    left = json.loads(state.read_text())["mappings"]
    assert [r.get("remote_port") for r in left] == [None]  # the MAP's record stays
    cli("unmap", "5003/udp", server_port=gateway_port, state=state, check_rc=0)
    assert json.loads(state.read_text())["mappings"] == []


def test_peer_hold_keeps_it_until_sigterm_then_deletes_it(
    served: GatewayThread, tmp_path: Path
) -> None:
    argv = [
        sys.executable,
        "-m",
        "portbroker.cli",
        "peer",
        "5004/udp",
        "--remote",
        "198.51.100.20:7000",
        "--hold",
        "--json",
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(served.port),
        "--ssdp-port",
        str(_free_udp_port()),
        "--no-multicast",
        "--state-file",
        str(tmp_path / "s"),
    ]
    remote = ("198.51.100.20", 7000)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process)
        first = json.loads(lines.next() or "null")
        assert (first["event"], first["peer"], first["remote_port"]) == ("Acquired", True, 7000)
        assert served.call(lambda: served.gateway.peer_for("udp", 5004, remote)) is not None
        process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines.rest()]
        assert rest[-1]["event"] == "Released"
        assert rest[-1]["confirmed"] is True
        assert process.wait(timeout=PATIENCE) == 0
    finally:
        _finish(process)
    assert served.call(lambda: served.gateway.peer_for("udp", 5004, remote)) is None
    assert not (tmp_path / "s").exists()  # held, then deleted: nothing to record
