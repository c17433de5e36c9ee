"""NAT-PMP (RFC 6886) over the shared transport."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from portbroker.errors import MappingError, MethodUnavailable
from portbroker.transport import Transport, natpmp_key, natpmp_schedule
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, TransportProtocol
from portbroker.wire import natpmp, pcp
from portbroker.wire.natpmp import ResultCode

__all__ = ["NatPmpMethod"]

_OPCODES: Final = {
    TransportProtocol.UDP: natpmp.Opcode.MAP_UDP,
    TransportProtocol.TCP: natpmp.Opcode.MAP_TCP,
}
# RFC 6886 §3.5: 1 and 5 mean NAT-PMP itself is no use; the rest refuse this
# request. 3 (network failure) and 4 (out of resources) are worth a retry.
_RETRY_AFTER: Final = {ResultCode.NETWORK_FAILURE: 30.0, ResultCode.OUT_OF_RESOURCES: 30.0}


class NatPmpMethod:
    """External address, map, renew and delete against one NAT-PMP gateway."""

    name = "natpmp"

    def __init__(self, transport: Transport, gateway: IPAddress) -> None:
        self.transport = transport
        self.gateway = gateway
        self.last_external_address: IPAddress | None = None

    async def _call(self, request: natpmp.NatPmpRequest) -> natpmp.NatPmpResponse:
        try:
            response = await self.transport.request(
                natpmp.encode_request(request), natpmp_key(request), natpmp_schedule()
            )
        except ConnectionRefusedError as exc:
            raise MethodUnavailable(
                self.name, f"port {self.transport.link.remote[1]} closed (ICMP port unreachable)"
            ) from exc
        if isinstance(response, pcp.PcpResponse):
            raise MethodUnavailable(self.name, "the gateway answered with PCP")
        if response.result_code in (ResultCode.UNSUPPORTED_VERSION, ResultCode.UNSUPPORTED_OPCODE):
            raise MethodUnavailable(self.name, f"the gateway answered {response.result_code.name}")
        return response

    async def probe(self) -> ProbeOutcome:
        started = trio.current_time()
        try:
            address = await self._external_address_response()
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        except MappingError as exc:
            # It answered, so NAT-PMP is there, but it has no address to give
            # (no WAN lease yet, or miniupnpd behind a private address).
            return ProbeOutcome(self.name, True, trio.current_time() - started, error=exc.reason)
        return ProbeOutcome(
            self.name,
            True,
            trio.current_time() - started,
            address.external_address,
            epoch=address.epoch,
        )

    async def _external_address_response(self) -> natpmp.ExternalAddressResponse:
        response = await self._call(natpmp.ExternalAddressRequest())
        if not isinstance(response, natpmp.ExternalAddressResponse) or response.result_code != 0:
            raise MappingError(
                self.name,
                f"external address refused: {response.result_code.name}",
                result_code=int(response.result_code),
                retry_after=_RETRY_AFTER.get(response.result_code),
            )
        address = response.external_address
        if address.is_unspecified or address.is_loopback:
            raise MappingError(self.name, f"the gateway reports an unusable address {address}")
        self.last_external_address = address
        return response

    async def external_address(self) -> IPAddress:
        return (await self._external_address_response()).external_address

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        own = self.transport.link.local_address
        if request.internal_address is not None and request.internal_address != own:
            raise MappingError(
                self.name,
                f"NAT-PMP maps only for the sender ({own}), not {request.internal_address}",
            )
        opcode = _OPCODES[request.protocol]
        if previous is not None:
            # RFC 6886 §3.3: renew with the previously mapped port suggested.
            suggested = previous.external_port
        else:
            suggested = request.external_port or request.internal_port
        response = await self._call(
            natpmp.MapRequest(opcode, request.internal_port, suggested, request.lifetime)
        )
        if not isinstance(response, natpmp.MapResponse) or response.result_code != 0:
            raise MappingError(
                self.name,
                f"map refused: {response.result_code.name}",
                result_code=int(response.result_code),
                retry_after=_RETRY_AFTER.get(response.result_code),
            )
        lease = Lease(
            method=self.name,
            protocol=request.protocol,
            internal_address=own,
            internal_port=request.internal_port,
            external_address=self.last_external_address or own,
            external_port=response.external_port,
            lifetime=response.lifetime,
            granted_at=trio.current_time(),
            gateway=self.gateway,
            epoch=response.epoch,
        )
        if request.exact and previous is None and response.external_port != request.external_port:
            # NAT-PMP has no PREFER_FAILURE: undo the mapping we did not want.
            await self.delete(lease)
            raise MappingError(
                self.name,
                f"the gateway offered port {response.external_port}, "
                f"not the exact {request.external_port}",
            )
        if self.last_external_address is None:
            lease = attrs.evolve(lease, external_address=await self.external_address())
        return lease

    async def delete(self, lease: Lease) -> None:
        """Map request with lifetime 0 and suggested port 0 (RFC 6886 §3.4)."""
        response = await self._call(
            natpmp.MapRequest(_OPCODES[lease.protocol], lease.internal_port, 0, 0)
        )
        if response.result_code != 0:
            raise MappingError(
                self.name,
                f"delete refused: {response.result_code.name}",
                result_code=int(response.result_code),
            )
