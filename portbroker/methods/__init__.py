"""One module per mapping protocol; each provides the :class:`Method` protocol.

Only this package knows protocol details. Everything above it speaks
:class:`~portbroker.types.MappingRequest`, :class:`~portbroker.types.Lease`
and :class:`~portbroker.types.ProbeOutcome`.
"""

from __future__ import annotations

from typing import Protocol

from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome

__all__ = ["Method"]


class Method(Protocol):
    """What every backend provides (design.md, "The Method protocol").

    ``create`` with a *previous* lease is a renewal or a re-creation: PCP
    reuses the nonce and suggests the assigned address and port; NAT-PMP asks
    for the same external port; UPnP adds the same entry again.

    Errors: :class:`~portbroker.errors.MethodUnavailable` when the gateway does
    not speak the method (closed port, version-0 reply, no IGD),
    :class:`~portbroker.errors.MappingError` when it refused the request,
    :class:`~portbroker.errors.NoAnswer` when it stayed silent. All are
    cancellation-safe: cancelling a call leaves no waiter behind (a request
    that reached the gateway may still have created a mapping, which the
    broker deletes when it can name it).
    """

    name: str

    async def probe(self) -> ProbeOutcome: ...

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease: ...

    async def delete(self, lease: Lease) -> None: ...

    async def external_address(self) -> IPAddress: ...
