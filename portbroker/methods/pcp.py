"""PCP (RFC 6887) MAP and PEER over the shared transport: the I/O half.

What to send and what an answer means live in
:mod:`portbroker.methods.pcp_rules` (pure, with the result-code table);
this class sends, waits, and turns transport failures into method failures.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Iterator
from typing import Final

import trio

from portbroker.errors import LinkError, MappingError, MethodUnavailable, NoAnswer
from portbroker.methods import pcp_rules, undo_grant
from portbroker.methods.pcp_rules import error_hold_off
from portbroker.methods.rules import Undo, filter_family_problem
from portbroker.transport import Transport, pcp_key, probe_schedule, rfc6887_schedule
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome
from portbroker.wire import pcp
from portbroker.wire.pcp import ResultCode

logger = logging.getLogger(__name__)

__all__ = ["PcpMethod", "error_hold_off"]

# Answers to a delete that still grant a lifetime (stale copies of a grant)
# before the delete is reported unanswered (NoAnswer, which the broker retries).
DELETE_ATTEMPTS: Final = 3


def _answers_the_delete(response: pcp.PcpResponse, lease: Lease) -> bool:
    """Whether a SUCCESS with a lifetime is the delete's own answer, not a late grant.

    RFC 6887 §15: when the mapping also carries implicit traffic, the server
    deletes the explicit mapping and answers with the remaining idle timeout
    as the Lifetime. That answer copies the delete's suggested port, which we
    send as 0 (§15.1, erratum 3621); a grant of a TCP or UDP port never has
    port 0, so a late copy of one does not. (A lease granted with port 0, the
    server bug that the undo deletes, cannot tell the two apart: not this.)
    """
    data = response.data
    return isinstance(data, pcp.MapData) and data.external_port == 0 and lease.external_port != 0


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
        client_address: IPAddress | None = None,
    ) -> None:
        self.transport = transport
        # RFC 6887 §8.1: the server compares this field with the request's
        # source (ADDRESS_MISMATCH). Behind another NAT that source is the
        # NAT's external address, not ours (docs/double-nat.md).
        self._client_address = client_address
        self.server = server
        self._rng = rng or random.Random()
        self.answered = False
        self.last_external_address: IPAddress | None = None
        # The nonce last used for each (protocol, internal address, port). A
        # MAP whose answer was lost may still have created the mapping; asking
        # again with the same nonce adopts it, where a fresh nonce would get
        # NOT_AUTHORIZED from a server that checks (RFC 6887 §11.3) and leave
        # a mapping nobody can delete.
        # PEER bindings are keyed by their remote peer too (RFC 6887 §12: one
        # nonce per flow), so a PEER and a MAP of one port never share one.
        self._nonces: dict[tuple[object, ...], bytes] = {}

    @property
    def client_address(self) -> IPAddress:
        return self._client_address or self.transport.link.local_address

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
        except LinkError as exc:
            # The local stack would not let it out (a host firewall, no
            # route): this method cannot work from here; another may.
            raise MethodUnavailable(self.name, str(exc)) from exc
        assert isinstance(response, pcp.PcpResponse)
        problem = pcp_rules.reply_problem(response)
        if problem is not None:
            raise problem
        self.answered = True
        return response

    async def probe(self) -> ProbeOutcome:
        """A solicited ANNOUNCE (RFC 6887 §14.1): is PCP there, and its epoch."""
        started = trio.current_time()
        try:
            response = await self._call(pcp_rules.announce_request(self.client_address))
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        return pcp_rules.announce_outcome(
            response, trio.current_time() - started, self.last_external_address
        )

    def _nonce_key(self, request: MappingRequest) -> tuple[object, ...]:
        internal = request.internal_address or self.client_address
        if request.remote is not None:
            return (
                "peer",
                request.protocol.number,
                internal,
                request.internal_port,
                request.remote,
            )
        return (request.protocol.number, internal, request.internal_port)

    @staticmethod
    def _lease_key(lease: Lease) -> tuple[object, ...]:
        if lease.remote is not None:
            return (
                "peer",
                lease.protocol.number,
                lease.internal_address,
                lease.internal_port,
                lease.remote,
            )
        return (lease.protocol.number, lease.internal_address, lease.internal_port)

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        problem = pcp_rules.family_problem(
            self.client_address, request.internal_address, self.server
        )
        if problem is None:
            problem = filter_family_problem(
                request.internal_address or self.client_address, request.filters
            )
        if problem is not None:
            raise MappingError(self.name, problem)  # nothing sent
        if request.remote is not None:
            return await self._create_peer(request, previous)
        exact = request.exact and previous is None
        renewal = previous is not None and previous.nonce is not None
        nonce = self._nonces.get(self._nonce_key(request)) or secrets.token_bytes(12)
        sent = pcp_rules.map_request(self.client_address, request, previous, nonce, exact=exact)
        assert sent.data is not None
        self._nonces[self._nonce_key(request)] = sent.data.nonce
        response = await self._call(sent)
        if response.result_code == ResultCode.CANNOT_PROVIDE_EXTERNAL and not exact:
            # §11.3: never valid for a plain MAP; a server bug. Ask again with
            # no suggestion, same nonce (pcp_rules.retry_without_suggestion).
            sent = pcp_rules.retry_without_suggestion(sent)
            response = await self._call(sent)
        result = pcp_rules.interpret_map(
            response,
            request=request,
            sent=sent,
            server=self.server,
            now=trio.current_time(),
            renewal=renewal,
        )
        return await self._settle(result)

    async def _settle(self, result: Lease | Undo) -> Lease:
        """A MAP's or PEER's interpreted answer: the lease, or the undone grant's error."""
        if isinstance(result, Undo):
            raise await undo_grant(self.delete, result)
        self.last_external_address = result.external_address
        return result

    async def _create_peer(self, request: MappingRequest, previous: Lease | None) -> Lease:
        """PEER (RFC 6887 §12): create or extend the binding of one outbound flow."""
        assert request.remote is not None
        internal = request.internal_address or self.client_address
        if request.remote[0].version != internal.version:
            # §12.1 (and miniupnpd's table of families): the remote peer is
            # named in the internal address's family; nothing to ask for.
            raise MappingError(
                self.name,
                f"remote peer {request.remote[0]} is IPv{request.remote[0].version} but the"
                f" flow's internal address {internal} is IPv{internal.version}: a PEER names"
                " a remote peer of the same family (RFC 6887 §12.1)",
            )
        renewal = previous is not None and previous.nonce is not None
        key = self._nonce_key(request)
        nonce = self._nonces.get(key) or secrets.token_bytes(12)
        sent = pcp_rules.peer_request(self.client_address, request, previous, nonce)
        assert sent.data is not None
        self._nonces[key] = sent.data.nonce
        response = await self._call(sent)
        if response.result_code == ResultCode.CANNOT_PROVIDE_EXTERNAL and sent.data.external_port:
            # §12.3: PEER behaves as with PREFER_FAILURE, so a suggestion (the
            # previous endpoint, after a restart) the server cannot give again
            # fails; the flow is what matters, not its old port: ask with none.
            sent = pcp_rules.retry_without_suggestion(sent)
            response = await self._call(sent)
        result = pcp_rules.interpret_peer(
            response,
            request=request,
            sent=sent,
            server=self.server,
            now=trio.current_time(),
            renewal=renewal,
        )
        return await self._settle(result)

    async def delete(self, lease: Lease) -> None:
        """MAP with lifetime 0 and the mapping's nonce (RFC 6887 §15); PEER for a PEER."""
        if lease.remote is not None:
            await self._delete_peer(lease)
            return
        request = pcp_rules.delete_request(self.client_address, lease)
        for _attempt in range(DELETE_ATTEMPTS):
            response = await self._call(request)
            if response.result_code == ResultCode.NO_RESOURCES:
                # miniupnpd (2.3.1, seen in the lab) answers a delete of a
                # mapping it does not hold with NO_RESOURCES ("Failed to remove
                # PCP mapping"); a delete needs no resources, so it means "no
                # such mapping": gone, the goal of a delete (like UPnP's 714).
                # A retried delete whose first answer was lost gets this.
                break
            if response.result_code == ResultCode.NOT_AUTHORIZED and await self._cut_short(lease):
                return  # the nonce is kept: a map of the port meanwhile renews it again
            if response.result_code != ResultCode.SUCCESS:
                # A short-lifetime error (NETWORK_FAILURE, USER_EX_QUOTA:
                # RFC 6887 §7.4) may clear, so it says when to ask again (the
                # broker retries failed deletes, lifecycle rule 10); a long
                # one (NOT_AUTHORIZED...) is final.
                short = response.result_code.error_class is pcp.ErrorClass.SHORT
                raise MappingError(
                    self.name,
                    f"delete refused: {response.result_code.name}",
                    result_code=int(response.result_code),
                    retry_after=error_hold_off(response) if short else None,
                )
            if response.lifetime == 0 or _answers_the_delete(response, lease):
                break
            # §15: a delete's answer has Lifetime 0. A SUCCESS with a lifetime
            # is a late copy of an earlier grant (same nonce, so the same key):
            # not this delete's answer, which may yet be lost. Ask again.
        else:
            # Only late copies came back (a gateway answering seconds late
            # has several in flight: one per retransmission of the map): this
            # delete's own answer is still to come, or lost. That is silence,
            # which the broker retries (lifecycle rule 10); a refusal here
            # was not retried, so a delete that was lost left the mapping open
            # for its whole lease.
            raise NoAnswer(
                f"{self.name}: no answer to the delete, only {DELETE_ATTEMPTS} late copies"
                f" of an earlier grant (lifetime {response.lifetime})",
                method=self.name,
            )
        self._forget_nonce(lease)

    async def _cut_short(self, lease: Lease) -> bool:
        """After a refused delete, renew *lease* for the server's minimum lifetime instead.

        True if the server took it (the mapping then closes within that
        lifetime; logged as a warning). See :func:`pcp_rules.shorten_request`.
        Only while the lease is live: then the server's entry for that internal
        endpoint is ours. After it lapsed, another client (another nonce) may
        hold the endpoint, the refusal is right, and miniupnpd 2.3.1 would let
        this MAP cut that client's pinhole short. A grant that outlives the
        lease (a server's minimum above what was left, a server that ignores
        the asked lifetime, a late copy of the last grant) shortened nothing:
        False, logged, and the delete stays refused.
        """
        if trio.current_time() >= lease.expires_at:
            return False
        response = await self._call(pcp_rules.shorten_request(self.client_address, lease))
        if response.result_code != ResultCode.SUCCESS or response.lifetime == 0:
            return False
        if trio.current_time() + response.lifetime > lease.expires_at:
            logger.warning(
                "%s %d/%s: the gateway refused the delete (NOT_AUTHORIZED) and answered a"
                " renewal for 1 s with %d s, past the lease's end: the mapping stays open"
                " that long",
                self.name,
                lease.internal_port,
                lease.protocol.value,
                response.lifetime,
            )
            return False
        logger.warning(
            "%s %d/%s: the gateway refused the delete (NOT_AUTHORIZED) but took a renewal"
            " for %d s, so the mapping closes then (miniupnpd 2.3.1 does this to an IPv6"
            " pinhole it has renewed)",
            self.name,
            lease.internal_port,
            lease.protocol.value,
            response.lifetime,
        )
        return True

    def _forget_nonce(self, lease: Lease) -> None:
        key = self._lease_key(lease)
        if self._nonces.get(key) == lease.nonce:
            del self._nonces[key]

    async def _delete_peer(self, lease: Lease) -> None:
        """PEER with lifetime 0, the binding's nonce and remote peer.

        Any SUCCESS ends it for us: lifetime 0 is a deleted binding; a lifetime
        left is a server that follows RFC 6887 §15 (PEER cannot shorten a
        binding), which keeps it as an ordinary outbound flow that lapses
        when the traffic stops. NO_RESOURCES is "no such binding", as for MAP:
        miniupnpd 2.3.1's nftables backend answers every PEER delete so (it
        cannot read its own peer rules back, seen in the lab; docs/peer.md).
        """
        request = pcp_rules.peer_delete_request(self.client_address, lease)
        response = await self._call(request)
        code = response.result_code
        if code not in (ResultCode.SUCCESS, ResultCode.NO_RESOURCES):
            short = code.error_class is pcp.ErrorClass.SHORT
            raise MappingError(
                self.name,
                f"peer delete refused: {code.name}",
                result_code=int(code),
                retry_after=error_hold_off(response) if short else None,
            )
        self._forget_nonce(lease)

    async def abandon(self, request: MappingRequest) -> None:
        """Delete what an interrupted create of *request* may have made.

        The MAP may have reached the server before its caller was cancelled;
        the nonce remembered for the internal endpoint names that mapping, so
        a delete with it (RFC 6887 §15) removes it, and is harmless when
        nothing was made. It is named as a lease of the lifetime asked for,
        from now: each retransmission that reached the server renewed it, so
        miniupnpd 2.3.1 may refuse the delete of an IPv6 pinhole, and then
        it is cut short as a release's would be (:meth:`_cut_short`).
        """
        key = self._nonce_key(request)
        nonce = self._nonces.get(key)
        if nonce is None:
            return
        await self.delete(
            Lease(
                method=self.name,
                protocol=request.protocol,
                internal_address=request.internal_address or self.client_address,
                internal_port=request.internal_port,
                external_address=pcp.no_preference(self.client_address),
                external_port=0,
                lifetime=request.lifetime,
                granted_at=trio.current_time(),
                gateway=self.server,
                nonce=nonce,
                remote=request.remote,
            )
        )

    async def external_address(self) -> IPAddress:
        """PCP reports the external address only in MAP replies: the last one seen."""
        if self.last_external_address is None:
            raise MethodUnavailable(self.name, "no mapping yet, so no external address known")
        return self.last_external_address
