"""The lab's topologies: a bridged lan with several hosts, wan sources, address changes.

Each feature of :mod:`portbroker.testing.lab` that other lab tests build on
is proven here with plain sockets and the wire codecs (no broker): a packet
from outside that arrives inside, or an announcement a lan host receives.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

import attrs
import pytest

from portbroker.testing.lab import (
    EXTERNAL_ADDRESS,
    EXTERNAL_ADDRESS6,
    GATEWAY_ADDRESS6,
    LAN_ADDRESS6,
    WAN_ADDRESS,
    WAN_ADDRESS6,
    Lab,
    LabError,
    LanHost,
    NatServer,
    Series,
    Sites,
    Variant,
    exchange,
    open_lab,
    open_series,
    open_sites,
)
from portbroker.wire import natpmp, pcp
from tests.conftest import _require_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One full gateway for the module's tests that do not change it (distinct ports)."""
    _require_lab()
    with open_lab(workdir=tmp_path_factory.mktemp("topology")) as built:
        yield built


def _listen(lab: Lab, host: LanHost, port: int) -> socket.socket:
    listener = lab.socket(host.ns, kind=socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(host.address), port))
    listener.listen()
    listener.settimeout(5)
    return listener


def _pcp_map(lab: Lab, host: LanHost, port: int, *, lifetime: int = 600) -> pcp.PcpResponse:
    """PCP MAP (RFC 6887 §11) of TCP *port* from *host*; the gateway's answer."""
    request = pcp.PcpRequest(
        pcp.Opcode.MAP,
        lifetime,
        host.address,
        pcp.MapData(secrets.token_bytes(12), socket.IPPROTO_TCP, port, port),
    )
    with lab.socket(host.ns) as udp:
        udp.connect((str(lab.gateway_address), 5351))
        response = exchange(udp, pcp.encode_request(request), pcp.decode_response)
    assert response.result_code is pcp.ResultCode.SUCCESS, response
    assert isinstance(response.data, pcp.MapData)
    return response


def _connect_in(
    lab: Lab, ns: str, listener: socket.socket, external: tuple[str, int], source: str = ""
) -> tuple[str, bytes]:
    """Connect from *ns* (bound to *source*) to *external*; (peer seen inside, bytes received)."""
    outside = lab.socket(ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(5)
        if source:
            outside.bind((source, 0))
        outside.connect(external)
        inside, peer = listener.accept()
        with inside:
            inside.sendall(b"hello from " + str(listener.getsockname()[0]).encode())
            return peer[0], outside.recv(100)


def test_the_lan_is_a_bridge_holding_the_gateway_address(lab: Lab) -> None:
    links = lab.exec_argv(lab.gw_ns, ["ip", "-d", "link", "show", lab.gw_lan_if])
    shown = subprocess.run(links, capture_output=True, text=True, check=True).stdout
    assert "bridge" in shown
    assert lab.lan_hosts[0] == LanHost(lab.lan_ns, IPv4Address("192.168.77.2"), lab.lan_if)
    assert lab.gateway_address == IPv4Address("192.168.77.1")
    config = lab.config_path.read_text()
    assert f"listening_ip={lab.gw_lan_if}\n" in config
    assert f'iifname "{lab.gw_lan_if}" accept' in lab.nft_rules()


def test_a_mapping_to_a_second_lan_host_is_reached_from_wan(lab: Lab) -> None:
    second = lab.add_lan_host()
    assert second.address == IPv4Address("192.168.77.3")
    assert second.ns != lab.lan_ns
    port = 23001
    with _listen(lab, second, port) as listener:
        mapped = _pcp_map(lab, second, port)
        assert isinstance(mapped.data, pcp.MapData)
        external = (str(lab.external_address), mapped.data.external_port)
        peer, received = _connect_in(lab, lab.wan_ns, listener, external)
    assert peer == str(WAN_ADDRESS)
    assert received == b"hello from 192.168.77.3"
    # The two lan hosts share the bridge: host 1 reaches host 2 directly.
    with _listen(lab, second, port + 1) as listener:
        peer, _ = _connect_in(lab, lab.lan_ns, listener, (str(second.address), port + 1))
    assert peer == str(lab.lan_address)


def test_multicast_crosses_the_lan_bridge(lab: Lab) -> None:
    """mDNS (224.0.0.251:5353) from one lan host reaches another: DNS-SD tests need it."""
    first = lab.lan_hosts[0]
    other = lab.lan_hosts[1] if len(lab.lan_hosts) > 1 else lab.add_lan_host()
    group = "224.0.0.251"
    with lab.socket(other.ns) as receiver, lab.socket(first.ns) as sender:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        receiver.bind((group, 5353))
        membership = socket.inet_aton(group) + socket.inet_aton(str(other.address))
        receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        receiver.settimeout(5)
        sender.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(first.address))
        )
        sender.sendto(b"mdns-ish", (group, 5353))
        data, source = receiver.recvfrom(100)
    assert (data, source[0]) == (b"mdns-ish", str(first.address))


def test_two_distinct_wan_sources_reach_a_mapping(lab: Lab) -> None:
    extra = lab.add_wan_address()
    other = lab.add_wan_host("far")
    assert (extra, other.address) == (IPv4Address("11.0.0.3"), IPv4Address("11.0.0.4"))
    port = 23011
    host = lab.lan_hosts[0]
    with _listen(lab, host, port) as listener:
        mapped = _pcp_map(lab, host, port)
        assert isinstance(mapped.data, pcp.MapData)
        external = (str(lab.external_address), mapped.data.external_port)
        seen = {
            _connect_in(lab, lab.wan_ns, listener, external)[0],
            _connect_in(lab, lab.wan_ns, listener, external, source=str(extra))[0],
            _connect_in(lab, other.ns, listener, external)[0],
        }
    assert seen == {"11.0.0.2", "11.0.0.3", "11.0.0.4"}


def test_bad_host_names_and_addresses_are_refused(lab: Lab) -> None:
    with pytest.raises(LabError, match="lowercase"):
        lab.add_lan_host("Bad/Name")
    with pytest.raises(LabError, match="in use"):
        lab.add_wan_address(WAN_ADDRESS)
    with pytest.raises(LabError, match="not a host address"):
        lab.set_external_address(IPv4Address("12.0.0.5"))


def _announcements(sock: socket.socket, want: Callable[[list[bytes]], bool]) -> list[bytes]:
    received: list[bytes] = []
    sock.settimeout(5)
    while not want(received):
        received.append(sock.recv(2048))
    return received


def test_set_external_address_is_announced_and_mappings_follow(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = lab_factory()
    listener_host = lab.add_lan_host()
    port = 23021
    with _listen(lab, lab.lan_hosts[0], port) as listener:
        mapped = _pcp_map(lab, lab.lan_hosts[0], port)
        assert isinstance(mapped.data, pcp.MapData)
        assert mapped.data.external_address == EXTERNAL_ADDRESS
        # RFC 6886 §3.2.1 / RFC 6887 §14.1: the gateway multicasts both to
        # 224.0.0.1:5350 on the lan; a second lan host hears them.
        multicast = lab.socket(listener_host.ns)
        with multicast:
            multicast.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            multicast.bind(("224.0.0.1", 5350))
            new = IPv4Address("11.0.0.5")
            lab.set_external_address(new)
            assert lab.external_address == new

            def decoded(data: list[bytes]) -> tuple[set[IPv4Address], bool]:
                natpmp_addresses = set()
                pcp_announce = False
                for datagram in data:
                    if datagram[0] == natpmp.VERSION:
                        answer = natpmp.decode_response(datagram)
                        assert isinstance(answer, natpmp.ExternalAddressResponse)
                        natpmp_addresses.add(answer.external_address)
                    else:
                        response = pcp.decode_response(datagram)
                        pcp_announce |= response.opcode is pcp.Opcode.ANNOUNCE
                return natpmp_addresses, pcp_announce

            heard = _announcements(
                multicast, lambda got: new in decoded(got)[0] and decoded(got)[1]
            )
        assert decoded(heard)[1]
        with lab.socket(lab.lan_ns) as udp:
            udp.connect((str(lab.gateway_address), 5351))
            answer = exchange(
                udp, natpmp.encode_request(natpmp.ExternalAddressRequest()), natpmp.decode_response
            )
        assert isinstance(answer, natpmp.ExternalAddressResponse)
        assert answer.external_address == new
        # The mapping made before the change is reached at the new address.
        peer, received = _connect_in(
            lab, lab.wan_ns, listener, (str(new), mapped.data.external_port)
        )
        assert (peer, received) == (str(WAN_ADDRESS), b"hello from 192.168.77.2")
        # A MAP now reports the new address.
        again = _pcp_map(lab, lab.lan_hosts[0], port)
        assert isinstance(again.data, pcp.MapData)
        assert again.data.external_address == new
    assert "RTM_DELADDR" in lab.log_text()


# -- IPv6 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A full gateway with the ULA prefixes (``ipv6=True``)."""
    _require_lab()
    with open_lab(workdir=tmp_path_factory.mktemp("topology6"), ipv6=True) as built:
        yield built


def _listen6(lab: Lab, ns: str, address: IPv6Address, port: int) -> socket.socket:
    listener = lab.socket(ns, socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind((str(address), port))
    listener.listen()
    listener.settimeout(5)
    return listener


def test_ipv6_addresses_are_ula_and_not_tentative(lab6: Lab) -> None:
    host = lab6.lan_hosts[0]
    assert (host.address6, lab6.gateway_address6) == (LAN_ADDRESS6, GATEWAY_ADDRESS6)
    assert (lab6.wan_hosts[0].address6, lab6.external_address6) == (WAN_ADDRESS6, EXTERNAL_ADDRESS6)
    assert lab6.add_lan_host().address6 == IPv6Address("fd77::3")
    for ns in (lab6.lan_ns, lab6.gw_ns, lab6.wan_ns):
        shown = subprocess.run(
            ["ip", "-n", ns, "-6", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert "tentative" not in shown
    routes = subprocess.run(
        ["ip", "-6", "route", "show", "type", "blackhole"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "fd77::/64" in routes
    assert "fd11::/64" in routes
    assert "ipv6_disable=no\n" in lab6.config_path.read_text()


def test_ipv6_inbound_is_dropped_until_a_pinhole_opens_it(lab6: Lab) -> None:
    port = 24001
    host = lab6.lan_hosts[0]
    assert host.address6 is not None
    with _listen6(lab6, host.ns, host.address6, port) as listener:
        outside = lab6.socket(lab6.wan_ns, socket.AF_INET6, socket.SOCK_STREAM)
        with outside:
            # Dropped by the forward chain's policy, not refused: no RST comes back.
            outside.settimeout(1)
            with pytest.raises(TimeoutError):
                outside.connect((str(host.address6), port))
        # A PCP MAP over IPv6 (RFC 6887 §11) makes miniupnpd insert a pinhole
        # into the `miniupnpd` chain; then the same connection gets through.
        request = pcp.PcpRequest(
            pcp.Opcode.MAP,
            600,
            host.address6,
            pcp.MapData(
                secrets.token_bytes(12),
                socket.IPPROTO_TCP,
                port,
                port,
                pcp.no_preference(IPv6Address("::1")),
            ),
        )
        with lab6.socket(host.ns, socket.AF_INET6) as udp:
            udp.connect((str(lab6.gateway_address6), 5351))
            response = exchange(udp, pcp.encode_request(request), pcp.decode_response)
        assert response.result_code is pcp.ResultCode.SUCCESS, lab6.log_text()
        assert isinstance(response.data, pcp.MapData)
        assert response.data.external_address == host.address6
        pinholes = lab6.nft_rules()
        assert f'iif "{lab6.gw_wan_if}" th dport {port}' in pinholes
        outside = lab6.socket(lab6.wan_ns, socket.AF_INET6, socket.SOCK_STREAM)
        with outside:
            outside.settimeout(5)
            outside.connect((str(host.address6), port))
            inside, peer = listener.accept()
            inside.close()
        assert peer[0] == str(WAN_ADDRESS6)
        delete = attrs.evolve(request, lifetime=0)
        with lab6.socket(host.ns, socket.AF_INET6) as udp:
            udp.connect((str(lab6.gateway_address6), 5351))
            exchange(udp, pcp.encode_request(delete), pcp.decode_response)


def test_ipv6_outbound_is_routed_not_translated(lab6: Lab) -> None:
    port = 24011
    with _listen6(lab6, lab6.wan_ns, WAN_ADDRESS6, port) as listener:
        inside = lab6.socket(lab6.lan_ns, socket.AF_INET6, socket.SOCK_STREAM)
        with inside:
            inside.settimeout(5)
            inside.connect((str(WAN_ADDRESS6), port))
            accepted, peer = listener.accept()
            accepted.close()
    assert peer[0] == str(LAN_ADDRESS6)


# -- two sites -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    _require_lab()
    with open_sites(workdir=tmp_path_factory.mktemp("sites")) as built:
        yield built


def test_two_sites_share_the_wan_and_b_reaches_a_mapping_on_a(sites: Sites) -> None:
    a, b = sites.labs
    assert (a.external_address, b.external_address) == (EXTERNAL_ADDRESS, IPv4Address("11.0.0.3"))
    assert (a.lan_address, b.lan_address) == (
        IPv4Address("192.168.77.2"),
        IPv4Address("192.168.78.2"),
    )
    assert a.wan_ns == b.wan_ns == sites.wan_ns
    assert a.gw_ns != b.gw_ns
    port = 25001
    with _listen(a, a.lan_hosts[0], port) as listener:
        mapped = _pcp_map(a, a.lan_hosts[0], port)
        assert isinstance(mapped.data, pcp.MapData)
        assert mapped.data.external_address == EXTERNAL_ADDRESS
        # From site b's lan host, through b's NAT, to a's wan address.
        peer, received = _connect_in(
            b, b.lan_ns, listener, (str(a.external_address), mapped.data.external_port)
        )
    assert peer == str(b.external_address)
    assert received == b"hello from 192.168.77.2"
    # Both gateways run their own miniupnpd on their own lan.
    assert a.miniupnpd_pid != b.miniupnpd_pid
    assert f"listening_ip={b.gw_lan_if}" in b.config_path.read_text()
    assert "allow 1024-65535 192.168.78.0/24 1024-65535" in b.config_path.read_text()


def test_two_sites_reach_the_rendezvous_host(sites: Sites) -> None:
    port = 25011
    with sites.socket(sites.wan_ns, kind=socket.SOCK_STREAM) as server:
        server.bind((str(sites.wan_address), port))
        server.listen()
        server.settimeout(5)
        seen = set()
        for site in sites.labs:
            with site.socket(site.lan_ns, kind=socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect((str(sites.wan_address), port))
                accepted, peer = server.accept()
                accepted.close()
                seen.add(peer[0])
    assert seen == {"11.0.0.1", "11.0.0.3"}


# -- two NATs in series --------------------------------------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Series]:
    _require_lab()
    with open_series(
        Variant.FULL, Variant.FULL, workdir=tmp_path_factory.mktemp("series")
    ) as built:
        yield built


def test_series_inner_lan_reaches_the_wan_through_both_nats(series: Series) -> None:
    inner, outer = series.labs
    assert inner.external_address == IPv4Address("100.64.0.2")
    assert inner.wan_ns == outer.gw_ns
    assert outer.lan_hosts[0].ns == inner.gw_ns
    port = 26001
    with series.socket(series.wan_ns, kind=socket.SOCK_STREAM) as server:
        server.bind((str(series.wan_address), port))
        server.listen()
        server.settimeout(5)
        with inner.socket(inner.lan_ns, kind=socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect((str(series.wan_address), port))
            accepted, peer = server.accept()
            accepted.close()
    # Translated twice: 192.168.77.2 -> 100.64.0.2 -> 11.0.0.1.
    assert peer[0] == str(outer.external_address) == "11.0.0.1"


def test_series_inner_miniupnpd_refuses_behind_a_shared_address(series: Series) -> None:
    """The docstring's finding: miniupnpd 2.3.1 will not map behind 100.64.0.2."""
    inner, outer = series.labs
    assert "Port forwarding is impossible" in inner.log_text()
    with inner.socket(inner.lan_ns) as udp:
        udp.connect((str(inner.gateway_address), 5351))
        answer = exchange(
            udp, natpmp.encode_request(natpmp.ExternalAddressRequest()), natpmp.decode_response
        )
    assert answer.result_code is natpmp.ResultCode.NETWORK_FAILURE
    # The outer gateway's miniupnpd serves the inner gateway, its lan host.
    with outer.socket(inner.gw_ns) as udp:
        udp.connect((str(outer.gateway_address), 5351))
        answer = exchange(
            udp, natpmp.encode_request(natpmp.ExternalAddressRequest()), natpmp.decode_response
        )
    assert isinstance(answer, natpmp.ExternalAddressResponse)
    assert answer.external_address == outer.external_address


def test_series_dnat_on_both_gateways_lets_the_wan_in(series: Series) -> None:
    inner, outer = series.labs
    port = 26011
    with _listen(inner, inner.lan_hosts[0], port) as listener:
        inner.add_dnat("tcp", port + 1, inner.lan_address, port)
        outer.add_dnat("tcp", port + 2, inner.external_address, port + 1)
        peer, received = _connect_in(
            outer, series.wan_ns, listener, (str(outer.external_address), port + 2)
        )
        assert (peer, received) == (str(series.wan_address), b"hello from 192.168.77.2")
        outer.remove_dnat("tcp", port + 2, inner.external_address, port + 1)
        with pytest.raises(ConnectionRefusedError):
            _connect_in(outer, series.wan_ns, listener, (str(outer.external_address), port + 2))
    with pytest.raises(LabError, match="protocol"):
        inner.add_dnat("sctp", 1, inner.lan_address, 1)


@pytest.fixture(scope="module")
def series_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Series, NatServer]]:
    """Double NAT whose inner gateway runs the lab's NatServer instead of miniupnpd."""
    _require_lab()
    with open_series(
        Variant.NONE, Variant.FULL, workdir=tmp_path_factory.mktemp("series-served")
    ) as built:
        yield built, built.inner.start_nat_server()


def test_nat_server_maps_behind_a_shared_address_and_reports_it(
    series_served: tuple[Series, NatServer],
) -> None:
    series, server = series_served
    inner, outer = series.labs
    host = inner.lan_hosts[0]
    with inner.socket(host.ns) as udp:
        udp.connect((str(inner.gateway_address), 5351))
        answer = exchange(
            udp, natpmp.encode_request(natpmp.ExternalAddressRequest()), natpmp.decode_response
        )
    assert answer == natpmp.ExternalAddressResponse(0, answer.epoch, IPv4Address("100.64.0.2"))
    port = 27001
    with _listen(inner, host, port) as listener:
        mapped = _pcp_map(inner, host, port)
        assert isinstance(mapped.data, pcp.MapData)
        assert mapped.data.external_address == IPv4Address("100.64.0.2")
        inner_external = mapped.data.external_port
        assert server.mappings[("tcp", host.address, port)].external_port == inner_external
        # From the outer gateway's lan (the inner gateway is its only host,
        # so from the outer gw namespace itself): the inner mapping works.
        peer, _ = _connect_in(
            outer, outer.gw_ns, listener, (str(inner.external_address), inner_external)
        )
        assert peer == str(outer.gateway_address)
        # Through both NATs: the inner gateway maps its external port on the
        # outer one (miniupnpd, PCP), then the wan host connects in.
        outer_host = outer.lan_hosts[0]
        request = pcp.PcpRequest(
            pcp.Opcode.MAP,
            600,
            outer_host.address,
            pcp.MapData(secrets.token_bytes(12), socket.IPPROTO_TCP, inner_external, 0),
        )
        with outer.socket(outer_host.ns) as udp:
            udp.connect((str(outer.gateway_address), 5351))
            outer_mapped = exchange(udp, pcp.encode_request(request), pcp.decode_response)
        assert outer_mapped.result_code is pcp.ResultCode.SUCCESS, outer.log_text()
        assert isinstance(outer_mapped.data, pcp.MapData)
        assert outer_mapped.data.external_address == outer.external_address
        peer, received = _connect_in(
            outer,
            series.wan_ns,
            listener,
            (str(outer.external_address), outer_mapped.data.external_port),
        )
        assert (peer, received) == (str(series.wan_address), b"hello from 192.168.77.2")
        # A PCP delete removes the inner mapping and its nftables rule.
        delete = pcp.PcpRequest(
            pcp.Opcode.MAP,
            0,
            host.address,
            pcp.MapData(mapped.data.nonce, socket.IPPROTO_TCP, port, 0),
        )
        with inner.socket(host.ns) as udp:
            udp.connect((str(inner.gateway_address), 5351))
            deleted = exchange(udp, pcp.encode_request(delete), pcp.decode_response)
        assert (deleted.result_code, deleted.lifetime) == (pcp.ResultCode.SUCCESS, 0)
        assert server.mappings == {}
        with pytest.raises(ConnectionRefusedError):
            _connect_in(outer, outer.gw_ns, listener, (str(inner.external_address), inner_external))


def test_nat_server_announces_a_new_reported_address(
    series_served: tuple[Series, NatServer],
) -> None:
    series, server = series_served
    inner = series.inner
    listener_host = inner.lan_hosts[0]
    with inner.socket(listener_host.ns) as multicast:
        multicast.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        multicast.bind(("224.0.0.1", 5350))
        multicast.settimeout(5)
        server.set_reported_address(IPv4Address("192.168.1.2"))
        try:
            first = natpmp.decode_response(multicast.recv(100))
            second = pcp.decode_response(multicast.recv(100))
        finally:
            server.reported_address = None
    assert isinstance(first, natpmp.ExternalAddressResponse)
    assert first.external_address == IPv4Address("192.168.1.2")
    assert second.opcode is pcp.Opcode.ANNOUNCE


def test_nat_server_announces_the_gateway_s_new_wan_address(
    series_served: tuple[Series, NatServer],
) -> None:
    series, _server = series_served
    inner = series.inner
    with inner.socket(inner.lan_ns) as multicast:
        multicast.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        multicast.bind(("224.0.0.1", 5350))
        multicast.settimeout(5)
        inner.set_external_address(IPv4Address("100.64.0.9"))
        try:
            announced = natpmp.decode_response(multicast.recv(100))
        finally:
            inner.set_external_address(IPv4Address("100.64.0.2"))
    assert isinstance(announced, natpmp.ExternalAddressResponse)
    assert announced.external_address == IPv4Address("100.64.0.9")


def test_nat_server_natpmp_map_and_delete(series_served: tuple[Series, NatServer]) -> None:
    series, server = series_served
    inner, outer = series.labs
    host = inner.lan_hosts[0]
    port = 27011
    with _listen(inner, host, port) as listener, inner.socket(host.ns) as udp:
        udp.connect((str(inner.gateway_address), 5351))

        def call(request: natpmp.NatPmpRequest) -> natpmp.NatPmpResponse:
            return exchange(udp, natpmp.encode_request(request), natpmp.decode_response)

        mapped = call(natpmp.MapRequest(natpmp.Opcode.MAP_TCP, port, port, 600))
        assert isinstance(mapped, natpmp.MapResponse)
        assert (mapped.result_code, mapped.lifetime) == (0, 600)
        external = (str(inner.external_address), mapped.external_port)
        assert _connect_in(outer, outer.gw_ns, listener, external)[1] == b"hello from 192.168.77.2"
        deleted = call(natpmp.MapRequest(natpmp.Opcode.MAP_TCP, port, 0, 0))
        assert isinstance(deleted, natpmp.MapResponse)
        assert (deleted.result_code, deleted.external_port, deleted.lifetime) == (0, 0, 0)
        assert ("tcp", host.address, port) not in server.mappings
        with pytest.raises(ConnectionRefusedError):
            _connect_in(outer, outer.gw_ns, listener, external)
