"""UPnP IPv6 pinholes (WANIPv6FirewallControl:1, IGD v2) against FakeIgd on ::1.

FakeIgd serves miniupnpd 2.3.1's own root description (captured in the lab)
over IPv6 loopback and answers the pinhole actions as miniupnpd does
(docs/ipv6.md). SSDP is unicast to ::1 only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv6Address
from typing import Any

import pytest
import trio

from portbroker.broker import Broker, open_broker
from portbroker.epoch import EntryMissing, GatewaySignal
from portbroker.errors import MappingError
from portbroker.methods import upnp_rules
from portbroker.methods.upnp import UpnpMethod
from portbroker.probe import NoMethodAvailable
from portbroker.state import RecordError, lease_from_record, lease_record
from portbroker.testing.fake_igd import FakeIgd, soap_fault
from portbroker.types import Lease, MappingRequest, TransportProtocol, lease_json
from tests.realdata import realdata

MINIUPNPD_V2 = realdata("miniupnpd-2.3.1-live", "rootDesc.xml").read_text()
LIVEBOX_V2 = realdata("miniupnp", "miniupnpc", "testdesc", "new_LiveBox_desc.xml").read_text()
PFSENSE_V1 = realdata("tailscale", "pfSenseRootDescXML.xml").read_text()
LOOPBACK6 = IPv6Address("::1")


@asynccontextmanager
async def igd_and_broker(igd: FakeIgd, **kwargs: Any) -> AsyncIterator[Broker]:
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        with trio.fail_after(20):
            async with open_broker(
                "::1",
                ("upnp",),
                upnp_port=igd.ssdp_port,
                ssdp_multicast=False,
                announce_port=None,
                **kwargs,
            ) as broker:
                yield broker
        nursery.cancel_scope.cancel()


def _actions(igd: FakeIgd) -> list[str]:
    return [name for name, _ in igd.actions]


def test_the_firewall_service_is_found_in_real_igd_v2_descriptions() -> None:
    found = upnp_rules.find_firewall_service(MINIUPNPD_V2, "http://192.168.77.1:2189/rootDesc.xml")
    assert found == upnp_rules.WanService(
        upnp_rules.FIREWALL_SERVICE, "http://192.168.77.1:2189/ctl/IP6FCtl"
    )
    livebox = upnp_rules.find_firewall_service(LIVEBOX_V2, "http://192.168.1.1:49152/desc.xml")
    assert livebox is not None
    assert livebox.control_url.endswith("/87895a19/upnp/control/WANIPv6FwCtrl1")
    assert upnp_rules.find_firewall_service(PFSENSE_V1, "http://192.168.1.1:2189/x.xml") is None


def test_the_scpd_names_the_actions_and_arguments_we_send() -> None:
    scpd = realdata("miniupnpd-2.3.1-live", "scpd_WANIP6FC.xml").read_text()
    for name in ("AddPinhole", "UpdatePinhole", "DeletePinhole", "GetFirewallStatus"):
        assert f"<name>{name}</name>" in scpd
    request = MappingRequest(8080, "udp", lifetime=100)
    args = [name for name, _ in upnp_rules.pinhole_args(request, "fd77::2", 100)]
    for name in [*args, "UniqueID", "NewLeaseTime"]:
        assert f"<name>{name}</name>" in scpd, name
    assert dict(upnp_rules.pinhole_args(request, "fd77::2", 100))["Protocol"] == "17"


async def test_an_ipv6_host_gets_a_pinhole_renewed_and_deleted_by_its_unique_id() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1")
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp")
        lease = mapping.lease
        assert lease is not None
        assert lease.method == "upnp"
        assert lease.pinhole_id is not None
        assert igd.pinhole_for("::1", 8080, 6) == lease.pinhole_id
        # No translation: the external endpoint is the host's own.
        assert (lease.external_address, lease.external_port) == (LOOPBACK6, 8080)
        assert lease.lifetime == 7200
        assert not lease.permanent
        assert "AddPortMapping" not in _actions(igd)
        assert _actions(igd).count("GetFirewallStatus") == 1
        assert dict(igd.actions[_actions(igd).index("AddPinhole")][1])["LeaseTime"] == "7200"
        await mapping.release()
        assert igd.pinholes == {}
        assert _actions(igd)[-1] == "DeletePinhole"


async def test_renewal_is_update_pinhole_and_a_vanished_pinhole_is_added_again() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1", pinhole_gone_code=402)
    signals: list[GatewaySignal] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        method = UpnpMethod(
            LOOPBACK6, ssdp_port=igd.ssdp_port, multicast=False, report=signals.append
        )
        request = MappingRequest(9000, "udp", lifetime=600)
        first = await method.create(request, None)
        assert first.pinhole_id is not None
        renewed = await method.create(request, first)
        assert renewed.pinhole_id == first.pinhole_id
        assert _actions(igd)[-1] == "UpdatePinhole"
        assert not [s for s in signals if isinstance(s, EntryMissing)]
        igd.reboot()  # the pinhole is gone; miniupnpd 2.3.1 then answers 402
        again = await method.create(request, renewed)
        assert again.pinhole_id is not None
        assert igd.pinhole_for("::1", 9000, 17) == again.pinhole_id
        missing = [s for s in signals if isinstance(s, EntryMissing)]
        assert len(missing) == 1
        assert f"pinhole {first.pinhole_id}" in missing[0].detail
        await method.delete(again)
        await method.delete(again)  # a second delete: gone already, which is fine
        assert igd.pinholes == {}
        nursery.cancel_scope.cancel()


async def test_a_lifetime_past_a_day_is_asked_as_a_day() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1")
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=7 * 86400)
        assert mapping.lease is not None
        assert mapping.lease.lifetime == 86400
        assert dict(igd.actions[_actions(igd).index("AddPinhole")][1])["LeaseTime"] == "86400"


async def test_a_disabled_firewall_is_a_reason_not_a_pinhole() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1", inbound_pinholes_allowed=False)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(NoMethodAvailable, match="allows no inbound IPv6 pinholes"):
            await broker.map(8080, "tcp")
    assert "AddPinhole" not in _actions(igd)


async def test_an_igd_v1_has_no_pinholes_and_says_so() -> None:
    igd = FakeIgd(description=PFSENSE_V1, address="::1")
    async with igd_and_broker(igd) as broker:
        with pytest.raises(NoMethodAvailable, match="no WANIPv6FirewallControl"):
            await broker.map(8080, "tcp")
    assert "AddPortMapping" not in _actions(igd)


async def test_an_exact_other_external_port_cannot_be_a_pinhole() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1")
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError, match="keeps the internal port"):
            await broker.map(8080, "tcp", external_port=9999, exact=True)
    assert igd.pinholes == {}


async def test_a_cancelled_add_pinhole_is_cleaned_up() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1")
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        method = UpnpMethod(LOOPBACK6, ssdp_port=igd.ssdp_port, multicast=False)
        request = MappingRequest(7000, "tcp")
        await method.external_address()  # discovery done, so the add is what is cut
        igd.drip_actions.add("AddPinhole")
        with trio.move_on_after(1):
            await method.create(request, None)
        igd.drip_actions.clear()
        # The dripped AddPinhole was never answered: let the gateway have
        # made the pinhole anyway, as a real one may have.
        sent = igd.actions[-1][1]
        assert igd.actions[-1][0] == "AddPinhole"
        igd._pinhole("AddPinhole", sent, time.monotonic())
        assert igd.pinhole_for("::1", 7000, 6) is not None
        await method.abandon(request)
        assert igd.pinholes == {}
        assert _actions(igd)[-2:] == ["AddPinhole", "DeletePinhole"]
        nursery.cancel_scope.cancel()


def test_the_state_file_keeps_the_unique_id() -> None:
    lease = Lease(
        method="upnp",
        protocol=TransportProtocol.TCP,
        internal_address="fd77::2",
        internal_port=8080,
        external_address="fd77::2",
        external_port=8080,
        lifetime=7200,
        granted_at=0.0,
        gateway="fd77::1",
        pinhole_id=3,
    )
    record = lease_record(lease)
    assert record["pinhole_id"] == 3
    again = lease_from_record(record, now=0.0)
    assert again.pinhole_id == 3
    assert again.internal_address == IPv6Address("fd77::2")
    # Leases without a pinhole read and write as before.
    plain = lease_json(
        Lease("pcp", TransportProtocol.UDP, "192.168.1.2", 1, "203.0.113.7", 1, 60, 0.0, "10.0.0.1")
    )
    assert "pinhole_id" not in plain
    del record["pinhole_id"]
    with pytest.raises(RecordError, match="pinhole_id"):
        lease_from_record(record, now=0.0)
    record["pinhole_id"] = 70000
    with pytest.raises(RecordError, match="pinhole_id"):
        lease_from_record(record, now=0.0)


async def test_a_pinhole_asked_over_ipv4_that_the_gateway_refuses_says_what_to_do() -> None:
    """miniupnpd 2.3.1 (secure_mode) answers 606 when an IPv4 control point asks a
    pinhole for an IPv6 address (seen in the lab): the error names the remedy."""
    igd = FakeIgd(description=MINIUPNPD_V2)
    body = soap_fault(606)
    head = f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {len(body)}\r\n\r\n"
    igd.scripted["AddPinhole"] = deque([head.encode() + body])
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        async with open_broker(
            "127.0.0.1",
            ("upnp",),
            upnp_port=igd.ssdp_port,
            ssdp_multicast=False,
            announce_port=None,
        ) as broker:
            with pytest.raises(MappingError, match="open the broker on the gateway's IPv6"):
                await broker.map(8080, "tcp", internal_address="fd77::2")
            # UPnP still maps IPv4 on this broker.
            mapping = await broker.map(8080, "tcp")
            assert mapping.lease is not None
            assert mapping.lease.pinhole_id is None
        nursery.cancel_scope.cancel()


async def test_a_unique_id_reused_for_another_host_after_a_restart_is_added_again() -> None:
    # miniupnpd counts UniqueIDs from 1 after a restart and, in secure mode,
    # answers 606 to an UpdatePinhole of another host's pinhole.
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1", secure_mode=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        method = UpnpMethod(LOOPBACK6, ssdp_port=igd.ssdp_port, multicast=False)
        request = MappingRequest(9000, "udp", lifetime=600)
        first = await method.create(request, None)
        assert first.pinhole_id == 1
        igd.reboot()
        # Another lan host re-adds its pinhole first, and gets UniqueID 1.
        theirs = await method._soap(
            await method._ensure_igd(),
            "AddPinhole",
            upnp_rules.pinhole_args(MappingRequest(22, "tcp"), "::1", 3600),
            service=(await method._ensure_igd()).firewall,
        )
        assert theirs["UniqueID"] == "1"
        igd.pinholes[1].client = "fd00::99"
        again = await method.create(request, first)  # the renewal
        assert again.pinhole_id is not None
        assert again.pinhole_id != 1
        assert igd.pinhole_for("::1", 9000, 17) == again.pinhole_id
        assert igd.pinhole_for("fd00::99", 22, 6) == 1  # theirs untouched
        await method.delete(again)
        nursery.cancel_scope.cancel()


async def test_a_filtered_pinhole_admits_only_that_remote_host() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2, address="::1")
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp", filters=["2001:db8::5"])
        assert mapping.lease is not None
        assert [str(f) for f in mapping.lease.filters] == ["2001:db8::5/128"]
        (add,) = [dict(args) for name, args in igd.actions if name == "AddPinhole"]
        assert add["RemoteHost"] == "2001:db8::5"  # not "" (anyone)
        await mapping.release()
        assert igd.pinholes == {}
