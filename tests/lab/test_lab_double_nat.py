"""Double NAT in the lab (open_series): an inner gateway behind an outer NAT whose
lan is 100.64.0.0/24, as behind a carrier-grade NAT, or 192.168.1.0/24, a
router behind an ISP modem (docs/double-nat.md).

- inner gateway: a plain NAT plus the lab's NatServer (Lab.start_nat_server),
  a PCP / NAT-PMP server that installs real nftables mappings and reports the
  real external address, 100.64.0.2 (192.168.1.2). miniupnpd 2.3.1 cannot be
  that gateway: it refuses to map behind a reserved address (open_series's
  docstring);
- outer gateway: miniupnpd 2.3.1 (PCP; UPnP only; or none), external 11.0.0.1.

Apps and the CLI run in the inner lan namespace; the proof is a connection
from the wan host 11.0.0.2.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import Lab, NatServer, Series, Variant, open_series
from tests.conftest import _require_lab
from tests.lab.helpers import connect_from_wan, listen_in_lan

pytestmark = pytest.mark.lab

AGENT = Path(__file__).with_name("nested_agent.py")
PORTBROKER = [sys.executable, "-m", "portbroker.cli"]
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Series, NatServer]]:
    _require_lab()
    with open_series(
        Variant.NONE, Variant.FULL, workdir=tmp_path_factory.mktemp("double-nat")
    ) as built:
        yield built, built.inner.start_nat_server()


def cli(inner: Lab, *args: str, state: Path) -> subprocess.CompletedProcess[str]:
    argv = inner.exec_argv(
        inner.lan_ns,
        [
            *PORTBROKER,
            *args,
            "--gateway",
            str(inner.gateway_address),
            "--methods",
            "pcp,natpmp",
            "--state-file",
            str(state),
        ],
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_a_gateway_behind_a_cgn_is_not_publicly_reachable(
    series: tuple[Series, NatServer], tmp_path: Path
) -> None:
    built, server = series
    inner = built.inner
    state = tmp_path / "state.json"
    done = cli(inner, "probe", "--json", state=state)
    assert done.returncode == 0, done.stderr
    natpmp = json.loads(done.stdout)["methods"]["natpmp"]
    assert natpmp["external_address"] == "100.64.0.2"
    assert natpmp["public"] is False
    assert "RFC 6598" in natpmp["reachability"]
    text = cli(inner, "probe", state=state)
    assert "not publicly reachable: 100.64.0.2 is in the shared address space" in text.stdout
    port = 27001
    with listen_in_lan(inner, port) as listener:
        done = cli(inner, "map", f"{port}/tcp", "--json", "--lifetime", "600", state=state)
        assert done.returncode == 0, done.stderr
        mapped = json.loads(done.stdout)
        assert (mapped["external_address"], mapped["public"]) == ("100.64.0.2", False)
        assert "carrier-grade NAT" in mapped["reachability"]
        # The mapping is real, but only the outer NAT's lan can use it.
        assert _connect(inner.wan_ns, listener, ("100.64.0.2", mapped["external_port"]))
        assert not _connect(built.wan_ns, listener, ("11.0.0.1", mapped["external_port"]))
        done = cli(inner, "unmap", f"{port}/tcp", state=state)
        assert done.returncode == 0, done.stderr
    assert server.mappings == {}
    print(
        f"\ndouble NAT: inner mapping 100.64.0.2:{mapped['external_port']}: {mapped['reachability']}"
    )


def test_mapped_through_both_nats_with_the_outer_pcp_server_from_dhcp(
    series: tuple[Series, NatServer], tmp_path: Path
) -> None:
    built, server = series
    inner, outer = built.labs
    port = 27011
    # The outer PCP server as DHCP would announce it (RFC 7291 option 158:
    # List-Length 4, 100.64.0.1).
    lease = tmp_path / "dhclient.leases"
    lease.write_text('lease {\n  interface "wan0";\n  option unknown-158 4:64:40:0:1;\n}\n')
    with listen_in_lan(inner, port) as listener:
        assert not _connect(built.wan_ns, listener, ("11.0.0.1", port))
        started = time.monotonic()
        with _agent(inner, port, "-", str(lease)) as agent:
            reachability = _next(agent, "ReachabilityChanged")
            assert (reachability["layer"], reachability["public"]) == ("inner broker", False)
            mapped = _next(agent, "Mapped")
            took = time.monotonic() - started
            assert mapped["inner_external"] == f"100.64.0.2:{port}"
            assert mapped["inner_public"] is False
            assert str(mapped["outer_server"]) == str(outer.gateway_address) == "100.64.0.1"
            assert mapped["outer_source"] == f"DHCPv4 option 158 in {lease} (wan0)"
            assert (mapped["external_address"], mapped["public"]) == ("11.0.0.1", True)
            assert mapped["outer_method"] == "pcp"
            assert "100.64.0.2" in outer.nft_rules()  # the outer miniupnpd's DNAT
            # In from the wan host, through both NATs.
            received = connect_from_wan(outer, listener, mapped["external_port"])
            assert received == b"inside says hello", outer.log_text()
            assert agent.stdin is not None
            agent.stdin.close()
            released = {_next(agent, "Released")["layer"], _next(agent, "Released")["layer"]}
            assert released == {"inner", "outer"}
            _next(agent, "Done")
        assert not _connect(built.wan_ns, listener, ("11.0.0.1", mapped["external_port"]))
    assert server.mappings == {}
    assert "100.64.0.2" not in outer.nft_rules()
    print(
        f"\ndouble NAT: 192.168.77.2:{port} -> {mapped['inner_external']} -> "
        f"11.0.0.1:{mapped['external_port']} in {took:.2f} s; inbound from 11.0.0.2 OK"
    )


def _connect(netns: str, listener: socket.socket, target: tuple[str, int]) -> bool:
    """Does a connection from *netns* to *target* reach *listener*?"""
    outside = _socket_in(netns)
    with outside:
        outside.settimeout(3)
        try:
            outside.connect(target)
        except (ConnectionRefusedError, TimeoutError, OSError):
            return False
        inside, _peer = listener.accept()
        inside.close()
        return True


def _socket_in(netns: str) -> socket.socket:
    from portbroker.testing.lab import in_netns

    return in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


@contextmanager
def _agent(inner: Lab, port: int, outer: str, *leases: str) -> Iterator[subprocess.Popen[str]]:
    argv = inner.exec_argv(
        inner.lan_ns,
        [sys.executable, str(AGENT), str(inner.gateway_address), str(port), outer, *leases],
    )
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            if process.stdin is not None and not process.stdin.closed:
                process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


_BUFFERS: dict[int, bytearray] = {}


def _next(
    process: subprocess.Popen[str], wanted: str, timeout: float = 60.0, *, allow_error: bool = False
) -> dict[str, Any]:
    """The agent's next *wanted* event; fails (never hangs) after *timeout*.

    Reads the pipe's file descriptor itself: a text-mode ``readline`` after
    ``select`` may pull several lines into Python's buffer, where ``select``
    no longer sees them, and the next wait would time out with the event read.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = _BUFFERS.setdefault(process.pid, bytearray())
    deadline = time.monotonic() + timeout
    seen: list[str] = []  # for the failure message
    while True:
        while b"\n" not in buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {wanted} from the agent within {timeout:g} s; saw {seen}")
            chunk = os.read(fd, 65536)
            if not chunk:
                assert process.stderr is not None
                raise AssertionError(f"agent ended before {wanted}: {process.stderr.read()}")
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        event: dict[str, Any] = json.loads(line)
        seen.append(json.dumps(event))
        if event["event"] == "Error" and not allow_error:
            raise AssertionError(f"agent: {event}")
        if event["event"] == wanted:
            return event


def test_cli_map_hold_through_both_nats(series: tuple[Series, NatServer]) -> None:
    """``portbroker map --hold --outer-gateway``: both mappings, a connection in
    from the wan host, both deleted on SIGTERM."""
    built, server = series
    inner, outer = built.labs
    port = 27021
    argv = inner.exec_argv(
        inner.lan_ns,
        [
            *PORTBROKER,
            "map",
            f"{port}/tcp",
            "--hold",
            "--json",
            "--gateway",
            str(inner.gateway_address),
            "--methods",
            "pcp,natpmp",
            "--outer-gateway",
            str(outer.gateway_address),
            "--lifetime",
            "600",
        ],
    )
    with listen_in_lan(inner, port) as listener:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        try:
            first = _next(process, "Acquired")
            assert first["inner"]["public"] is False
            assert (first["outer"]["external_address"], first["outer"]["public"]) == (
                "11.0.0.1",
                True,
            )
            assert first["outer"]["internal_address"] == "100.64.0.2"
            external_port = first["outer"]["external_port"]
            assert connect_from_wan(outer, listener, external_port) == b"inside says hello"
            process.send_signal(signal.SIGTERM)
            _next(process, "Released")
            assert process.wait(timeout=30) == 0
            assert process.stderr is not None
            # Both deletes answered: no "delete failed", nothing left pending.
            assert process.stderr.read() == ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        assert not _connect(built.wan_ns, listener, ("11.0.0.1", external_port))
    assert server.mappings == {}
    assert "100.64.0.2" not in outer.nft_rules()


def test_an_outer_nat_without_pcp_or_upnp_is_said_clearly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A router behind an ISP modem (outer lan 192.168.1.0/24) that is a plain
    NAT, no PCP, no UPnP: probe says the router's 192.168.1.2 is private, the
    nested mapping fails with the reasons, and the inner mapping it made first
    is deleted again."""
    _require_lab()
    with open_series(
        Variant.NONE,
        Variant.NONE,
        outer_lan=IPv4Network("192.168.1.0/24"),
        workdir=tmp_path_factory.mktemp("double-nat-modem"),
    ) as modem:
        inner, outer = modem.labs
        server = inner.start_nat_server()
        # The router behind an ISP modem reports its 192.168.1.2 (RFC 1918).
        done = cli(inner, "probe", "--json", state=tmp_path_factory.mktemp("s") / "s")
        natpmp = json.loads(done.stdout)["methods"]["natpmp"]
        assert (natpmp["external_address"], natpmp["public"]) == ("192.168.1.2", False)
        assert "private address (RFC 1918)" in natpmp["reachability"]
        asked = server.requests
        with _agent(inner, 27031, str(outer.gateway_address)) as agent:
            error = _next(agent, "Error", allow_error=True)
            assert error["kind"] in ("NoMethodAvailable", "MethodUnavailable"), error
            assert "pcp: port 5351 closed" in error["message"]  # ICMP from 192.168.1.1
            assert "upnp" in error["message"]
            _next(agent, "Done")
        # The inner mapping was made (a MAP) and deleted again (another).
        assert server.requests - asked >= 2
        assert server.mappings == {}


def test_reachability_follows_the_reported_address(series: tuple[Series, NatServer]) -> None:
    """The inner gateway's reported address moves from shared to global and back
    (announced by NAT-PMP, RFC 6886 §3.2.1): each move is an
    ExternalAddressChanged, then a ReachabilityChanged saying which way."""
    built, server = series
    inner = built.inner
    try:
        with _agent(inner, 27041, "none") as agent:
            _next(agent, "Mapped")
            first = _next(agent, "ReachabilityChanged")  # right after Acquired
            assert (first["external_address"], first["public"]) == ("100.64.0.2", False)
            server.set_reported_address(IPv4Address("11.0.0.9"))  # public, for the test's sake
            moved = _announced(agent, server, "ExternalAddressChanged")
            assert moved["external_address"] == "11.0.0.9"
            public = _next(agent, "ReachabilityChanged")
            assert (public["public"], public["reason"]) == (True, None)
            server.set_reported_address(inner.external_address)  # 100.64.0.2 again
            _announced(agent, server, "ExternalAddressChanged")
            shared = _next(agent, "ReachabilityChanged")
            assert shared["public"] is False
            assert "RFC 6598" in shared["reason"]
    finally:
        server.reported_address = None
    assert server.mappings == {}


def _announced(
    agent: subprocess.Popen[str], server: NatServer, wanted: str, tries: int = 20
) -> dict[str, Any]:
    """The agent's next *wanted* event after the server's announcement, which is
    repeated (as RFC 6886 §3.2.1 has gateways do) until it is heard: a client
    confirms at most one hint per 2 s (docs/architecture.md)."""
    for _ in range(tries):
        try:
            return _next(agent, wanted, timeout=1.0)
        except TimeoutError:
            server.announce()
    raise AssertionError(f"no {wanted} after {tries} announcements")


def test_through_an_outer_nat_with_upnp_only(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A router behind an ISP modem that speaks UPnP IGD only (miniupnpd 2.3.1,
    UPnP only): the nested mapping finds the modem's IGD by a unicast search
    and maps the router's external endpoint (NewInternalClient 192.168.1.2,
    which is where our requests come from, so secure mode allows it); the wan
    host gets in through both NATs."""
    _require_lab()
    with open_series(
        Variant.NONE,
        Variant.UPNP_ONLY,
        outer_lan=IPv4Network("192.168.1.0/24"),
        workdir=tmp_path_factory.mktemp("double-nat-upnp"),
    ) as modem:
        inner, outer = modem.labs
        server = inner.start_nat_server()
        port = 27061
        with listen_in_lan(inner, port) as listener:
            with _agent(inner, port, str(outer.gateway_address)) as agent:
                mapped = _next(agent, "Mapped")
                assert mapped["inner_external"] == f"192.168.1.2:{port}"
                assert "RFC 1918" in mapped["inner_reason"]
                assert (mapped["external_address"], mapped["public"]) == ("11.0.0.1", True)
                assert mapped["outer_method"] == "upnp"
                received = connect_from_wan(outer, listener, mapped["external_port"])
                assert received == b"inside says hello", outer.log_text()
                assert agent.stdin is not None
                agent.stdin.close()
                _next(agent, "Done")
            assert not _connect(modem.wan_ns, listener, ("11.0.0.1", mapped["external_port"]))
        assert "DeletePortMapping" in outer.log_text()
        assert server.mappings == {}
