"""Publicly reachable or not: the classification, the lease / mapping / probe
fields, and the ReachabilityChanged event (lifecycle rule 11, docs/double-nat.md)."""

from __future__ import annotations

import ast
import random
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
import trio
import trio.testing

from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    MappingLifecycle,
    ReachabilityChanged,
    Renewed,
    Restored,
    Trigger,
    event_detail,
)
from portbroker.probe import report_json
from portbroker.reachability import AddressKind, classify
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, ProbeOutcome, TransportProtocol
from portbroker.wire import natpmp
from tests.broker_harness import Recorder, broker_for, wait_for
from tests.realdata import realdata

K = AddressKind


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("11.0.0.1", K.GLOBAL),  # the lab's wan side
        ("8.8.8.8", K.GLOBAL),
        ("192.0.0.9", K.GLOBAL),  # PCP anycast (RFC 7723) sits in a reserved /24
        ("192.0.0.8", K.RESERVED),
        ("10.201.213.174", K.PRIVATE),
        ("172.16.0.1", K.PRIVATE),
        ("172.31.255.255", K.PRIVATE),
        ("172.32.0.1", K.GLOBAL),
        ("192.168.1.20", K.PRIVATE),
        ("100.64.0.1", K.SHARED),
        ("100.127.255.254", K.SHARED),
        ("100.128.0.1", K.GLOBAL),
        ("127.0.0.1", K.LOOPBACK),
        ("169.254.10.10", K.LINK_LOCAL),
        ("0.0.0.0", K.UNSPECIFIED),
        ("192.0.2.1", K.DOCUMENTATION),
        ("198.51.100.9", K.DOCUMENTATION),
        ("203.0.113.7", K.DOCUMENTATION),  # FakeGateway's default
        ("198.18.0.1", K.RESERVED),
        ("224.0.0.1", K.MULTICAST),
        ("240.0.0.1", K.RESERVED),
        ("255.255.255.255", K.RESERVED),
        ("2001:4860::8888", K.GLOBAL),
        ("2001:db8::1", K.DOCUMENTATION),
        ("3fff::1", K.DOCUMENTATION),
        ("2001:1::1", K.GLOBAL),  # PCP anycast
        ("2001::1", K.RESERVED),  # Teredo
        ("fd00:77::1", K.UNIQUE_LOCAL),  # the lab's IPv6 variant
        ("fe80::1", K.LINK_LOCAL),
        ("::1", K.LOOPBACK),
        ("::", K.UNSPECIFIED),
        ("ff02::1", K.MULTICAST),
        ("fec0::1", K.RESERVED),  # deprecated site-local
        ("::ffff:192.168.1.1", K.PRIVATE),  # IPv4-mapped: judged as IPv4
        ("::ffff:11.0.0.1", K.GLOBAL),
        # 6to4 and NAT64's well-known prefix are as reachable as the IPv4
        # address they embed (RFC 3056 §2, RFC 6052 §3.1).
        ("2002:c0a8:101::1", K.PRIVATE),  # 6to4 from a private WAN address
        ("2002:6440:2::1", K.SHARED),
        ("2002:b00:1::1", K.GLOBAL),  # 11.0.0.1
        ("64:ff9b::b00:1", K.GLOBAL),
        ("64:ff9b::a00:1", K.PRIVATE),
        ("64:ff9b:1::1", K.RESERVED),  # local-use NAT64 (RFC 8215)
        ("2001:1::3", K.GLOBAL),  # DNS-SD SRP anycast (RFC 9665)
    ],
)
def test_classify(address: str, kind: AddressKind) -> None:
    found = classify(address)
    assert found.kind is kind
    assert found.public is (kind is K.GLOBAL)
    if found.public:
        assert found.reason is None
    else:
        assert found.reason is not None
        assert found.reason.startswith("not publicly reachable: ")


def test_reasons_name_the_cause() -> None:
    private = classify("192.168.1.20").reason
    assert private is not None
    assert "RFC 1918" in private
    assert "double NAT" in private
    shared = classify("100.64.0.1").reason
    assert shared is not None
    assert "RFC 6598" in shared
    assert "carrier-grade NAT" in shared
    six_to_four = classify("2002:c0a8:101::1").reason
    assert six_to_four == (
        "not publicly reachable: 2002:c0a8:101::1: the IPv4 address 192.168.1.1 within it"
        " is a private address (RFC 1918): another NAT lies beyond this gateway (double NAT)"
    )
    assert isinstance(classify("::ffff:10.0.0.1").address, IPv4Address)
    assert isinstance(classify("fd00::1").address, IPv6Address)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        classify("not an address")


@pytest.mark.parametrize(
    "address",
    ["100.64.0.1", "192.168.0.1", "10.1.2.3", "172.20.0.1", "fd12::1", "127.0.0.1", "::1"],
)
def test_agrees_with_ipaddress_where_python_versions_agree(address: str) -> None:
    # ipaddress's is_global says False for all of these in every Python we
    # support (it is the documentation blocks and 192.0.0.0/24 whose answer
    # changed between releases); our table must not be more generous.
    assert ip_address(address).is_global is False
    assert classify(address).public is False


def test_the_module_is_sans_io() -> None:
    tree = ast.parse(Path("portbroker/reachability.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= {"__future__", "enum", "ipaddress", "typing", "attrs"}


def test_a_real_router_behind_an_isp_modem() -> None:
    """nDPI's capture: 192.168.1.254 answers NAT-PMP with 10.201.213.174, a
    private address: the router is behind another NAT."""
    lines = realdata("ndpi", "natpmp.pcap.payloads.txt").read_text().splitlines()
    reply = next(line for line in lines if "192.168.1.254:5351 ->" in line and "len=12" in line)
    response = natpmp.decode_response(bytes.fromhex(reply.split()[-1]))
    assert isinstance(response, natpmp.ExternalAddressResponse)
    outcome = ProbeOutcome("natpmp", True, 0.03, response.external_address, response.epoch)
    assert outcome.reachability is not None
    assert outcome.reachability.kind is K.PRIVATE
    assert str(outcome.reachability.address) == "10.201.213.174"
    assert ProbeOutcome("pcp", False, error="silent").reachability is None


def _lease(external: str, granted_at: float = 0.0, port: int = 5000) -> Lease:
    return Lease(
        "natpmp",
        TransportProtocol.UDP,
        "192.168.77.2",
        5000,
        external,
        port,
        600,
        granted_at,
        "192.168.77.1",
    )


def _renew(lifecycle: MappingLifecycle, now: float, lease: Lease) -> list[object]:
    """A renewal (TIMER, then its GRANTED) that got *lease*: the events."""
    lifecycle.fire(Trigger.TIMER, now, token=lifecycle.token)
    return list(lifecycle.fire(Trigger.GRANTED, now, token=lifecycle.token, lease=lease).events)


def test_lifecycle_says_not_reachable_after_acquired() -> None:
    lifecycle = MappingLifecycle(random.Random(1))
    step = lifecycle.fire(Trigger.GRANTED, 0.0, token=0, lease=_lease("192.168.1.20"))
    assert [type(e) for e in step.events] == [Acquired, ReachabilityChanged]
    event = step.events[1]
    assert isinstance(event, ReachabilityChanged)
    assert event.public is False
    assert event.reason is not None
    assert "RFC 1918" in event.reason
    assert event.reachability.kind is K.PRIVATE
    assert event_detail(event) == {"reason": event.reason, "public": False}
    # The same address renewed: nothing new to say.
    assert [type(e) for e in _renew(lifecycle, 300.0, _lease("192.168.1.20", 300.0))] == [Renewed]
    # Public now (the modem was put in bridge mode): say so, after the change.
    events = _renew(lifecycle, 600.0, _lease("11.0.0.1", 600.0))
    assert [type(e) for e in events] == [Renewed, ExternalAddressChanged, ReachabilityChanged]
    back = events[2]
    assert isinstance(back, ReachabilityChanged)
    assert back.public
    assert back.reason is None
    # And into the ISP's CGN: not public again.
    events = _renew(lifecycle, 900.0, _lease("100.64.3.4", 900.0))
    assert [type(e) for e in events] == [Renewed, ExternalAddressChanged, ReachabilityChanged]
    cgn = events[2]
    assert isinstance(cgn, ReachabilityChanged)
    assert not cgn.public


def test_a_public_grant_says_nothing_more() -> None:
    lifecycle = MappingLifecycle(random.Random(1))
    step = lifecycle.fire(Trigger.GRANTED, 0.0, token=0, lease=_lease("11.0.0.1"))
    assert [type(e) for e in step.events] == [Acquired]
    # A move between two public addresses is a change of address, not of reachability.
    events = _renew(lifecycle, 300.0, _lease("11.0.0.9", 300.0))
    assert [type(e) for e in events] == [Renewed, ExternalAddressChanged]


def test_restored_behind_another_nat() -> None:
    lifecycle = MappingLifecycle(random.Random(1), recovery_delay=0.0)
    lifecycle.fire(Trigger.GRANTED, 0.0, token=0, lease=_lease("11.0.0.1"))
    lifecycle.fire(Trigger.STATE_LOST, 10.0, reason="restart")
    lifecycle.fire(Trigger.TIMER, 10.0, token=lifecycle.token)
    step = lifecycle.fire(
        Trigger.GRANTED, 11.0, token=lifecycle.token, lease=_lease("192.168.0.2", 11.0)
    )
    assert [type(e) for e in step.events] == [Restored, ExternalAddressChanged, ReachabilityChanged]


async def test_broker_mapping_moves_behind_a_cgn(autojump_clock: trio.testing.MockClock) -> None:
    """FakeGateway's address moves from public to shared (the ISP put the line
    behind its CGN): the mapping hears ExternalAddressChanged, then
    ReachabilityChanged; ``mapping.reachability`` says so."""
    gateway = FakeGateway(external_address="11.0.0.1")
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7000, "udp", via="natpmp")
        assert mapping.reachability.public
        await nursery.start(recorder.run, mapping)
        watched = broker.events()
        await trio.sleep(30)
        await gateway.change_external_address("100.64.0.7")
        await wait_for(lambda: bool(recorder.of(ReachabilityChanged)), 60)
        kinds = [type(e) for _, e in recorder.events]
        assert kinds.index(ExternalAddressChanged) < kinds.index(ReachabilityChanged)
        event = recorder.of(ReachabilityChanged)[0]
        assert not event.public
        assert "RFC 6598" in event.reason
        assert mapping.reachability.kind is K.SHARED
        seen = []
        while True:
            try:
                seen.append(watched.receive_nowait().event)
            except trio.WouldBlock:
                break
        assert any(isinstance(e, ReachabilityChanged) for e in seen)
        nursery.cancel_scope.cancel()


def test_probe_json_says_so() -> None:
    from portbroker.types import ProbeReport

    report = ProbeReport(
        "192.168.1.254",
        "natpmp",
        (
            ProbeOutcome("natpmp", True, 0.01, "10.201.213.174", 2833117),
            ProbeOutcome("pcp", True, 0.01, "11.0.0.1", 5),
            ProbeOutcome("upnp", False, error="no IGD"),
        ),
    )
    methods = report_json(report)["methods"]
    assert methods["natpmp"]["public"] is False
    assert "RFC 1918" in methods["natpmp"]["reachability"]
    assert methods["pcp"]["public"] is True
    assert methods["pcp"]["reachability"] is None
    assert methods["upnp"]["public"] is None
