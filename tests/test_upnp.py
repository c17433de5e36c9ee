"""UPnP IGD through miniupnpc, against every real description in ../shared/realdata.

Each description is served by FakeIgd on 127.0.0.1 (its URLBase and absolute
URLs pointed at the fake, as they point at the device itself in the wild),
with SOAP answered from a mapping table or replayed from real captures. SSDP
is unicast to 127.0.0.1 only; multicast is off.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
import trio

from portbroker.broker import Broker, open_broker
from portbroker.errors import MappingError, MethodUnavailable
from portbroker.lifecycle import State
from portbroker.methods.upnp import UpnpMethod, upnp_error_code
from portbroker.probe import NoMethodAvailable
from portbroker.testing.fake_igd import FakeIgd
from portbroker.types import MappingRequest
from tests.realdata import realdata


def _aioupnp_description(name: str) -> str:
    text = json.loads(realdata("aioupnp", name).read_text())["gateway"]["gateway_xml"]
    return str(text[text.index("<?xml") if "<?xml" in text else text.index("<root") :])


def descriptions() -> list[tuple[str, str]]:
    files = [
        "tailscale/googleWifiRootDescXML.xml",
        "tailscale/mikrotikRootDescXML.xml",
        "tailscale/pfSenseRootDescXML.xml",
        "tailscale/testRootDesc.xml",
        "miniupnp/miniupnpc/testdesc/linksys_WAG200G_desc.xml",
        "miniupnp/miniupnpc/testdesc/new_LiveBox_desc.xml",
        "libtorrent/root1.xml",
        "libtorrent/root2.xml",
        "libtorrent/root3.xml",
        "aioupnp/TestDiscoverDLinkDIR890L_rootdesc.xml",
        "aioupnp/TestDiscoverNetgearNighthawkAC2350_rootdesc.xml",
        "miniupnpd-2.3.1-live/rootDesc.xml",
        "miniupnpd-2.3.1-live/force_igd_desc_v1/rootDesc.xml",
    ]
    out = [(name, realdata(*name.split("/")).read_text(errors="replace")) for name in files]
    for replay in ("replay_Actiontec_GT784WN.json", "replay_NewMedia-NET_GmbH_Generic_X86.json"):
        out.append((f"aioupnp/{replay}", _aioupnp_description(replay)))
    return out


DESCRIPTIONS = descriptions()
MINIUPNPD_V2 = realdata("miniupnpd-2.3.1-live", "rootDesc.xml").read_text()
PFSENSE_V1 = realdata("tailscale", "pfSenseRootDescXML.xml").read_text()


@asynccontextmanager
async def igd_and_broker(igd: FakeIgd, probe_timeout: float = 2.0) -> AsyncIterator[Broker]:
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        async with open_broker(
            "127.0.0.1",
            ("upnp",),
            probe_timeout,
            upnp_port=igd.ssdp_port,
            ssdp_multicast=False,
            announce_port=None,
        ) as broker:
            yield broker
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("name", "text"), DESCRIPTIONS, ids=[n for n, _ in DESCRIPTIONS])
async def test_every_real_description_maps_and_unmaps(name: str, text: str) -> None:
    igd = FakeIgd(text)
    async with igd_and_broker(igd) as broker:
        report = await broker.probe()
        assert report.selected == "upnp", report
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        assert mapping.method == "upnp"
        assert mapping.external_address == IPv4Address("203.0.113.7")
        entry = igd.entries[(8080, "TCP")]
        assert (entry.client, entry.internal_port, entry.lease) == ("127.0.0.1", 8080, 3600)
        assert mapping.lease is not None
        assert mapping.lease.lifetime == 3600
        await mapping.release()
        assert igd.entries == {}
    # The SOAP went to the service the description names.
    added = [args for action, args in igd.actions if action == "AddPortMapping"]
    assert added
    assert added[0]["NewInternalClient"] == "127.0.0.1"


@pytest.mark.parametrize(
    "name",
    [
        "noSupportedServicesRootDesc.xml",
        # Huawei HG531: every service is urn:dslforum-org:..., which miniupnpc
        # does not recognise; refused with the reason rather than half-used.
        "huaweiRootDescXML.xml",
    ],
)
async def test_a_description_without_a_usable_wan_connection_is_refused(name: str) -> None:
    igd = FakeIgd(realdata("tailscale", name).read_text())
    async with igd_and_broker(igd) as broker:
        with pytest.raises(NoMethodAvailable) as info:
            await broker.map(8080, "tcp")
        assert "no WANIPConnection or WANPPPConnection service" in str(info.value)
    assert igd.actions == []  # no SOAP sent to a guessed URL


@pytest.mark.parametrize(
    "fault",
    ["testAddPortMappingPermanentLease.xml", "testAddPortMappingPermanentLease_InvalidArgs.xml"],
)
async def test_permanent_only_routers_get_lease_zero_and_we_delete_it(fault: str) -> None:
    # 725 as the spec says it, and 402 (with a "SOAP:" prefix) as some routers
    # say the same thing; tailscale issue 15223.
    igd = FakeIgd(
        PFSENSE_V1,
        permanent_only="Invalid" not in fault,
        invalid_args_for_lease="Invalid" in fault,
        fault_body=realdata("tailscale", fault).read_bytes(),
    )
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "udp", lifetime=3600)
        assert mapping.lease is not None
        assert mapping.lease.permanent
        assert igd.entries[(8080, "UDP")].lease == 0
        await mapping.release()
        assert igd.entries == {}
    leases = [a["NewLeaseDuration"] for action, a in igd.actions if action == "AddPortMapping"]
    assert leases == ["3600", "0"]


async def test_conflict_on_igd_v2_uses_add_any_port_mapping() -> None:
    igd = FakeIgd(MINIUPNPD_V2, conflict_ports={8080})
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        assert mapping.external_port != 8080
        assert [a for a, _ in igd.actions].count("AddAnyPortMapping") == 1
        # miniupnpc sends AddAnyPortMapping with lease 0: a week on IGD v2, read back.
        assert mapping.lease is not None
        assert mapping.lease.lifetime > 3600


async def test_conflict_on_igd_v1_tries_another_port() -> None:
    igd = FakeIgd(PFSENSE_V1, conflict_ports={8080})
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        assert mapping.external_port != 8080
        assert ("AddAnyPortMapping", {}) not in igd.actions
        assert (mapping.external_port, "TCP") in igd.entries


async def test_exact_port_taken_is_a_718() -> None:
    igd = FakeIgd(MINIUPNPD_V2, conflict_ports={8080})
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError) as info:
            await broker.map(8081, "tcp", external_port=8080, exact=True)
        assert (info.value.method, info.value.result_code) == ("upnp", 718)
        assert igd.entries == {}


def _captured_response(name: str) -> bytes:
    """The RESPONSE part of a miniupnpd-2.3.1-live capture, as HTTP bytes."""
    text = realdata("miniupnpd-2.3.1-live", name).read_text()
    response = text.split("### RESPONSE", 1)[1].strip("\n")
    head, _, body = response.partition("\n\n")
    lines = [line for line in head.splitlines() if not line.lower().startswith("content-length")]
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@pytest.mark.parametrize(
    ("capture", "code"),
    [
        ("soap_AddPortMapping_denied_port22.http", 606),
        ("soap_AddPortMapping_other_client_secure_mode.http", 718),
    ],
)
async def test_captured_miniupnpd_refusals(capture: str, code: int) -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    # Every AddPortMapping answered with the captured fault.
    igd.scripted["AddPortMapping"] = deque([_captured_response(capture)] * 10)
    igd.scripted["AddAnyPortMapping"] = deque([_captured_response(capture)] * 10)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError) as info:
            await broker.map(8080, "tcp", external_port=8080, exact=True)
        assert info.value.result_code == code


async def test_captured_replies_of_a_whole_exchange() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    for action, capture in (
        ("GetExternalIPAddress", "soap_GetExternalIPAddress.http"),
        ("AddPortMapping", "soap_AddPortMapping_ok.http"),
        ("GetSpecificPortMappingEntry", "soap_GetSpecificPortMappingEntry_ok.http"),
        ("DeletePortMapping", "soap_DeletePortMapping_ok.http"),
    ):
        igd.scripted[action] = deque([_captured_response(capture)])
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(6001, "tcp", lifetime=3600)
        # The captured GetExternalIPAddress says 11.22.33.44; the entry's lease, 3600.
        assert mapping.external_address == IPv4Address(
            re.findall(
                r"<NewExternalIPAddress>([^<]+)<",
                _captured_response("soap_GetExternalIPAddress.http").decode(),
            )[0]
        )
        await mapping.release()
        assert mapping.state is State.RELEASED


async def test_delete_of_a_missing_entry_is_fine() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(8080, "tcp")
        igd.entries.clear()  # gone behind our back (714 on delete)
        events = mapping.events()
        await mapping.release()
        released = [e async for e in events]
        assert released[-1].confirmed  # type: ignore[union-attr]


async def test_unusable_external_address_is_refused() -> None:
    igd = FakeIgd(MINIUPNPD_V2, external_address="0.0.0.0")
    async with igd_and_broker(igd) as broker:
        report = await broker.probe()
        assert report.selected is None
        outcome = report.outcome("upnp")
        assert outcome is not None
        assert "no usable external address" in (outcome.error or "")


async def test_silent_gateway_times_out_within_the_probe_timeout() -> None:
    igd = FakeIgd(MINIUPNPD_V2, silent_ssdp=True)
    async with igd_and_broker(igd, probe_timeout=0.5) as broker:
        with pytest.raises(NoMethodAvailable, match=r"no answer within 0\.5 s"):
            await broker.map(8080, "tcp")


async def test_location_naming_another_host_is_pointed_at_the_gateway() -> None:
    method = UpnpMethod(IPv4Address("192.168.77.1"), multicast=False)
    assert method._location_at_gateway("http://10.9.9.9:2189/rootDesc.xml?x=1") == (
        "http://192.168.77.1:2189/rootDesc.xml?x=1"
    )
    assert method._location_at_gateway("http://router.lan/d.xml") == "http://192.168.77.1:80/d.xml"
    assert method._location_at_gateway("https://192.168.77.1/d.xml") is None
    assert method._location_at_gateway("file:///etc/passwd") is None


async def test_replies_from_other_hosts_are_ignored() -> None:
    method = UpnpMethod(IPv4Address("192.168.77.1"), multicast=False)
    raw = realdata(
        "miniupnpd-2.3.1-live",
        "ssdp_msearch_urn_schemas-upnp-org_device_InternetGatewayDevice_2.txt",
    ).read_bytes()
    assert method._accept(raw, "192.168.77.1") is not None
    assert method._accept(raw, "192.168.77.50") is None


async def test_control_url_leading_away_from_the_gateway_is_refused() -> None:
    # URLBase names another host (loopback, so nothing could leave even if
    # contacted): the control URL it yields must never be used.
    text = re.sub(r"<device>", "<device>", MINIUPNPD_V2, count=1).replace(
        "<specVersion>", "<URLBase>http://127.0.0.2:9</URLBase><specVersion>", 1
    )

    class KeepBase(FakeIgd):
        def _prepare_description(self) -> str:
            return self.description

    igd = KeepBase(text)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(NoMethodAvailable, match="leads away from the gateway"):
            await broker.map(8080, "tcp")
    assert not [a for a, _ in igd.actions if a != "GetExternalIPAddress"]


async def test_renewal_notices_a_vanished_entry_and_restores_it() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        losses: list[str] = []
        method = UpnpMethod(
            IPv4Address("127.0.0.1"),
            ssdp_port=igd.ssdp_port,
            multicast=False,
            report=lambda signal: losses.append(getattr(signal, "detail", "")),
        )
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
        igd.reboot()
        renewed = await method.create(request, lease)
        assert losses
        assert "vanished" in losses[0]
        assert renewed.external_port == lease.external_port
        assert (8080, "TCP") in igd.entries
        nursery.cancel_scope.cancel()


def test_error_texts_map_back_to_codes() -> None:
    assert upnp_error_code("ConflictInMappingEntry") == 718
    assert upnp_error_code("OnlyPermanentLeasesSupported") == 725
    assert upnp_error_code("Invalid Args") == 402
    assert upnp_error_code("Miniupnpc HTTP error") is None


async def test_upnp_only_gateway_is_chosen_after_pcp_and_natpmp_are_refused() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        async with open_broker(
            "127.0.0.1",
            port=1,  # nothing listens: ICMP port unreachable for PCP and NAT-PMP
            upnp_port=igd.ssdp_port,
            ssdp_multicast=False,
            announce_port=None,
        ) as broker:
            mapping = await broker.map(8080, "tcp")
            assert mapping.method == "upnp"
            report = await broker.probe()
            pcp_outcome = report.outcome("pcp")
            assert pcp_outcome is not None
            assert "ICMP" in (pcp_outcome.error or "")
        nursery.cancel_scope.cancel()


def test_method_unavailable_names_the_method() -> None:
    exc = MethodUnavailable("upnp", "nothing listens")
    assert (exc.method, str(exc)) == ("upnp", "upnp: nothing listens")
