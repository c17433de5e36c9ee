"""PcpMethod over a Transport and a FakeGateway memory link, and its pure rules.

The result-code table (portbroker.methods.pcp_rules.RESULT_RULES,
docs/result-codes.md) is tested row by row through create_by_preference with
[pcp, natpmp], as the broker uses it when the caller forces no method.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from ipaddress import IPv4Address

import pytest
import trio

from portbroker.errors import MappingError, MethodUnavailable, NoMethodAvailable
from portbroker.methods import pcp_rules
from portbroker.methods.natpmp import NatPmpMethod
from portbroker.methods.pcp import PcpMethod
from portbroker.methods.rules import Scope, Undo, grant_problem, unusable_address
from portbroker.probe import create_by_preference, probe_all
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.transport import Transport, open_udp_link
from portbroker.types import Lease, MappingRequest, TransportProtocol
from portbroker.wire import pcp
from portbroker.wire.pcp import ResultCode
from tests.conftest import first_line
from tests.method_harness import harness

GATEWAY = IPv4Address("127.0.0.1")
CLIENT = IPv4Address("192.168.1.100")
TCP_7000 = MappingRequest(7000, "tcp")


# -- socket failures (issue 7, item 1) ----------------------------------------


async def test_a_host_firewall_makes_pcp_unavailable_not_a_traceback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        h.link.send_error = PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        with pytest.raises(MethodUnavailable) as info:
            await h.pcp.create(TCP_7000, None)
        assert info.value.method == "pcp"
        assert "Operation not permitted (EPERM); a host firewall may drop it" in info.value.reason
        outcome = await h.pcp.probe()
        assert not outcome.available
        assert outcome.error is not None
        assert "EPERM" in outcome.error


async def test_map_moves_on_when_only_pcp_is_firewalled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A PCP server elsewhere (RFC 7488) behind a firewall rule: NAT-PMP to the
    gateway still works, and create_by_preference takes it."""
    async with harness() as h:
        pcp_link = h.gateway.memory_link()
        pcp_link.send_error = OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        pcp_transport = Transport(pcp_link)
        async with trio.open_nursery() as nursery:
            await nursery.start(pcp_transport.run)
            method = type(h.pcp)(pcp_transport, GATEWAY)
            lease, report = await create_by_preference(GATEWAY, [method, h.natpmp], TCP_7000, 2.0)
            nursery.cancel_scope.cancel()
    assert lease.method == "natpmp"
    outcome = report.outcome("pcp")
    assert outcome is not None
    assert not outcome.available
    assert outcome.error is not None
    assert "(ENETUNREACH)" in outcome.error


# -- useless grants (item 5) ----------------------------------------------------


async def test_a_port_zero_grant_is_deleted_and_natpmp_takes_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(grant_port_zero=True)) as h:
        lease, report = await create_by_preference(GATEWAY, [h.pcp, h.natpmp], TCP_7000, 2.0)
    assert lease.method == "natpmp"
    assert lease.external_port != 0
    assert [m.via for m in h.gateway.mappings.values()] == ["natpmp"]
    outcome = report.outcome("pcp")
    assert outcome is not None
    assert outcome.error == "the PCP server granted port 0; deleted it"
    assert not outcome.available
    # The delete carried the mapping's nonce (RFC 6887 §15).
    maps = [r for r in h.gateway.requests if isinstance(r, pcp.PcpRequest)]
    assert [r.lifetime for r in maps] == [7200, 0]
    assert maps[0].data is not None
    assert maps[1].data is not None
    assert maps[0].data.nonce == maps[1].data.nonce


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("169.254.7.7", "link-local"),
        ("255.255.255.255", "reserved"),
    ],
)
async def test_an_unusable_external_address_is_deleted_and_natpmp_takes_over(
    autojump_clock: trio.testing.MockClock, address: str, kind: str
) -> None:
    async with harness(FakeGateway(granted_address=address)) as h:
        lease, report = await create_by_preference(GATEWAY, [h.pcp, h.natpmp], TCP_7000, 2.0)
    assert lease.method == "natpmp"
    assert lease.external_address == IPv4Address("203.0.113.7")
    assert [m.via for m in h.gateway.mappings.values()] == ["natpmp"]
    outcome = report.outcome("pcp")
    assert outcome is not None
    assert outcome.error == (
        f"the PCP server granted an unusable ({kind}) external address {address}; deleted it"
    )


async def test_a_useless_grant_the_server_will_not_delete_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(grant_port_zero=True, silent_deletes=True)) as h:
        started = trio.current_time()
        with pytest.raises(MethodUnavailable) as info:
            await h.pcp.create(TCP_7000, None)
        # Bounded: the undo gives up after UNDO_TIMEOUT.
        assert trio.current_time() - started == pytest.approx(4.0, abs=0.01)
    assert info.value.reason == (
        "the PCP server granted port 0; could not delete it (no answer within 4 s)"
    )


# -- ANNOUNCE refused, MAP served (item 6) ------------------------------------


async def test_a_server_refusing_announce_but_serving_map_is_pcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(announce_unsupported=True)) as h:
        outcome = await h.pcp.probe()
        assert outcome.available
        assert outcome.error is None
        report = await probe_all(GATEWAY, [h.pcp, h.natpmp], 2.0)
        assert report.selected == "pcp"
        lease = await h.pcp.create(TCP_7000, None)
        assert lease.method == "pcp"


# -- the result-code table (item 9) -------------------------------------------


@pytest.mark.parametrize("rule", pcp_rules.RESULT_RULES, ids=lambda r: r.code.name)
async def test_result_code_table_through_create_by_preference(
    autojump_clock: trio.testing.MockClock, rule: pcp_rules.CodeRule
) -> None:
    async with harness(FakeGateway(forced_result=rule.code, forced_lifetime=600)) as h:
        if rule.create is Scope.SERVER:
            lease, report = await create_by_preference(GATEWAY, [h.pcp, h.natpmp], TCP_7000, 2.0)
            assert lease.method == "natpmp"
            outcome = report.outcome("pcp")
            assert outcome is not None
            assert not outcome.available
            assert outcome.error == rule.meaning
        else:
            with pytest.raises(MappingError) as info:
                await create_by_preference(GATEWAY, [h.pcp, h.natpmp], TCP_7000, 2.0)
            assert info.value.method == "pcp"
            assert info.value.result_code == rule.code
            assert info.value.retry_after == 600.0
            assert rule.meaning in info.value.reason
            assert not h.gateway.mappings  # NAT-PMP was never asked to map


async def test_an_unknown_result_code_is_refused_for_this_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(forced_result=20, forced_lifetime=0)) as h:
        with pytest.raises(MappingError) as info:
            await create_by_preference(GATEWAY, [h.pcp, h.natpmp], TCP_7000, 2.0)
    assert info.value.result_code == 20
    assert info.value.retry_after == 60.0  # long class, clamped


async def test_a_forced_method_gets_the_server_scope_error_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(forced_result=ResultCode.NOT_AUTHORIZED)) as h:
        with pytest.raises(NoMethodAvailable) as info:
            await create_by_preference(GATEWAY, [h.pcp], TCP_7000, 2.0)
    assert "NOT_AUTHORIZED" in str(info.value)


async def test_not_authorized_on_a_renewal_is_about_this_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """RFC 6887 §11.3: a MAP whose nonce differs from the holder's gets
    NOT_AUTHORIZED with the holder's remaining lifetime. On a renewal with our
    own nonce that is this mapping's problem (someone took the port after a
    restart), not a reason to give up on PCP."""
    gateway = FakeGateway()
    async with harness(gateway) as h:
        lease = await h.pcp.create(TCP_7000, None)
        gateway.forced_result = ResultCode.NOT_AUTHORIZED
        gateway.forced_lifetime = 900
        with pytest.raises(MappingError) as info:
            await h.pcp.create(TCP_7000, lease)
        assert info.value.result_code == ResultCode.NOT_AUTHORIZED
        assert info.value.retry_after == 900.0
        # The same code for a new mapping: PCP will not serve this client.
        with pytest.raises(MethodUnavailable):
            await h.pcp.create(MappingRequest(7001, "tcp"), None)


# -- pure rules ---------------------------------------------------------------


def _lease(**changes: object) -> Lease:
    fields: dict[str, object] = {
        "method": "pcp",
        "protocol": TransportProtocol.UDP,
        "internal_address": CLIENT,
        "internal_port": 5000,
        "external_address": IPv4Address("203.0.113.7"),
        "external_port": 41000,
        "lifetime": 7200,
        "granted_at": 0.0,
        "gateway": GATEWAY,
        "nonce": bytes(range(12)),
    }
    fields.update(changes)
    return Lease(**fields)  # type: ignore[arg-type]


def test_a_new_map_asks_for_the_wished_port_with_no_address_preference() -> None:
    request = MappingRequest(5000, "udp", external_port=6000)
    sent = pcp_rules.map_request(CLIENT, request, None, b"n" * 12, exact=False)
    assert sent.opcode == pcp.Opcode.MAP
    assert sent.lifetime == 7200
    assert sent.data == pcp.MapData(b"n" * 12, 17, 5000, 6000, pcp.NO_PREFERENCE_V4)
    assert list(sent.options) == []


def test_a_renewal_reuses_the_nonce_and_suggests_what_was_granted() -> None:
    """RFC 6887 §11.2.1, §8.5."""
    sent = pcp_rules.map_request(
        CLIENT, MappingRequest(5000, "udp"), _lease(), b"x" * 12, exact=False
    )
    assert sent.data == pcp.MapData(bytes(range(12)), 17, 5000, 41000, IPv4Address("203.0.113.7"))


def test_options_third_party_and_prefer_failure() -> None:
    request = MappingRequest(
        5000, "tcp", external_port=5000, exact=True, internal_address="192.168.1.50"
    )
    sent = pcp_rules.map_request(CLIENT, request, None, b"n" * 12, exact=True)
    assert list(sent.options) == [pcp.ThirdParty(IPv4Address("192.168.1.50")), pcp.PreferFailure()]
    deleted = pcp_rules.delete_request(CLIENT, _lease(internal_address="192.168.1.50"))
    assert deleted.lifetime == 0
    assert list(deleted.options) == [pcp.ThirdParty(IPv4Address("192.168.1.50"))]
    assert deleted.data == pcp.MapData(bytes(range(12)), 17, 5000, 0, pcp.NO_PREFERENCE_V4)


def test_retry_without_suggestion_keeps_the_nonce() -> None:
    request = MappingRequest(5000, "udp", external_port=6000)
    sent = pcp_rules.map_request(CLIENT, request, None, b"n" * 12, exact=False)
    again = pcp_rules.retry_without_suggestion(sent)
    assert again.data == pcp.MapData(b"n" * 12, 17, 5000, 0, pcp.NO_PREFERENCE_V4)
    assert again.lifetime == sent.lifetime


def _response(code: int, lifetime: int = 0, **data: object) -> pcp.PcpResponse:
    fields: dict[str, object] = {
        "nonce": b"n" * 12,
        "protocol": 17,
        "internal_port": 5000,
        "external_port": 41000,
        "external_address": IPv4Address("203.0.113.7"),
    }
    fields.update(data)
    return pcp.PcpResponse(pcp.Opcode.MAP, code, lifetime, 99, pcp.MapData(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "lifetime", "hold_off"),
    [
        (ResultCode.NO_RESOURCES, 30, 30.0),
        (ResultCode.NETWORK_FAILURE, 0, 5.0),  # short, miniupnpd's 0: clamped
        (ResultCode.NOT_AUTHORIZED, 0, 60.0),  # long, miniupnpd's 0: clamped
        (ResultCode.NOT_AUTHORIZED, 1800, 1800.0),
        (ResultCode.CANNOT_PROVIDE_EXTERNAL, 0, 30.0),
    ],
)
def test_error_hold_off(code: ResultCode, lifetime: int, hold_off: float) -> None:
    assert pcp_rules.error_hold_off(_response(code, lifetime)) == hold_off


def test_interpret_map_grants_a_lease() -> None:
    request = MappingRequest(5000, "udp")
    sent = pcp_rules.map_request(CLIENT, request, None, b"n" * 12, exact=False)
    lease = pcp_rules.interpret_map(
        _response(0, 3600), request=request, sent=sent, server=GATEWAY, now=10.0, renewal=False
    )
    assert isinstance(lease, Lease)
    assert (lease.external_port, lease.lifetime, lease.expires_at) == (41000, 3600, 3610.0)
    assert lease.nonce == b"n" * 12
    assert lease.epoch == 99


def test_interpret_map_undoes_port_zero_and_refuses_lifetime_zero() -> None:
    request = MappingRequest(5000, "udp")
    sent = pcp_rules.map_request(CLIENT, request, None, b"n" * 12, exact=False)
    undo = pcp_rules.interpret_map(
        _response(0, 3600, external_port=0),
        request=request,
        sent=sent,
        server=GATEWAY,
        now=0.0,
        renewal=False,
    )
    assert isinstance(undo, Undo)
    assert undo.lease.nonce == b"n" * 12
    error = undo.error("deleted it")
    assert isinstance(error, MethodUnavailable)
    assert str(error) == "pcp: the PCP server granted port 0; deleted it"
    with pytest.raises(MappingError, match="lifetime 0"):
        pcp_rules.interpret_map(
            _response(0, 0), request=request, sent=sent, server=GATEWAY, now=0.0, renewal=False
        )


@pytest.mark.parametrize("rule", pcp_rules.RESULT_RULES, ids=lambda r: r.code.name)
def test_refusal_follows_the_table(rule: pcp_rules.CodeRule) -> None:
    for renewal, scope in ((False, rule.create), (True, rule.renewal)):
        error = pcp_rules.refusal(_response(rule.code, 1800), renewal=renewal)
        expected = MethodUnavailable if scope is Scope.SERVER else MappingError
        assert type(error) is expected
        assert rule.meaning in str(error)


@pytest.mark.parametrize("code", list(ResultCode))
def test_announce_outcome(code: ResultCode) -> None:
    response = pcp.PcpResponse(pcp.Opcode.ANNOUNCE, code, 0, 12)
    outcome = pcp_rules.announce_outcome(response, 0.01, None)
    refused_outright = {
        ResultCode.UNSUPP_VERSION,
        ResultCode.NOT_AUTHORIZED,
        ResultCode.ADDRESS_MISMATCH,
    }
    assert outcome.available is (code not in refused_outright)
    assert outcome.epoch == 12


def test_reply_problem_names_natpmp_and_other_versions() -> None:
    natpmp_reply = pcp.decode_response(bytes.fromhex("0081000100000005"))
    problem = pcp_rules.reply_problem(natpmp_reply)
    assert problem is not None
    assert problem.natpmp_hint
    assert pcp_rules.reply_problem(pcp.PcpResponse(pcp.Opcode.ANNOUNCE, 0, 0, 0)) is None


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("239.1.1.1", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("240.0.0.1", "reserved"),
        ("10.0.0.1", None),  # double NAT: usable by the next NAT
        ("100.64.0.1", None),  # carrier-grade NAT
        ("203.0.113.7", None),
        ("2001:db8::1", None),
    ],
)
def test_unusable_address(address: str, why: str | None) -> None:
    from ipaddress import ip_address

    assert unusable_address(ip_address(address)) == why


def test_grant_problem() -> None:
    assert grant_problem(0, None) == "granted port 0"
    assert grant_problem(1, IPv4Address("203.0.113.7")) is None
    assert grant_problem(1, IPv4Address("0.0.0.0")) == (
        "granted an unusable (unspecified) external address 0.0.0.0"
    )


# -- over real UDP on 127.0.0.1 -----------------------------------------------


async def test_over_real_udp_a_port_zero_grant_hands_over_to_natpmp() -> None:
    gateway = FakeGateway(port=0, grant_port_zero=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve_udp)
            link = await open_udp_link(GATEWAY, gateway.port)
            transport = Transport(link)
            await nursery.start(transport.run)
            pcp_method = PcpMethod(transport, GATEWAY)
            natpmp_method = NatPmpMethod(transport, GATEWAY)
            lease, _report = await create_by_preference(
                GATEWAY, [pcp_method, natpmp_method], TCP_7000, 2.0
            )
            link.close()
            nursery.cancel_scope.cancel()
    assert lease.method == "natpmp"
    assert [m.via for m in gateway.mappings.values()] == ["natpmp"]


def test_the_fake_gateway_process_refuses_announce_on_request() -> None:
    """``python -m portbroker.testing.fake_gateway --announce-unsupported``: a
    small PCP server that serves MAP but not ANNOUNCE, for lab and CLI tests."""
    process = subprocess.Popen(
        [sys.executable, "-m", "portbroker.testing.fake_gateway", "--announce-unsupported"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = first_line(process, "the FakeGateway")
        assert line.startswith("port "), line
        port = int(line.split()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.send(pcp.encode_request(pcp_rules.announce_request(IPv4Address("127.0.0.1"))))
            reply = pcp.decode_response(sock.recv(1100))
        assert reply.result_code == ResultCode.UNSUPP_OPCODE
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
