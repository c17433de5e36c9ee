"""NatPmpMethod over a Transport and a FakeGateway memory link, and its pure rules.

The result-code table (portbroker.methods.natpmp_rules.RESULT_RULES,
docs/result-codes.md) is tested row by row through create_by_preference with
[natpmp, pcp].
"""

from __future__ import annotations

import errno
import os
from ipaddress import IPv4Address

import pytest
import trio

from portbroker.errors import MappingError, MethodUnavailable
from portbroker.methods import natpmp_rules
from portbroker.methods.rules import Scope, Undo
from portbroker.probe import create_by_preference
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, MappingRequest, TransportProtocol
from portbroker.wire import natpmp
from portbroker.wire.natpmp import ResultCode
from tests.method_harness import harness

GATEWAY = IPv4Address("127.0.0.1")
CLIENT = IPv4Address("192.168.1.100")
TCP_7000 = MappingRequest(7000, "tcp")


async def test_a_socket_error_makes_natpmp_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        h.link.send_error = OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        with pytest.raises(MethodUnavailable) as info:
            await h.natpmp.create(TCP_7000, None)
        assert info.value.method == "natpmp"
        assert "(ENOBUFS); the kernel is out of buffer space" in info.value.reason
        outcome = await h.natpmp.probe()
        assert not outcome.available


async def test_a_port_zero_grant_is_deleted_and_pcp_takes_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(FakeGateway(natpmp_grant_port_zero=True)) as h:
        lease, report = await create_by_preference(GATEWAY, [h.natpmp, h.pcp], TCP_7000, 2.0)
    assert lease.method == "pcp"
    assert [m.via for m in h.gateway.mappings.values()] == ["pcp"]
    outcome = report.outcome("natpmp")
    assert outcome is not None
    assert outcome.error == "the gateway granted port 0; deleted it"
    deletes = [
        r for r in h.gateway.requests if isinstance(r, natpmp.MapRequest) and r.lifetime == 0
    ]
    assert deletes == [natpmp.MapRequest(natpmp.Opcode.MAP_TCP, 7000, 0, 0)]


async def test_an_unusable_external_address_rules_natpmp_out_before_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(external_address="0.0.0.0", granted_address="203.0.113.7")
    async with harness(gateway) as h:
        lease, report = await create_by_preference(GATEWAY, [h.natpmp, h.pcp], TCP_7000, 2.0)
    assert lease.method == "pcp"
    outcome = report.outcome("natpmp")
    assert outcome is not None
    assert outcome.error == "the gateway reports an unusable (unspecified) address 0.0.0.0"
    # Asked before mapping, so there was nothing to undo.
    assert not any(isinstance(r, natpmp.MapRequest) for r in gateway.requests)


# Result 1 is left out: a version-0 datagram with result 1 is the answer to a
# *PCP* request (RFC 6886 §3.5, what a NAT-PMP-only box sends to PCP), so the
# transport hands it to PCP requests; we never send NAT-PMP a version it lacks.
@pytest.mark.parametrize(
    "rule",
    [r for r in natpmp_rules.RESULT_RULES if r.code != ResultCode.UNSUPPORTED_VERSION],
    ids=lambda r: r.code.name,
)
async def test_result_code_table_through_create_by_preference(
    autojump_clock: trio.testing.MockClock, rule: natpmp_rules.CodeRule
) -> None:
    async with harness(FakeGateway(forced_natpmp_result=rule.code)) as h:
        if rule.scope is Scope.SERVER:
            lease, report = await create_by_preference(GATEWAY, [h.natpmp, h.pcp], TCP_7000, 2.0)
            assert lease.method == "pcp"
            outcome = report.outcome("natpmp")
            assert outcome is not None
            assert outcome.error == rule.meaning
        else:
            with pytest.raises(MappingError) as info:
                await create_by_preference(GATEWAY, [h.natpmp, h.pcp], TCP_7000, 2.0)
            assert info.value.method == "natpmp"
            assert info.value.result_code == rule.code
            assert info.value.retry_after == rule.retry_after
            assert not h.gateway.mappings  # PCP was never asked to map


async def test_an_unknown_result_code_is_fatal_for_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """RFC 6886 §3.5: a code the client does not know is a fatal error for that request."""
    async with harness(FakeGateway(forced_natpmp_result=77)) as h:
        with pytest.raises(MappingError) as info:
            await create_by_preference(GATEWAY, [h.natpmp, h.pcp], TCP_7000, 2.0)
    assert info.value.result_code == 77
    assert info.value.retry_after is None


async def test_the_external_address_comes_only_from_solicited_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An announcement (RFC 6886 §3.2.1) is seen by the observer as unsolicited,
    but the method's address changes only when it asks."""
    async with harness() as h:
        lease = await h.natpmp.create(TCP_7000, None)
        assert lease.external_address == IPv4Address("203.0.113.7")
        await h.gateway.change_external_address("6.6.6.6")
        await trio.sleep(0.1)
        assert any(not matched for _response, matched in h.observed)
        assert h.natpmp.last_external_address == IPv4Address("203.0.113.7")
        assert await h.natpmp.external_address() == IPv4Address("6.6.6.6")
        assert h.natpmp.last_external_address == IPv4Address("6.6.6.6")


async def test_exact_port_mismatch_is_undone_and_final(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        other = h.gateway.memory_link("192.168.1.101")
        h.gateway.handle(
            natpmp.encode_request(natpmp.MapRequest(natpmp.Opcode.MAP_TCP, 9, 7000, 7200)),
            (str(other.local_address), 40000),
        )
        with pytest.raises(MappingError, match="not the exact 7000; deleted it"):
            await h.natpmp.create(MappingRequest(7000, "tcp", external_port=7000, exact=True), None)
        assert [m.internal_address for m in h.gateway.mappings.values()] == [
            IPv4Address("192.168.1.101")
        ]


# -- pure rules ---------------------------------------------------------------


def _lease(**changes: object) -> Lease:
    fields: dict[str, object] = {
        "method": "natpmp",
        "protocol": TransportProtocol.UDP,
        "internal_address": CLIENT,
        "internal_port": 5000,
        "external_address": IPv4Address("203.0.113.7"),
        "external_port": 41000,
        "lifetime": 7200,
        "granted_at": 0.0,
        "gateway": GATEWAY,
    }
    fields.update(changes)
    return Lease(**fields)  # type: ignore[arg-type]


def test_map_and_delete_requests() -> None:
    """RFC 6886 §3.3 (renewal suggests the mapped port), §3.4 (delete)."""
    assert natpmp_rules.map_request(MappingRequest(5000, "udp"), None) == natpmp.MapRequest(
        natpmp.Opcode.MAP_UDP, 5000, 5000, 7200
    )
    wished = MappingRequest(5000, "tcp", external_port=6000, lifetime=600)
    assert natpmp_rules.map_request(wished, None) == natpmp.MapRequest(
        natpmp.Opcode.MAP_TCP, 5000, 6000, 600
    )
    assert natpmp_rules.map_request(MappingRequest(5000, "udp"), _lease()) == natpmp.MapRequest(
        natpmp.Opcode.MAP_UDP, 5000, 41000, 7200
    )
    assert natpmp_rules.delete_request(_lease()) == natpmp.MapRequest(
        natpmp.Opcode.MAP_UDP, 5000, 0, 0
    )


def _interpret(response: natpmp.NatPmpResponse, request: MappingRequest) -> Lease | Undo:
    return natpmp_rules.interpret_map(
        response,
        request=request,
        previous=None,
        own=CLIENT,
        external=IPv4Address("203.0.113.7"),
        gateway=GATEWAY,
        now=5.0,
    )


def test_interpret_map() -> None:
    request = MappingRequest(5000, "udp")
    ok = natpmp.MapResponse(natpmp.Opcode.MAP_UDP, 0, 3, 5000, 41000, 3600)
    lease = _interpret(ok, request)
    assert isinstance(lease, Lease)
    assert (lease.external_port, lease.expires_at, lease.epoch) == (41000, 3605.0, 3)
    zero = natpmp.MapResponse(natpmp.Opcode.MAP_UDP, 0, 3, 5000, 0, 3600)
    undo = _interpret(zero, request)
    assert isinstance(undo, Undo)
    assert isinstance(undo.error("deleted it"), MethodUnavailable)
    exact = MappingRequest(5000, "udp", external_port=5000, exact=True)
    undo = _interpret(ok, exact)
    assert isinstance(undo, Undo)
    assert isinstance(undo.error("deleted it"), MappingError)
    with pytest.raises(MappingError, match="lifetime 0"):
        _interpret(natpmp.MapResponse(natpmp.Opcode.MAP_UDP, 0, 3, 5000, 41000, 0), request)


@pytest.mark.parametrize("code", [*list(ResultCode)[1:], 99])
def test_refusal_follows_the_table(code: int) -> None:
    response = natpmp.MapResponse(natpmp.Opcode.MAP_UDP, code, 3, 5000, 0, 0)
    rule = natpmp_rules.rule_for(ResultCode(code))
    error = natpmp_rules.refusal(response, "map")
    assert type(error) is (MethodUnavailable if rule.scope is Scope.SERVER else MappingError)
    if isinstance(error, MappingError):
        assert error.retry_after == rule.retry_after
        assert error.result_code == code


def test_external_address_checks() -> None:
    good = natpmp.ExternalAddressResponse(0, 1, IPv4Address("203.0.113.7"))
    assert natpmp_rules.external_address(good) == IPv4Address("203.0.113.7")
    with pytest.raises(MethodUnavailable, match="loopback"):
        natpmp_rules.external_address(
            natpmp.ExternalAddressResponse(0, 1, IPv4Address("127.0.0.1"))
        )
    failing = natpmp.ExternalAddressResponse(3, 1, IPv4Address("0.0.0.0"))
    with pytest.raises(MappingError) as info:
        natpmp_rules.external_address(failing)
    assert info.value.retry_after == 30.0
