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
import socket
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portbroker.testing.lab import Lab, Roaming, open_roaming
from tests.conftest import _require_lab

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
