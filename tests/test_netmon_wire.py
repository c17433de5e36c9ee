"""The rtnetlink parser: captured kernel messages, handcrafted ones, and fuzz."""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker import netmon_wire as wire
from portbroker.netmon_wire import (
    AddressRecord,
    Change,
    Done,
    Failed,
    LinkRecord,
    Malformed,
    RouteRecord,
)

CAPTURE = json.loads((Path(__file__).parent / "data/rtnetlink/capture.json").read_text())


def _captured(name: str) -> list[wire.Record]:
    return [r for chunk in CAPTURE[name] for r in wire.parse_messages(bytes.fromhex(chunk))]


def test_a_captured_link_dump_names_every_interface_and_ends_with_done() -> None:
    records = _captured("dump_link")
    links = [r for r in records if isinstance(r, LinkRecord)]
    assert [(link.index, link.name, link.up) for link in links] == [
        (1, "lo", True),
        (2, "d1", True),
        (3, "d0", True),
    ]
    assert records[-1] == Done(1)


def test_a_captured_address_dump_gives_ipv4_local_and_ipv6_addresses_with_flags() -> None:
    addresses = [r for r in _captured("dump_addr") if isinstance(r, AddressRecord)]
    found = {(a.index, a.address, a.prefix_length, a.usable) for a in addresses}
    assert (3, IPv4Address("10.9.0.2"), 24, True) in found
    assert (3, IPv6Address("fd09::2"), 64, True) in found
    link_local = [a for a in addresses if a.address.is_link_local and a.index == 3]
    assert len(link_local) == 1
    assert not link_local[0].usable  # still tentative (DAD) when captured


def test_a_captured_route_dump_holds_exactly_the_two_default_routes() -> None:
    defaults = [r for r in _captured("dump_route") if isinstance(r, RouteRecord) and r.is_default]
    assert [(r.family, r.gateway, r.oif, r.priority) for r in defaults] == [
        (wire.AF_INET, IPv4Address("10.9.0.1"), 3, 0),
        (wire.AF_INET6, IPv6Address("fd09::1"), 3, 1024),
    ]


def test_captured_notifications_show_the_route_replace_and_the_address_add_and_delete() -> None:
    records = _captured("notifications")
    route = next(r for r in records if isinstance(r, RouteRecord))
    assert route.is_default
    assert route.gateway == IPv4Address("10.9.0.254")
    seven = [
        r.change
        for r in records
        if isinstance(r, AddressRecord) and r.address == IPv4Address("10.9.0.7")
    ]
    assert seven == [Change.NEW, Change.DELETED]
    down = next(r for r in records if isinstance(r, LinkRecord) and r.name == "d0")
    assert not down.up


def test_a_deleted_default_route_is_not_a_default_route() -> None:
    deleted = [
        r
        for r in _captured("notifications")
        if isinstance(r, RouteRecord) and r.change is Change.DELETED and r.dst_len == 0
    ]
    assert deleted
    assert not any(r.is_default for r in deleted)


@pytest.mark.parametrize(
    "record",
    [
        LinkRecord(Change.NEW, 7, "wlan0", wire.IFF_UP | wire.IFF_RUNNING, seq=9),
        LinkRecord(Change.DELETED, 8, "tun0", 0),
        AddressRecord(Change.NEW, 7, IPv4Address("192.168.1.20"), 24, 0x80, "wlan0", seq=9),
        AddressRecord(Change.DELETED, 7, IPv6Address("2001:db8::20"), 64, 0x100),
        RouteRecord(
            Change.NEW, wire.AF_INET, 0, 254, 1, 0, IPv4Address("192.168.1.1"), 7, 600, seq=2
        ),
        RouteRecord(Change.NEW, wire.AF_INET6, 0, 1000, 1, 0, None, 8, 0),
    ],
)
def test_what_is_encoded_is_parsed_back(record: wire.Record) -> None:
    if isinstance(record, LinkRecord):
        data = wire.encode_link(record)
    elif isinstance(record, AddressRecord):
        data = wire.encode_address(record)
    else:
        assert isinstance(record, RouteRecord)
        data = wire.encode_route(record)
    assert wire.parse_messages(data) == [record]


def test_a_route_in_a_policy_table_is_not_the_default_route() -> None:
    vpn = RouteRecord(Change.NEW, wire.AF_INET, 0, 51820, 1, 0, None, 9, 0)
    assert wire.parse_messages(wire.encode_route(vpn)) == [vpn]
    assert not vpn.is_default


def test_an_unreachable_or_cached_default_route_is_not_a_default_route() -> None:
    unreachable = RouteRecord(Change.NEW, wire.AF_INET6, 0, 254, 7, 0, None, 1, 0)
    cloned = RouteRecord(Change.NEW, wire.AF_INET6, 0, 254, 1, wire.RTM_F_CLONED, None, 1, 0)
    assert not unreachable.is_default
    assert not cloned.is_default


def _route_message(attributes: bytes) -> bytes:
    body = struct.pack("=BBBBBBBBI", wire.AF_INET, 0, 0, 0, 254, 4, 0, 1, 0) + attributes
    return struct.pack("=IHHII", 16 + len(body), wire.RTM_NEWROUTE, 0, 0, 0) + body


def test_an_ecmp_default_route_takes_its_first_next_hops_gateway() -> None:
    hop_attrs = wire._rtattr(wire.RTA_GATEWAY, IPv4Address("10.0.0.1").packed)
    hop = struct.pack("=HBBi", 8 + len(hop_attrs), 0, 0, 4) + hop_attrs
    other = struct.pack("=HBBi", 8, 0, 0, 5)
    [route] = wire.parse_messages(_route_message(wire._rtattr(wire.RTA_MULTIPATH, hop + other)))
    assert isinstance(route, RouteRecord)
    assert (route.gateway, route.oif, route.is_default) == (IPv4Address("10.0.0.1"), 4, True)


def test_an_ipv4_route_via_an_ipv6_next_hop_reports_that_next_hop() -> None:
    via = struct.pack("=H", wire.AF_INET6) + IPv6Address("fe80::1").packed
    [route] = wire.parse_messages(_route_message(wire._rtattr(wire.RTA_VIA, via)))
    assert isinstance(route, RouteRecord)
    assert route.gateway == IPv6Address("fe80::1")


def test_unknown_attributes_and_message_types_are_skipped() -> None:
    unknown_attr = wire._rtattr(200, b"\x01\x02\x03") + wire._rtattr(
        wire.RTA_GATEWAY, IPv4Address("10.0.0.9").packed
    )
    neighbour = struct.pack("=IHHII", 28, 28, 0, 0, 0) + b"\0" * 12  # RTM_NEWNEIGH
    records = wire.parse_messages(neighbour + _route_message(unknown_attr))
    assert len(records) == 1
    assert isinstance(records[0], RouteRecord)
    assert records[0].gateway == IPv4Address("10.0.0.9")


def test_a_message_whose_length_lies_ends_the_walk_with_malformed() -> None:
    good = wire.encode_link(LinkRecord(Change.NEW, 1, "lo", 0x49))
    lying = struct.pack("=IHHII", 4096, wire.RTM_NEWLINK, 0, 0, 0) + b"\0" * 16
    records = wire.parse_messages(good + lying)
    assert records[0] == LinkRecord(Change.NEW, 1, "lo", 0x49)
    assert isinstance(records[1], Malformed)
    assert "4096" in records[1].reason
    assert len(records) == 2


def test_a_body_too_short_for_its_struct_is_malformed_and_the_next_message_still_parses() -> None:
    short = struct.pack("=IHHII", 20, wire.RTM_NEWADDR, 0, 0, 0) + b"\0" * 4
    good = wire.encode_link(LinkRecord(Change.NEW, 2, "eth0", 0))
    records = wire.parse_messages(short + good)
    assert isinstance(records[0], Malformed)
    assert records[1] == LinkRecord(Change.NEW, 2, "eth0", 0)


def test_an_attribute_longer_than_its_message_keeps_what_came_before() -> None:
    attributes = wire._rtattr(wire.RTA_OIF, struct.pack("=I", 3)) + struct.pack("=HH", 200, 5)
    [route] = wire.parse_messages(_route_message(attributes))
    assert isinstance(route, RouteRecord)
    assert route.oif == 3
    assert route.gateway is None


def test_an_address_message_with_an_impossible_prefix_is_malformed() -> None:
    data = wire.encode_address(AddressRecord(Change.NEW, 1, IPv4Address("10.0.0.1"), 33, 0))
    [record] = wire.parse_messages(data)
    assert isinstance(record, Malformed)
    assert "prefix" in record.reason


def test_an_error_answer_is_failed_and_an_acknowledgement_is_nothing() -> None:
    refused = struct.pack("=IHHII", 20, wire.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -1)
    ack = struct.pack("=IHHII", 20, wire.NLMSG_ERROR, 0, 6, 0) + struct.pack("=i", 0)
    assert wire.parse_messages(refused + ack) == [Failed(5, 1)]


def test_an_interrupted_dump_says_so_on_its_done() -> None:
    assert wire.parse_messages(wire.encode_done(4, interrupted=True)) == [Done(4, True)]


def test_a_dump_request_is_a_get_with_the_dump_flags() -> None:
    data = wire.dump_request(wire.RTM_GETROUTE, 77)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq, pid) == (len(data), wire.RTM_GETROUTE, 77, 0)
    assert flags == wire.NLM_F_REQUEST | wire.NLM_F_DUMP
    with pytest.raises(ValueError, match="not a dump request"):
        wire.dump_request(wire.RTM_NEWROUTE, 1)


_KNOWN = (LinkRecord, AddressRecord, RouteRecord, Done, Failed, Malformed)
_ALL_CAPTURED = b"".join(bytes.fromhex(c) for chunks in CAPTURE.values() for c in chunks)


@given(st.binary(max_size=600))
def test_any_bytes_parse_to_records_without_raising(data: bytes) -> None:
    assert all(isinstance(r, _KNOWN) for r in wire.parse_messages(data))


@given(st.integers(0, len(_ALL_CAPTURED)), st.integers(0, len(_ALL_CAPTURED)), st.binary())
def test_truncated_or_spliced_kernel_messages_parse_without_raising(
    cut: int, start: int, junk: bytes
) -> None:
    records = wire.parse_messages(_ALL_CAPTURED[start:cut] + junk)
    assert all(isinstance(r, _KNOWN) for r in records)


@given(
    st.integers(0, len(_ALL_CAPTURED) - 4),
    st.integers(0, 0xFFFF),
)
def test_a_lying_length_anywhere_never_raises(position: int, value: int) -> None:
    data = bytearray(_ALL_CAPTURED)
    struct.pack_into("=H", data, position, value)
    records = wire.parse_messages(bytes(data))
    assert all(isinstance(r, _KNOWN) for r in records)
    for record in records:
        if isinstance(record, AddressRecord):
            assert record.prefix_length <= record.address.max_prefixlen
            assert ip_address(str(record.address)) == record.address


def _mutations(count: int, seed: int) -> Iterator[bytes]:
    """Captured datagrams with bits flipped, bytes overwritten, cut short or spliced."""
    rng = random.Random(seed)
    datagrams = [bytes.fromhex(c) for chunks in CAPTURE.values() for c in chunks]
    for _ in range(count):
        data = bytearray(rng.choice(datagrams))
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(4)
            if kind == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif kind == 1 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 2:
                del data[rng.randrange(len(data) + 1) :]
            else:
                data += rng.choice(datagrams)[: rng.randrange(64)]
        yield bytes(data)


def _feed(data: bytes) -> int:
    """Parse *data* and build a snapshot of it; the number of records that parsed."""
    from portbroker import netmon

    records = wire.parse_messages(data)
    assert all(isinstance(r, _KNOWN) for r in records)
    snapshot = netmon.snapshot_from_records(records)
    netmon.changes_between(netmon.NetworkSnapshot(), snapshot)
    return sum(isinstance(r, LinkRecord | AddressRecord | RouteRecord) for r in records)


def test_mutated_captures_never_raise_from_parse_to_snapshot() -> None:
    parsed = sum(_feed(data) > 0 for data in _mutations(20_000, seed=3549))
    assert parsed > 6_000  # the mutations keep reaching past the first header


@pytest.mark.fuzz
def test_mutated_captures_long_run() -> None:
    count = int(os.environ.get("PORTBROKER_FUZZ_COUNT", "1000000"))
    seed = int(os.environ.get("PORTBROKER_FUZZ_SEED", "3549"))
    parsed = sum(_feed(data) > 0 for data in _mutations(count, seed=seed))
    print(f"\nfuzz: {count} rtnetlink inputs (seed {seed}), {parsed} with records")
    assert parsed > count // 3
