"""IPv6 pinholes through a real miniupnpd 2.3.1, proven by inbound IPv6 connections.

One lab with ULA prefixes (``open_lab(ipv6=True)``: lan fd77::/64, wan
fd11::/64). The gateway routes IPv6 without translation, and its forward
chain (policy drop) lets an inbound connection from the wan host to
[fd77::2]:P through only while a pinhole for P exists. The CLI runs in the
lan namespace as an app would, with ``--gateway fd77::1`` (docs/ipv6.md).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portbroker.testing.lab import GATEWAY_ADDRESS6, LAN_ADDRESS6, WAN_ADDRESS6, Lab, open_lab
from tests.conftest import _require_lab

PORTBROKER = [sys.executable, "-m", "portbroker.cli"]
# An inbound SYN the forward chain drops is never answered: this long
# without an answer means "no pinhole".
DROPPED_AFTER = 1.5


@pytest.fixture(scope="module")
def lab6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_lab()
    with open_lab(ipv6=True, workdir=tmp_path_factory.mktemp("lab-ipv6")) as lab:
        yield lab


def cli(lab: Lab, *args: str, state: Path) -> subprocess.CompletedProcess[str]:
    argv = lab.exec_argv(
        lab.lan_ns,
        [*PORTBROKER, *args, "--gateway", str(GATEWAY_ADDRESS6), "--state-file", str(state)],
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def listen6(lab: Lab, port: int) -> socket.socket:
    listener = lab.socket(lab.lan_ns, socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(LAN_ADDRESS6), port))
    listener.listen()
    listener.settimeout(5)
    return listener


def inbound(lab: Lab, listener: socket.socket, address: str, port: int) -> bytes | None:
    """Connect from the wan host to [address]:port; what the lan side sent, or None
    if the gateway dropped the SYN."""
    outside = lab.socket(lab.wan_ns, socket.AF_INET6, socket.SOCK_STREAM)
    with outside:
        outside.settimeout(DROPPED_AFTER)
        try:
            outside.connect((address, port))
        except TimeoutError:
            return None
        outside.settimeout(5)
        inside, peer = listener.accept()
        with inside:
            # Routed, not translated: the wan host's own address arrives.
            assert peer[0] == str(WAN_ADDRESS6)
            inside.sendall(b"inside says hello")
            return outside.recv(100)


def test_probe_over_ipv6_says_natpmp_is_ipv4_only(lab6: Lab, tmp_path: Path) -> None:
    done = cli(lab6, "probe", "--json", state=tmp_path / "s")
    assert done.returncode == 0, done.stderr + lab6.log_text()
    report = json.loads(done.stdout)
    assert report["selected"] == "pcp"
    assert report["methods"]["pcp"]["available"]
    assert report["methods"]["upnp"]["available"]
    natpmp = report["methods"]["natpmp"]
    assert not natpmp["available"]
    assert "IPv4 only" in natpmp["error"]
    # Nothing was tried: miniupnpd logs every NAT-PMP/PCP datagram it reads,
    # and a NAT-PMP request is 2 bytes long.
    assert "received from [fd77::2]" in lab6.log_text()
    assert " 2bytes" not in lab6.log_text()


@pytest.mark.parametrize(("method", "port"), [("pcp", 22001), ("upnp", 22002)])
def test_a_mapping_opens_a_pinhole_and_unmap_closes_it(
    lab6: Lab, method: str, port: int, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    state = tmp_path / "state.json"
    host = str(LAN_ADDRESS6)
    with listen6(lab6, port) as listener:
        assert inbound(lab6, listener, host, port) is None, "open before any mapping"

        started = time.monotonic()
        done = cli(lab6, "map", f"{port}/tcp", "--json", "--methods", method, state=state)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr + lab6.log_text()
        mapped = json.loads(done.stdout)
        assert mapped["method"] == method
        # A pinhole: the external endpoint is the host's own ULA address and port.
        assert (mapped["internal_address"], mapped["internal_port"]) == (host, port)
        assert (mapped["external_address"], mapped["external_port"]) == (host, port)
        if method == "upnp":
            assert isinstance(mapped["pinhole_id"], int)
        assert inbound(lab6, listener, host, port) == b"inside says hello", lab6.nft_rules()
        figure(f"ipv6 {method}: map {took:.2f} s, inbound [{host}]:{port} from the wan OK")

        done = cli(lab6, "unmap", f"{port}/tcp", state=state)
        assert done.returncode == 0, done.stderr + lab6.log_text()
        assert f"[{host}]:{port}" in done.stdout
        assert inbound(lab6, listener, host, port) is None, "still open after unmap"
