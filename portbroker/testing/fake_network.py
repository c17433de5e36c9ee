"""FakeNetwork: a network monitor for tests of code that follows the network.

``open_broker(network_monitor=FakeNetwork.routed_via("10.0.0.1"))`` gives a
broker that follows it (portbroker.roaming); the test then moves the default
route, takes links down and up, adds addresses, and the changes arrive as
:mod:`portbroker.netmon` would send them (one change per call, already
settled). Nothing touches the host's network.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import attrs
import trio

from portbroker.netmon import (
    Address,
    AddressAdded,
    AddressRemoved,
    DefaultRoute,
    Link,
    LinkDown,
    LinkUp,
    NetworkChange,
    NetworkSnapshot,
    RouteChanged,
)
from portbroker.types import IPAddress
from portbroker.wire._fields import to_address

__all__ = ["FakeNetwork"]


@attrs.define(eq=False)
class FakeNetwork:
    """A :class:`portbroker.roaming.NetworkWatch` whose changes the test makes.

    Every change updates :meth:`snapshot` and queues the change (unbounded:
    a test never blocks on a slow consumer). :meth:`close` ends the stream.
    """

    _current: NetworkSnapshot
    _send: trio.MemorySendChannel[NetworkChange] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[NetworkChange] = attrs.field(init=False)
    sent: list[NetworkChange] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[NetworkChange](math.inf)

    @classmethod
    def routed_via(cls, gateway: IPAddress | str, interface: str = "eth0") -> FakeNetwork:
        """A host whose IPv4 default route is via *gateway* on *interface* (up)."""
        route = DefaultRoute(4, to_address(gateway), interface)
        return cls(NetworkSnapshot(routes=(route,), links=(Link(interface, True),)))

    def snapshot(self) -> NetworkSnapshot:
        return self._current

    def __aiter__(self) -> AsyncIterator[NetworkChange]:
        return self._receive

    def _emit(self, change: NetworkChange, after: NetworkSnapshot) -> None:
        self._current = after
        self.sent.append(change)
        self._send.send_nowait(change)

    def route_via(self, gateway: IPAddress | str | None, interface: str | None = None) -> None:
        """Move the IPv4 default route to *gateway* (None: no default route)."""
        old = self._current.default_route(4)
        others = tuple(r for r in self._current.routes if r.family != 4)
        if gateway is None:
            routes = others
            new_interface = ""
        else:
            new_interface = interface or (old.interface if old is not None else "eth0")
            routes = (*others, DefaultRoute(4, to_address(gateway), new_interface))
        self._emit(
            RouteChanged(
                4,
                None if old is None else old.gateway,
                None if gateway is None else to_address(gateway),
                new_interface,
                "" if old is None else old.interface,
            ),
            attrs.evolve(self._current, routes=routes),
        )

    def link(self, interface: str, up: bool) -> None:
        """*interface* goes down (*up* False) or comes up."""
        links = {link for link in self._current.links if link.interface != interface}
        links.add(Link(interface, up))
        change: NetworkChange = LinkUp(interface) if up else LinkDown(interface)
        self._emit(change, attrs.evolve(self._current, links=links))

    def address(
        self, interface: str, address: IPAddress | str, prefix_length: int = 24, *, added: bool
    ) -> None:
        """*address* appears on (*added*) or leaves *interface*."""
        entry = Address(interface, to_address(address), prefix_length)
        addresses = set(self._current.addresses)
        if added:
            addresses.add(entry)
            change: NetworkChange = AddressAdded(interface, entry.address, prefix_length)
        else:
            addresses.discard(entry)
            change = AddressRemoved(interface, entry.address, prefix_length)
        self._emit(change, attrs.evolve(self._current, addresses=addresses))

    def close(self) -> None:
        """End the stream of changes (the follower stops)."""
        self._send.close()
