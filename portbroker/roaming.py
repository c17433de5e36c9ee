"""Following the default route: what a broker does with the network monitor's changes.

A broker opened with ``open_broker(follow=True)`` (or handed a
``network_monitor``) runs :func:`follow_network`: it reads the monitor's
changes (:mod:`portbroker.netmon`) and turns them into two things the
broker does (docs/architecture.md, "Following the default route"):

- **a move**, when the preferred default route of the gateway's family leads
  to another gateway and the broker's gateway was not pinned (no *gateway*
  argument, no ``$PORTBROKER_GATEWAY``): :meth:`Broker._move` releases what is
  on the old gateway (one bounded attempt each, else forgotten), switches to
  the new gateway's methods and fires MOVED on every mapping (lifecycle rule
  12). A route that changes again within *settle* seconds restarts the wait,
  so a flapping route moves the broker once, to where it settled, or not at
  all; a change during a move is followed by another move once that one is
  done.
- **a re-check**, when a link went down or up, an address came or went on
  the interface of the default route, or the route came back to the same
  gateway: :meth:`Broker._network_changed` fires NETWORK_CHANGED on every
  mapping (rule 13: what is pending, now). A pinned broker re-checks too; it
  never moves.

Nothing here sends or decides a mapping's fate: the lifecycle does, the
broker executes. Tests feed :class:`FakeNetwork` (portbroker.testing) and
two FakeGateways.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, Protocol

import trio

from portbroker.types import IPAddress

if TYPE_CHECKING:
    from portbroker.netmon import NetworkChange, NetworkSnapshot

__all__ = ["FOLLOW_SETTLE", "Follower", "NetworkWatch", "follow_network"]

logger = logging.getLogger("portbroker")

# How long the default route must stay put before the broker moves: on top of
# the monitor's own settling (netmon.DEFAULT_QUIET), a route that goes A -> B
# -> A in a second (a Wi-Fi roam that failed) moves nothing.
FOLLOW_SETTLE: Final = 1.0


class NetworkWatch(Protocol):
    """What a broker follows: :class:`portbroker.netmon.NetworkMonitor`, or a test's fake.

    ``snapshot()`` is the state the changes start from; iterating yields
    each change after it.
    """

    def snapshot(self) -> NetworkSnapshot: ...

    def __aiter__(self) -> AsyncIterator[NetworkChange]: ...


class Follower(Protocol):
    """What the follower drives: :class:`portbroker.broker.Broker` (its two roaming operations)."""

    @property
    def gateway(self) -> IPAddress: ...

    async def _move(self, new: IPAddress) -> None: ...

    def _network_changed(self, reason: str) -> None: ...


def _family(address: IPAddress) -> int:
    return address.version


async def follow_network(
    broker: Follower,
    watch: NetworkWatch,
    *,
    pinned: bool,
    settle: float = FOLLOW_SETTLE,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow *watch*'s changes for *broker* until cancelled (see the module docstring).

    *pinned* (the caller named the gateway) turns moves off; re-checks stay.
    Never raises but Cancelled: a failed move is logged and the next change
    tries again. Returns when *watch* fails (an OSError, logged).
    """
    # Imported here: a broker that does not follow never loads the monitor.
    from portbroker.netmon import AddressAdded, AddressRemoved, LinkDown, LinkUp, RouteChanged

    family = _family(broker.gateway)
    first = watch.snapshot()
    route = first.default_route(family)
    interface = route.interface if route is not None else ""
    target: IPAddress | None = route.gateway if route is not None else None
    changed = trio.Event()
    seq = 0

    def route_moved(new: IPAddress | None) -> None:
        nonlocal target, seq, changed
        target = new
        seq += 1
        changed.set()

    async def mover() -> None:
        nonlocal changed
        while True:
            if target is None or target == broker.gateway:
                await changed.wait()
                changed = trio.Event()
                continue
            # The route must hold still for *settle* seconds (flapping).
            while True:
                seen = seq
                await trio.sleep(settle)
                if seq == seen:
                    break
            changed = trio.Event()
            new = target
            if new is None or new == broker.gateway:
                continue  # it came back, or went away: nothing to move to
            try:
                await broker._move(new)
            except Exception:  # a bug: log it, follow the next change
                logger.exception("moving to gateway %s failed", new)

    async with trio.open_nursery() as nursery:
        if not pinned:
            nursery.start_soon(mover)
            if target is not None and target != broker.gateway:
                # The route moved between resolving the gateway and now.
                route_moved(target)
        task_status.started()
        try:
            async for change in watch:
                if isinstance(change, RouteChanged):
                    if change.family != family:
                        continue
                    # No route now: keep the last one's interface, whose link coming back
                    # matters (a container's veth does not).
                    interface = change.interface or interface
                    if pinned:
                        if change.new_gateway is not None:
                            logger.info(
                                "default route now via %s; the gateway %s is pinned: staying",
                                change.new_gateway,
                                broker.gateway,
                            )
                            broker._network_changed(
                                f"default route changed to {change.new_gateway}"
                            )
                        continue
                    route_moved(change.new_gateway)
                    if change.new_gateway == broker.gateway:
                        # Back to (or, another interface, still) the same gateway.
                        broker._network_changed(f"default route via {broker.gateway} again")
                    continue
                if isinstance(change, LinkUp | LinkDown | AddressAdded | AddressRemoved):
                    if interface and change.interface != interface:
                        continue  # another interface (a container bridge, a VPN): not our path
                    if target is not None and target != broker.gateway and not pinned:
                        continue  # a move is coming: it re-creates everything anyway
                    if isinstance(change, LinkDown):
                        continue  # nothing gets through now; the LinkUp re-checks
                    broker._network_changed(_describe(change))

        except OSError as exc:
            # The stream broke (its socket, say): the broker keeps working
            # where it is, and broker._follow opens a new monitor.
            logger.warning("network monitor failed (%s): not following the network", exc)
            nursery.cancel_scope.cancel()


def _describe(change: NetworkChange) -> str:
    address = getattr(change, "address", None)
    if address is None:
        return f"{type(change).__name__} {change.interface}"
    return f"{type(change).__name__} {address} on {change.interface}"
