"""A mapping through two NATs in series: the inner gateway's, then the outer's.

Behind double NAT (a router behind an ISP modem, a carrier-grade NAT) a
mapping on the inner gateway gets a non-global external address
(:mod:`portbroker.reachability`). When the outer NAT speaks PCP or UPnP IGD, a
second mapping there, whose internal endpoint is the inner mapping's external
endpoint, makes the host reachable from the Internet (docs/double-nat.md)::

    async with portbroker.open_broker() as inner:
        async with open_nested_mapping(inner, 8080, "tcp", outer_gateway="100.64.0.1") as m:
            print(m.external_address, m.external_port, m.reachability.public)

Each of the two mappings lives in its own broker, with its own lifecycle
(renewals, state loss, recovery: docs/architecture.md); this module only
ties them together. The outer broker's PCP requests reach the outer server
from the inner NAT's external address, which RFC 6887 §8.1 requires the
client address field to carry (ADDRESS_MISMATCH otherwise): it is opened
with ``pcp_client_address`` set to it, and MAPs the inner external port.
When the inner mapping's external endpoint moves, the outer mapping is made
again for the new one; when the inner mapping fails for good, the outer one
is deleted. Leaving the block deletes the outer mapping, then the inner one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.broker import Broker, Mapping, open_broker
from portbroker.errors import PortBrokerError
from portbroker.gateway import choose_pcp_server, discover_pcp_servers
from portbroker.lifecycle import Acquired, Failed, MappingEvent, ReachabilityChanged
from portbroker.reachability import Reachability
from portbroker.types import DEFAULT_LIFETIME, IPAddress, TransportProtocol

__all__ = ["NestedEvent", "NestedMapping", "open_nested_mapping"]

logger = logging.getLogger("portbroker")

# Releasing the outer mapping: its broker's one delete attempt (5 s) and the
# broker's exit, with room to spare.
OUTER_RELEASE_TIMEOUT = 15.0
# The methods that can map for another address than the sender's.
OUTER_METHODS: Final = ("pcp", "upnp")


@attrs.frozen
class NestedEvent:
    """An event of one of the two mappings: ``layer`` is "inner" or "outer"."""

    layer: str
    event: MappingEvent


@attrs.define(eq=False)
class NestedMapping:
    """The two mappings; the outer one's external endpoint is the reachable one."""

    inner: Mapping
    outer_server: IPAddress
    outer_server_source: str
    outer: Mapping | None = None
    _subscribers: list[trio.MemorySendChannel[NestedEvent]] = attrs.Factory(list)
    _moved: trio.Event = attrs.Factory(trio.Event)
    _outer_gone: trio.Event = attrs.Factory(trio.Event)
    _closing: bool = False
    _started: bool = False
    # The inner endpoint the outer mapping is (being) made for.
    _outer_for: tuple[IPAddress, int] | None = None

    def _outer(self) -> Mapping:
        if self.outer is None:
            raise PortBrokerError("the outer mapping is being made again")
        return self.outer

    @property
    def external_address(self) -> IPAddress:
        return self._outer().external_address

    @property
    def external_port(self) -> int:
        return self._outer().external_port

    @property
    def reachability(self) -> Reachability:
        """The outer mapping's: whether the Internet reaches it (docs/double-nat.md)."""
        return self._outer().reachability

    def events(self) -> trio.MemoryReceiveChannel[NestedEvent]:
        """Both mappings' events, each tagged with its layer.

        The stream starts with where each mapping is now (an ``Acquired`` of
        its current lease, and a ``ReachabilityChanged`` when that is not
        public: the inner one's usually is not), then every event as it
        happens; it ends when the block exits.
        """
        send, receive = trio.open_memory_channel[NestedEvent](math.inf)
        for layer, mapping in (("inner", self.inner), ("outer", self.outer)):
            if mapping is not None and mapping.lease is not None:
                for event in _first_events(mapping):
                    send.send_nowait(NestedEvent(layer, event))
        self._subscribers.append(send)
        return receive

    def _publish(self, layer: str, event: MappingEvent) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(NestedEvent(layer, event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def _wanted(self) -> tuple[IPAddress, int] | None:
        lease = self.inner.lease
        return None if lease is None else (lease.external_address, lease.external_port)

    async def _follow_inner(self, events: trio.MemoryReceiveChannel[MappingEvent]) -> None:
        async for event in events:
            self._publish("inner", event)
            if isinstance(event, Failed):
                # The inner mapping is gone for good (its last event): the
                # outer one would forward the Internet to an inner port the
                # inner NAT may give to another host. Delete it now.
                self._closing = True
                self._moved.set()
                return
            wanted = self._wanted()
            if wanted is not None and wanted != self._outer_for:
                # The inner NAT maps us elsewhere now: the outer mapping
                # points at nothing; make it again for the new endpoint.
                self._moved.set()

    async def _follow_outer(self, mapping: Mapping) -> None:
        async for event in mapping.events():
            self._publish("outer", event)


@contextlib.asynccontextmanager
async def open_nested_mapping(
    inner: Broker,
    internal_port: int,
    protocol: str | TransportProtocol = "tcp",
    *,
    outer_gateway: str | IPAddress | None = None,
    dhcp_leases: Sequence[str | os.PathLike[str]] | None = None,
    lifetime: int = DEFAULT_LIFETIME,
    external_port: int | None = None,
    via: str | None = None,
    outer_methods: Sequence[str] = OUTER_METHODS,
    outer_options: dict[str, Any] | None = None,
) -> AsyncIterator[NestedMapping]:
    """Map *internal_port* on *inner*'s gateway, then through the outer NAT by PCP.

    The outer NAT is *outer_gateway*, else the first PCP server the DHCP
    lease files *dhcp_leases* announce (RFC 7291; the host does not see the
    DHCP exchange between the two NATs, so this is a lease file the user
    provides or one from a host directly on the outer network). It is asked
    with *outer_methods*, most preferred first: PCP (the client address field
    set to the inner external address) and UPnP IGD (found by a unicast
    search, never multicast, with the inner external address as
    ``NewInternalClient``). NAT-PMP cannot be one: it maps only for the
    sender's own address (RFC 6886 §3.3).
    *outer_options* go to the outer broker's :func:`open_broker` (port,
    probe_timeout...). The outer mapping asks for *external_port*.

    Raises:
        ValueError: no outer PCP server given or announced, or bad arguments.
        MappingError, MethodUnavailable, NoAnswer: a mapping could not be made
            (the inner one is deleted again when the outer one fails).
    """
    discovered = discover_pcp_servers(dhcp_leases) if dhcp_leases else []
    if outer_gateway is None and not discovered:
        raise ValueError(
            "no outer NAT: name it (outer_gateway, --outer-gateway) or give DHCP lease"
            " files that announce its PCP server (RFC 7291 option 158 / 86)"
        )
    methods = tuple(outer_methods)
    if not methods or any(m not in OUTER_METHODS for m in methods):
        raise ValueError(
            f"outer_methods must be some of {', '.join(OUTER_METHODS)}, got {list(methods)}"
            " (NAT-PMP maps only for the sender's own address)"
        )
    mapping = await inner.map(internal_port, protocol, lifetime=lifetime, via=via)
    nested: NestedMapping | None = None
    try:
        external = mapping._lease().external_address
        choice = choose_pcp_server(outer_gateway, external, discovered)
        if outer_gateway is None and choice.address == external:
            # choose_pcp_server falls back on its "gateway", here the inner
            # external address: none of the servers announced is of its family.
            raise ValueError(
                f"no outer NAT: the DHCP lease files announce no IPv{external.version} PCP"
                f" server for the inner external address {external}; name it"
                " (outer_gateway, --outer-gateway)"
            )
        nested = NestedMapping(mapping, choice.address, choice.source)
        inner_events = mapping.events()
        options = dict(outer_options or {})
        options.setdefault("probe_timeout", inner.probe_timeout)
        with collapse_single():  # the caller sees the error, not a group of one
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nested._follow_inner, inner_events)
                # The outer broker runs in the inner broker's nursery, not
                # here: a caller's scope cancelled around this block (the
                # CLI's SIGTERM) would otherwise cancel the outer broker's
                # transport before its delete's answer is read, and the
                # outer mapping would stay until its lifetime ran out.
                await inner._nursery.start(
                    _keep_outer, nested, methods, options, lifetime, external_port
                )
                try:
                    yield nested
                finally:
                    with trio.CancelScope(shield=True):
                        # The outer mapping first (it points at the inner one),
                        # then the inner: both streams end with their Released.
                        nested._closing = True
                        nested._moved.set()
                        with trio.move_on_after(OUTER_RELEASE_TIMEOUT):
                            await nested._outer_gone.wait()
                        await mapping.release()
    finally:
        with trio.CancelScope(shield=True):
            await mapping.release()  # idempotent; here when the outer one failed
        if nested is not None:
            for channel in nested._subscribers:
                channel.close()


async def _keep_outer(
    nested: NestedMapping,
    methods: tuple[str, ...],
    options: dict[str, Any],
    lifetime: int,
    external_port: int | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The outer mapping for the inner one's current external endpoint, for as
    long as it is wanted; made again (in a new broker: the client address
    changes with the endpoint) when that endpoint moves."""
    try:
        await _outer_loop(nested, methods, options, lifetime, external_port, task_status)
    except Exception:
        if not nested._started:
            raise  # to the caller of open_nested_mapping
        # After the start a failure must not take the inner broker down.
        logger.exception("outer mapping via %s: unexpected error (a bug)", nested.outer_server)
    finally:
        nested.outer = None
        nested._outer_gone.set()


async def _outer_loop(
    nested: NestedMapping,
    methods: tuple[str, ...],
    options: dict[str, Any],
    lifetime: int,
    external_port: int | None,
    task_status: trio.TaskStatus[None],
) -> None:
    while not nested._closing:
        wanted = nested._wanted()
        if wanted is None:  # not granted yet (cannot happen after map(); kept safe)
            await trio.sleep(1)
            continue
        # Together, with no checkpoint between: a move seen after this point
        # is one away from the endpoint the new outer mapping is made for.
        address, port = nested._outer_for = wanted
        nested._moved = trio.Event()
        try:
            async with open_broker(
                nested.outer_server,
                methods,
                pcp_client_address=address,
                # The outer server announces on its own lan, which this host
                # is not on; 5350 is the inner broker's to listen on.
                announce_port=None,
                dhcp_leases=(),
                # SSDP multicast does not cross the inner NAT: a unicast
                # search to the outer NAT's address finds its IGD.
                ssdp_multicast=False,
                **options,
            ) as outer_broker:
                outer = await outer_broker.map(
                    port,
                    nested.inner.protocol,
                    lifetime=lifetime,
                    external_port=external_port,
                    internal_address=address,
                )
                nested.outer = outer
                for event in _first_events(outer):
                    nested._publish("outer", event)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(nested._follow_outer, outer)
                    if not nested._started:
                        nested._started = True
                        task_status.started()
                    await nested._moved.wait()
                    with trio.CancelScope(shield=True):
                        # Its stream ends with Released: _follow_outer returns.
                        await outer.release()
        except PortBrokerError as exc:
            if not nested._started:
                raise
            logger.warning("outer mapping via %s failed: %s", nested.outer_server, exc)
            nested._publish("outer", Failed(f"outer mapping failed: {exc}"))
            await nested._moved.wait()
        finally:
            nested.outer = None


def _first_events(mapping: Mapping) -> list[MappingEvent]:
    """What the outer mapping's Acquired said (published before anyone could
    subscribe): the Acquired itself and, if not public, its reachability."""
    lease = mapping._lease()
    events: list[MappingEvent] = [Acquired(lease)]
    reachable = lease.reachability
    if not reachable.public:
        events.append(ReachabilityChanged(lease, reachable.public, reachable.reason))
    return events
