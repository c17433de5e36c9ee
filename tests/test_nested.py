"""open_nested_mapping: a mapping through two NATs, on two FakeGateways in
memory (the inner one behind the outer one's CGN address; docs/double-nat.md).
The lab proves it with real NATs: tests/lab/test_lab_double_nat.py."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
import trio.testing

from portbroker.broker import Broker, open_broker
from portbroker.errors import MethodUnavailable
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Failed,
    ReachabilityChanged,
    Released,
)
from portbroker.nested import NestedEvent, open_nested_mapping
from portbroker.reachability import AddressKind
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.types import IPAddress
from portbroker.wire import pcp
from tests.broker_harness import wait_for

# Memory links only: nothing is sent to 100.64.0.1.
INNER, OUTER = IPv4Address("127.0.0.1"), IPv4Address("100.64.0.1")


class TwoNats:
    """The inner fake at 127.0.0.1 (external: an address on the outer's lan),
    the outer at 100.64.0.1 (external 11.0.0.1), which sees our requests come
    from the inner's external address, as a real NAT makes it."""

    def __init__(self) -> None:
        self.inner = FakeGateway(address=INNER, external_address="100.64.0.2")
        self.outer = FakeGateway(address=OUTER, external_address="11.0.0.1")

    async def link(self, address: IPAddress, _port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        if address == OUTER:
            return self.outer.memory_link(self.inner.external_address)
        return self.inner.memory_link("192.168.77.2")

    def broker(self) -> AbstractAsyncContextManager[Broker]:
        return open_broker(INNER, ("pcp", "natpmp"), link_factory=self.link, announce_port=None)


def _drain(channel: trio.MemoryReceiveChannel[NestedEvent]) -> list[NestedEvent]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_maps_through_both_and_deletes_both(autojump_clock: trio.testing.MockClock) -> None:
    nats = TwoNats()
    async with (
        open_broker(INNER, ("pcp", "natpmp"), link_factory=nats.link, announce_port=None) as inner,
        open_nested_mapping(
            inner,
            8080,
            "tcp",
            outer_gateway=OUTER,
            outer_methods=("pcp",),
            outer_options={"link_factory": nats.link},
        ) as nested,
    ):
        assert nested.inner.reachability.kind is AddressKind.SHARED
        assert nested.reachability.public
        assert (str(nested.external_address), nested.external_port) == ("11.0.0.1", 8080)
        assert nested.outer_server_source == "configured (--pcp-server)"
        held = nats.outer.mapping_for("tcp", nested.inner.external_port)
        assert held is not None
        assert str(held.internal_address) == "100.64.0.2"  # the inner's external endpoint
        request = [r for r in nats.outer.requests if isinstance(r, pcp.PcpRequest)][-1]
        assert str(request.client_address) == "100.64.0.2"  # RFC 6887 §8.1
        events = nested.events()
        first = _drain(events)
        assert [(e.layer, type(e.event)) for e in first] == [
            ("inner", Acquired),
            ("inner", ReachabilityChanged),
            ("outer", Acquired),
        ]
        # Both renewed by their own brokers.
        await trio.sleep(3 * 3600)
        assert nats.inner.mapping_for("tcp", 8080) is not None
        assert nats.outer.mapping_for("tcp", 8080) is not None
    assert nats.inner.mappings == {}
    assert nats.outer.mappings == {}
    rest = _drain(events)
    assert ("outer", Released) in [(e.layer, type(e.event)) for e in rest]
    assert ("inner", Released) in [(e.layer, type(e.event)) for e in rest]


async def test_the_inner_endpoint_moves(autojump_clock: trio.testing.MockClock) -> None:
    """The inner NAT's address changes: the outer mapping is made again for the
    new endpoint (a new client address), the old one deleted."""
    nats = TwoNats()
    async with (
        open_broker(INNER, ("pcp", "natpmp"), link_factory=nats.link, announce_port=None) as inner,
        open_nested_mapping(
            inner,
            9000,
            "udp",
            outer_gateway=OUTER,
            outer_methods=("pcp",),
            outer_options={"link_factory": nats.link},
        ) as nested,
    ):
        events = nested.events()
        await trio.sleep(10)
        await nats.inner.change_external_address("100.64.0.9")
        await wait_for(
            lambda: any(
                str(m.internal_address) == "100.64.0.9" for m in nats.outer.mappings.values()
            ),
            600,
        )
        assert [str(m.internal_address) for m in nats.outer.mappings.values()] == ["100.64.0.9"]
        await wait_for(lambda: nested.outer is not None, 60)
        assert nested.reachability.public
        kinds = [(e.layer, type(e.event)) for e in _drain(events)]
        assert ("inner", ExternalAddressChanged) in kinds
        assert kinds.count(("outer", Acquired)) == 2  # the replay, then the new one
        assert ("outer", Released) in kinds


async def test_the_inner_mapping_fails_for_good(autojump_clock: trio.testing.MockClock) -> None:
    """The inner NAT restarts and refuses to map again: the outer mapping, which
    would forward the Internet to an inner port now free for any other host,
    is deleted at once, not renewed for as long as the block lasts."""
    nats = TwoNats()
    async with (
        nats.broker() as inner,
        open_nested_mapping(
            inner,
            8084,
            outer_gateway=OUTER,
            outer_methods=("pcp",),
            outer_options={"link_factory": nats.link},
        ) as nested,
    ):
        events = nested.events()
        nats.inner.forced_result = pcp.ResultCode.NOT_AUTHORIZED
        nats.inner.forced_natpmp_result = 2  # NOT_AUTHORIZED (RFC 6886 §3.5)
        nats.inner.reset()
        await wait_for(lambda: nats.outer.mappings == {}, 5 * 3600)
        kinds = [(e.layer, type(e.event)) for e in _drain(events)]
        assert ("inner", Failed) in kinds
        assert kinds[-1] == ("outer", Released)
        assert nested.outer is None


async def test_no_outer_server_is_a_clear_error(tmp_path: Path) -> None:
    nats = TwoNats()
    async with nats.broker() as inner:
        with pytest.raises(ValueError, match="no outer NAT: name it"):
            async with open_nested_mapping(inner, 8080):
                pass
        lease = tmp_path / "l"
        lease.write_text("lease {\n  option unknown-158 4:64:40:0:1;\n}\n")
        async with open_nested_mapping(
            inner,
            8081,
            dhcp_leases=[lease],
            outer_methods=("pcp",),
            outer_options={"link_factory": nats.link},
        ) as nested:
            assert nested.outer_server == OUTER
            assert nested.outer_server_source.startswith("DHCPv4 option 158 in")


async def test_a_lease_of_the_other_family_is_no_outer_server(tmp_path: Path) -> None:
    """Only a DHCPv6-announced server for an IPv4 inner external address: a
    clear error, not PCP sent to the inner NAT's own external address."""
    nats = TwoNats()
    lease = tmp_path / "l6"
    lease.write_text("lease6 {\n  option dhcp6.v6-pcp-server 2001:db8::1;\n}\n")
    async with nats.broker() as inner:
        with pytest.raises(ValueError, match="announce no IPv4 PCP server for the inner"):
            async with open_nested_mapping(
                inner,
                8083,
                dhcp_leases=[lease],
                outer_methods=("pcp",),
                outer_options={"link_factory": nats.link},
            ):
                pass
        assert nats.inner.mappings == {}


async def test_an_outer_refusal_deletes_the_inner_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nats = TwoNats()
    nats.outer.pcp_enabled = False  # an outer NAT without PCP: silence
    nats.outer.closed = True
    async with nats.broker() as inner:
        with pytest.raises(MethodUnavailable):
            async with open_nested_mapping(
                inner,
                8082,
                outer_gateway=OUTER,
                outer_methods=("pcp",),
                outer_options={"link_factory": nats.link},
            ):
                pass
        assert nats.inner.mapping_for("tcp", 8082) is None
        assert inner.mappings == frozenset()


async def test_cancelled_around_it_both_deletes_are_answered(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A scope cancelled around the block (the CLI's SIGTERM) still gets both
    deletes answered: the outer broker's transport is not cancelled under it."""
    nats = TwoNats()
    async with nats.broker() as inner:
        with trio.CancelScope() as scope:
            async with open_nested_mapping(
                inner,
                8090,
                outer_gateway=OUTER,
                outer_methods=("pcp",),
                outer_options={"link_factory": nats.link},
            ):
                assert nats.outer.mapping_for("tcp", 8090) is not None
                scope.cancel()
                await trio.sleep_forever()
        assert nats.outer.mappings == {}
        assert nats.inner.mappings == {}
    assert not [r for r in caplog.records if "delete" in r.getMessage()], caplog.text


async def test_outer_methods_must_name_another_address() -> None:
    nats = TwoNats()
    async with nats.broker() as inner:
        with pytest.raises(ValueError, match="NAT-PMP maps only for the sender"):
            async with open_nested_mapping(
                inner, 8095, outer_gateway=OUTER, outer_methods=("natpmp",)
            ):
                pass
        assert nats.inner.mappings == {}
