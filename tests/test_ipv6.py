"""IPv6: PCP MAP as a firewall pinhole, NAT-PMP ruled out, families kept apart (docs/ipv6.md).

Memory links under MockClock for the broker, and one real UDP exchange on ::1
for the socket family. No traffic leaves the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
import trio
import trio.testing

from portbroker.broker import open_broker
from portbroker.errors import MappingError
from portbroker.methods import pcp_rules
from portbroker.probe import NoMethodAvailable
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.transport import Transport
from portbroker.types import IPAddress, Lease, TransportProtocol, format_endpoint
from portbroker.wire import natpmp, pcp
from tests.broker_harness import HOUR
from tests.conftest import first_line

GATEWAY6 = IPv6Address("fd77::1")
HOST6 = IPv6Address("fd77::2")


def _v6_gateway() -> FakeGateway:
    return FakeGateway(address=GATEWAY6)


async def test_pcp_map_for_an_ipv6_host_is_a_pinhole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = _v6_gateway()
    async with open_broker(
        GATEWAY6,
        ("pcp", "natpmp"),
        link_factory=gw.link_factory(HOST6),
        announce_port=None,
        seed=7,
    ) as broker:
        mapping = await broker.map(8080, "tcp")
        lease = mapping.lease
        assert lease is not None
        assert lease.method == "pcp"
        # A firewall translates nothing (RFC 6887 §1): the external endpoint
        # is the host's own IPv6 address and port.
        assert (lease.internal_address, lease.internal_port) == (HOST6, 8080)
        assert (lease.external_address, lease.external_port) == (HOST6, 8080)
        assert lease.gateway == GATEWAY6
        request = gw.requests[0]
        assert isinstance(request, pcp.PcpRequest)
        assert request.client_address == HOST6  # the PCP header (RFC 6887 §7.1)
        assert request.data is not None
        assert request.data.external_address == pcp.NO_PREFERENCE_V6
        # It is renewed like any PCP mapping, with the same nonce.
        await trio.sleep(3 * HOUR)
        maps = [r for r in gw.requests if isinstance(r, pcp.PcpRequest) and r.data is not None]
        assert len(maps) >= 2
        assert {r.data.nonce for r in maps if r.data is not None} == {lease.nonce}
        assert gw.mapping_for("tcp", 8080) is not None
        await mapping.release()
        assert gw.mapping_for("tcp", 8080) is None
    assert not any(isinstance(r, natpmp.NatPmpRequest) for r in gw.requests)


async def test_natpmp_on_an_ipv6_gateway_is_unavailable_and_not_tried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = _v6_gateway()
    async with open_broker(
        GATEWAY6,
        ("natpmp", "pcp"),
        link_factory=gw.link_factory(HOST6),
        announce_port=None,
        seed=7,
    ) as broker:
        report = await broker.probe()
        outcome = report.outcome("natpmp")
        assert outcome is not None
        assert not outcome.available
        assert outcome.error is not None
        assert "IPv4 only" in outcome.error
        assert "RFC 6886" in outcome.error
        assert not outcome.silent  # a reason, not a timeout
        assert report.selected == "pcp"
        # NAT-PMP is preferred here, yet the map goes to PCP at once.
        mapping = await broker.map(9000, "udp")
        assert mapping.lease is not None
        assert mapping.lease.method == "pcp"
    assert gw.requests, "PCP was asked"
    assert not any(isinstance(r, natpmp.NatPmpRequest) for r in gw.requests)


async def test_natpmp_forced_on_an_ipv6_gateway_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = _v6_gateway()
    async with open_broker(
        GATEWAY6, ("natpmp",), link_factory=gw.link_factory(HOST6), announce_port=None
    ) as broker:
        with pytest.raises(NoMethodAvailable) as caught:
            await broker.map(9000, "udp")
    assert "IPv4 only" in str(caught.value)
    assert gw.requests == []


async def test_an_ipv6_internal_address_through_an_ipv4_pcp_server_is_refused_unsent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = FakeGateway()
    async with open_broker(
        "127.0.0.1",
        ("pcp",),
        link_factory=gw.link_factory("192.168.1.100"),
        announce_port=None,
    ) as broker:
        with pytest.raises(MappingError) as caught:
            await broker.map(8080, "tcp", internal_address=HOST6)
        assert "IPv6" in str(caught.value)
        assert "gateway's IPv6 address" in str(caught.value)
        # PCP is not ruled out for IPv4: the next map works.
        mapping = await broker.map(8080, "tcp")
        assert mapping.lease is not None
        assert mapping.lease.method == "pcp"
    maps = [r for r in gw.requests if isinstance(r, pcp.PcpRequest) and r.data is not None]
    assert all(r.client_address == IPv4Address("192.168.1.100") for r in maps)
    assert not any(isinstance(o, pcp.ThirdParty) for r in maps for o in r.options)


async def test_natpmp_refuses_an_ipv6_internal_address_for_that_request_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = FakeGateway()
    async with open_broker(
        "127.0.0.1",
        ("natpmp",),
        link_factory=gw.link_factory("192.168.1.100"),
        announce_port=None,
    ) as broker:
        with pytest.raises(MappingError, match="IPv4"):
            await broker.map(8080, "tcp", internal_address=HOST6)
        mapping = await broker.map(8080, "tcp")
        assert mapping.lease is not None
        assert mapping.lease.method == "natpmp"


def test_family_problem() -> None:
    v4, v6 = IPv4Address("192.168.77.2"), HOST6
    assert pcp_rules.family_problem(v4, None, v4) is None
    assert pcp_rules.family_problem(v6, v6, GATEWAY6) is None
    assert pcp_rules.family_problem(v6, IPv6Address("fd77::9"), GATEWAY6) is None
    problem = pcp_rules.family_problem(v4, v6, IPv4Address("192.168.77.1"))
    assert problem is not None
    assert "192.168.77.1" in problem
    assert "IPv6" in problem
    assert pcp_rules.family_problem(v6, v4, GATEWAY6) is not None


async def test_pcp_over_a_real_ipv6_socket_on_loopback() -> None:
    """open_udp_link picks AF_INET6 and PCP's Client IP Address is the socket's ::1."""
    gw = FakeGateway(address="::1", port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.serve_udp)
        with trio.fail_after(10):
            async with open_broker(
                "::1", ("pcp", "natpmp"), port=gw.port, announce_port=None
            ) as broker:
                report = await broker.probe()
        nursery.cancel_scope.cancel()
    pcp_outcome = report.outcome("pcp")
    assert pcp_outcome is not None
    assert pcp_outcome.available, pcp_outcome
    natpmp_outcome = report.outcome("natpmp")
    assert natpmp_outcome is not None
    assert not natpmp_outcome.available
    assert [type(r) for r in gw.requests] == [pcp.PcpRequest]
    request = gw.requests[0]
    assert isinstance(request, pcp.PcpRequest)
    assert request.client_address == IPv6Address("::1")


def test_format_endpoint_brackets_ipv6_only() -> None:
    assert format_endpoint(HOST6, 8080) == "[fd77::2]:8080"
    assert format_endpoint("fd77::2", 1) == "[fd77::2]:1"
    assert format_endpoint(IPv4Address("11.0.0.1"), 8080) == "11.0.0.1:8080"


def test_describe_lease_writes_ipv6_endpoints_in_brackets() -> None:
    from portbroker.cli import _describe_lease

    lease = Lease("pcp", TransportProtocol.TCP, HOST6, 8080, HOST6, 8080, 7200, 0.0, GATEWAY6)
    assert _describe_lease(lease) == (
        "[fd77::2]:8080/tcp -> [fd77::2]:8080 via pcp (lifetime 7200 s)"
    )


@pytest.mark.parametrize("gateway", ["::1", "[::1]"])
def test_cli_probe_of_an_ipv6_gateway(gateway: str, tmp_path: Path) -> None:
    """`portbroker probe --gateway ::1` against a FakeGateway process on ::1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "portbroker.testing.fake_gateway", "--address", "::1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = first_line(process, "the FakeGateway")
        assert line.startswith("port "), line
        argv = [
            *(sys.executable, "-m", "portbroker.cli", "probe", "--json"),
            *("--gateway", gateway, "--server-port", line.split()[1]),
            *("--methods", "pcp,natpmp", "--no-multicast"),
            *("--state-file", str(tmp_path / "state.json")),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["gateway"] == "::1"
    assert report["selected"] == "pcp"
    assert report["methods"]["natpmp"]["available"] is False
    assert "IPv4 only" in report["methods"]["natpmp"]["error"]


async def test_an_ipv6_pcp_server_beside_an_ipv4_gateway(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """pcp_server=fd77::1: PCP goes over IPv6 (pinholes), NAT-PMP to the IPv4 gateway."""
    gw4, gw6 = FakeGateway(), _v6_gateway()

    async def links(address: IPAddress, port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        if isinstance(address, IPv6Address):
            return gw6.memory_link(HOST6)
        return gw4.memory_link("192.168.1.100")

    async with open_broker(
        "127.0.0.1",
        ("pcp", "natpmp"),
        pcp_server=GATEWAY6,
        link_factory=links,
        announce_port=None,
    ) as broker:
        pinhole = await broker.map(8080, "tcp")
        assert pinhole.lease is not None
        assert pinhole.lease.gateway == GATEWAY6
        assert pinhole.lease.external_address == HOST6
        mapped = await broker.map(9000, "udp", via="natpmp")
        assert mapped.lease is not None
        assert mapped.lease.external_address == IPv4Address("203.0.113.7")
    assert all(isinstance(r, pcp.PcpRequest) for r in gw6.requests)
    assert all(isinstance(r, natpmp.NatPmpRequest) for r in gw4.requests)


class _ScopedLink:
    """A link to a link-local gateway, named with its zone as the kernel needs it."""

    local_address = IPv6Address("fe80::2%eth0")
    remote = (IPv6Address("fe80::1%eth0"), 5351)

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


@pytest.mark.parametrize("source", ["fe80::1%eth0", "fe80::1"])
def test_a_link_local_gateway_s_replies_are_its_own_with_or_without_the_zone(
    source: str,
) -> None:
    transport = Transport(_ScopedLink())
    assert transport._foreign((source, 5351)) is None
    assert transport._foreign(("fe80::9%eth0", 5351)) == "wrong source address"
    assert transport._foreign((source, 5350)) == "wrong source port"
