"""PCP (RFC 6887) MAP over the shared transport."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from typing import Final

import trio

from portbroker.errors import MappingError, MethodUnavailable
from portbroker.transport import Transport, pcp_key, probe_schedule, rfc6887_schedule
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome
from portbroker.wire import pcp
from portbroker.wire.pcp import ErrorClass, ResultCode

__all__ = ["PcpMethod", "error_hold_off"]

# RFC 6887 §7.4 suggests 30 s for short and 30 min for long errors, but
# miniupnpd sends long errors (and CANNOT_PROVIDE_EXTERNAL) with lifetime 0,
# which read literally means "retry at once": clamp to these minimums.
_MIN_HOLD_OFF: Final = {ErrorClass.SHORT: 5.0, ErrorClass.LONG: 60.0, ErrorClass.DEPENDS: 30.0}

# Results that say PCP itself is no use with this server, not this request.
_UNUSABLE: Final = {
    ResultCode.UNSUPP_VERSION: "the server does not speak PCP version 2",
    ResultCode.UNSUPP_OPCODE: "the server does not support MAP",
    # RFC 6887 §7.4: another NAT sits between us and the server.
    ResultCode.ADDRESS_MISMATCH: "another NAT between this host and the PCP server",
}


def error_hold_off(response: pcp.PcpResponse) -> float:
    """Seconds before the same request may be sent again (RFC 6887 §8.3)."""
    floor = _MIN_HOLD_OFF.get(response.result_code.error_class, 60.0)
    return max(float(response.lifetime), floor)


class PcpMethod:
    """MAP create / renew / delete against one PCP server.

    Until the server has answered once, requests use a fast probing schedule
    (the first MAP doubles as the PCP probe); after that, RFC 6887 §8.1.1.
    """

    name = "pcp"

    def __init__(
        self,
        transport: Transport,
        server: IPAddress,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.transport = transport
        self.server = server
        self._rng = rng or random.Random()
        self.answered = False
        self.last_external_address: IPAddress | None = None
        # The nonce last used for each (protocol, internal address, port). A
        # MAP whose answer was lost may still have created the mapping; asking
        # again with the same nonce adopts it, where a fresh nonce would get
        # NOT_AUTHORIZED from a server that checks (RFC 6887 §11.3) and leave
        # a mapping nobody can delete.
        self._nonces: dict[tuple[int, IPAddress, int], bytes] = {}

    @property
    def client_address(self) -> IPAddress:
        return self.transport.link.local_address

    def _schedule(self) -> Iterator[float]:
        return rfc6887_schedule(self._rng) if self.answered else probe_schedule()

    async def _call(self, request: pcp.PcpRequest) -> pcp.PcpResponse:
        try:
            response = await self.transport.request(
                pcp.encode_request(request), pcp_key(request), self._schedule()
            )
        except ConnectionRefusedError as exc:
            raise MethodUnavailable(
                self.name, f"port {self.transport.link.remote[1]} closed (ICMP port unreachable)"
            ) from exc
        assert isinstance(response, pcp.PcpResponse)
        if response.is_natpmp:
            raise MethodUnavailable(
                self.name, "the gateway answered as a NAT-PMP server (version 0)", natpmp_hint=True
            )
        self.answered = True
        if response.version != pcp.VERSION:
            raise MethodUnavailable(self.name, f"the server speaks PCP version {response.version}")
        return response

    async def probe(self) -> ProbeOutcome:
        """A solicited ANNOUNCE (RFC 6887 §14.1): is PCP there, and its epoch."""
        started = trio.current_time()
        try:
            response = await self._call(pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, self.client_address))
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        rtt = trio.current_time() - started
        if response.result_code != ResultCode.SUCCESS:
            # Some servers refuse ANNOUNCE but do MAP; the answer alone proves PCP.
            usable = response.result_code not in _UNUSABLE
            return ProbeOutcome(
                self.name,
                usable,
                rtt,
                epoch=response.epoch,
                error=None if usable else _UNUSABLE[response.result_code],
            )
        return ProbeOutcome(self.name, True, rtt, self.last_external_address, epoch=response.epoch)

    def _map_request(
        self, request: MappingRequest, previous: Lease | None, *, exact: bool
    ) -> pcp.PcpRequest:
        if previous is not None and previous.nonce is not None:
            # RFC 6887 §11.2.1 / §8.5: renew or re-create with the same nonce,
            # suggesting what the server assigned before.
            nonce = previous.nonce
            suggested_port = previous.external_port
            suggested_address = previous.external_address
        else:
            nonce = self._nonces.get(self._nonce_key(request)) or secrets.token_bytes(12)
            suggested_port = request.external_port or 0
            suggested_address = pcp.no_preference(self.client_address)
        options: list[pcp.Option] = []
        internal = request.internal_address
        if internal is not None and internal != self.client_address:
            options.append(pcp.ThirdParty(internal))
        if exact:
            options.append(pcp.PreferFailure())
        return pcp.PcpRequest(
            pcp.Opcode.MAP,
            request.lifetime,
            self.client_address,
            pcp.MapData(
                nonce,
                request.protocol.number,
                request.internal_port,
                suggested_port,
                suggested_address,
            ),
            options,
        )

    def _nonce_key(self, request: MappingRequest) -> tuple[int, IPAddress, int]:
        internal = request.internal_address or self.client_address
        return (request.protocol.number, internal, request.internal_port)

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        exact = request.exact and previous is None
        map_request = self._map_request(request, previous, exact=exact)
        assert map_request.data is not None
        self._nonces[self._nonce_key(request)] = map_request.data.nonce
        response = await self._call(map_request)
        if response.result_code == ResultCode.CANNOT_PROVIDE_EXTERNAL and not exact:
            # §11.3: never valid for a plain MAP; a server bug. Ask again with
            # no suggestion (protocols.md §1.18), same nonce.
            assert map_request.data is not None
            retry_data = pcp.MapData(
                map_request.data.nonce,
                map_request.data.protocol,
                map_request.data.internal_port,
                0,
                pcp.no_preference(self.client_address),
            )
            response = await self._call(
                pcp.PcpRequest(
                    pcp.Opcode.MAP,
                    map_request.lifetime,
                    map_request.client_address,
                    retry_data,
                    map_request.options,
                )
            )
        return self._lease(request, map_request, response)

    def _lease(
        self, request: MappingRequest, sent: pcp.PcpRequest, response: pcp.PcpResponse
    ) -> Lease:
        code = response.result_code
        if code in _UNUSABLE:
            raise MethodUnavailable(self.name, _UNUSABLE[code])
        if code != ResultCode.SUCCESS:
            raise MappingError(
                self.name,
                f"{code.name} ({code.error_class.value} lifetime error)",
                result_code=int(code),
                retry_after=error_hold_off(response),
            )
        data = response.data
        assert data is not None
        assert sent.data is not None
        if response.lifetime == 0:
            raise MappingError(self.name, "SUCCESS with lifetime 0: the server deleted it")
        if data.external_address.is_unspecified or data.external_address.is_loopback:
            raise MappingError(
                self.name, f"the server assigned an unusable address {data.external_address}"
            )
        self.last_external_address = data.external_address
        return Lease(
            method=self.name,
            protocol=request.protocol,
            internal_address=request.internal_address or sent.client_address,
            internal_port=request.internal_port,
            external_address=data.external_address,
            external_port=data.external_port,
            lifetime=response.lifetime,
            granted_at=trio.current_time(),
            gateway=self.server,
            epoch=response.epoch,
            nonce=sent.data.nonce,
        )

    async def delete(self, lease: Lease) -> None:
        """MAP with lifetime 0 and the mapping's nonce (RFC 6887 §15)."""
        assert lease.nonce is not None, "a PCP lease always has its nonce"
        options: list[pcp.Option] = []
        if lease.internal_address != self.client_address:
            options.append(pcp.ThirdParty(lease.internal_address))
        request = pcp.PcpRequest(
            pcp.Opcode.MAP,
            0,
            self.client_address,
            pcp.MapData(
                lease.nonce,
                lease.protocol.number,
                lease.internal_port,
                0,
                pcp.no_preference(self.client_address),
            ),
            options,
        )
        response = await self._call(request)
        if response.result_code != ResultCode.SUCCESS:
            raise MappingError(
                self.name,
                f"delete refused: {response.result_code.name}",
                result_code=int(response.result_code),
            )
        key = (lease.protocol.number, lease.internal_address, lease.internal_port)
        if self._nonces.get(key) == lease.nonce:
            del self._nonces[key]

    async def external_address(self) -> IPAddress:
        """PCP reports the external address only in MAP replies: the last one seen."""
        if self.last_external_address is None:
            raise MethodUnavailable(self.name, "no mapping yet, so no external address known")
        return self.last_external_address
