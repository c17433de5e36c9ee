"""UPnP IGD against every real description we have (loaded by tests/realdata.py).

Each description is served by FakeIgd on 127.0.0.1 (its URLBase and absolute
URLs pointed at the fake, as they point at the device itself in the wild),
with SOAP answered from a mapping table or replayed from real captures. SSDP
is unicast to 127.0.0.1 only; multicast is off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import tracemalloc
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from typing import Any

import pytest
import trio

from portbroker.broker import Broker, open_broker
from portbroker.epoch import BootIdSeen, EntryMissing, GatewaySignal, UptimeSeen
from portbroker.errors import MappingError, MethodUnavailable, NoAnswer, PortBrokerError
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


# -- signals, not decisions -----------------------------------------------------------

LOCALHOST = IPv4Address("127.0.0.1")
GUARD = 20.0  # seconds: only so that a regression fails instead of hanging


def _method(igd: FakeIgd, signals: list[GatewaySignal] | None = None) -> UpnpMethod:
    return UpnpMethod(
        LOCALHOST,
        ssdp_port=igd.ssdp_port,
        multicast=False,
        report=None if signals is None else signals.append,
    )


@asynccontextmanager
async def serving(igd: FakeIgd) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        yield
        nursery.cancel_scope.cancel()


async def test_boot_id_and_uptime_are_reported_as_they_are_seen() -> None:
    igd = FakeIgd(MINIUPNPD_V2, boot_id=7)
    signals: list[GatewaySignal] = []
    async with serving(igd):
        method = _method(igd, signals)
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
        assert [type(s) for s in signals] == [BootIdSeen, UptimeSeen]
        assert signals[0] == BootIdSeen(7, signals[0].at)
        await method.create(request, lease)
        assert [type(s) for s in signals] == [BootIdSeen, UptimeSeen, UptimeSeen]
        igd.reboot()
        method.forget_igd()
        await method.probe()
        assert signals[-1] == BootIdSeen(8, signals[-1].at)
    # The method decides nothing: no entry went missing, nothing was "lost".
    assert not [s for s in signals if isinstance(s, EntryMissing)]


async def test_renewal_reports_a_missing_entry_and_restores_it() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    signals: list[GatewaySignal] = []
    async with serving(igd):
        method = _method(igd, signals)
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
        igd.entries.clear()  # the gateway lost it: 714 on GetSpecificPortMappingEntry
        renewed = await method.create(request, lease)
        missing = [s for s in signals if isinstance(s, EntryMissing)]
        assert len(missing) == 1
        assert "714" in missing[0].detail
        assert renewed.external_port == lease.external_port
        assert (8080, "TCP") in igd.entries


def _raw(status: str, body: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("connection closed", b""),
        ("HTTP 503", _raw("503 Service Unavailable")),
        ("HTTP 500 without a UPnP error", _raw("500 Internal Server Error", b"<html/>")),
        ("unreadable", b"garbage\r\n\r\n"),
    ],
)
async def test_a_transient_failure_at_renewal_is_not_a_missing_entry(
    name: str, reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # miniupnpc's getspecificportmapping() returns None for these and for 714
    # alike, which read as "entry vanished": a spurious Lost/Restored pair.
    igd = FakeIgd(MINIUPNPD_V2)
    signals: list[GatewaySignal] = []
    async with serving(igd):
        method = _method(igd, signals)
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
        igd.scripted["GetSpecificPortMappingEntry"] = deque([reply])
        failure: Exception | None = None
        with caplog.at_level(logging.DEBUG, "portbroker"):
            try:
                await method.create(request, lease)
            except NoAnswer as exc:
                failure = exc
        assert not [s for s in signals if isinstance(s, EntryMissing)]
        # The renewal fails (and is retried on the lifecycle's schedule).
        assert isinstance(failure, NoAnswer)
        assert "GetSpecificPortMappingEntry" in str(failure)
        # Logged once, below warning: the broker reports the failed renewal.
        assert len([r for r in caplog.records if r.name.startswith("portbroker.methods")]) == 1
        assert all(r.levelno < logging.WARNING for r in caplog.records)
        # The next renewal works and the entry never moved.
        renewed = await method.create(request, lease)
        assert renewed.external_port == lease.external_port
    assert not [s for s in signals if isinstance(s, EntryMissing)]


# -- SSDP from any port ----------------------------------------------------------------


async def test_a_search_reply_from_an_ephemeral_port_is_accepted() -> None:
    # UDA 1.1 §1.3.3 does not require the reply to come from port 1900; a
    # connected socket drops it, so unicast-only discovery found nothing.
    igd = FakeIgd(MINIUPNPD_V2, ssdp_from_ephemeral_port=True)
    async with serving(igd):
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        with trio.fail_after(GUARD):
            reply = await method.search()
        assert reply.location == igd.location
    async with igd_and_broker(FakeIgd(MINIUPNPD_V2, ssdp_from_ephemeral_port=True)) as broker:
        assert (await broker.probe()).selected == "upnp"


async def test_nothing_on_the_ssdp_port_is_refused_at_once() -> None:
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as closed:
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    method = UpnpMethod(LOCALHOST, ssdp_port=port, multicast=False)
    with trio.fail_after(GUARD), pytest.raises(MethodUnavailable, match="nothing listens"):
        await method.search()


# -- nothing on stderr ------------------------------------------------------------------


def _closed_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_closed_http_port_is_reported_and_stderr_stays_clean(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # miniupnpc's connecthostport() perror()s "connect: Connection refused"
    # straight to fd 2, once per attempt.
    igd = FakeIgd(MINIUPNPD_V2, location_port=_closed_tcp_port())
    async with serving(igd):
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        with trio.fail_after(GUARD):
            outcome = await method.probe()
    assert not outcome.available
    assert "refused" in (outcome.error or "")
    assert "ECONNREFUSED" in (outcome.error or "")
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


async def test_soap_to_a_closed_port_at_renewal_leaves_stderr_clean(
    capfd: pytest.CaptureFixture[str],
) -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with serving(igd):
        method = _method(igd)
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
    # The gateway's HTTP server is gone (miniupnpd restarted on another port).
    failure: Exception | None = None
    with trio.fail_after(GUARD):
        try:
            await method.create(request, lease)
        except PortBrokerError as exc:
            failure = exc
    assert capfd.readouterr().err == ""
    assert isinstance(failure, NoAnswer)
    assert "refused" in str(failure)


# -- a description or SOAP answer that never ends ----------------------------------------


async def test_a_dripped_description_fails_in_time_and_later_requests_work() -> None:
    igd = FakeIgd(MINIUPNPD_V2, description_mode="drip", drip_interval=0.2)
    async with serving(igd):
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        method.http_timeout = 1.0
        with trio.fail_after(GUARD):
            outcome = await method.probe()
        assert not outcome.available
        assert "no complete answer" in (outcome.error or "")
        assert igd.body_bytes_sent >= 2  # it did drip, and we did wait for it
        igd.description_mode = "normal"
        with trio.fail_after(GUARD):
            lease = await method.create(MappingRequest(8080, "tcp", 3600), None)
        assert (lease.external_port, "TCP") in igd.entries


async def test_an_endless_description_is_cut_off_at_the_cap() -> None:
    igd = FakeIgd(MINIUPNPD_V2, description_mode="endless")
    async with serving(igd):
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        tracemalloc.start()
        try:
            with trio.fail_after(GUARD):
                outcome = await method.probe()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not outcome.available
        assert "64 KiB" in (outcome.error or "")
        print(f"endless description: peak {peak / 1024:.0f} KiB traced while reading it")
        assert peak < 1024 * 1024
        igd.description_mode = "normal"
        with trio.fail_after(GUARD):
            assert (await method.probe()).available


async def test_a_dripping_soap_answer_does_not_jam_later_requests() -> None:
    igd = FakeIgd(MINIUPNPD_V2, drip_actions={"AddPortMapping"}, drip_interval=0.2)
    async with serving(igd):
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        method.http_timeout = 1.0
        request = MappingRequest(8080, "tcp", 3600)
        with trio.fail_after(GUARD), pytest.raises(MethodUnavailable, match="no complete answer"):
            await method.create(request, None)
        igd.drip_actions.clear()
        with trio.fail_after(GUARD):
            lease = await method.create(request, None)
        assert (lease.external_port, "TCP") in igd.entries


# -- a local socket failure is this method's failure --------------------------------------


class _FailingSocket:
    """A trio socket whose sends (or connects) fail with *error*."""

    def __init__(self, real: Any, error: OSError, fail_connect: bool) -> None:
        self._real = real
        self._error = error
        self._fail_connect = fail_connect

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _FailingSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    async def send(self, *args: Any) -> int:
        raise self._error

    async def sendto(self, *args: Any) -> int:
        raise self._error

    async def connect(self, address: Any) -> None:
        if self._fail_connect:
            raise self._error
        await self._real.connect(address)


def _fail_sockets(
    monkeypatch: pytest.MonkeyPatch, kind: int, error: OSError, *, fail_connect: bool = False
) -> None:
    real_factory = trio.socket.socket

    def factory(*args: Any, **kwargs: Any) -> Any:
        sock = real_factory(*args, **kwargs)
        if sock.type == kind:
            return _FailingSocket(sock, error, fail_connect)
        return sock

    monkeypatch.setattr(trio.socket, "socket", factory)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EPERM, "Operation not permitted (EPERM); a host firewall may drop it"),
        (errno.ENETUNREACH, "(ENETUNREACH); no route to that network"),
        (errno.EHOSTUNREACH, "(EHOSTUNREACH); no route to that host"),
        (errno.ENOBUFS, "(ENOBUFS); the kernel is out of buffer space"),
        (errno.EADDRNOTAVAIL, "(EADDRNOTAVAIL); no local address can reach it"),
    ],
)
async def test_an_ssdp_socket_failure_is_this_methods_failure(
    monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with serving(igd):
        _fail_sockets(monkeypatch, socket.SOCK_DGRAM, OSError(code, os.strerror(code)))
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        with trio.fail_after(GUARD):
            outcome = await method.probe()
        assert not outcome.available
        assert outcome.error is not None
        assert outcome.error.startswith(f"cannot send to 127.0.0.1:{igd.ssdp_port}: ")
        assert outcome.error.endswith(words)
        assert "Errno" not in outcome.error
        with trio.fail_after(GUARD), pytest.raises(MethodUnavailable) as info:
            await method.create(MappingRequest(8080, "tcp"), None)
        assert not isinstance(info.value, BaseExceptionGroup)
        assert info.value.method == "upnp"


async def test_an_http_socket_failure_is_this_methods_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with serving(igd):
        _fail_sockets(
            monkeypatch,
            socket.SOCK_STREAM,
            OSError(errno.EPERM, os.strerror(errno.EPERM)),
            fail_connect=True,
        )
        method = UpnpMethod(LOCALHOST, ssdp_port=igd.ssdp_port, multicast=False)
        with trio.fail_after(GUARD):
            outcome = await method.probe()
    assert not outcome.available
    assert outcome.error is not None
    assert outcome.error.startswith(
        f"cannot connect to 127.0.0.1:{igd.http_port}: Operation not permitted (EPERM)"
    )


async def test_a_map_whose_upnp_socket_fails_names_the_reason_not_an_errno(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with igd_and_broker(igd) as broker:
        _fail_sockets(
            monkeypatch, socket.SOCK_DGRAM, OSError(errno.EPERM, "Operation not permitted")
        )
        with trio.fail_after(GUARD), pytest.raises(NoMethodAvailable) as info:
            await broker.map(8080, "tcp")
    assert "a host firewall may drop it" in str(info.value)


async def test_a_renewal_reads_the_external_address_again() -> None:
    # Seen in the lab (set_external_address, an ISP lease change): a UPnP
    # mapping kept the cached old address at every renewal, so it never got
    # ExternalAddressChanged and candidates and DNS-SD records stayed wrong.
    igd = FakeIgd(MINIUPNPD_V2)
    async with serving(igd):
        method = _method(igd, [])
        request = MappingRequest(8080, "tcp", 3600)
        lease = await method.create(request, None)
        assert str(lease.external_address) == "203.0.113.7"
        igd.external_address = "203.0.113.9"
        renewed = await method.create(request, lease)
        assert str(renewed.external_address) == "203.0.113.9"
        assert renewed.external_port == lease.external_port
