"""Review 12b: this host's own address, however spelled, is one claim (and this host's).

An IPv6 address may carry a scope (``fe80::5%eth0``, Python keeps it, and
getsockname gives one for a link-local source); the gateway never sees it (the
wire has 16 bytes), so an address that differs only in its scope names the
same host and the same gateway entry. Memory links and FakeGateway only.
"""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
import trio
import trio.testing

from portbroker import p2p
from portbroker.broker import open_broker
from portbroker.daemon.protocol import Request
from portbroker.daemon.server import _is_this_host, _third_party_params
from portbroker.errors import AlreadyMapped
from portbroker.lifecycle import State
from portbroker.p2p import InterfaceAddress
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.testing.fake_network import FakeNetwork
from portbroker.types import IPAddress, MappingRequest
from tests.broker_harness import wait_for
from tests.test_roaming import A, B, gateways


def test_a_scope_on_an_internal_address_is_dropped() -> None:
    # It means nothing to the gateway, and UPnP would send it as text.
    request = MappingRequest(22, "tcp", internal_address="2001:db8::5%eth0")
    assert request.internal_address == IPv6Address("2001:db8::5")
    assert "%" not in str(request.internal_address)


def test_this_hosts_own_address_with_a_scope_keeps_the_privileged_port_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # getifaddrs gives addresses without a scope: "2001:db8::5%eth0" was no
    # address of this host's, so a third-party-group member mapped this host's
    # port 22 past the privileged-port rule (the wire drops the scope).
    own = InterfaceAddress("eth0", 2, IPv6Address("2001:db8::5"), 64)
    monkeypatch.setattr(p2p, "interface_addresses", lambda: [own])
    for text in ("2001:db8::5%eth0", "2001:db8::5%2", "2001:db8::5"):
        address, _filters = _third_party_params(
            Request("map", 1, {"port": 22, "internal_address": text})
        )
        assert address is not None
        assert _is_this_host(address), text


async def test_the_transports_link_local_address_without_its_scope_is_one_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with open_broker(
        "127.0.0.1",
        ("pcp",),
        link_factory=gateway.link_factory("fe80::5%eth0"),
        announce_port=None,
        seed=7,
    ) as broker:
        (transport,) = broker._method_set.transports.values()
        # getsockname gives a link-local source with its scope.
        assert str(transport.link.local_address) == "fe80::5%eth0"
        for spelled in ("fe80::5", "fe80::5%eth0", "fe80::5%2"):
            # map() and peer() take it through _own_as_none: one claim with none.
            request = broker._own_as_none(MappingRequest(8080, "tcp", internal_address=spelled))
            assert request.internal_address is None, spelled


def test_the_clis_third_party_host_is_spelled_as_the_daemon_keeps_it() -> None:
    # unmap --third-party compares it with the daemon's internal_address.
    from portbroker.cli import _third_party

    assert _third_party("fe80::5%eth0") == "fe80::5"


async def test_after_a_move_a_held_mapping_for_the_new_own_address_and_none_are_one_claim(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On gateway a this host is 192.168.1.100, and 10.0.0.5 another address
    # (its other interface); on b, 10.0.0.5 is its address toward the gateway.
    # The mapping made for 10.0.0.5 and a map with none name one entry on b.
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)
    gw_a, gw_b = gateways()
    client: dict[IPAddress, str] = {A: "192.168.1.100", B: "10.0.0.5"}
    by_address: dict[IPAddress, FakeGateway] = {A: gw_a, B: gw_b}

    async def factory(address: IPAddress, _port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        return by_address[address].memory_link(client[address])

    network = FakeNetwork.routed_via(A)
    async with open_broker(
        None,
        ("pcp",),
        link_factory=factory,
        announce_port=None,
        seed=7,
        dhcp_leases=(),
        network_monitor=network,
        follow_settle=0,
    ) as broker:
        held = await broker.map(8080, "tcp", internal_address="10.0.0.5")
        network.route_via(B)
        await wait_for(
            lambda: held.state is State.ACTIVE and held.lease.gateway == B  # type: ignore[union-attr]
        )
        with pytest.raises(AlreadyMapped):
            await broker.map(8080, "tcp")
        assert held.state is State.ACTIVE
