"""One module per mapping protocol; each provides the :class:`Method` protocol.

Only this package knows protocol details. Everything above it speaks
:class:`~portbroker.types.MappingRequest`, :class:`~portbroker.types.Lease`
and :class:`~portbroker.types.ProbeOutcome`. :func:`open_methods` is the one
place that builds methods and the transports they share.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import attrs
import trio

from portbroker.epoch import SignalSink
from portbroker.errors import PortBrokerError
from portbroker.methods import rules
from portbroker.transport import DatagramLink, Response, Transport, open_udp_link
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome

__all__ = [
    "UNDO_TIMEOUT",
    "LinkFactory",
    "Method",
    "MethodSet",
    "ResponseObserver",
    "open_methods",
    "undo_grant",
]

# How long deleting a useless grant may take (docs/result-codes.md, "Useless
# grants"): shielded from the caller's deadline, so it must be short.
UNDO_TIMEOUT = 4.0


class Method(Protocol):
    """What every backend provides (docs/architecture.md, "Methods").

    ``create`` with a *previous* lease is a renewal or a re-creation: PCP
    reuses the nonce and suggests the assigned address and port; NAT-PMP asks
    for the same external port; UPnP adds the same entry again.

    Errors: :class:`~portbroker.errors.MethodUnavailable` when the gateway does
    not speak the method or will not serve this client (closed port, version-0
    reply, no IGD, a local socket failure), :class:`~portbroker.errors.MappingError`
    when it refused this request, :class:`~portbroker.errors.NoAnswer` when it
    stayed silent. All are cancellation-safe: cancelling a call leaves no
    waiter behind (a request that reached the gateway may still have created a
    mapping, which the broker deletes when it can name it).
    """

    name: str

    async def probe(self) -> ProbeOutcome: ...

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease: ...

    async def delete(self, lease: Lease) -> None: ...

    async def abandon(self, request: MappingRequest) -> None:
        """Delete what a create of *request* that was cancelled mid-flight may
        have made; nothing when it sent nothing. Bounded by the caller."""
        ...

    async def external_address(self) -> IPAddress: ...


LinkFactory = Callable[[IPAddress, int], Awaitable[DatagramLink]]


async def undo_grant(
    delete: Callable[[Lease], Awaitable[None]], undo: rules.Undo
) -> PortBrokerError:
    """Delete a granted mapping we cannot use (best effort, bounded); the error to raise."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + UNDO_TIMEOUT
        try:
            await delete(undo.lease)
        except PortBrokerError as exc:
            return undo.error(f"could not delete it ({exc})")
    if scope.cancelled_caught:
        return undo.error(f"could not delete it (no answer within {UNDO_TIMEOUT:g} s)")
    return undo.error("deleted it")


# (server address, response, now, solicited, asked_at): every PCP / NAT-PMP
# response (see transport.Observer).
ResponseObserver = Callable[[IPAddress, Response, float, bool, float], None]


@attrs.define
class MethodSet:
    """The methods of one broker, most preferred first, and the transports under them."""

    methods: dict[str, Method]
    transports: dict[IPAddress, Transport]

    def transport_of(self, method: str) -> Transport | None:
        """The transport *method* sends on (None for UPnP, which has its own sockets)."""
        found = self.methods.get(method)
        transport = getattr(found, "transport", None)
        return transport if isinstance(transport, Transport) else None


async def _receive_until_closed(
    transport: Transport,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run *transport*'s receive loop, shielded from outside cancellation.

    Only *scope* (cancelled when :func:`open_methods` exits) ends it. If a
    cancellation of the surrounding scope reached the loop, the broker's
    shielded release would send its deletes and never read their answers:
    each would wait out its budget and be reported undeleted although the
    gateway did delete it.
    """
    with scope:
        await transport.run(task_status=task_status)


@contextlib.asynccontextmanager
async def open_methods(
    names: Sequence[str],
    *,
    gateway: IPAddress,
    pcp_server: IPAddress,
    port: int,
    upnp_port: int,
    ssdp_multicast: bool,
    rng: random.Random,
    observe: ResponseObserver,
    report: SignalSink,
    link_factory: LinkFactory | None = None,
    pcp_client_address: IPAddress | None = None,
) -> AsyncIterator[MethodSet]:
    """Build the methods named in *names* and run their transports until exit.

    PCP and NAT-PMP share one transport per server address (one connected UDP
    socket to port 5351); every response on it is shown to *observe*. UPnP
    reports what it sees (BOOTID, uptime, missing entries) to *report*.
    *pcp_client_address* overrides the PCP client address field (RFC 6887
    §8.1; docs/double-nat.md).
    """
    from portbroker.methods.natpmp import NatPmpMethod
    from portbroker.methods.pcp import PcpMethod

    make_link = link_factory or open_udp_link
    # The receive loops outlive a cancellation of the caller's scope: the
    # broker's shielded release still needs the answers to its deletes.
    receiving: list[trio.CancelScope] = []
    transports: dict[IPAddress, Transport] = {}
    methods: dict[str, Method] = {}
    async with trio.open_nursery() as nursery:
        try:

            async def transport_for(address: IPAddress) -> Transport:
                if address not in transports:

                    def observer(
                        response: Response, now: float, matched: bool, asked_at: float
                    ) -> None:
                        observe(address, response, now, matched, asked_at)

                    transport = Transport(await make_link(address, port), observer)
                    transports[address] = transport
                    scope = trio.CancelScope(shield=True)
                    receiving.append(scope)
                    await nursery.start(_receive_until_closed, transport, scope)
                return transports[address]

            for name in names:
                if name == "pcp":
                    methods[name] = PcpMethod(
                        await transport_for(pcp_server),
                        pcp_server,
                        rng=rng,
                        client_address=pcp_client_address,
                    )
                elif name == "natpmp":
                    methods[name] = NatPmpMethod(await transport_for(gateway), gateway)
                else:
                    # Imported only when UPnP is asked for (it is the largest method).
                    from portbroker.methods.upnp import UpnpMethod

                    methods[name] = UpnpMethod(
                        gateway,
                        ssdp_port=upnp_port,
                        multicast=ssdp_multicast,
                        rng=rng,
                        report=report,
                    )
            yield MethodSet(methods, transports)
        finally:
            for scope in receiving:
                scope.cancel()
            nursery.cancel_scope.cancel()
            for transport in transports.values():
                transport.link.close()
            for method in methods.values():
                close = getattr(method, "aclose", None)
                if close is not None:
                    with trio.CancelScope(shield=True):
                        await close()
