"""NAT-PMP (RFC 6886) over the shared transport: the I/O half.

What to send and what an answer means live in
:mod:`portbroker.methods.natpmp_rules` (pure, with the result-code table).
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Final

import trio

from portbroker.errors import (
    LinkError,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    RequestUnsupported,
)
from portbroker.methods import natpmp_rules, undo_grant
from portbroker.methods.rules import Undo
from portbroker.transport import Transport, natpmp_key, natpmp_schedule
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, TransportProtocol
from portbroker.wire import natpmp, pcp
from portbroker.wire.natpmp import ResultCode

__all__ = ["NatPmpMethod", "ipv6_gateway_reason"]

# Answers to a delete that still grant a lifetime (stale copies of a grant)
# before the delete is declared refused.
DELETE_ATTEMPTS: Final = 3


def ipv6_gateway_reason(gateway: IPAddress) -> str:
    """Why NAT-PMP is unavailable on an IPv6 gateway address (docs/ipv6.md)."""
    return (
        f"NAT-PMP is IPv4 only (RFC 6886) and the gateway {gateway} is IPv6;"
        " not tried (PCP and UPnP can open IPv6 pinholes)"
    )


class NatPmpMethod:
    """External address, map, renew and delete against one NAT-PMP gateway.

    ``last_external_address`` is only ever set from answers to our own
    external-address requests: an unsolicited announcement (RFC 6886 §3.2.1)
    is a hint to ask again, never a fact, since any host on the link can send
    one.
    """

    name = "natpmp"

    def __init__(self, transport: Transport, gateway: IPAddress) -> None:
        self.transport = transport
        self.gateway = gateway
        # Map requests sent whose caller was cancelled before the answer.
        self._unsettled: set[tuple[TransportProtocol, int]] = set()
        self.last_external_address: IPAddress | None = None

    async def _call(self, request: natpmp.NatPmpRequest) -> natpmp.NatPmpResponse:
        if isinstance(self.gateway, IPv6Address):
            # Nothing is sent: there is no NAT-PMP over IPv6 to try.
            raise MethodUnavailable(self.name, ipv6_gateway_reason(self.gateway))
        try:
            response = await self.transport.request(
                natpmp.encode_request(request), natpmp_key(request), natpmp_schedule()
            )
        except ConnectionRefusedError as exc:
            raise MethodUnavailable(
                self.name, f"port {self.transport.link.remote[1]} closed (ICMP port unreachable)"
            ) from exc
        except LinkError as exc:
            raise MethodUnavailable(self.name, str(exc)) from exc
        if isinstance(response, pcp.PcpResponse):
            raise MethodUnavailable(self.name, "the gateway answered with PCP")
        if response.result_code in (ResultCode.UNSUPPORTED_VERSION, ResultCode.UNSUPPORTED_OPCODE):
            # Whatever we asked: NAT-PMP itself is no use here (RFC 6886 §3.5).
            raise natpmp_rules.refusal(response, "request")
        return response

    async def probe(self) -> ProbeOutcome:
        started = trio.current_time()
        try:
            response = await self._external_address()
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        except MappingError as exc:
            # It answered, so NAT-PMP is there, but it has no address to give
            # (no WAN lease yet, or miniupnpd behind a private address).
            return ProbeOutcome(self.name, True, trio.current_time() - started, error=exc.reason)
        rtt = trio.current_time() - started
        return ProbeOutcome(self.name, True, rtt, response.external_address, epoch=response.epoch)

    async def _external_address(self) -> natpmp.ExternalAddressResponse:
        response = await self._call(natpmp.ExternalAddressRequest())
        address = natpmp_rules.external_address(response)
        assert isinstance(response, natpmp.ExternalAddressResponse)
        # Solicited: the answer to our own request (see the class docstring).
        self.last_external_address = address
        return response

    async def external_address(self) -> IPAddress:
        return (await self._external_address()).external_address

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        if request.remote is not None:
            # NAT-PMP has no PEER opcode (RFC 6886 §3: MAP only): refuse
            # before anything is sent, so no inbound mapping is made instead.
            raise MethodUnavailable(self.name, "PEER needs PCP; NAT-PMP maps inbound ports only")
        own = self.transport.link.local_address
        if isinstance(request.internal_address, IPv6Address):
            # About this request only: the gateway may still map IPv4 for others.
            raise MappingError(
                self.name,
                f"NAT-PMP maps only IPv4 (RFC 6886), not {request.internal_address};"
                " use PCP or UPnP on the gateway's IPv6 address for an IPv6 pinhole",
            )
        if request.internal_address is not None and request.internal_address != own:
            raise RequestUnsupported(
                self.name,
                f"NAT-PMP maps only for the sender ({own}), not {request.internal_address}"
                " (RFC 6886 has no third-party mapping; PCP THIRD_PARTY or UPnP can)",
            )
        if request.filters:
            # RFC 6886 has no way to name remote peers: mapping anyway would
            # open the port to everyone when the app asked for a few.
            raise RequestUnsupported(
                self.name,
                "NAT-PMP cannot restrict a mapping to remote peers (RFC 6886 has no filter);"
                " nothing was mapped (PCP FILTER or UPnP NewRemoteHost can)",
            )
        # The address first when unknown: a gateway with no usable one is no
        # use for mapping, and asking before mapping leaves nothing to undo.
        external = self.last_external_address or await self.external_address()
        sent_key = (request.protocol, request.internal_port)
        self._unsettled.add(sent_key)
        try:
            response = await self._call(natpmp_rules.map_request(request, previous))
        except Exception:
            self._unsettled.discard(sent_key)
            raise
        # Only a cancellation leaves it unsettled (see abandon).
        self._unsettled.discard(sent_key)
        result = natpmp_rules.interpret_map(
            response,
            request=request,
            previous=previous,
            own=own,
            external=external,
            gateway=self.gateway,
            now=trio.current_time(),
        )
        if isinstance(result, Undo):
            raise await undo_grant(self.delete, result)
        return result

    async def abandon(self, request: MappingRequest) -> None:
        """Delete what an interrupted create of *request* may have made.

        Only when a map request for that internal port went out and its caller
        was cancelled before the answer: NAT-PMP knows mappings by internal
        port, so a delete of the port (RFC 6886 §3.4) removes it.
        """
        key = (request.protocol, request.internal_port)
        if request.remote is not None or key not in self._unsettled:
            return  # a PEER request never reached NAT-PMP (create refuses it)
        self._unsettled.discard(key)
        own = self.transport.link.local_address
        await self.delete(
            Lease(
                method=self.name,
                protocol=request.protocol,
                internal_address=own,
                internal_port=request.internal_port,
                external_address=own,
                external_port=0,
                lifetime=0,
                granted_at=trio.current_time(),
                gateway=self.gateway,
            )
        )

    async def delete(self, lease: Lease) -> None:
        """Map request with lifetime 0 and suggested port 0 (RFC 6886 §3.4)."""
        for _attempt in range(DELETE_ATTEMPTS):
            response = await self._call(natpmp_rules.delete_request(lease))
            if response.result_code != 0:
                # NETWORK_FAILURE and OUT_OF_RESOURCES may clear: the table's
                # retry_after tells the broker's delete retries when to ask
                # again (lifecycle rule 10); the others are final.
                raise MappingError(
                    self.name,
                    f"delete refused: {response.result_code.name}",
                    result_code=int(response.result_code),
                    retry_after=natpmp_rules.rule_for(response.result_code).retry_after,
                )
            if not isinstance(response, natpmp.MapResponse) or response.lifetime == 0:
                break
            # §3.4: a delete's answer has lifetime 0. NAT-PMP has no
            # transaction ID, so a late copy of the grant (same opcode and
            # internal port) matches too: not this delete's answer. Ask again.
        else:
            # Only late copies came back: this delete's own answer is still to
            # come, or lost. Silence, which the broker retries (rule 10), not
            # a refusal, which it would not (see PcpMethod.delete).
            raise NoAnswer(
                f"{self.name}: no answer to the delete, only {DELETE_ATTEMPTS} late copies"
                " of an earlier grant",
                method=self.name,
            )
