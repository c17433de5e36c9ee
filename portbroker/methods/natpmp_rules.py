"""NAT-PMP (RFC 6886) requests and what the answers mean: pure functions, no I/O.

:class:`portbroker.methods.natpmp.NatPmpMethod` only sends what these build
and raises or returns what they decide. :data:`RESULT_RULES` is the
result-code table (RFC 6886 §3.5), documented in ``docs/result-codes.md``.
"""

from __future__ import annotations

from typing import Final

import attrs

from portbroker.errors import MappingError, MethodUnavailable
from portbroker.methods.rules import Scope, Undo, grant_problem, unusable_address
from portbroker.types import IPAddress, Lease, MappingRequest, TransportProtocol
from portbroker.wire import natpmp
from portbroker.wire.natpmp import ResultCode

__all__ = [
    "NAME",
    "RESULT_RULES",
    "UNKNOWN_RULE",
    "CodeRule",
    "delete_request",
    "external_address",
    "interpret_map",
    "map_request",
    "opcode_for",
    "refusal",
    "rule_for",
]

NAME: Final = "natpmp"

_OPCODES: Final = {
    TransportProtocol.UDP: natpmp.Opcode.MAP_UDP,
    TransportProtocol.TCP: natpmp.Opcode.MAP_TCP,
}


@attrs.frozen
class CodeRule:
    """What portbroker does with one NAT-PMP result code (docs/result-codes.md).

    NAT-PMP has no nonces, so a code means the same for a new mapping, a
    renewal and the external-address request; a delete refused is always a
    MappingError (e.g. NOT_AUTHORIZED for a static mapping).
    """

    code: ResultCode
    scope: Scope
    retry_after: float | None  # seconds; None: retrying unchanged is pointless
    meaning: str
    section: str


RESULT_RULES: Final[tuple[CodeRule, ...]] = (
    CodeRule(
        ResultCode.UNSUPPORTED_VERSION,
        Scope.SERVER,
        None,
        "the gateway does not speak NAT-PMP version 0 (UNSUPPORTED_VERSION)",
        "§3.5",
    ),
    CodeRule(
        ResultCode.NOT_AUTHORIZED,
        Scope.SERVER,
        None,
        "the gateway has NAT-PMP mapping switched off (NOT_AUTHORIZED)",
        "§3.5",
    ),
    # miniupnpd also sends it when its own external address is private or
    # reserved: a double NAT (docs/result-codes.md).
    CodeRule(
        ResultCode.NETWORK_FAILURE,
        Scope.REQUEST,
        30.0,
        "the gateway has a network failure, e.g. no external address yet, or (miniupnpd) a"
        " private one: another NAT beyond it (NETWORK_FAILURE; docs/double-nat.md)",
        "§3.5",
    ),
    CodeRule(
        ResultCode.OUT_OF_RESOURCES,
        Scope.REQUEST,
        30.0,
        "the gateway is out of resources (OUT_OF_RESOURCES)",
        "§3.5",
    ),
    CodeRule(
        ResultCode.UNSUPPORTED_OPCODE,
        Scope.SERVER,
        None,
        "the gateway does not support this NAT-PMP request (UNSUPPORTED_OPCODE)",
        "§3.5",
    ),
)

# §3.5: "any other result code ... MUST be treated as a fatal error for that request".
UNKNOWN_RULE: Final = CodeRule(
    ResultCode.SUCCESS, Scope.REQUEST, None, "the gateway refused with an unknown result", "§3.5"
)
_BY_CODE: Final = {rule.code: rule for rule in RESULT_RULES}


def rule_for(code: ResultCode) -> CodeRule:
    """The table's row for *code* (an error code), :data:`UNKNOWN_RULE` if none."""
    return _BY_CODE.get(code, UNKNOWN_RULE)


def refusal(response: natpmp.NatPmpResponse, what: str) -> MethodUnavailable | MappingError:
    """The error for a non-zero result to a *what* ("map", "external address") request."""
    code = response.result_code
    rule = rule_for(code)
    if rule.scope is Scope.SERVER:
        return MethodUnavailable(NAME, rule.meaning)
    meaning = rule.meaning if rule is not UNKNOWN_RULE else f"{rule.meaning} {code.name}"
    return MappingError(
        NAME, f"{what} refused: {meaning}", result_code=int(code), retry_after=rule.retry_after
    )


def opcode_for(protocol: TransportProtocol) -> natpmp.Opcode:
    return _OPCODES[protocol]


def map_request(request: MappingRequest, previous: Lease | None) -> natpmp.MapRequest:
    """A map request; a renewal suggests the previously mapped port (RFC 6886 §3.3)."""
    if previous is not None:
        suggested = previous.external_port
    else:
        suggested = request.external_port or request.internal_port
    return natpmp.MapRequest(
        opcode_for(request.protocol), request.internal_port, suggested, request.lifetime
    )


def delete_request(lease: Lease) -> natpmp.MapRequest:
    """Lifetime 0 and suggested port 0 (RFC 6886 §3.4)."""
    return natpmp.MapRequest(opcode_for(lease.protocol), lease.internal_port, 0, 0)


def external_address(response: natpmp.NatPmpResponse) -> IPAddress:
    """The address an external-address answer gives (RFC 6886 §3.2).

    Raises:
        MethodUnavailable: a server-scope code, or an address nobody can reach
            (0.0.0.0, loopback...: docs/result-codes.md, "Useless grants").
        MappingError: a code about this request (NETWORK_FAILURE...).
    """
    if response.result_code != ResultCode.SUCCESS:
        raise refusal(response, "external address")
    if not isinstance(response, natpmp.ExternalAddressResponse):
        raise MappingError(NAME, "the gateway answered the external-address request oddly")
    address = response.external_address
    why = unusable_address(address)
    if why is not None:
        raise MethodUnavailable(NAME, f"the gateway reports an unusable ({why}) address {address}")
    return address


def interpret_map(
    response: natpmp.NatPmpResponse,
    *,
    request: MappingRequest,
    previous: Lease | None,
    own: IPAddress,
    external: IPAddress,
    gateway: IPAddress,
    now: float,
) -> Lease | Undo:
    """The lease a map answer grants, or what to undo; raises the table's error."""
    if response.result_code != ResultCode.SUCCESS:
        raise refusal(response, "map")
    if not isinstance(response, natpmp.MapResponse):
        raise MappingError(NAME, "the gateway answered the map request oddly")
    if response.lifetime == 0:
        raise MappingError(NAME, "success with lifetime 0: the gateway deleted it")
    lease = Lease(
        method=NAME,
        protocol=request.protocol,
        internal_address=own,
        internal_port=request.internal_port,
        external_address=external,
        external_port=response.external_port,
        lifetime=response.lifetime,
        granted_at=now,
        gateway=gateway,
        epoch=response.epoch,
    )
    problem = grant_problem(response.external_port, None)
    if problem is not None:
        return Undo(lease, f"the gateway {problem}")
    if request.exact and previous is None and response.external_port != request.external_port:
        # NAT-PMP has no PREFER_FAILURE: undo the mapping we did not want.
        return Undo(
            lease,
            f"the gateway offered port {response.external_port}, "
            f"not the exact {request.external_port}",
            move_on=False,
        )
    return lease
