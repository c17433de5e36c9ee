"""RFC 7291 PCP server discovery: the option codecs, dhclient lease files, the
choice (explicit, then DHCP, then the gateway), open_broker's use of it, and
the PCP client address override (docs/double-nat.md).

Every lease file here is a fixture in tests/data/dhcp or a temp file: the
machine's own leases are never read.
"""

from __future__ import annotations

import calendar
import re
import shutil
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import portbroker.broker
from portbroker.errors import MethodUnavailable
from portbroker.gateway import choose_pcp_server, discover_pcp_servers
from portbroker.pcp_discovery import (
    PcpServer,
    decode_v4_option,
    decode_v6_option,
    parse_dhclient_leases,
)
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.types import IPAddress
from portbroker.wire import pcp
from portbroker.wire._fields import to_address
from tests.broker_harness import broker_for
from tests.realdata import realdata

# 2026-12-01 14:45 UTC: inside the fixtures' current leases.
NOW = float(calendar.timegm((2026, 12, 1, 14, 45, 0, 0, 0, 0)))
V4 = IPv4Address


def test_v4_option_one_server() -> None:
    assert decode_v4_option(bytes([4, 100, 64, 0, 1])) == ((V4("100.64.0.1"),),)


def test_v4_option_several_lists_are_several_servers() -> None:
    body = bytes([8, 100, 64, 0, 3, 100, 64, 0, 4, 4, 192, 0, 2, 1])
    assert decode_v4_option(body) == (
        (V4("100.64.0.3"), V4("100.64.0.4")),  # one server, two addresses
        (V4("192.0.2.1"),),
    )


def test_v4_option_drops_unusable_addresses() -> None:
    body = bytes([12, 0, 0, 0, 0, 224, 0, 0, 1, 100, 64, 0, 9, 4, 255, 255, 255, 255])
    assert decode_v4_option(body) == ((V4("100.64.0.9"),),)


def test_loopback_pcp_servers_are_discarded(tmp_path: Path) -> None:
    """RFC 7291 §3.2 / §4.2: a DHCP client MUST silently discard host loopback
    addresses: a lease (or a rogue DHCP server) naming 127.0.0.1 or ::1 must
    not make us send PCP to a service on this host."""
    assert decode_v4_option(bytes([8, 127, 0, 0, 1, 100, 64, 0, 9, 4, 127, 9, 9, 9])) == (
        (V4("100.64.0.9"),),
    )
    assert decode_v6_option(IPv6Address("::1").packed) == ()
    assert decode_v6_option(IPv6Address("::ffff:127.0.0.1").packed) == ()
    text = (
        'lease {\n  interface "eth0";\n  option unknown-158 4:7f:0:0:1;\n}\n'
        'lease6 {\n  interface "eth0";\n  option dhcp6.v6-pcp-server ::1,::ffff:127.0.0.2;\n}\n'
    )
    assert parse_dhclient_leases(text, source="l", now=NOW) == ([], [])
    lease = tmp_path / "dhclient.leases"
    lease.write_text(text)
    choice = choose_pcp_server(None, to_address("192.168.1.1"), discover_pcp_servers([lease]))
    assert choice.source == "the gateway"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (bytes([4, 1, 2, 3]), "at least 5"),
        (bytes([5, 1, 2, 3, 4, 5]), "multiple of 4"),
        (bytes([0, 1, 2, 3, 4]), "multiple of 4"),
        (bytes([8, 1, 2, 3, 4]), "past the option's end"),
        (bytes([4, 1, 2, 3, 4, 4, 1, 2]), "past the option's end"),
    ],
)
def test_v4_option_malformed(body: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_v4_option(body)


def test_v6_option() -> None:
    body = IPv6Address("2001:db8::158").packed + IPv6Address("::ffff:100.64.0.1").packed
    assert decode_v6_option(body) == (IPv6Address("2001:db8::158"), V4("100.64.0.1"))
    assert decode_v6_option(IPv6Address("::").packed + IPv6Address("ff02::1").packed) == ()
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_v6_option(b"\x20\x01" * 7 + b"\x00")


def test_dhclient_the_last_lease_of_each_interface_counts() -> None:
    path = realdata("dhcp", "dhclient.eth0.leases")
    servers, problems = parse_dhclient_leases(path.read_text(), source=str(path), now=NOW)
    assert problems == []
    assert [s.addresses for s in servers] == [
        (V4("100.64.0.2"),),
        (V4("100.64.0.3"), V4("100.64.0.4")),
    ]
    assert servers[0].source == f"DHCPv4 option 158 in {path} (eth0)"


def test_dhclient_an_expired_lease_says_nothing() -> None:
    path = realdata("dhcp", "dhclient.eth0.leases")
    later = float(calendar.timegm((2026, 12, 1, 15, 11, 0, 0, 0, 0)))
    assert parse_dhclient_leases(path.read_text(), source="x", now=later) == ([], [])
    # No clock given: taken as it is.
    assert len(parse_dhclient_leases(path.read_text(), source="x")[0]) == 2


def test_dhclient6_unknown_86() -> None:
    path = realdata("dhcp", "dhclient6.eth0.leases")
    servers, problems = parse_dhclient_leases(path.read_text(), source="v6", now=NOW)
    assert problems == []
    assert servers == [PcpServer((IPv6Address("2001:db8::158"),), "DHCPv6 option 86 in v6 (eth0)")]


def test_networkmanager_dhclient_backend_with_a_defined_option() -> None:
    # "option pcp-server code 158 = text;" in dhclient.conf: a quoted string
    # with octal escapes; "expire epoch N".
    path = realdata("dhcp", "dhclient-4f0ecf4e-3b2a-4c1d-9a55-0b1c2d3e4f50-enp1s0.lease")
    servers, _ = parse_dhclient_leases(path.read_text(), source="nm", now=NOW)
    assert [s.addresses for s in servers] == [(V4("192.168.1.1"),)]
    assert servers[0].source.endswith("(enp1s0)")
    expired, _ = parse_dhclient_leases(path.read_text(), source="nm", now=1796266904.0)
    assert expired == []


def test_dhclient_malformed_option_is_discarded_and_said() -> None:
    text = (
        'lease {\n  interface "wlan0";\n  option unknown-158 5:64:40:0:1:2;\n}\n'
        'lease {\n  interface "eth1";\n  option unknown-158 4:a:0:0:1;\n}\n'
        "lease6 {\n  option dhcp6.unknown-86 20:1:d;\n}\n"
    )
    servers, problems = parse_dhclient_leases(text, source="f", now=NOW)
    assert [s.addresses for s in servers] == [(V4("10.0.0.1"),)]
    assert len(problems) == 2
    assert problems[0].startswith("f (wlan0): option unknown-158 discarded:")
    assert "multiple of 4" in problems[0]
    assert "multiple of 16" in problems[1]


def test_dhclient_garbage_is_no_lease() -> None:
    for text in ("", "}}}{{{", 'lease { option unknown-158 "', "option unknown-158 4:1:2:3:4;"):
        assert parse_dhclient_leases(text, source="g", now=NOW)[0] == []


def test_discover_reads_directories_and_skips_the_unreadable(tmp_path: Path) -> None:
    shutil.copy(realdata("dhcp", "dhclient.eth0.leases"), tmp_path / "a.leases")
    shutil.copy(realdata("dhcp", "dhclient6.eth0.leases"), tmp_path / "b.leases")
    found = discover_pcp_servers([tmp_path, tmp_path / "missing.leases"], now=NOW)
    assert [s.addresses[0] for s in found] == [
        V4("100.64.0.2"),
        V4("100.64.0.3"),
        IPv6Address("2001:db8::158"),
    ]


def test_choice_order() -> None:
    gateway = to_address("192.168.1.1")
    dhcp = [
        PcpServer((IPv6Address("2001:db8::158"),), "v6 lease"),
        PcpServer((V4("100.64.0.2"),), "v4 lease"),
    ]
    # Explicit wins over DHCP.
    explicit = choose_pcp_server("10.9.9.9", gateway, dhcp)
    assert (str(explicit.address), explicit.source) == ("10.9.9.9", "configured (--pcp-server)")
    # Then the first DHCP server of the gateway's family.
    learned = choose_pcp_server(None, gateway, dhcp)
    assert (learned.address, learned.source) == (V4("100.64.0.2"), "v4 lease")
    # Then the gateway.
    assert choose_pcp_server(None, gateway, dhcp[:1]).address == gateway
    assert choose_pcp_server(None, gateway).source == "the gateway"
    with pytest.raises(ValueError, match="pcp_server"):
        choose_pcp_server("224.0.0.1", gateway)


def test_a_lease_naming_this_host_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A PCP server at one of this host's own addresses is ignored (said),
    as a loopback one is: we would map on whatever listens on our port 5351."""
    import portbroker.p2p
    from portbroker.p2p import InterfaceAddress

    own = [
        InterfaceAddress("eth0", 2, "192.168.1.100", 24),
        InterfaceAddress("eth0", 2, "fe80::5", 64),
    ]
    monkeypatch.setattr(portbroker.p2p, "interface_addresses", lambda: own)
    lease = tmp_path / "dhclient.leases"
    lease.write_text(
        'lease {\n  interface "eth0";\n  option unknown-158 8:c0:a8:1:64:64:40:0:1;\n}\n'
        'lease6 {\n  interface "eth0";\n  option dhcp6.v6-pcp-server fe80::5;\n}\n'
    )
    found = discover_pcp_servers([lease], now=NOW)
    assert [s.addresses for s in found] == [(V4("100.64.0.1"),)]
    assert "names this host's own address; ignored" in caplog.text


def test_a_link_local_server_gets_its_interface() -> None:
    """DHCPv6 on eth0 naming fe80::1: usable only as fe80::1%eth0."""
    text = 'lease6 {\n  interface "eth0";\n  option dhcp6.v6-pcp-server fe80::1;\n}\n'
    servers, _ = parse_dhclient_leases(text, source="l", now=NOW)
    assert [str(a) for a in servers[0].addresses] == ["fe80::1%eth0"]
    choice = choose_pcp_server(None, to_address("fe80::2%eth0"), servers)
    assert str(choice.address) == "fe80::1%eth0"


def test_of_several_interfaces_the_default_routes_lease_wins(tmp_path: Path) -> None:
    """Leases on Wi-Fi and on the wire, each with a PCP server: the one whose
    routers include the gateway (the default route's network) is used,
    whichever file sorts first; without such a lease, the first one."""
    (tmp_path / "dhclient-1111-wlan0.lease").write_text(
        'lease {\n  interface "wlan0";\n  option routers 10.1.0.1;\n'
        "  option unknown-158 4:a:1:0:2;\n}\n"
    )
    (tmp_path / "dhclient-2222-eth0.lease").write_text(
        'lease {\n  interface "eth0";\n  option routers 192.168.1.1, 192.168.1.254;\n'
        "  option unknown-158 4:64:40:0:1;\n}\n"
    )
    found = discover_pcp_servers([tmp_path], now=NOW)
    wired = choose_pcp_server(None, to_address("192.168.1.254"), found)
    assert (str(wired.address), wired.source.endswith("(eth0)")) == ("100.64.0.1", True)
    wifi = choose_pcp_server(None, to_address("10.1.0.1"), found)
    assert str(wifi.address) == "10.1.0.2"
    other = choose_pcp_server(None, to_address("172.16.0.1"), found)
    assert str(other.address) == "10.1.0.2"  # the first file's


@pytest.mark.parametrize(
    ("spelling", "why"),
    [
        ("255.255.255.255", "255.255.255.255 cannot be a gateway"),  # broadcast
        ("ff02::1", "ff02::1 cannot be a gateway"),
        ("0.0.0.0", "0.0.0.0 cannot be a gateway"),
        ("127.0.0.1:5351", "'127.0.0.1:5351' is not an IP address"),
        ("", "'' is not an IP address"),
        ("fe80::1", "fe80::1 is link-local: name its interface"),
    ],
)
def test_a_bad_pcp_server_is_said_before_anything_is_sent(spelling: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"^pcp_server: {re.escape(why)}"):
        choose_pcp_server(spelling, to_address("192.168.1.1"))


def _recording(gateway: FakeGateway, seen: list[IPAddress]) -> Any:
    factory = gateway.link_factory()

    async def record(address: IPAddress, port: int) -> MemoryLink:
        seen.append(address)
        return await factory(address, port)

    return record


async def test_open_broker_uses_the_dhcp_server_for_pcp(tmp_path: Path) -> None:
    lease = tmp_path / "dhclient.leases"
    # A memory link: nothing is sent to 100.64.0.5.
    lease.write_text('lease {\n  interface "lan0";\n  option unknown-158 4:64:40:0:5;\n}\n')
    gateway = FakeGateway()
    seen: list[IPAddress] = []
    async with portbroker.broker.open_broker(
        "127.0.0.1",
        ("pcp", "natpmp"),
        link_factory=_recording(gateway, seen),
        announce_port=None,
        dhcp_leases=[lease],
    ) as broker:
        assert broker.pcp_server.address == V4("100.64.0.5")
        assert broker.pcp_server.source == f"DHCPv4 option 158 in {lease} (lan0)"
        mapping = await broker.map(7100, "udp", via="pcp")
        assert mapping.lease is not None
        assert mapping.lease.gateway == V4("100.64.0.5")  # the PCP server's lease
    # PCP went to the announced server, NAT-PMP to the gateway (RFC 6886).
    assert seen == [V4("100.64.0.5"), V4("127.0.0.1")]
    # An explicit --pcp-server wins over the lease.
    async with broker_for(gateway, dhcp_leases=[lease], pcp_server="127.0.0.7") as broker:
        assert broker.pcp_server.address == V4("127.0.0.7")


async def test_a_named_gateway_reads_no_system_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object, **_kwargs: object) -> list[PcpServer]:
        raise AssertionError("read lease files")

    monkeypatch.setattr(portbroker.broker, "discover_pcp_servers", forbidden)
    async with broker_for(FakeGateway()) as broker:
        assert broker.pcp_server.source == "the gateway"
    monkeypatch.setenv("PORTBROKER_GATEWAY", "127.0.0.1")
    async with portbroker.broker.open_broker(
        None, ("pcp",), link_factory=FakeGateway().link_factory(), announce_port=None
    ) as broker:
        assert broker.pcp_server.source == "the gateway"
    async with broker_for(FakeGateway(), dhcp_leases=()) as broker:
        assert broker.pcp_server.source == "the gateway"


async def test_the_default_route_reads_the_system_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[object] = []

    def discover(sources: object) -> list[PcpServer]:
        asked.append(sources)
        return [PcpServer((V4("127.0.0.9"),), "a system lease")]

    # Never the real default route: the resolved "default" is the fake's.
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)
    monkeypatch.setattr(portbroker.broker, "resolve_gateway", lambda _g: V4("127.0.0.1"))
    monkeypatch.setattr(portbroker.broker, "discover_pcp_servers", discover)
    seen: list[IPAddress] = []
    async with portbroker.broker.open_broker(
        None, ("pcp",), link_factory=_recording(FakeGateway(), seen), announce_port=None
    ) as broker:
        assert broker.pcp_server.source == "a system lease"
    assert asked == [None]
    assert seen == [V4("127.0.0.9")]


@attrs.define(eq=False)
class _BehindNat(MemoryLink):
    """A link whose host address (192.168.1.100) is not the source the
    server sees (100.64.0.9): another NAT lies between them."""

    @property
    def local_address(self) -> IPAddress:
        return V4("192.168.1.100")


async def test_pcp_client_address_is_what_the_server_sees() -> None:
    gateway = FakeGateway()

    async def behind(_address: IPAddress, _port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        return _BehindNat(gateway, V4("100.64.0.9"))

    # Without the override the server sees a mismatch (RFC 6887 §8.1).
    async with portbroker.broker.open_broker(
        "127.0.0.1", ("pcp",), link_factory=behind, announce_port=None
    ) as broker:
        with pytest.raises(MethodUnavailable, match="ADDRESS_MISMATCH"):
            await broker.map(7200, "tcp", via="pcp")
    async with portbroker.broker.open_broker(
        "127.0.0.1",
        ("pcp",),
        link_factory=behind,
        announce_port=None,
        pcp_client_address="100.64.0.9",
    ) as broker:
        mapping = await broker.map(7200, "tcp", via="pcp")
        assert mapping.internal_address == V4("100.64.0.9")
        request = gateway.requests[-1]
        assert isinstance(request, pcp.PcpRequest)
        assert request.client_address == V4("100.64.0.9")
        assert not any(isinstance(o, pcp.ThirdParty) for o in request.options)


def test_dhclient_quoted_form_of_an_unknown_option() -> None:
    # dhclient also prints an undefined option as a quoted string with octal
    # escapes (seen for Azure's unknown-245 as "\250?\201\020"): 0x04 'd' '@'
    # 0x00 0x01 is List-Length 4, 100.64.0.1.
    text = 'lease {\n  interface "eth0";\n  option unknown-158 "\\004d@\\000\\001";\n}\n'
    servers, problems = parse_dhclient_leases(text, source="q", now=NOW)
    assert problems == []
    assert [s.addresses for s in servers] == [(V4("100.64.0.1"),)]
    # "expire never" is no expiry.
    never = text.replace("}\n", "  expire never;\n}\n")
    assert len(parse_dhclient_leases(never, source="q", now=NOW)[0]) == 1


def test_a_fifo_or_a_device_is_no_lease_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--dhcp-leases naming a fifo (or a symlink to /dev/zero) must not block
    the command for ever, nor read without end: each is skipped, and said."""
    import os
    import threading

    fifo = tmp_path / "fifo.leases"
    os.mkfifo(fifo)
    (tmp_path / "zero.leases").symlink_to("/dev/zero")
    found: list[list[PcpServer]] = []
    reader = threading.Thread(
        target=lambda: found.append(
            discover_pcp_servers([fifo, tmp_path / "zero.leases"], now=NOW)
        ),
        daemon=True,
    )
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): a writer releases it
        with open(fifo, "wb"):
            pass
        reader.join(30)
        pytest.fail("reading a fifo blocked")
    assert found == [[]]
    said = caplog.text
    assert f"cannot read {fifo}: {fifo} is not a regular file" in said
    assert "zero.leases is not a regular file" in said


def test_a_huge_lease_file_is_read_from_its_tail(tmp_path: Path) -> None:
    """A lease file grown by years of renewals: its last MiB holds the current
    lease, read from the first whole block in it."""
    from portbroker import gateway

    old = 'lease {\n  interface "eth0";\n  option unknown-158 4:64:40:0:1;\n}\n'
    current = 'lease {\n  interface "eth0";\n  option unknown-158 4:64:40:0:9;\n}\n'
    path = tmp_path / "dhclient.leases"
    path.write_text(old * (2 * gateway.MAX_LEASE_FILE // len(old)) + current)
    assert [s.addresses for s in discover_pcp_servers([path], now=NOW)] == [(V4("100.64.0.9"),)]


def test_an_unterminated_string_is_read_in_one_pass() -> None:
    """A truncated or garbage file of ``\\"``: every quote opened a string that
    never closed and was tried again to the end, quadratic (hours for a MiB,
    holding the GIL). Now the unterminated string runs to the end of the file
    and is discarded. In a child process, so that a hang fails the test."""
    import subprocess
    import sys

    script = (
        "from portbroker.pcp_discovery import parse_dhclient_leases\n"
        "text = 'lease {\\n  option unknown-158 \"' + '\\\\\"' * 200_000\n"
        "print(parse_dhclient_leases(text, source='t', now=0))\n"
        "print(parse_dhclient_leases(text + '\";\\n}\\n', source='t', now=0))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("parsing an unterminated string did not end")
    assert done.returncode == 0, done.stderr
    unclosed, closed = done.stdout.splitlines()
    assert unclosed == "([], [])"  # no lease block ended: nothing, and nothing said
    assert closed.startswith("([], ['t (?): option unknown-158 discarded")
