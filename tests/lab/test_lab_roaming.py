"""One lan, two NAT gateways (open_roaming): a lan host whose default route moves.

- gateway a: lan 192.168.77.1, external 11.0.0.1; gateway b: lan
  192.168.77.254, external 11.0.0.3; each its own miniupnpd 2.3.1.
- the lan host 192.168.77.2 starts behind a; ``Roaming.use_gateway`` moves
  its default route, as a laptop that joins another network does.

The proof of each mapping is a connection from the wan host 11.0.0.2 to the
gateway's external address; the proof of a route switch is the lan host's
kernel route and the source address its outbound traffic arrives from.
"""

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
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import Lab, Roaming, open_roaming
from tests.conftest import _require_lab
from tests.lab.helpers import lines_of

pytestmark = pytest.mark.lab

PORTBROKER = [sys.executable, "-m", "portbroker.cli"]
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def roaming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roaming]:
    _require_lab()
    with open_roaming(workdir=tmp_path_factory.mktemp("roaming")) as built:
        yield built


def _map(roaming: Roaming, gateway: Lab, port: int, method: str, state: Path) -> dict[str, object]:
    argv = roaming.exec_argv(
        roaming.host.ns,
        [
            *PORTBROKER,
            "map",
            f"{port}/tcp",
            "--json",
            "--gateway",
            str(gateway.gateway_address),
            "--methods",
            method,
            "--lifetime",
            "600",
            "--state-file",
            str(state),
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr + gateway.log_text()
    mapped: dict[str, object] = json.loads(done.stdout)
    return mapped


def _listen(roaming: Roaming, port: int) -> socket.socket:
    listener = roaming.socket(roaming.host.ns, kind=socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(roaming.host.address), port))
    listener.listen()
    listener.settimeout(3)
    return listener


def _inbound(roaming: Roaming, listener: socket.socket, target: tuple[str, int]) -> bytes | None:
    """What the lan side sent over a connection from the wan host to *target* (None: no way in)."""
    outside = roaming.socket(roaming.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(3)
        try:
            outside.connect(target)
        except OSError:
            return None
        inside, _peer = listener.accept()
        with inside:
            inside.sendall(b"inside says hello")
            return outside.recv(100)


def _outbound_source(roaming: Roaming, port: int) -> IPv4Address:
    """The address the wan host sees the lan host's outbound connection come from."""
    server = roaming.socket(roaming.wan_ns, kind=socket.SOCK_STREAM)
    client = roaming.socket(roaming.host.ns, kind=socket.SOCK_STREAM)
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((str(roaming.wan_address), port))
        server.listen()
        server.settimeout(3)
        client.settimeout(3)
        client.connect((str(roaming.wan_address), port))
        conn, (source, _port) = server.accept()
        conn.close()
        return IPv4Address(source)


def test_the_route_switch_is_what_the_lan_hosts_kernel_shows(roaming: Roaming) -> None:
    roaming.use_gateway(roaming.a)
    assert roaming.default_gateway() == IPv4Address("192.168.77.1")
    assert _outbound_source(roaming, 28001) == roaming.a.external_address
    roaming.use_gateway(roaming.b)
    assert roaming.default_gateway() == IPv4Address("192.168.77.254")
    assert roaming.current_gateway() is roaming.b
    assert _outbound_source(roaming, 28002) == roaming.b.external_address == IPv4Address("11.0.0.3")


@pytest.mark.parametrize("method", ["pcp", "upnp"])
def test_a_mapping_follows_the_gateway_the_route_points_at(
    roaming: Roaming, method: str, tmp_path: Path
) -> None:
    port = {"pcp": 28011, "upnp": 28021}[method]
    roaming.use_gateway(roaming.a)
    with _listen(roaming, port) as listener:
        mapped = _map(roaming, roaming.a, port, method, tmp_path / "a.json")
        assert (mapped["method"], mapped["external_address"]) == (method, "11.0.0.1")
        external_port = mapped["external_port"]
        assert isinstance(external_port, int)
        assert _inbound(roaming, listener, ("11.0.0.1", external_port)) == b"inside says hello"
        # Each miniupnpd serves only its own lan interface: b holds nothing yet.
        assert f"dport {external_port}" in roaming.a.nft_rules()
        assert f"dport {external_port}" not in roaming.b.nft_rules()

        roaming.use_gateway(roaming.b)
        assert roaming.current_gateway() is roaming.b
        mapped_b = _map(roaming, roaming.b, port + 1, method, tmp_path / "b.json")
        with _listen(roaming, port + 1) as listener_b:
            assert (mapped_b["method"], mapped_b["external_address"]) == (method, "11.0.0.3")
            external_b = mapped_b["external_port"]
            assert isinstance(external_b, int)
            assert _inbound(roaming, listener_b, ("11.0.0.3", external_b)) == b"inside says hello"
            assert f"dport {external_b}" in roaming.b.nft_rules()
            assert f"dport {external_b}" not in roaming.a.nft_rules()
    print(
        f"\nroaming ({method}): 11.0.0.1:{external_port} through a, then "
        f"11.0.0.3:{external_b} through b, inbound from 11.0.0.2 OK"
    )


def _next_line(
    process: subprocess.Popen[str], *wanted: str, timeout: float = 30.0
) -> dict[str, Any]:
    """The next JSON line of *process* whose event is one of *wanted* (fails, never hangs)."""
    lines = lines_of(process)
    deadline = time.monotonic() + timeout
    while True:
        line = lines.next(deadline - time.monotonic())
        if line is None:
            raise AssertionError(f"no {wanted} line within {timeout:g} s")
        if not line:
            assert process.stderr is not None
            raise AssertionError(f"map --hold ended before {wanted}: {process.stderr.read()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] in wanted:
            return event


def _inbound_within(
    roaming: Roaming, listener: socket.socket, target: tuple[str, int], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _inbound(roaming, listener, target) == b"inside says hello":
            return True
        time.sleep(0.05)
    return False


def _hold(roaming: Roaming, port: int, method: str, tmp_path: Path) -> subprocess.Popen[str]:
    """``portbroker map PORT/tcp --hold --json`` in the lan host, on its default route's gateway."""
    leases = tmp_path / "no-leases"  # no PCP server from this machine's DHCP leases
    leases.mkdir(exist_ok=True)
    argv = roaming.exec_argv(
        roaming.host.ns,
        [
            *PORTBROKER,
            "map",
            f"{port}/tcp",
            "--hold",
            "--json",
            "--no-daemon",
            "--methods",
            method,
            "--lifetime",
            "600",
            "--dhcp-leases",
            str(leases),
            "--state-file",
            str(tmp_path / "state.json"),
        ],
    )
    env = {k: v for k, v in os.environ.items() if k != "PORTBROKER_GATEWAY"}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def test_an_address_change_on_the_same_gateway_renews_at_once(
    roaming: Roaming, tmp_path: Path
) -> None:
    port = 28131
    roaming.use_gateway(roaming.a)
    host = roaming.host
    process = _hold(roaming, port, "pcp", tmp_path)
    extra = "192.168.77.50/24"
    try:
        acquired = _next_line(process, "Acquired")
        assert acquired["gateway"] == "192.168.77.1"
        subprocess.run(
            ["ip", "-n", host.ns, "addr", "add", extra, "dev", host.interface], check=True
        )
        # Lifetime 600 s: the renewal was due in 300-375 s, not now.
        renewed = _next_line(process, "Renewed", "GatewayChanged", timeout=15)
        assert renewed["event"] == "Renewed"
        assert renewed["gateway"] == "192.168.77.1"
        process.send_signal(signal.SIGTERM)
        assert _next_line(process, "Released")["confirmed"] is True
        assert process.wait(timeout=30) == 0
    finally:
        subprocess.run(
            ["ip", "-n", host.ns, "addr", "del", extra, "dev", host.interface], check=False
        )
        _stop(process)


@pytest.mark.parametrize("method", ["pcp", "upnp"])
def test_map_hold_follows_the_default_route_to_the_other_gateway(
    roaming: Roaming, method: str, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    port = {"pcp": 28101, "upnp": 28111}[method]
    roaming.use_gateway(roaming.a)
    process = _hold(roaming, port, method, tmp_path)
    try:
        with _listen(roaming, port) as listener:
            acquired = _next_line(process, "Acquired")
            assert (acquired["gateway"], acquired["external_address"]) == (
                "192.168.77.1",
                "11.0.0.1",
            )
            assert _inbound(roaming, listener, ("11.0.0.1", acquired["external_port"]))
            assert f"dport {port}" in roaming.a.nft_rules()

            switched = time.monotonic()
            roaming.use_gateway(roaming.b)
            changed = _next_line(process, "GatewayChanged")
            assert (changed["old_gateway"], changed["new_gateway"]) == (
                "192.168.77.1",
                "192.168.77.254",
            )
            restored = _next_line(process, "Restored")
            assert (restored["gateway"], restored["external_address"]) == (
                "192.168.77.254",
                "11.0.0.3",
            )
            target = ("11.0.0.3", restored["external_port"])
            assert _inbound_within(roaming, listener, target, 10.0), roaming.b.log_text()
            took = time.monotonic() - switched
            # Deleted on a (still on the lan), made on b.
            deadline = time.monotonic() + 5
            while f"dport {port}" in roaming.a.nft_rules() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"dport {port}" not in roaming.a.nft_rules(), roaming.a.log_text()
            assert f"dport {port}" in roaming.b.nft_rules()

            process.send_signal(signal.SIGTERM)
            released = _next_line(process, "Released")
            assert released["confirmed"] is True
            assert process.wait(timeout=30) == 0
        assert f"dport {port}" not in roaming.b.nft_rules()
    finally:
        _stop(process)
    figure(
        f"roaming ({method}): map --hold moved from 11.0.0.1 to 11.0.0.3:{target[1]};"
        f" route change to working inbound connection through b: {took:.2f} s"
    )


def _wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    from portbroker.client import BlockingClient

    deadline = time.monotonic() + 30
    while True:
        try:
            BlockingClient(path).close()
            return
        except Exception as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                assert process.stderr is not None
                raise AssertionError(f"daemon did not start: {process.stderr.read()!r}") from exc
            time.sleep(0.1)


def test_the_daemon_moves_its_clients_mappings_with_the_default_route(
    roaming: Roaming, figure: Callable[[str], None]
) -> None:
    from portbroker.client import BlockingClient

    port = 28141
    roaming.use_gateway(roaming.a)
    directory = Path(tempfile.mkdtemp(prefix="pbr-"))
    sock = directory / "pb.sock"
    argv = roaming.exec_argv(
        roaming.host.ns,
        [
            *PORTBROKER,
            "daemon",
            "--socket",
            str(sock),
            "--state",
            str(directory / "state.json"),
            "--methods",
            "pcp",
        ],
    )
    env = {k: v for k, v in os.environ.items() if k != "PORTBROKER_GATEWAY"}
    daemon = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        _wait_for_socket(sock, daemon)
        with (
            _listen(roaming, port) as listener,
            BlockingClient(sock) as app,
            BlockingClient(sock) as watcher,
        ):
            mapped = app.map(port, "tcp", lifetime=600, persist=True)
            assert (mapped["gateway"], mapped["external_address"]) == ("192.168.77.1", "11.0.0.1")
            assert _inbound(roaming, listener, ("11.0.0.1", mapped["external_port"]))
            events = watcher.watch()

            switched = time.monotonic()
            roaming.use_gateway(roaming.b)
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                event = next(events)
                seen.append(event)
                if event["event"] == "Restored":
                    break
            kinds = [e["event"] for e in seen]
            assert kinds[0] == "GatewayChanged", kinds
            assert seen[0]["detail"] == {
                "old_gateway": "192.168.77.1",
                "new_gateway": "192.168.77.254",
            }
            restored = seen[-1]["mapping"]
            assert (restored["gateway"], restored["external_address"]) == (
                "192.168.77.254",
                "11.0.0.3",
            )
            target = ("11.0.0.3", restored["external_port"])
            assert _inbound_within(roaming, listener, target, 10.0), roaming.b.log_text()
            took = time.monotonic() - switched
            deadline = time.monotonic() + 5
            while f"dport {port}" in roaming.a.nft_rules() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"dport {port}" not in roaming.a.nft_rules(), roaming.a.log_text()
            assert f"dport {port}" in roaming.b.nft_rules()
            (listed,) = app.list()
            assert (listed["gateway"], listed["persist"]) == ("192.168.77.254", True)
            # The state file is written behind the events (the daemon's writer).
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                saved = json.loads((directory / "state.json").read_text())
                if [r["gateway"] for r in saved["mappings"]] == ["192.168.77.254"]:
                    break
                time.sleep(0.05)
            assert [r["gateway"] for r in saved["mappings"]] == ["192.168.77.254"], saved
            assert app.unmap(port, "tcp") == f"{port}/tcp"
        assert f"dport {port}" not in roaming.b.nft_rules()
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            if daemon.stderr is not None:
                daemon.stderr.close()
            shutil.rmtree(directory, ignore_errors=True)
    figure(
        f"roaming (daemon, pcp): route change to working inbound connection through b: {took:.2f} s"
    )
