"""THIRD_PARTY and FILTER against miniupnpd 2.3.1, proven with TCP connections.

The lan has a second host, the "camera" (192.168.77.3), that runs no client:
the lan host (192.168.77.2) maps the camera's port on its behalf, and a
connection from the wan side arrives at the camera. The wan side has two
sources, A (11.0.0.2) and B (11.0.0.3), for the filters.

What miniupnpd 2.3.1 does (docs/third-party-and-filter.md):
- PCP THIRD_PARTY: refused with UNSUPP_OPTION unless ``pcp_allow_thirdparty=yes``;
  then mapped to the other host.
- PCP FILTER: echoed, with every other option (an unknown optional one too),
  and not applied: a connection from B arrives. portbroker therefore refuses a
  filtered PCP mapping (and deletes what was granted).
- UPnP NewRemoteHost: applied (a source-address match in its nftables rule).
- UPnP NewInternalClient of another host: 718 under ``secure_mode=yes``.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portbroker.methods.pcp_rules import ECHO_PROBE
from portbroker.testing.lab import GATEWAY_ADDRESS, Lab, LanHost, Variant, open_lab
from portbroker.wire import pcp
from tests.conftest import _require_lab

PORTBROKER = [sys.executable, "-m", "portbroker.cli"]


@pytest.fixture(scope="module")
def allowing(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, LanHost, IPv4Address]]:
    """A full gateway with ``pcp_allow_thirdparty=yes``, the camera, and wan source B."""
    _require_lab()
    with open_lab(
        Variant.FULL,
        workdir=tmp_path_factory.mktemp("lab-third-party"),
        extra_config=["pcp_allow_thirdparty=yes"],
    ) as lab:
        camera = lab.add_lan_host("camera")
        source_b = lab.add_wan_address()
        yield lab, camera, source_b


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """miniupnpd as configured by default: no third party over PCP, secure_mode=yes."""
    _require_lab()
    with open_lab(Variant.FULL, workdir=tmp_path_factory.mktemp("lab-strict")) as lab:
        yield lab


def cli(lab: Lab, *args: str, state: Path) -> subprocess.CompletedProcess[str]:
    argv = lab.exec_argv(
        lab.lan_ns,
        [*PORTBROKER, *args, "--gateway", str(GATEWAY_ADDRESS), "--state-file", str(state)],
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@contextmanager
def listening(lab: Lab, ns: str, address: IPv4Address, port: int) -> Iterator[socket.socket]:
    listener = lab.socket(ns, kind=socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((str(address), port))
        listener.listen()
        yield listener


def connect_from(
    lab: Lab, listener: socket.socket, source: IPv4Address, port: int, *, timeout: float = 5.0
) -> str | None:
    """Connect from wan *source* to the external address:*port*.

    Returns the peer the listener saw (``"11.0.0.2:40000"``), or None when the
    connection did not arrive (no answer within *timeout*, or refused).
    """
    outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.bind((str(source), 0))
        outside.settimeout(timeout)
        try:
            outside.connect((str(lab.external_address), port))
        except (TimeoutError, ConnectionRefusedError):
            return None
        listener.settimeout(5)
        inside, peer = listener.accept()
        with inside:
            inside.sendall(b"camera says hello")
            assert outside.recv(100) == b"camera says hello"
        return f"{peer[0]}:{peer[1]}"


def rules_for(lab: Lab, port: int) -> list[str]:
    return [line.strip() for line in lab.nft_rules().splitlines() if f"dport {port} " in line]


def test_pcp_maps_the_cameras_port_for_it(
    allowing: tuple[Lab, LanHost, IPv4Address], tmp_path: Path
) -> None:
    lab, camera, _b = allowing
    state = tmp_path / "state.json"
    with listening(lab, camera.ns, camera.address, 8554) as listener:
        done = cli(
            lab, "map", "8554/tcp", "--third-party", str(camera.address), "--json", state=state
        )
        assert done.returncode == 0, done.stderr + lab.log_text()
        mapped = json.loads(done.stdout)
        assert mapped["method"] == "pcp"
        assert mapped["internal_address"] == str(camera.address)
        peer = connect_from(lab, listener, lab.wan_address, mapped["external_port"])
        print(
            f"\nPCP THIRD_PARTY: {lab.external_address}:{mapped['external_port']} -> "
            f"{camera.address}:8554; connection from {peer} arrived at the camera"
        )
        assert peer is not None
        assert peer.startswith(f"{lab.wan_address}:")
        done = cli(lab, "unmap", "8554/tcp", state=state)
        assert done.returncode == 0, done.stderr
        assert rules_for(lab, 8554) == []
        assert connect_from(lab, listener, lab.wan_address, 8554, timeout=1.0) is None


def test_the_daemon_maps_for_the_camera_as_root(
    allowing: tuple[Lab, LanHost, IPv4Address], tmp_path: Path
) -> None:
    lab, camera, _b = allowing
    sock = tmp_path / "pb.sock"
    daemon = subprocess.Popen(
        lab.exec_argv(
            lab.lan_ns,
            [
                *PORTBROKER,
                "daemon",
                "--socket",
                str(sock),
                "--state",
                str(tmp_path / "daemon.json"),
                "--gateway",
                str(GATEWAY_ADDRESS),
                "--no-announcements",
                "-q",
            ],
        ),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline, "the daemon never made its socket"
            time.sleep(0.05)
        with listening(lab, camera.ns, camera.address, 8555) as listener:
            done = subprocess.run(
                lab.exec_argv(
                    lab.lan_ns,
                    [
                        *PORTBROKER,
                        "map",
                        "8555/tcp",
                        "--third-party",
                        str(camera.address),
                        "--socket",
                        str(sock),
                        "--json",
                    ],
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr + lab.log_text()
            mapped = json.loads(done.stdout)
            assert mapped["internal_address"] == str(camera.address)
            peer = connect_from(lab, listener, lab.wan_address, mapped["external_port"])
            print(f"\ndaemon THIRD_PARTY: 8555 -> {camera.address}; from {peer}")
            assert peer is not None
            done = subprocess.run(
                lab.exec_argv(
                    lab.lan_ns, [*PORTBROKER, "unmap", "8555/tcp", "--socket", str(sock)]
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert rules_for(lab, 8555) == []
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        if daemon.stderr is not None:
            daemon.stderr.close()


def test_miniupnpd_echoes_pcp_filter_without_applying_it(
    allowing: tuple[Lab, LanHost, IPv4Address], tmp_path: Path
) -> None:
    """The proof behind refusing a filtered PCP mapping on this gateway."""
    lab, _camera, source_b = allowing
    link = lab.socket(lab.lan_ns)
    with link, listening(lab, lab.lan_ns, lab.lan_address, 8556) as listener:
        link.settimeout(5)
        link.connect((str(GATEWAY_ADDRESS), pcp.SERVER_PORT))
        only_a = pcp.Filter(128, 0, lab.wan_address)  # A/32, IPv4-mapped
        nonce = secrets.token_bytes(12)

        def ask(lifetime: int) -> pcp.PcpResponse:
            request = pcp.PcpRequest(
                pcp.Opcode.MAP,
                lifetime,
                lab.lan_address,
                pcp.MapData(nonce, 6, 8556, 0),
                (only_a, ECHO_PROBE),
            )
            link.send(pcp.encode_request(request))
            return pcp.decode_response(link.recv(1100))

        granted = ask(600)
        assert granted.result_code == pcp.ResultCode.SUCCESS
        assert granted.options == (only_a, ECHO_PROBE)  # echoed, the probe too
        try:
            from_b = connect_from(lab, listener, source_b, 8556)
            print(
                f"\nminiupnpd PCP FILTER {lab.wan_address}/32: answer options"
                f" {[o.code.name for o in granted.options]}; from B ({source_b}): {from_b};"
                f" rule: {rules_for(lab, 8556)}"
            )
            assert from_b is not None  # B got in: the filter was not applied
        finally:
            assert ask(0).result_code == pcp.ResultCode.SUCCESS
    # And portbroker says so rather than pretend, leaving nothing open...
    only = ("--filter", f"{lab.wan_address}/32")
    done = cli(lab, "map", "8557/tcp", *only, "--via", "pcp", state=tmp_path / "s")
    assert done.returncode == 1
    assert "proves nothing" in done.stderr
    assert "deleted it" in done.stderr
    assert rules_for(lab, 8557) == []
    # ...and, left to choose, takes the method that enforces it (UPnP), PCP's
    # unenforced grant deleted on the way.
    state = tmp_path / "auto.json"
    done = cli(lab, "map", "8557/tcp", *only, "--json", state=state)
    assert done.returncode == 0, done.stderr + lab.log_text()
    mapped = json.loads(done.stdout)
    print(f"map --filter without --via: {mapped['method']}, filters {mapped['filters']}")
    assert mapped["method"] == "upnp"
    assert mapped["filters"] == [f"{lab.wan_address}/32"]
    assert len(rules_for(lab, 8557)) == 2  # UPnP's forward and dnat rules, no PCP leftover
    assert cli(lab, "unmap", "8557/tcp", state=state).returncode == 0
    assert rules_for(lab, 8557) == []


def test_upnp_filter_lets_source_a_in_and_keeps_source_b_out(
    allowing: tuple[Lab, LanHost, IPv4Address], tmp_path: Path
) -> None:
    lab, _camera, source_b = allowing
    state = tmp_path / "state.json"
    with listening(lab, lab.lan_ns, lab.lan_address, 8558) as listener:
        done = cli(
            lab,
            "map",
            "8558/tcp",
            "--via",
            "upnp",
            "--filter",
            f"{lab.wan_address}/32",
            "--json",
            state=state,
        )
        assert done.returncode == 0, done.stderr + lab.log_text()
        mapped = json.loads(done.stdout)
        assert mapped["filters"] == [f"{lab.wan_address}/32"]
        port = mapped["external_port"]
        from_a = connect_from(lab, listener, lab.wan_address, port)
        from_b = connect_from(lab, listener, source_b, port, timeout=1.5)
        print(
            f"\nUPnP NewRemoteHost {lab.wan_address}: from A: {from_a}; from B ({source_b}):"
            f" {from_b}; rule: {rules_for(lab, port)}"
        )
        assert from_a is not None
        assert from_b is None
        done = cli(lab, "unmap", "8558/tcp", state=state)
        assert done.returncode == 0, done.stderr
        assert rules_for(lab, port) == []
    # What UPnP cannot express is refused before anything is sent.
    done = cli(
        lab, "map", "8559/tcp", "--via", "upnp", "--filter", "11.0.0.0/24", state=tmp_path / "s"
    )
    assert done.returncode == 1
    assert "one remote host" in done.stderr
    assert rules_for(lab, 8559) == []


def test_a_gateway_that_allows_no_third_party_says_so(strict: Lab, tmp_path: Path) -> None:
    camera = "192.168.77.3"
    # Left to choose, every method is asked; each says why not.
    via_any = cli(strict, "map", "8560/tcp", "--third-party", camera, state=tmp_path / "s")
    via_upnp = cli(
        strict, "map", "8561/tcp", "--third-party", camera, "--via", "upnp", state=tmp_path / "s"
    )
    via_natpmp = cli(
        strict, "map", "8562/tcp", "--third-party", camera, "--via", "natpmp", state=tmp_path / "s"
    )
    print(f"\n{via_any.stderr.strip()}\n{via_upnp.stderr.strip()}\n{via_natpmp.stderr.strip()}")
    assert via_any.returncode == 1
    assert "does not allow mapping for another host (192.168.77.3)" in via_any.stderr
    assert "pcp_allow_thirdparty=yes" in via_any.stderr
    assert "natpmp: NAT-PMP maps only for the sender" in via_any.stderr
    assert "upnp: the gateway refused to map for another host" in via_any.stderr
    assert via_upnp.returncode == 1
    assert "refused to map for another host (192.168.77.3" in via_upnp.stderr
    assert "secure_mode=yes" in via_upnp.stderr
    assert via_natpmp.returncode == 1
    assert "NAT-PMP maps only for the sender" in via_natpmp.stderr
    for port in (8560, 8561, 8562):
        assert rules_for(strict, port) == []
    # And this host's own ports still map over PCP: the refusal was about the camera.
    own = cli(strict, "map", "8563/tcp", "--json", state=tmp_path / "own")
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["method"] == "pcp"
    assert cli(strict, "unmap", "8563/tcp", state=tmp_path / "own").returncode == 0
