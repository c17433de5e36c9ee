"""portbroker.p2p: candidates and their changes, against FakeGateway in memory (MockClock).

The interface enumeration is replaced by a list the test edits (the seam);
one test reads the real one (getifaddrs) for the loopback it always has.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
import trio

from portbroker.errors import AlreadyMapped, PortBrokerError
from portbroker.lifecycle import State
from portbroker.p2p import (
    CHANGES_BUFFER,
    TYPE_PREFERENCE,
    Candidate,
    CandidateChange,
    CandidateKind,
    ChangeReason,
    InterfaceAddress,
    _inet6_flags,
    _is_public,
    build_candidates,
    host_addresses,
    interface_addresses,
    local_preference,
    open_candidates,
    priority,
)
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, TransportProtocol
from tests.broker_harness import HOUR, broker_for, wait_for

UDP = TransportProtocol.UDP
LAN = InterfaceAddress("eth0", 2, "192.168.1.100", 24)
GLOBAL6 = InterfaceAddress("eth0", 2, "2001:db8:1::100", 64)  # documentation: not public


class Addresses:
    """The enumeration seam, edited by the test."""

    def __init__(self, *entries: InterfaceAddress) -> None:
        self.entries = list(entries)
        self.reads = 0

    def __call__(self) -> list[InterfaceAddress]:
        self.reads += 1
        return list(self.entries)


class Changes:
    """Collects a gatherer's changes."""

    def __init__(self) -> None:
        self.seen: list[CandidateChange] = []

    async def run(self, stream: trio.MemoryReceiveChannel[CandidateChange]) -> None:
        async for change in stream:
            self.seen.append(change)

    def reasons(self) -> list[ChangeReason]:
        return [c.reason for c in self.seen]


def kinds(candidates: tuple[Candidate, ...]) -> list[tuple[str, str, int]]:
    return [(c.kind.value, str(c.address), c.port) for c in candidates]


def lease(external: str = "203.0.113.7", port: int = 40000, **kw: Any) -> Lease:
    fields: dict[str, Any] = {
        "method": "pcp",
        "protocol": UDP,
        "internal_address": "192.168.1.100",
        "internal_port": 5000,
        "external_address": external,
        "external_port": port,
        "lifetime": 7200,
        "granted_at": 10.0,
        "gateway": "192.168.1.1",
    }
    fields.update(kw)
    return Lease(**fields)


# -- priorities and the list, sans-IO ----------------------------------------------


def test_priority_is_rfc_8445_formula() -> None:
    # RFC 8445 §5.1.2.1: 2^24 type + 2^8 local + (256 - component)
    assert priority(CandidateKind.HOST, 65535, 1) == 126 * 2**24 + 65535 * 2**8 + 255
    assert priority(CandidateKind.SERVER_REFLEXIVE, 0, 2) == 100 * 2**24 + 254
    assert TYPE_PREFERENCE == {CandidateKind.HOST: 126, CandidateKind.SERVER_REFLEXIVE: 100}


@pytest.mark.parametrize(("local", "component"), [(-1, 1), (65536, 1), (0, 0), (0, 257)])
def test_priority_rejects_values_outside_rfc_ranges(local: int, component: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        priority(CandidateKind.HOST, local, component)


def test_local_preference_puts_public_then_ipv6_first_and_is_unique_by_rank() -> None:
    v4, v6 = IPv4Address("198.51.100.1"), IPv6Address("2001:db8::1")
    assert local_preference(True, v4, 0) > local_preference(False, v6, 0)
    assert local_preference(False, v6, 5) > local_preference(False, v4, 0)
    assert local_preference(False, v4, 0) > local_preference(False, v4, 1)
    assert local_preference(True, v6, 0) == 0xFFFF


def test_is_public_says_no_to_private_shared_documentation_and_ula() -> None:
    for text in ("10.0.0.1", "192.168.1.1", "100.64.0.1", "203.0.113.7", "fd00::1", "224.0.0.1"):
        assert not _is_public(ip_address(text)), text
    for text in ("11.0.0.1", "8.8.8.8", "2a00:1450::1"):
        assert _is_public(ip_address(text)), text


def test_host_addresses_skip_loopback_link_local_tentative_deprecated_and_mapped() -> None:
    entries = [
        InterfaceAddress("lo", 1, "127.0.0.1", 8, loopback=True),
        InterfaceAddress("lo", 1, "::1", 128, loopback=True),
        InterfaceAddress("eth0", 2, "fe80::1", 64),
        InterfaceAddress("eth0", 2, "169.254.3.4", 16),
        InterfaceAddress("eth0", 2, "2001:db8::7", 64, tentative=True),
        InterfaceAddress("eth0", 2, "2001:db8::8", 64, deprecated=True),
        InterfaceAddress("eth0", 2, "::192.0.2.1", 96),  # IPv4-compatible
        InterfaceAddress("eth0", 2, "fec0::1", 64),  # site-local
        InterfaceAddress("eth1", 3, "10.0.0.5", 8, up=False),
        InterfaceAddress("eth0", 2, "192.168.1.100", 24),
        InterfaceAddress("eth0", 2, "fd00::2", 64),
        InterfaceAddress("wg0", 5, "192.168.1.100", 32),  # the same address twice
    ]
    usable = host_addresses(entries)
    assert [str(e.address) for e in usable] == ["192.168.1.100", "fd00::2"]
    assert usable[0].interface == "eth0"


def test_list_orders_host_before_server_reflexive_and_public_first() -> None:
    hosts = host_addresses([LAN, InterfaceAddress("eth1", 3, "11.0.0.9", 24), GLOBAL6])
    out = build_candidates(5000, UDP, hosts, lease("11.0.0.1"))
    assert kinds(out) == [
        ("host", "11.0.0.9", 5000),
        ("host", "2001:db8:1::100", 5000),
        ("host", "192.168.1.100", 5000),
        ("server-reflexive", "11.0.0.1", 40000),
    ]
    assert [c.priority for c in out] == sorted((c.priority for c in out), reverse=True)
    assert len({c.priority for c in out}) == len(out)
    srflx = out[-1]
    assert srflx.public
    assert srflx.method == "pcp"
    assert srflx.lifetime == 7200
    assert srflx.expires_at == 7210.0
    assert (str(srflx.base_address), srflx.base_port) == ("192.168.1.100", 5000)
    assert srflx.priority == priority(
        CandidateKind.SERVER_REFLEXIVE, local_preference(True, srflx.address, 0)
    )
    assert out[2].method is None
    assert out[2].lifetime is None


def test_mapped_address_behind_another_nat_is_not_public() -> None:
    out = build_candidates(5000, UDP, [LAN], lease("100.64.7.1"))
    srflx = next(c for c in out if c.kind is CandidateKind.SERVER_REFLEXIVE)
    assert not srflx.public
    assert srflx.to_json()["public"] is False


def test_a_mapping_that_keeps_the_host_address_adds_its_fields_to_the_host_candidate() -> None:
    # An IPv6 pinhole: the external endpoint is the host's own (RFC 8445 §5.1.3).
    pinhole = lease(
        "2001:db8:1::100", 5000, internal_address="2001:db8:1::100", protocol=UDP, method="pcp"
    )
    out = build_candidates(5000, UDP, [GLOBAL6], pinhole)
    assert kinds(out) == [("host", "2001:db8:1::100", 5000)]
    assert out[0].method == "pcp"
    assert out[0].lifetime == 7200


def test_a_lease_with_an_unusable_endpoint_adds_no_candidate() -> None:
    assert kinds(build_candidates(5000, UDP, [LAN], lease("0.0.0.0"))) == [
        ("host", "192.168.1.100", 5000)
    ]


def test_real_enumeration_sees_the_loopback_and_filters_it() -> None:
    entries = interface_addresses()
    loopback = [e for e in entries if str(e.address) == "127.0.0.1"]
    assert loopback
    assert loopback[0].loopback
    assert loopback[0].prefix_length == 8
    assert all(not e.address.is_loopback for e in host_addresses(entries))


# -- the gatherer, against FakeGateway -----------------------------------------------


async def test_candidates_hold_the_mapping_and_the_host_and_exit_deletes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        async with open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)) as gatherer:
            assert kinds(gatherer.candidates()) == [
                ("host", "192.168.1.100", 5000),
                ("server-reflexive", "203.0.113.7", 5000),
            ]
            assert gatherer.candidates()[1].method == "pcp"
            assert gateway.mapping_for("udp", 5000) is not None
        assert gateway.mapping_for("udp", 5000) is None
        assert not broker.mappings


async def test_mapping_lost_and_restored_are_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        await trio.sleep(100)  # an epoch that can go back
        gateway.reset()
        await gateway.announce()
        await wait_for(lambda: len(changes.seen) >= 2)
        lost, restored = changes.seen[:2]
        assert lost.reason is ChangeReason.MAPPING_LOST
        assert kinds(lost.removed) == [("server-reflexive", "203.0.113.7", 5000)]
        assert kinds(lost.candidates) == [("host", "192.168.1.100", 5000)]
        assert restored.reason is ChangeReason.MAPPING_RESTORED
        assert kinds(restored.added) == [("server-reflexive", "203.0.113.7", 5000)]
        assert restored.candidates == gatherer.candidates()
        assert restored.detail == "at 203.0.113.7:5000"
        nursery.cancel_scope.cancel()


async def test_a_renewal_with_a_new_external_address_is_one_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        first = gatherer.candidates()[1].expires_at
        gateway.external_address = IPv4Address("198.51.100.20")  # no announcement
        await wait_for(lambda: bool(changes.seen), 2 * HOUR)
        assert changes.reasons() == [ChangeReason.EXTERNAL_ADDRESS_CHANGED]
        (change,) = changes.seen
        assert kinds(change.removed) == [("server-reflexive", "203.0.113.7", 5000)]
        assert kinds(change.added) == [("server-reflexive", "198.51.100.20", 5000)]
        assert "203.0.113.7:5000 -> 198.51.100.20:5000" in change.detail
        assert first is not None
        assert (change.added[0].expires_at or 0) > first
        nursery.cancel_scope.cancel()


async def test_renewals_refresh_the_expiry_without_a_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(broker, 5000, "udp", addresses=Addresses(LAN), lifetime=600) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        first = gatherer.candidates()[1].expires_at
        await trio.sleep(HOUR)
        later = gatherer.candidates()[1].expires_at
        assert first is not None
        assert (later or 0) > first + 3000
        assert changes.seen == []
        nursery.cancel_scope.cancel()


async def test_interface_addresses_added_and_removed_after_debounce(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    addresses = Addresses(LAN)
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(
            broker, 5000, "udp", addresses=addresses, poll_interval=5, debounce=2
        ) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        addresses.entries.append(GLOBAL6)
        await wait_for(lambda: bool(changes.seen), 60)
        (added,) = changes.seen
        assert added.reason is ChangeReason.ADDRESS_ADDED
        assert kinds(added.added) == [("host", "2001:db8:1::100", 5000)]
        assert added.removed == ()
        assert "2001:db8:1::100" in added.detail

        # Renumbered: the old IPv4 address goes, a new one comes, in one poll.
        addresses.entries = [GLOBAL6, InterfaceAddress("eth0", 2, "192.168.1.101", 24)]
        await wait_for(lambda: len(changes.seen) >= 3, 60)
        removed, came = changes.seen[1:3]
        assert removed.reason is ChangeReason.ADDRESS_REMOVED
        assert kinds(removed.removed) == [("host", "192.168.1.100", 5000)]
        assert came.reason is ChangeReason.ADDRESS_ADDED
        assert kinds(came.added) == [("host", "192.168.1.101", 5000)]
        assert came.candidates == gatherer.candidates()
        nursery.cancel_scope.cancel()


async def test_an_address_that_flaps_within_the_debounce_is_no_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    addresses = Addresses(LAN)
    changes = Changes()
    async with (
        open_candidates(None, 5000, "udp", addresses=addresses, poll_interval=5, debounce=2) as g,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, g.changes())
        await trio.sleep(4.5)  # just before a poll
        addresses.entries = []  # the poll at 5 s sees it gone...
        await trio.sleep(1.5)
        addresses.entries = [LAN]  # ...and it is back before the debounce read at 7 s
        await trio.sleep(60)
        assert addresses.reads >= 10
        assert changes.seen == []
        assert kinds(g.candidates()) == [("host", "192.168.1.100", 5000)]
        nursery.cancel_scope.cancel()


async def test_no_method_works_gives_host_candidates_and_the_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_enabled=False, natpmp_enabled=False)
    async with (
        broker_for(gateway) as broker,
        open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)) as gatherer,
    ):
        assert kinds(gatherer.candidates()) == [("host", "192.168.1.100", 5000)]
        assert gatherer.mapping is None
        assert isinstance(gatherer.mapping_error, PortBrokerError)


async def test_require_mapping_raises_the_map_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_enabled=False, natpmp_enabled=False)
    async with broker_for(gateway) as broker:
        with pytest.raises(PortBrokerError):
            async with open_candidates(
                broker, 5000, "udp", addresses=Addresses(LAN), require_mapping=True
            ):
                pytest.fail("entered without a mapping")


async def test_a_gateway_that_comes_up_later_is_mapped_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_enabled=False, natpmp_enabled=False)
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(
            broker, 5000, "udp", addresses=Addresses(LAN), remap_interval=60
        ) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        await trio.sleep(100)
        assert changes.seen == []
        gateway.pcp_enabled = gateway.natpmp_enabled = True
        await wait_for(lambda: bool(changes.seen), 600)
        (change,) = changes.seen
        assert change.reason is ChangeReason.MAPPING_ACQUIRED
        assert kinds(change.added) == [("server-reflexive", "203.0.113.7", 5000)]
        assert gatherer.mapping_error is None
        nursery.cancel_scope.cancel()
    assert gateway.mapping_for("udp", 5000) is None  # ours, so released on exit


async def test_a_mapping_handed_in_is_followed_and_left_to_its_owner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(5000, "udp")
        async with open_candidates(
            None, 5000, "udp", mapping=mapping, addresses=Addresses(LAN)
        ) as gatherer:
            assert kinds(gatherer.candidates())[1] == ("server-reflexive", "203.0.113.7", 5000)
        assert mapping.state is State.ACTIVE
        assert gateway.mapping_for("udp", 5000) is not None
        await mapping.release()


async def test_a_mapping_released_by_its_owner_ends_the_reflexive_candidate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(5000, "udp")
        async with (
            open_candidates(None, 5000, "udp", mapping=mapping, addresses=Addresses(LAN)) as g,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(changes.run, g.changes())
            await mapping.release()
            await wait_for(lambda: bool(changes.seen), 60)
            assert changes.reasons() == [ChangeReason.MAPPING_ENDED]
            assert kinds(g.candidates()) == [("host", "192.168.1.100", 5000)]
            nursery.cancel_scope.cancel()


async def test_change_streams_end_when_the_gatherer_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_candidates(None, 5000, "udp", addresses=Addresses(LAN)) as gatherer:
        stream = gatherer.changes()
    with trio.fail_after(1):
        assert [change async for change in stream] == []


async def test_bound_address_keeps_only_that_host_candidate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entries = Addresses(LAN, GLOBAL6, InterfaceAddress("eth1", 3, "10.9.9.9", 8))
    async with open_candidates(
        None, 5000, "udp", addresses=entries, bound_address="10.9.9.9"
    ) as gatherer:
        assert kinds(gatherer.candidates()) == [("host", "10.9.9.9", 5000)]
    async with open_candidates(None, 5000, "udp", addresses=entries, bound_address="::") as g:
        assert kinds(g.candidates()) == [("host", "2001:db8:1::100", 5000)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port must be"),
        ({"component": 0}, "component must be"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"protocol": "sctp"}, "protocol must be"),
    ],
)
async def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"port": 5000, "protocol": "udp", **kwargs}
    port = arguments.pop("port")
    protocol = arguments.pop("protocol")
    with pytest.raises(ValueError, match=message):
        async with open_candidates(None, port, protocol, addresses=Addresses(LAN), **arguments):
            pass


async def test_an_enumeration_failure_later_keeps_the_last_list(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def broken() -> list[InterfaceAddress]:
        raise OSError(24, "Too many open files")

    addresses = Addresses(LAN)
    async with open_candidates(None, 5000, "udp", addresses=addresses) as gatherer:
        gatherer._addresses = broken
        await trio.sleep(60)
        assert kinds(gatherer.candidates()) == [("host", "192.168.1.100", 5000)]


async def test_an_error_in_the_block_comes_out_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_candidates(None, 5000, "udp", addresses=Addresses(LAN)):
            raise KeyError("mine")


async def test_a_port_the_broker_already_maps_is_an_error_that_says_what_to_do(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(5000, "udp")
        with pytest.raises(AlreadyMapped, match=r"open_candidates\(mapping=\.\.\.\)"):
            async with open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)):
                pytest.fail("entered")
        assert mapping.state is State.ACTIVE


def test_ipv6_flags_from_proc_mark_tentative_and_deprecated(tmp_path: Path) -> None:
    # /proc/net/if_inet6: address, ifindex, prefix length, scope, flags, name
    table = tmp_path / "if_inet6"
    table.write_text(
        "20010db8000000000000000000000007 02 40 00 40     eth0\n"
        "20010db8000000000000000000000008 02 40 00 20     eth0\n"
        "20010db8000000000000000000000009 02 40 00 80     eth0\n"
        "garbage line\n"
    )
    flags = _inet6_flags(table)
    assert flags[("eth0", IPv6Address("2001:db8::7"))] == 0x40
    assert flags[("eth0", IPv6Address("2001:db8::8"))] == 0x20
    assert flags[("eth0", IPv6Address("2001:db8::9"))] == 0x80  # permanent: usable
    assert len(flags) == 3
    assert _inet6_flags(tmp_path / "missing") == {}


async def test_a_change_stream_asked_for_after_the_close_is_empty(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_candidates(None, 5000, "udp", addresses=Addresses(LAN)) as gatherer:
        pass
    with trio.fail_after(1):
        assert [change async for change in gatherer.changes()] == []


async def test_a_mapping_restored_elsewhere_says_where_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with (
        broker_for(gateway) as broker,
        open_candidates(broker, 5000, "udp", addresses=Addresses(LAN)) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        await trio.sleep(100)
        gateway.reset()
        gateway.external_address = IPv4Address("198.51.100.20")
        await gateway.announce()
        await wait_for(lambda: len(changes.seen) >= 2)
        assert changes.reasons()[:2] == [ChangeReason.MAPPING_LOST, ChangeReason.MAPPING_RESTORED]
        restored = changes.seen[1]
        assert kinds(restored.added) == [("server-reflexive", "198.51.100.20", 5000)]
        assert restored.detail == "at 198.51.100.20:5000, no longer 203.0.113.7:5000"
        await trio.sleep(60)
        assert len(changes.seen) == 2  # the ExternalAddressChanged after it changes nothing more
        nursery.cancel_scope.cancel()


async def test_a_mapping_given_up_on_ends_its_candidate_and_is_made_again_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    changes = Changes()
    async with (
        broker_for(gateway, methods=("pcp",)) as broker,
        open_candidates(
            broker, 5000, "udp", addresses=Addresses(LAN), remap_interval=600
        ) as gatherer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(changes.run, gatherer.changes())
        first = gatherer.mapping
        await trio.sleep(100)
        # NOT_AUTHORIZED, again and again: after 20 re-creations (about 75
        # minutes) the broker gives up (lifecycle rule 7).
        gateway.forced_result = 2
        gateway.forced_lifetime = 30
        gateway.reset()
        await gateway.announce()
        await wait_for(lambda: ChangeReason.MAPPING_ENDED in changes.reasons(), 4 * HOUR)
        assert first is not None
        assert first.state is State.FAILED
        assert "given up on: gave up after 20 failed re-creations" in str(gatherer.mapping_error)
        assert kinds(gatherer.candidates()) == [("host", "192.168.1.100", 5000)]
        gateway.forced_result = None
        await wait_for(lambda: ChangeReason.MAPPING_ACQUIRED in changes.reasons(), 4 * HOUR)
        assert changes.reasons() == [
            ChangeReason.MAPPING_LOST,
            ChangeReason.MAPPING_ENDED,
            ChangeReason.MAPPING_ACQUIRED,
        ]
        assert gatherer.mapping is not first
        assert kinds(gatherer.candidates())[1] == ("server-reflexive", "203.0.113.7", 5000)
        nursery.cancel_scope.cancel()
    assert gateway.mapping_for("udp", 5000) is None


async def test_a_stream_left_unread_is_ended_not_grown_without_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    addresses = Addresses(LAN)
    flap = InterfaceAddress("eth1", 3, "192.168.7.1", 24)
    async with open_candidates(
        None, 5000, "udp", addresses=addresses, poll_interval=5, debounce=0
    ) as g:
        unread = g.changes()  # and never read while the storm goes on
        for _ in range(2 * CHANGES_BUFFER):  # an address that comes and goes
            addresses.entries = [LAN, flap] if flap not in addresses.entries else [LAN]
            await trio.sleep(10)  # two polls: each flip is seen
        held = unread.statistics().current_buffer_used
        assert held == CHANGES_BUFFER
        got = [change async for change in unread]  # what it holds, then the end
        assert len(got) == CHANGES_BUFFER
        # The gatherer goes on: a new stream hears the next change.
        fresh = g.changes()
        addresses.entries = [LAN, flap] if flap not in addresses.entries else [LAN]
        with trio.fail_after(60):
            change = await fresh.receive()
        assert change.candidates == g.candidates()
