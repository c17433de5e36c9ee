"""Gateway discovery from routing-table text (never the machine's own table)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from portbroker.gateway import (
    ENV_GATEWAY,
    parse_ipv6_route,
    parse_macos_route,
    parse_proc_net_route,
    resolve_gateway,
)

PROC_NET_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
wlan0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
"""

IPV6_ROUTE = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fe800000000000000000000000000001 00000400 00000001 00000000 00450003 eth0\n"
    "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n"
)


def test_lowest_metric_default_route_wins() -> None:
    assert parse_proc_net_route(PROC_NET_ROUTE) == IPv4Address("10.0.0.1")


def test_no_default_route() -> None:
    assert parse_proc_net_route(PROC_NET_ROUTE.splitlines()[0] + "\n") is None


def test_ipv6_default_router() -> None:
    # A link-local router is reachable only with its interface as the scope.
    found = parse_ipv6_route(IPV6_ROUTE)
    assert found == IPv6Address("fe80::1%eth0")
    assert found is not None
    assert found.scope_id == "eth0"


def test_a_gateway_may_be_written_in_brackets() -> None:
    assert resolve_gateway("[fd77::1]") == IPv6Address("fd77::1")
    assert resolve_gateway(" fd77::1 ") == IPv6Address("fd77::1")
    assert resolve_gateway("fe80::1%eth0") == IPv6Address("fe80::1%eth0")


def test_a_link_local_gateway_without_its_interface_is_refused_with_the_remedy() -> None:
    with pytest.raises(ValueError, match=r"link-local: name its interface \(fe80::1%eth0\)"):
        resolve_gateway("fe80::1")


def test_macos_route_output() -> None:
    text = "   route to: default\ndestination: default\n    gateway: 192.168.1.254\n"
    assert parse_macos_route(text) == IPv4Address("192.168.1.254")


def test_explicit_gateway_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_GATEWAY, "192.168.9.9")
    assert resolve_gateway("127.0.0.1") == IPv4Address("127.0.0.1")
    assert resolve_gateway() == IPv4Address("192.168.9.9")


@pytest.mark.parametrize("bad", ["gateway.lan", "0.0.0.0", "224.0.0.1", "1.2.3"])
def test_unusable_gateways_are_value_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="gateway"):
        resolve_gateway(bad)
