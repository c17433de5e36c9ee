"""The Broker: executes what each mapping's lifecycle decides, on one gateway.

A :class:`Broker` owns the I/O and the clock, and no rules (those live in
:mod:`portbroker.lifecycle` for a mapping's life and :mod:`portbroker.epoch`
for a gateway's state loss). It holds

- the methods and their transports, built by :func:`portbroker.methods.open_methods`;
- the cached method decision: concurrent ``map()`` calls on a cold broker
  share one probe (one :func:`~portbroker.probe.create_by_preference` race);
- the live :class:`Mapping` objects, each driven by a
  :class:`~portbroker.lifecycle.MappingLifecycle`: the broker fires triggers,
  publishes the events and executes the one action each step returns
  (sleep, renew, re-create, delete);
- one scheduler task over a heap of every mapping's Sleep;
- one :class:`~portbroker.epoch.EpochTracker` per gateway box, fed by every
  PCP / NAT-PMP response, the announcement listener and the UPnP method's
  signals; each incident it reports is one STATE_LOST for every mapping on
  that box, whatever its method.

Fault isolation: an operation runs in its own task and whatever it raises —
an error of the method, a timeout, or a bug — becomes that mapping's
``FAILED`` trigger; nothing a mapping does can cancel the broker or another
mapping. Leaving :func:`open_broker` releases every mapping the broker holds.

Deletes that fail are retried in the background (lifecycle rule 10): each
lease whose delete failed is a :class:`~portbroker.lifecycle.PendingDelete`
on the same timer heap as the mappings; :meth:`Broker.undeleted` lists them.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.clockwatch import ClockWatch, ResumeCause, Resumed
from portbroker.epoch import Confirm, EpochTracker, GatewaySignal, StateLoss, Verdict
from portbroker.errors import (
    AlreadyMapped,
    GatewayNotFound,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    NoMethodAvailable,
    PortBrokerError,
    RequestUnsupported,
)
from portbroker.gateway import (
    ENV_GATEWAY,
    PcpServerChoice,
    checked_address,
    choose_pcp_server,
    discover_pcp_servers,
    resolve_gateway,
)
from portbroker.lifecycle import (
    MAX_DELETE_ATTEMPTS,
    MIN_RENEWAL_GAP,
    Delete,
    DeleteState,
    DeleteStep,
    Failure,
    FailureKind,
    GatewayChanged,
    MappingEvent,
    MappingLifecycle,
    PendingDelete,
    Recreate,
    Renew,
    RetryDelete,
    Sleep,
    State,
    Step,
    Trigger,
    classify,
    supersedes,
)
from portbroker.methods import LinkFactory, Method, MethodSet, open_methods
from portbroker.probe import create_by_preference, probe_all
from portbroker.reachability import Reachability
from portbroker.roaming import FOLLOW_SETTLE, NetworkWatch
from portbroker.transport import Response, Transport, listen_announcements
from portbroker.transport import budget as transport_budget
from portbroker.types import (
    DEFAULT_LIFETIME,
    METHOD_NAMES,
    IPAddress,
    Lease,
    MappingRequest,
    ProbeOutcome,
    ProbeReport,
    RemoteFilter,
    TransportProtocol,
    format_endpoint,
    unscoped,
)

__all__ = ["Broker", "BrokerEvent", "Mapping", "NoMethodAvailable", "open_broker"]

logger = logging.getLogger("portbroker")
T = TypeVar("T")

SERVER_PORT: Final = 5351
ANNOUNCE_PORT: Final = 5350
# How long a release's delete may take (the caller waits for it); a failed one
# is retried in the background, each retry with the request budget.
RELEASE_TIMEOUT: Final = 5.0
# A method ruled out (MethodUnavailable) is not asked again for this long
# while another is left to ask (_race); a gateway that was restarting, or a
# firewall rule removed, gets another chance.
UNAVAILABLE_TTL: Final = 30.0
# A request to a server that keeps answering *other* requests is queued, not
# lost (miniupnpd's nftables backend takes 100-250 ms per rule once it holds
# 50): its deadline moves on with every answer, up to this bound.
MAX_PATIENCE: Final = 120.0
# A probe race decided by silence alone (every answer lost) is run again, up to
# this many times in all: on a lossy link the next one may get through.
MAX_RACES: Final = 3


@attrs.frozen
class BrokerEvent:
    """A mapping event, as seen on :meth:`Broker.events`."""

    mapping: Mapping
    event: MappingEvent


@attrs.define(eq=False)
class Mapping:
    """A live mapping. Read its fields; subscribe with :meth:`events`; end it with :meth:`release`."""

    broker: Broker
    request: MappingRequest
    lifecycle: MappingLifecycle
    _subscribers: list[trio.MemorySendChannel[MappingEvent]] = attrs.Factory(list)
    _released: trio.Event = attrs.Factory(trio.Event)

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def lease(self) -> Lease | None:
        return self.lifecycle.lease

    def _lease(self) -> Lease:
        if self.lifecycle.lease is None:
            raise PortBrokerError("the mapping has no lease (yet)")
        return self.lifecycle.lease

    @property
    def method(self) -> str:
        return self._lease().method

    @property
    def external_address(self) -> IPAddress:
        return self._lease().external_address

    @property
    def external_port(self) -> int:
        return self._lease().external_port

    @property
    def internal_address(self) -> IPAddress:
        return self._lease().internal_address

    @property
    def reachability(self) -> Reachability:
        """Whether the Internet can reach the external endpoint, and if not why
        (``.public``, ``.reason``; docs/double-nat.md)."""
        return self._lease().reachability

    @property
    def internal_port(self) -> int:
        return self.request.internal_port

    @property
    def protocol(self) -> TransportProtocol:
        return self.request.protocol

    def events(self) -> trio.MemoryReceiveChannel[MappingEvent]:
        """A stream of this mapping's events from now on; it ends after Released or Failed."""
        send, receive = trio.open_memory_channel[MappingEvent](math.inf)
        if self.state in (State.RELEASED, State.FAILED):
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def _publish(self, events: Sequence[MappingEvent]) -> None:
        # Formatting an event is not free: skip it unless it is logged.
        logging_info = logger.isEnabledFor(logging.INFO)
        for event in events:
            if logging_info:
                logger.info("%s: %s", self._label(), _describe(event))
            for channel in list(self._subscribers):
                try:
                    channel.send_nowait(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(channel)
            self.broker._publish(self, event)

    def _close_subscribers(self) -> None:
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()

    def _label(self) -> str:
        return f"{self.request.internal_port}/{self.request.protocol.value}" + _to_remote(
            self.request.remote
        )

    @property
    def remote(self) -> tuple[IPAddress, int] | None:
        """The remote peer of a PEER mapping (:meth:`Broker.peer`); None for a MAP,
        including the MAP a PEER request fell back to (docs/peer.md)."""
        return self.request.remote

    async def release(self) -> None:
        """Delete the mapping on the gateway and stop renewing it.

        Idempotent. The delete runs shielded from cancellation, bounded by a
        few seconds, so a mapping is removed even when its owner is being
        cancelled. It returns after that one attempt: a delete the gateway
        never answered (or could not take now) ends the event stream with
        ``Released(confirmed=False, retrying=True)`` and is retried in the
        background (lifecycle rule 10, :meth:`Broker.undeleted`); one it
        refused for good with ``Released(confirmed=False)``.
        """
        await self.broker._release(self)


def _describe(event: MappingEvent) -> str:
    lease = getattr(event, "lease", None)
    name = type(event).__name__
    if lease is not None:
        return (
            f"{name} via {lease.method}:"
            f" {format_endpoint(lease.external_address, lease.external_port)}"
            f" for {lease.lifetime} s"
        )
    return f"{name} {attrs.asdict(event)}"


def _lease_label(lease: Lease) -> str:
    return (
        f"{lease.internal_port}/{lease.protocol.value}{_to_remote(lease.remote)} via {lease.method}"
    )


def _to_remote(remote: tuple[IPAddress, int] | None) -> str:
    return "" if remote is None else f" to {remote[0]}:{remote[1]}"


_Endpoint = tuple[TransportProtocol, IPAddress | None, int, tuple[IPAddress, int] | None]
_Entry = tuple[TransportProtocol, int, tuple[IPAddress, int] | None]


# A request waiting patiently (Broker._patiently): its cancel scope, budget
# and cap.
_Patience = tuple[trio.CancelScope, float, float]


def _patience_due(entry: _Patience) -> float:
    """The first time an answer could move *entry*'s deadline (Broker._observe).

    Once an answer at *now* finds the deadline more than 1/16 of the budget
    short of now + budget, or finds now + budget past the cap with the
    deadline short of it; never (inf) once the deadline is at the cap.
    """
    scope, budget, latest = entry
    deadline = scope.deadline
    if deadline >= latest:
        return math.inf
    return min(deadline - budget + budget / 16, latest - budget)


def _endpoint(request: MappingRequest) -> _Endpoint:
    # A PEER is one flow's binding, a gateway entry of its own (RFC 6887 §12):
    # its remote peer is part of what it claims, so a MAP of the port and
    # PEERs of it to other remote peers coexist (docs/peer.md).
    return (request.protocol, request.internal_address, request.internal_port, request.remote)


def _entry_of(request: MappingRequest) -> _Entry:
    """What a failed map's cleanup may delete on the gateway, whoever it maps to.

    Not :func:`_endpoint`: ``internal_address=`` this host's own address and
    none are one gateway entry (PCP: one nonce, NAT-PMP: one internal port),
    though two claims. A map of another host's port waits too (at most
    RELEASE_TIMEOUT), which costs less than knowing every address of ours.
    """
    return (request.protocol, request.internal_port, request.remote)


@attrs.define(eq=False)
class _Decision:
    """One probe race that concurrent callers wait for."""

    event: trio.Event = attrs.Factory(trio.Event)
    failed: NoMethodAvailable | NoAnswer | None = None


# Above this many mappings a network change re-checks them spread over
# recovery_delay (lifecycle rule 13), not all at once.
NETWORK_BURST: Final = 16

_Connect = Callable[
    [IPAddress], contextlib.AbstractAsyncContextManager[tuple[MethodSet, PcpServerChoice]]
]


@attrs.define(eq=False)
class _Held:
    """One gateway's methods, open while the broker may still need them (portbroker.roaming)."""

    gateway: IPAddress
    choice: PcpServerChoice
    method_set: MethodSet
    done: trio.Event | None  # set to close them; None: open_broker's own, closed at its exit

    @property
    def boxes(self) -> set[IPAddress]:
        return {self.gateway, self.choice.address}


class Broker:
    """Port mappings on one gateway. Create with :func:`open_broker`."""

    def __init__(
        self,
        *,
        gateway: IPAddress,
        nursery: trio.Nursery,
        method_set: MethodSet,
        probe_timeout: float,
        recovery_delay: float,
        rng: random.Random,
        pcp_server: PcpServerChoice | None = None,
    ) -> None:
        self.gateway = gateway
        # The PCP server in use and where it came from (docs/double-nat.md).
        self.pcp_server = pcp_server or PcpServerChoice(gateway, "the gateway")
        self.probe_timeout = probe_timeout
        self.recovery_delay = recovery_delay
        self._nursery = nursery
        # Set once open_broker has cancelled the nursery: see _spawn.
        self._closed = False
        self._method_set = method_set
        self._methods: dict[str, Method] = method_set.methods
        self._rng = rng
        self._mappings: set[Mapping] = set()
        self._heap: list[tuple[float, int, int, Mapping | PendingDelete]] = []
        self._pending: list[PendingDelete] = []  # deletes being retried (rule 10)
        # Deletes whose attempts ran out with their lease still running: the
        # gateway may still hold them (see take_given_up).
        self._given_up: list[Lease] = []
        self._seq = 0
        self._wake = trio.Event()
        # When the scheduler wakes next on its own (the heap's head when it
        # went to sleep): a push later than that needs no wake-up. Renewals
        # are pushed minutes ahead, so thousands of them cost the scheduler
        # nothing until one is due (benchmarks/scale.py).
        self._wake_at = -math.inf
        self._unavailable: dict[str, tuple[str, float]] = {}  # method -> (why, since)
        self._report: ProbeReport | None = None
        self._deciding: _Decision | None = None
        self._trackers: dict[IPAddress, EpochTracker] = {}
        # server -> {(scope, budget, latest deadline)} of the requests waiting on it
        self._patience: dict[IPAddress, set[tuple[trio.CancelScope, float, float]]] = {}
        # The same entries per server in a heap by when an answer could first
        # move their deadline (_patience_due): _observe looks at those only.
        self._patience_heap: dict[IPAddress, list[tuple[float, int, _Patience]]] = {}
        self._confirming = False
        self._deferring: set[IPAddress] = set()  # boxes with a _confirm_later task
        self._confirm_ended = trio.Event()  # set (and renewed) as each _confirm ends
        self._subscribers: list[trio.MemorySendChannel[BrokerEvent]] = []
        self._claims: set[_Endpoint] = set()
        # Failed maps' background deletes, by gateway entry (map waits for
        # those of its own; two claims can name one entry, see _entry_of).
        self._cleanups: dict[_Entry, set[trio.Event]] = {}
        # The live mappings by endpoint (as _mappings holds them): _claim
        # looks one up instead of scanning them all, or creating N mappings
        # would take N**2 / 2 comparisons (benchmarks/scale.py).
        self._held: dict[_Endpoint, Mapping] = {}
        # Why the gateway has no PEER, and since when (not asked again for
        # UNAVAILABLE_TTL): peer() falls back or fails at once meanwhile.
        self._peer_unavailable: tuple[str, float] | None = None
        # Following the default route (portbroker.roaming): how to open another
        # gateway's methods (set by open_broker when following), and the
        # method sets of gateways left behind, by box, None once closed.
        self._connect: _Connect | None = None
        self._gateways_held: list[_Held] = []  # gateways whose methods are open (after a move)
        self._left: set[IPAddress] = set()  # boxes of gateways left, methods closed
        self._gateway_subscribers: list[trio.MemorySendChannel[GatewayChanged]] = []
        self.moves = 0  # how often the broker moved to another gateway
        self.resumes = 0  # how often it noticed a suspend or a stop (rule 14)

    # -- public ---------------------------------------------------------------

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._methods)

    @property
    def mappings(self) -> frozenset[Mapping]:
        return frozenset(self._mappings)

    @property
    def transport(self) -> Transport | None:
        """The first PCP / NAT-PMP transport (for statistics), if any."""
        return next(iter(self._method_set.transports.values()), None)

    @property
    def state_losses(self) -> int:
        """How many state-loss incidents the gateway's trackers reported."""
        return sum(t.incidents for t in self._trackers.values())

    @property
    def selected_method(self) -> str | None:
        """The method the last probe or creation chose, if still trusted."""
        return self._report.selected if self._report else None

    def tracker(self, box: IPAddress | None = None) -> EpochTracker:
        """The state-loss tracker of *box* (default: the gateway)."""
        box = box or self.gateway
        if box not in self._trackers:
            self._trackers[box] = EpochTracker()
        return self._trackers[box]

    async def probe(self) -> ProbeReport:
        """Ask every enabled method at once and report each (bounded by the probe timeout)."""
        report = await probe_all(self.gateway, list(self._methods.values()), self.probe_timeout)
        self._report = report if report.selected is not None else None
        return report

    def events(self) -> trio.MemoryReceiveChannel[BrokerEvent]:
        """Every mapping's events, from now on, until the broker closes."""
        send, receive = trio.open_memory_channel[BrokerEvent](math.inf)
        self._subscribers.append(send)
        return receive

    def gateway_changes(self) -> trio.MemoryReceiveChannel[GatewayChanged]:
        """One ``GatewayChanged(old, new)`` per move of the broker (``open_broker(follow=True)``),
        mappings or none, from now on, until the broker closes. Each mapping
        also publishes its own (lifecycle rule 12)."""
        send, receive = trio.open_memory_channel[GatewayChanged](math.inf)
        self._gateway_subscribers.append(send)
        return receive

    async def map(
        self,
        internal_port: int,
        protocol: str | TransportProtocol = "tcp",
        *,
        lifetime: int = DEFAULT_LIFETIME,
        external_port: int | None = None,
        exact: bool = False,
        via: str | None = None,
        internal_address: IPAddress | str | None = None,
        description: str = "portbroker",
        filters: Sequence[RemoteFilter | str] = (),
    ) -> Mapping:
        """Create a mapping and keep it alive until :meth:`Mapping.release`.

        *via* forces one method ("pcp", "natpmp", "upnp"); otherwise the most
        preferred one that works is used (probing it on the way if needed).
        *internal_address* of another host makes a third-party mapping;
        *filters* (``"11.0.0.2/32"``, :class:`RemoteFilter`) restrict which
        remote peers may use it, and a method that cannot enforce them
        refuses with MappingError (docs/third-party-and-filter.md).

        Raises:
            ValueError: a bad port, protocol, lifetime or method name.
            MappingError: the gateway refused (``result_code`` says why).
            MethodUnavailable: no enabled method works with this gateway
                (:class:`NoMethodAvailable` says why for each).
            NoAnswer: the chosen method's server stayed silent.
        """
        request = self._own_as_none(
            MappingRequest(
                internal_port,
                protocol,
                lifetime,
                external_port,
                exact,
                internal_address,
                description,
                filters=tuple(filters),
            )
        )
        if via is not None and via not in self._methods:
            raise ValueError(
                f"method {via!r} is not enabled here; enabled: {', '.join(self._methods)}"
            )
        key = _entry_of(request)
        while cleanups := self._cleanups.get(key):
            # A failed map of this gateway entry is still deleting what the
            # gateway may have made (below): with PCP this map reuses that
            # nonce, and that delete would remove what this one makes.
            await next(iter(cleanups)).wait()
        with self._claim(request):
            # No retried delete of this port may go out while its create does.
            dropped = self._supersede(request)
            try:
                lease = await self._create_for(request, via)
            except BaseException as exc:
                # The old entry may well be there still (a gateway down makes
                # deletes pending and creates fail): its delete starts again.
                for old in dropped:
                    self._spawn(self._delete_again, old)
                if not isinstance(exc, Exception):
                    # Cancelled (or interrupted) after the request may have
                    # reached the gateway: delete what it may have made, since
                    # no Mapping will ever name it.
                    await self._clean_up(request, key, self._cleaning(key))
                elif isinstance(exc, NoAnswer | NoMethodAvailable):
                    # Silence is not a refusal: the request may have been
                    # served and only its answers lost (the peers benchmark at
                    # 60 % loss left DNAT rules so). The delete runs in the
                    # background, so a failure against a gateway that is down
                    # is not RELEASE_TIMEOUT slower.
                    self._clean_up_later(request, key)
                raise
            return self._start(request, lease)

    def _clean_up_later(self, request: MappingRequest, key: _Entry) -> None:
        if self._closed:
            return
        self._spawn(self._clean_up, request, key, self._cleaning(key))

    def _cleaning(self, key: _Entry) -> trio.Event:
        """Register a cleanup of *key* (map waits for it); set when it is over."""
        done = trio.Event()
        self._cleanups.setdefault(key, set()).add(done)
        return done

    async def _clean_up(self, request: MappingRequest, key: _Entry, done: trio.Event) -> None:
        try:
            await self._abandon(request)
        finally:
            running = self._cleanups.get(key, set())
            running.discard(done)
            if not running:
                self._cleanups.pop(key, None)
            done.set()

    def _own_as_none(self, request: MappingRequest) -> MappingRequest:
        """*request* with an ``internal_address`` of this host's own (toward the gateway) as none.

        Both name one gateway entry (PCP: one nonce, NAT-PMP: one internal
        port), so they must be one claim: as two, a second map of the port
        renewed the first's entry under another Mapping, and releasing either
        (or a failed one's cleanup) deleted the other's.
        """
        if request.internal_address is None:
            return request
        if request.internal_address in self._own_addresses():
            return attrs.evolve(request, internal_address=None)
        return request

    def _own_addresses(self) -> set[IPAddress]:
        """This host's addresses toward the gateway now (the transports' sources)."""
        # Unscoped: getsockname gives a link-local source with its scope, and
        # the request's address has none (MappingRequest drops it).
        return {unscoped(t.link.local_address) for t in self._method_set.transports.values()}

    @contextlib.contextmanager
    def _claim(self, request: MappingRequest) -> Iterator[None]:
        """One mapping per internal endpoint in this broker (errors.AlreadyMapped)."""
        key = _endpoint(request)
        same = [key]
        if request.internal_address is None:
            # One claimed for an address that has since become this host's own
            # toward the gateway (a move to another gateway, by another
            # interface) is this gateway entry too.
            same += [(key[0], own, key[2], key[3]) for own in self._own_addresses()]
        mapping = next((m for k in same if (m := self._held.get(k)) is not None), None)
        if mapping is not None:
            raise AlreadyMapped(
                f"{request.internal_port}/{request.protocol.value}{_to_remote(request.remote)}"
                f" is already mapped by this broker ({mapping.state.value}); use that"
                " mapping or release it first"
            )
        if any(k in self._claims for k in same):
            raise AlreadyMapped(
                f"{request.internal_port}/{request.protocol.value}{_to_remote(request.remote)}"
                " is being mapped by another call on this broker"
            )
        self._claims.add(key)
        try:
            yield
        finally:
            self._claims.discard(key)

    async def _abandon(self, request: MappingRequest) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for method in self._methods.values():
                    nursery.start_soon(self._abandon_one, method, request)

    async def _abandon_one(self, method: Method, request: MappingRequest) -> None:
        try:
            await method.abandon(request)
        except Exception as exc:  # noqa: BLE001 - best effort: the lease lapses on its own
            logger.info("%s: cleaning up after a cancelled map failed: %s", method.name, exc)

    async def adopt(self, request: MappingRequest, lease: Lease) -> Mapping:
        """Take over a mapping made earlier (by a previous run, say) and keep it alive.

        It is renewed at once with its lease as the previous one, so PCP keeps
        the same nonce and the gateway the same mapping.

        Raises:
            ValueError: the lease's method is not enabled here.
            MappingError, MethodUnavailable, NoAnswer: the renewal failed.
        """
        method = self._methods.get(lease.method)
        if method is None:
            raise ValueError(f"method {lease.method!r} is not enabled here")
        with self._claim(request):
            return self._start(request, await self._create_with(method, request, lease))

    def _start(self, request: MappingRequest, lease: Lease) -> Mapping:
        self._supersede(lease)
        lifecycle = MappingLifecycle(
            self._rng, self.recovery_delay, request_budget=self._request_budget()
        )
        mapping = Mapping(self, request, lifecycle)
        self._mappings.add(mapping)
        self._held[_endpoint(request)] = mapping
        self._apply(
            mapping, lifecycle.fire(Trigger.GRANTED, trio.current_time(), token=0, lease=lease)
        )
        if self.moves and lease.gateway not in (self.gateway, self.pcp_server.address):
            # Made on a gateway the broker moved away from meanwhile (a map()
            # across a move): it follows, as the others did (lifecycle rule 12).
            self._apply(
                mapping,
                self._fire_safely(
                    mapping, Trigger.MOVED, old_gateway=lease.gateway, new_gateway=self.gateway
                ),
            )
            self._spawn(self._release_left, lease)
        return mapping

    @contextlib.asynccontextmanager
    async def open_mapping(
        self,
        internal_port: int,
        protocol: str | TransportProtocol = "tcp",
        **kwargs: Any,
    ) -> AsyncIterator[Mapping]:
        """:meth:`map`, released when the block exits (however it exits)."""
        mapping = await self.map(internal_port, protocol, **kwargs)
        try:
            yield mapping
        finally:
            await mapping.release()

    async def peer(
        self,
        internal_port: int,
        protocol: str | TransportProtocol = "udp",
        remote: tuple[IPAddress | str, int] | None = None,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        fallback: str | None = "map",
        internal_address: IPAddress | str | None = None,
        description: str = "portbroker",
    ) -> Mapping:
        """Create or extend the NAT binding of the outbound flow to *remote* (PCP PEER).

        RFC 6887 §12: the gateway keeps the binding of *internal_port* toward
        ``remote = (address, port)`` alive for *lifetime* without keepalive
        traffic; the lease's external address and port are what the remote
        peer sees as the flow's source. It is renewed, re-created after a
        gateway restart and deleted on release like a MAP (same events).

        Only PCP has PEER. Where the gateway has no PCP, or its PCP server
        answers PEER with UNSUPP_OPCODE, *fallback* decides: ``"map"`` (the
        default) makes an ordinary inbound mapping of *internal_port* instead
        (:meth:`map`: any method; its ``remote`` is None), ``None`` raises
        :class:`NoMethodAvailable` saying why (docs/peer.md).

        A PEER and a MAP of one port are different gateway entries and
        coexist here, as do PEERs of one port to different remote peers; a
        second PEER of the same flow raises ``AlreadyMapped``.

        Raises:
            ValueError: a bad port, protocol, lifetime, remote or fallback.
            MappingError: the gateway refused (``result_code`` says why).
            NoMethodAvailable: no PEER here and *fallback* is None (a PCP
                server that stays silent counts as none), or no method can
                make the fallback MAP.
            AlreadyMapped: this broker already holds that PEER, or (no PEER
                here) the MAP of the port the fallback would make.
            NoAnswer: the fallback MAP's method stayed silent.
        """
        if fallback not in ("map", None):
            raise ValueError(f"fallback must be 'map' or None, got {fallback!r}")
        if remote is None:
            raise ValueError("peer() needs remote=(address, port): the flow's remote peer")
        request = self._own_as_none(
            MappingRequest(
                internal_port,
                protocol,
                lifetime,
                internal_address=internal_address,
                description=description,
                remote=remote,
            )
        )
        outcome = await self._try_peer(request, fallback)
        if isinstance(outcome, Mapping):
            return outcome
        if fallback is None:
            raise NoMethodAvailable(
                [
                    ProbeOutcome(name, False, error=outcome if name == "pcp" else "PEER needs PCP")
                    for name in (*self._methods, *(() if "pcp" in self._methods else ("pcp",)))
                ]
            )
        logger.info(
            "%s/%s: no PEER here (%s); mapping the port instead (fallback='map')",
            request.internal_port,
            request.protocol.value,
            outcome,
        )
        try:
            return await self.map(
                internal_port,
                protocol,
                lifetime=lifetime,
                internal_address=internal_address,
                description=description,
            )
        except AlreadyMapped as exc:
            raise AlreadyMapped(
                f"no PEER here ({outcome}), and the fallback, a MAP of"
                f" {request.internal_port}/{request.protocol.value}, is held by this broker"
                " already: use that mapping"
            ) from exc

    def _pcp_for_peer(self) -> Method:
        method = self._methods.get("pcp")
        if method is None:
            raise MethodUnavailable("pcp", "not enabled on this broker, and PEER needs PCP")
        return method

    async def _try_peer(self, request: MappingRequest, fallback: str | None) -> Mapping | str:
        """A PEER mapping, or why this gateway has no PEER (for the fallback)."""
        method = self._methods.get("pcp")
        if method is None:
            return "PCP is not enabled on this broker"
        now = trio.current_time()
        ruled_out = self._known_unavailable()
        known = ruled_out.get("pcp")
        # A rule-out steers the choice to another method (_race). PCP is
        # PEER's only one, and with no fallback, or every method ruled out
        # (the fallback MAP would ask PCP again anyway), it is asked: one
        # ICMP in a restart made peer() give up on PEER for 30 s (a MAP,
        # open to anyone, made instead through the PCP that was back).
        if known is not None and fallback is not None and ruled_out.keys() < self._methods.keys():
            return f"the gateway does not speak PCP ({known})"
        if self.selected_method not in (None, "pcp"):
            return f"the gateway does not speak PCP (it chose {self.selected_method})"
        if self._peer_unavailable is not None:
            why, since = self._peer_unavailable
            if now - since < UNAVAILABLE_TTL:
                return why
            self._peer_unavailable = None
        with self._claim(request):
            dropped = self._supersede(request)
            try:
                lease = await self._create_with(method, request)
            except (MethodUnavailable, NoAnswer) as exc:
                for old in dropped:
                    self._spawn(self._delete_again, old)
                if isinstance(exc, NoAnswer):
                    # The PEER may have been made and its answer lost.
                    await self._abandon_on(method, request)
                why = getattr(exc, "reason", None) or str(exc)
                self._peer_unavailable = (why, trio.current_time())
                return why
            except BaseException as exc:
                for old in dropped:
                    self._spawn(self._delete_again, old)
                if not isinstance(exc, Exception):
                    await self._abandon(request)
                raise
            return self._start(request, lease)

    @contextlib.asynccontextmanager
    async def open_peer(
        self,
        internal_port: int,
        protocol: str | TransportProtocol = "udp",
        remote: tuple[IPAddress | str, int] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Mapping]:
        """:meth:`peer`, released when the block exits (however it exits)."""
        mapping = await self.peer(internal_port, protocol, remote, **kwargs)
        try:
            yield mapping
        finally:
            await mapping.release()

    def detach(self, mapping: Mapping) -> Lease:
        """Stop managing *mapping* without deleting it; return its lease.

        The mapping stays on the gateway until its lease runs out or someone
        deletes it with :meth:`delete` (the CLI's ``map`` without ``--hold``
        records the lease in a state file for ``unmap``). Its event stream
        ends with ``Released(confirmed=False, detached=True)``.
        """
        lease = mapping._lease()
        self._apply(mapping, mapping.lifecycle.fire(Trigger.DETACH, trio.current_time()))
        return lease

    async def delete(self, lease: Lease, *, retry: bool = False) -> bool:
        """Delete a mapping from its lease (for example one :meth:`detach` returned).

        With *retry*, one attempt too, but a failure is not raised: it returns
        False and, unless the failure was final (a refusal, an expired lease),
        the broker retries in the background like a failed release's delete
        (lifecycle rule 10); :meth:`undeleted` lists the lease meanwhile.

        Returns:
            True when this attempt deleted it (without *retry*, always True).

        Raises:
            ValueError: the lease's method is not enabled on this broker.
            MappingError, MethodUnavailable, NoAnswer: the delete failed
                (only without *retry*).
        """
        methods = self._methods_for(lease)
        if methods is None:
            raise MethodUnavailable(
                lease.method, f"the broker has left gateway {lease.gateway} (it moved)"
            )
        method = methods.get(lease.method)
        if method is None:
            raise ValueError(f"method {lease.method!r} is not enabled here")
        if retry:
            # Asked again for a lease already pending: this attempt replaces those.
            self._pending = [p for p in self._pending if p.lease != lease]
            try:
                failure = await self._delete_once(lease, self._request_budget())
            except BaseException:
                # Cancelled mid-attempt (a daemon stopping): the lease is still
                # to be deleted, and undeleted() must say so.
                self._hand_over(lease, Failure(FailureKind.SILENT, "delete interrupted"))
                raise
            if failure is None:
                logger.info("%s: deleted on the gateway", _lease_label(lease))
                return True
            self._hand_over(lease, failure)
            return False
        budget = self._request_budget()
        try:
            with trio.fail_after(budget):
                await method.delete(lease)
        except trio.TooSlowError:
            raise NoAnswer(f"{lease.method}: delete not answered within {budget:g} s") from None
        except OSError as exc:  # a method that let one through: still that method's failure
            raise MethodUnavailable(lease.method, f"delete failed: {exc}") from exc
        return True

    def take_given_up(self) -> list[Lease]:
        """The leases whose delete retries ran out (:data:`MAX_DELETE_ATTEMPTS`)
        while the lease still runs, each returned once: neither refused nor
        lapsed, they may still be open on the gateway. The daemon keeps them
        recorded and tries again later (docs/daemon-protocol.md, Persistence).
        """
        given_up, self._given_up = self._given_up, []
        return given_up

    def undeleted(self) -> list[Lease]:
        """The leases whose delete failed and is still being retried (rule 10).

        Still valid after :func:`open_broker` has exited (the retries end
        then): a daemon stopping cleanly records these for its next start.
        """
        return [pending.lease for pending in self._pending]

    # -- creation ---------------------------------------------------------------

    def _request_budget(self) -> float:
        return max(4 * self.probe_timeout, 8.0)

    def _known_unavailable(self) -> dict[str, str]:
        now = trio.current_time()
        for name, (_why, since) in list(self._unavailable.items()):
            if now - since >= UNAVAILABLE_TTL:
                del self._unavailable[name]
        return {name: why for name, (why, _since) in self._unavailable.items()}

    async def _create(self, request: MappingRequest, via: str | None) -> Lease:
        """Create with *via*, or the chosen method, or decide (one probe for all callers)."""
        if via is not None:
            # A forced method gets the same second chances as a race lost to
            # silence alone (MAX_RACES): a request repeated is the same
            # mapping (PCP: the same nonce; NAT-PMP, UPnP: the same port), and
            # a gateway busy past a whole budget (the lab's miniupnpd adding
            # 50 nftables rules went 8 s without a word) is not gone.
            for attempt in range(1, MAX_RACES + 1):
                try:
                    return await self._create_with(self._methods[via], request)
                except NoAnswer as exc:
                    if attempt == MAX_RACES:
                        raise
                    logger.info("%s; asking again", exc)
        while True:
            selected = self.selected_method
            if selected is not None:
                try:
                    return await self._create_with(self._methods[selected], request)
                except (MethodUnavailable, NoAnswer) as exc:
                    # The chosen method stopped working: race again without it
                    # for a while. (A server that answered others meanwhile
                    # was patient-waited in _create_with: this is silence.)
                    logger.info("method %s failed (%s); choosing again", selected, exc)
                    self._forget(selected, getattr(exc, "reason", str(exc)))
                    continue
            if self._deciding is None:
                break
            # Another caller is deciding: share its probe (50 map() calls on a
            # cold broker are one race, not 50), then use what it chose, or
            # fail as it failed.
            decision = self._deciding
            await decision.event.wait()
            if isinstance(decision.failed, NoMethodAvailable):
                raise NoMethodAvailable(decision.failed.outcomes)
            if isinstance(decision.failed, NoAnswer):
                # The method the race chose answered its probe, then not the
                # request: the waiters share that too, or each would run its
                # own race in turn and the last of 50 would wait 50 budgets.
                shared = NoAnswer(str(decision.failed))  # the message names the ignored
                shared.ignored = dict(decision.failed.ignored)
                raise shared
        decision = self._deciding = _Decision()
        try:
            lease, report = await self._race(request)
        except (NoMethodAvailable, NoAnswer) as exc:
            decision.failed = exc
            raise
        except MappingError as exc:
            # The method answered (and refused this request): it is the choice.
            self._report = ProbeReport(self.gateway, exc.method, ())
            raise
        finally:
            self._deciding = None
            decision.event.set()
        self._report = report
        now = trio.current_time()
        for outcome in report.outcomes:
            if not outcome.available:
                self._unavailable.setdefault(outcome.method, (outcome.error or "unavailable", now))
        return lease

    async def _create_for(self, request: MappingRequest, via: str | None) -> Lease:
        """:meth:`_create`; for a request the method cannot carry out, the others.

        A method that cannot do what this request asks (RequestUnsupported:
        a mapping for another host, filters it cannot enforce) stays the
        broker's choice for everything else; this one request is offered to
        the other enabled methods in order of preference, and gets the same
        request, enforced as asked, or the refusals of all
        (docs/third-party-and-filter.md). A forced method (*via*) is not
        second-guessed.
        """
        try:
            return await self._create(request, via)
        except RequestUnsupported as first:
            if via is not None:
                raise
            refusals = [f"{first.method}: {first.reason}"]
            skip = {first.method, *self._known_unavailable()}
            for name, method in self._methods.items():
                if name in skip:
                    continue
                try:
                    return await self._create_with(method, request)
                except NoAnswer as exc:
                    # It may have made the mapping all the same.
                    await self._abandon_on(method, request)
                    refusals.append(str(exc))
                except PortBrokerError as exc:
                    refusals.append(str(exc))
            raise RequestUnsupported(
                first.method,
                "; ".join(refusals)[len(first.method) + 2 :],
                result_code=first.result_code,
                retry_after=first.retry_after,
            ) from first

    async def _race(self, request: MappingRequest) -> tuple[Lease, ProbeReport]:
        """The probe race, run again when silence (not a refusal) decided it.

        On a lossy link a race can lose every method's answers, or the chosen
        method's answer to the request itself: up to :data:`MAX_RACES` races,
        each without the methods already ruled out. A method that answered its
        probe but not the request may have made the mapping anyway: it is
        cleaned up (:meth:`Method.abandon`) before another method may try, so
        nothing is duplicated. A definite answer (a refusal, an ICMP
        unreachable) ends it at once.
        """
        for race in range(1, MAX_RACES + 1):
            known = self._known_unavailable()
            racing = self._methods  # the gateway may move meanwhile (portbroker.roaming)
            if racing and known.keys() >= racing.keys():
                # Every method is ruled out. A rule-out steers the choice to
                # another method for a while, and there is none: ask them
                # all again rather than fail from memory. A renewal that met
                # miniupnpd restarting (one ICMP port unreachable) left a
                # PCP-only mapping lost for 52 s (UNAVAILABLE_TTL, then the
                # backoff), though the gateway was back within a second (a
                # lab run under load: tests/test_restart_window.py).
                known = {}
            try:
                return await create_by_preference(
                    self.gateway,
                    list(racing.values()),
                    request,
                    self.probe_timeout,
                    known_unavailable=known,
                )
            except NoMethodAvailable as exc:
                asked = [o for o in exc.outcomes if o.method not in known]
                if race == MAX_RACES or not asked or not all(o.silent for o in asked):
                    raise
                if racing is not self._methods:
                    # The broker moved: the next race asks another gateway, and
                    # this one may have made what it never answered.
                    for left in racing.values():
                        await self._abandon_on(left, request)
                logger.info("no method answered (%s); racing again", exc.reason)
            except NoAnswer as exc:
                if race == MAX_RACES or exc.method not in racing:
                    raise
                method = racing[exc.method]
                await self._abandon_on(method, request)
                self._forget(method.name, str(exc))
                logger.info("%s; racing again without it", exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _abandon_on(self, method: Method, request: MappingRequest) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            await self._abandon_one(method, request)

    async def _create_with(
        self, method: Method, request: MappingRequest, previous: Lease | None = None
    ) -> Lease:
        budget = self._request_budget()
        try:
            return await self._patiently(method, budget, method.create(request, previous))
        except trio.TooSlowError:
            raise NoAnswer(f"{method.name}: no answer within {budget:g} s") from None

    async def _patiently(
        self, method: Method, budget: float, call: Awaitable[T], *, until: float = math.inf
    ) -> T:
        """Await *call* within *budget*, extended while the method's server answers others.

        A deadline that every response from the same server pushes back by
        *budget* (bounded by :data:`MAX_PATIENCE`, and never past *until*: a
        renewal must not outlive its lease, lifecycle rule 2): a slow server
        working through a queue is alive; only silence for a whole budget
        (less at most 1/16 of it, see _observe) is NoAnswer.
        """
        transport = self._method_set.transport_of(method.name)
        server = transport.link.remote[0] if transport is not None else None
        started = trio.current_time()
        latest = min(started + MAX_PATIENCE, max(until, started + budget))
        with trio.CancelScope(deadline=started + budget) as scope, transport_budget(scope):
            entry = (scope, budget, latest)
            if server is not None:
                self._patience.setdefault(server, set()).add(entry)
                self._wait_patiently(server, entry)
            try:
                return await call
            finally:
                if server is not None:
                    self._patience[server].discard(entry)
        raise trio.TooSlowError

    def _wait_patiently(self, server: IPAddress, entry: _Patience) -> None:
        """Put *entry* (of _patience) on *server*'s heap at :func:`_patience_due`."""
        due = _patience_due(entry)
        if due == math.inf:
            return  # at its cap: no answer moves it again
        heap = self._patience_heap.setdefault(server, [])
        if len(heap) > 2 * len(self._patience[server]) + 64:
            # Entries that ended stay until popped; a server that stopped
            # answering pops none, so they are dropped here now and then.
            live = self._patience[server]
            heap[:] = [item for item in heap if item[2] in live]
            heapq.heapify(heap)
        self._seq += 1
        heapq.heappush(heap, (due, self._seq, entry))

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start *fn* in the broker's nursery, unless the broker has closed.

        The transports' receive loops are shielded from the broker's
        cancellation (a delete's answer must still be read while the broker
        releases), so an answer or announcement read after the nursery closed
        can still ask for a confirmation, a renewal or a delete retry; that
        work is moot then (everything was released), and starting it raised
        RuntimeError in the receive loop (tests/test_broker_teardown.py).
        """
        if self._closed:
            logger.debug("broker closed: not starting %s", getattr(fn, "__name__", fn))
            return
        self._nursery.start_soon(fn, *args)

    def _forget(self, method: str, reason: str) -> None:
        self._unavailable[method] = (reason, trio.current_time())
        if self._report is not None and self._report.selected == method:
            self._report = None

    # -- executing steps ----------------------------------------------------------

    def _apply(self, mapping: Mapping, step: Step) -> None:
        """Publish a step's events and start its action."""
        mapping._publish(step.events)
        action = step.action
        if mapping.state in (State.RELEASED, State.FAILED) and mapping in self._mappings:
            self._mappings.discard(mapping)
            if self._held.get(_endpoint(mapping.request)) is mapping:
                del self._held[_endpoint(mapping.request)]
            mapping._close_subscribers()
            mapping._released.set()
        if action is None:
            return
        if isinstance(action, Sleep):
            self._push(action, mapping)
        elif isinstance(action, Renew | Recreate) or (isinstance(action, Delete) and action.quiet):
            self._spawn(self._execute, mapping, action)
        elif isinstance(action, RetryDelete):
            self._apply_delete(action.pending, action.first)
        # A Delete that is not quiet comes from RELEASE; _release runs it
        # in the releasing task (shielded), and Stop needs nothing.

    async def _execute(self, mapping: Mapping, action: Renew | Recreate | Delete) -> None:
        """Run one action's I/O and feed its outcome back. Never raises (but Cancelled)."""
        lifecycle = mapping.lifecycle
        try:
            if isinstance(action, Delete):
                # A grant after the end (rule 9): its delete is retried too.
                failure = await self._delete_once(action.lease, RELEASE_TIMEOUT, shield=True)
                if failure is not None:
                    self._hand_over(action.lease, failure)
                return
            if isinstance(action, Renew):
                lease = action.lease
                method = self._methods.get(lease.method)
                if method is None:
                    raise MethodUnavailable(lease.method, "not enabled on this broker")
                began = trio.current_time()
                try:
                    granted = await self._patiently(
                        method,
                        action.budget,
                        method.create(mapping.request, lease),
                        until=lease.expires_at,
                    )
                except trio.TooSlowError:
                    waited = trio.current_time() - began
                    raise NoAnswer(
                        f"{lease.method}: renewal not answered within {waited:.1f} s"
                    ) from None
            else:
                assert isinstance(action, Recreate)
                previous = action.previous
                if previous is not None and previous.method in self._methods:
                    granted = await self._create_with(
                        self._methods[previous.method], mapping.request, previous
                    )
                elif mapping.request.remote is not None:
                    # A PEER stays a PEER: only PCP has it (no race, no fallback).
                    granted = await self._create_with(self._pcp_for_peer(), mapping.request)
                else:
                    granted = await self._create_for(mapping.request, None)
            step = lifecycle.fire(
                Trigger.GRANTED, trio.current_time(), token=action.token, lease=granted
            )
        except Exception as exc:
            # A renewal's "retry after" beyond its lease cannot save the lease
            # (REFUSED); a re-creation has no lease to save, so any retry_after
            # is "not now" (lifecycle rule 7), even once the old lease expired.
            current = lifecycle.lease if isinstance(action, Renew) else None
            expires_in = current.expires_at - trio.current_time() if current else None
            failure = classify(exc, expires_in=expires_in)
            if failure.kind is FailureKind.INTERNAL:
                logger.error(
                    "%s: unexpected error (a bug; the mapping carries on):",
                    mapping._label(),
                    exc_info=exc,
                )
            else:
                logger.info("%s: %s", mapping._label(), failure.reason)
            if (
                failure.kind is FailureKind.UNAVAILABLE
                and isinstance(exc, MethodUnavailable)
                and not isinstance(exc, NoMethodAvailable)  # "all" is no method to rule out
                # A PEER refused (UNSUPP_OPCODE) says nothing of PCP's MAP.
                and mapping.request.remote is None
            ):
                self._forget(exc.method, exc.reason)
            step = self._fire_safely(mapping, Trigger.FAILED, token=action.token, failure=failure)
        self._apply(mapping, step)

    def _fire_safely(self, mapping: Mapping, trigger: Trigger, **kwargs: Any) -> Step:
        try:
            return mapping.lifecycle.fire(trigger, trio.current_time(), **kwargs)
        except PortBrokerError:
            logger.exception("%s: lifecycle refused %s", mapping._label(), trigger.value)
            return Step([], None)

    async def _delete_once(
        self, lease: Lease, budget: float, *, shield: bool = False
    ) -> Failure | None:
        """One delete attempt within *budget*: None if it worked, else how it failed."""
        methods = self._methods_for(lease)
        if methods is None:
            # A gateway the broker moved away from: off the path, forgotten.
            return Failure(
                FailureKind.REFUSED, f"gateway {lease.gateway} is no longer this broker's"
            )
        method = methods.get(lease.method)
        if method is None:
            return Failure(FailureKind.REFUSED, f"method {lease.method} is not enabled here")
        with trio.CancelScope(shield=shield), trio.move_on_after(budget):
            try:
                await method.delete(lease)
                return None
            except OSError as exc:  # a method that let one through: still that method's failure
                return classify(MethodUnavailable(lease.method, f"delete failed: {exc}"))
            except Exception as exc:
                failure = classify(exc)
                if failure.kind is FailureKind.INTERNAL:
                    logger.error(
                        "%s: unexpected error in a delete (a bug):",
                        _lease_label(lease),
                        exc_info=exc,
                    )
                return failure
        return Failure(
            FailureKind.SILENT, f"{lease.method}: delete not answered within {budget:g} s"
        )

    # -- deletes that failed (lifecycle rule 10) ------------------------------------

    def _apply_delete(self, pending: PendingDelete, step: DeleteStep) -> None:
        """Execute a pending delete's step, and log each failure and the end."""
        action = step.action
        label = _lease_label(pending.lease)
        if action is None:
            return
        if isinstance(action, Sleep):
            if pending not in self._pending:
                self._pending.append(pending)
            assert pending.last_failure is not None
            # The first failure is a warning, the attempts after it are not:
            # thousands of deletes a silent gateway never confirms must not
            # write twenty warnings each (the end, giving up, is one again).
            logger.log(
                logging.WARNING if pending.attempts == 1 else logging.INFO,
                "%s: delete failed (attempt %d of %d: %s); trying again in %.0f s",
                label,
                pending.attempts,
                MAX_DELETE_ATTEMPTS,
                pending.last_failure.reason,
                action.until - trio.current_time(),
            )
            self._push(action, pending)
        elif isinstance(action, Delete):
            self._spawn(self._retry_delete, pending, action)
        else:
            if pending in self._pending:
                self._pending.remove(pending)
            if pending.state is DeleteState.DELETED:
                logger.info("%s: %s", label, pending.outcome)
            else:
                logger.warning("%s: delete failed, not retried: %s", label, pending.outcome)
                failure = pending.last_failure
                if (
                    pending.state is DeleteState.GAVE_UP
                    and failure is not None
                    and failure.kind is not FailureKind.REFUSED
                    and (pending.lease.permanent or trio.current_time() < pending.lease.expires_at)
                ):
                    self._given_up.append(pending.lease)

    def _hand_over(self, lease: Lease, failure: Failure) -> None:
        """A first attempt that failed outside a mapping's life: rule 10 decides what next."""
        pending = PendingDelete(lease)
        now = trio.current_time()
        self._apply_delete(pending, pending.fire(Trigger.FAILED, now, token=0, failure=failure))

    async def _retry_delete(self, pending: PendingDelete, action: Delete) -> None:
        failure = await self._delete_once(action.lease, self._request_budget())
        if pending not in self._pending:
            return  # superseded by a new mapping meanwhile (_supersede)
        trigger = Trigger.DELETED if failure is None else Trigger.FAILED
        self._apply_delete(pending, self._fire_delete(pending, trigger, action.token, failure))

    def _fire_delete(
        self, pending: PendingDelete, trigger: Trigger, token: int, failure: Failure | None = None
    ) -> DeleteStep:
        # Like _fire_safely: a LifecycleError is a bug here, logged; the broker carries on.
        try:
            return pending.fire(trigger, trio.current_time(), token=token, failure=failure)
        except PortBrokerError:
            logger.exception("%s: delete retries refused %s", _lease_label(pending.lease), trigger)
            return DeleteStep(None)

    def _supersede(self, new: Lease | MappingRequest) -> list[Lease]:
        """End the pending deletes that would remove *new* (rule 10); their leases."""
        dropped = [p for p in self._pending if supersedes(new, p.lease)]
        for pending in dropped:
            self._pending.remove(pending)
            logger.info(
                "%s: no longer deleting it: a new mapping takes its place",
                _lease_label(pending.lease),
            )
        return [pending.lease for pending in dropped]

    async def _delete_again(self, lease: Lease) -> None:
        try:
            await self.delete(lease, retry=True)
        except Exception:  # a bug: the lease lapses on its own
            logger.exception("%s: deleting it again failed", _lease_label(lease))

    # -- scheduling -------------------------------------------------------------

    def _push(self, sleep: Sleep, target: Mapping | PendingDelete) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (sleep.until, self._seq, sleep.token, target))
        if sleep.until < self._wake_at:
            self._wake.set()

    async def _scheduler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The one task that wakes mappings when their Sleep ends."""
        task_status.started()
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _until, _seq, token, target = heapq.heappop(self._heap)
                if isinstance(target, PendingDelete):
                    if target in self._pending and target.token == token:
                        self._apply_delete(target, self._fire_delete(target, Trigger.TIMER, token))
                    continue
                if target not in self._mappings or target.lifecycle.token != token:
                    continue  # superseded
                self._apply(target, self._fire_safely(target, Trigger.TIMER, token=token))
            self._wake = trio.Event()
            wake = self._wake
            self._wake_at = self._heap[0][0] if self._heap else math.inf
            with trio.move_on_at(self._wake_at):
                await wake.wait()
            # Awake: every push until the next sleep is seen by the loop above.
            self._wake_at = -math.inf

    # -- state loss -------------------------------------------------------------

    def _observe(
        self,
        server: IPAddress,
        response: Response,
        now: float,
        matched: bool,
        *,
        announcement: bool = False,
        asked_at: float | None = None,
    ) -> None:
        """Every PCP / NAT-PMP response from *server*: patience, then the tracker."""
        live = self._patience.get(server)
        heap = self._patience_heap.get(server)
        later: list[_Patience] = []
        while live and heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[2]
            if entry not in live:
                continue  # ended meanwhile
            scope, budget, latest = entry
            target = min(now + budget, latest)
            # Moving a deadline costs trio a re-registration, and a burst of
            # answers would move every waiting one per answer (O(n**2) at
            # scale, benchmarks/scale.py): move it only once it has fallen
            # 1/16 of its budget behind. It never moves back. At the cap it
            # moves at once (once): else a request whose cap is within 1/16
            # of its deadline gave up short of it while the server answered.
            if scope.deadline < target - budget / 16 or (
                target == latest and scope.deadline < latest
            ):
                scope.deadline = target
            later.append(entry)
        for entry in later:
            self._wait_patiently(server, entry)
        verdict = self.tracker(server).response(
            response, now, solicited=matched, announcement=announcement, asked_at=asked_at
        )
        self._on_verdict(server, verdict)

    def _on_verdict(self, box: IPAddress, verdict: Verdict) -> None:
        if isinstance(verdict, StateLoss):
            self._state_lost(box, verdict.reason)
        elif isinstance(verdict, Confirm):
            if self._confirming:
                # One confirmation at a time; this one's turn comes after it.
                self.tracker(box).defer(verdict, trio.current_time())
            else:
                self._confirming = True
                self._spawn(self._confirm, box, verdict)
        if self.tracker(box).deferred_until() is not None and box not in self._deferring:
            self._deferring.add(box)
            self._spawn(self._confirm_later, box)

    async def _confirm_later(self, box: IPAddress) -> None:
        """Confirm a hint that came too soon after the last confirmation, once it may be."""
        try:
            tracker = self.tracker(box)
            while (due := tracker.deferred_until()) is not None:
                await trio.sleep_until(due)
                while self._confirming:  # the one in flight goes first
                    await self._confirm_ended.wait()
                confirm = tracker.take_deferred(trio.current_time())
                if confirm is not None:
                    self._confirming = True
                    self._spawn(self._confirm, box, confirm)
        finally:
            self._deferring.discard(box)

    async def _confirm(self, box: IPAddress, confirm: Confirm) -> None:
        """Settle a hint with one solicited request (its answer reaches the tracker)."""
        try:
            if box not in (self.gateway, self.pcp_server.address):
                # A hint (deferred, say) from a gateway the broker has left:
                # self._methods reach the new one, which has nothing to settle.
                logger.info("gateway %s, left: not confirming %s", box, confirm.reason)
                return
            logger.info("gateway %s: %s; asking it", box, confirm.reason)
            with trio.move_on_after(self._request_budget()):
                for family in confirm.families:
                    method = self._methods.get(family)
                    if method is None:
                        continue
                    try:
                        if family == "natpmp":
                            address = await method.external_address()
                            self._recheck_if_moved(address)
                        else:
                            await method.probe()
                        return
                    except PortBrokerError as exc:
                        logger.info("gateway %s: confirming with %s failed: %s", box, family, exc)
                if not confirm.families:
                    # No epoch to compare with (only UPnP mappings, say): look
                    # at one mapping, the least recently renewed, and not one
                    # renewed under 4 s ago (RFC 6887 §11.2.1). A restart lost
                    # them all, so one missing entry tells (EntryMissing); and
                    # a spoofed hint costs one renewal per CONFIRM_INTERVAL,
                    # not one per mapping.
                    now = trio.current_time()
                    due = [
                        (mapping.lease.granted_at, index, mapping)
                        for index, mapping in enumerate(self._mappings)
                        if mapping.state is State.ACTIVE
                        and mapping.lease is not None
                        and mapping.lease.gateway == box
                        and now - mapping.lease.granted_at >= MIN_RENEWAL_GAP
                    ]
                    if due:
                        _granted, _index, mapping = min(due)
                        self._apply(mapping, mapping.lifecycle.fire(Trigger.RECHECK, now))
        except Exception:
            logger.exception("gateway %s: confirming a hint failed", box)
        finally:
            self._confirming = False
            self._confirm_ended.set()
            self._confirm_ended = trio.Event()

    def _recheck_if_moved(self, address: IPAddress) -> None:
        now = trio.current_time()
        for mapping in list(self._mappings):
            lease = mapping.lease
            if lease is not None and lease.method == "natpmp" and lease.external_address != address:
                self._apply(mapping, mapping.lifecycle.fire(Trigger.RECHECK, now))

    def _state_lost(self, box: IPAddress, reason: str) -> None:
        """One incident: every mapping on *box* is lost and re-created, whatever its method."""
        now = trio.current_time()
        affected = [
            m
            for m in self._mappings
            if m.lease is not None and (m.lease.gateway == box or box == self.gateway)
        ]
        logger.warning(
            "gateway %s lost state (%s): re-creating %d mapping(s)", box, reason, len(affected)
        )
        for mapping in affected:
            self._apply(mapping, mapping.lifecycle.fire(Trigger.STATE_LOST, now, reason=reason))

    # -- following the default route (portbroker.roaming) ------------------------

    def _methods_for(self, lease: Lease) -> dict[str, Method] | None:
        """The methods that reach *lease*'s gateway; None for one left and closed."""
        box = lease.gateway
        if box in (self.gateway, self.pcp_server.address):
            return self._methods
        for held in self._gateways_held:
            if box in held.boxes:
                return held.method_set.methods
        if box in self._left:
            return None
        return self._methods

    def _network_changed(self, reason: str) -> None:
        """Same gateway, another link or address: every mapping re-checks now (rule 13)."""
        logger.info("network changed (%s): re-checking %d mapping(s)", reason, len(self._mappings))
        # A few renewals at once are nothing; a daemon's thousands would be a
        # burst at the gateway: spread over the 0-5 s of rule 5 then.
        spread = self.recovery_delay if len(self._mappings) > NETWORK_BURST else 0.0
        for mapping in list(self._mappings):
            self._apply(mapping, self._fire_safely(mapping, Trigger.NETWORK_CHANGED, spread=spread))

    def _resumed(self, resumed: Resumed) -> None:
        """The host slept or this process was stopped: check every mapping (rule 14).

        Each one renews (or is re-created) after its own random delay in
        0-5 s. A stop is seen by trio's clock too (it is CLOCK_MONOTONIC,
        which counts a SIGSTOP but not a suspend): grants since it ended
        are fresh and left alone.
        """
        now = trio.current_time()
        awake_since = now - resumed.slept_for if resumed.cause is ResumeCause.LATE_TIMERS else None
        logger.warning(
            "resumed (%s, %.0f s away): checking %d mapping(s)",
            resumed.cause.value,
            resumed.slept_for,
            len(self._mappings),
        )
        self.resumes += 1
        for mapping in list(self._mappings):
            self._apply(
                mapping, self._fire_safely(mapping, Trigger.RESUMED, awake_since=awake_since)
            )

    async def _move(self, new: IPAddress) -> None:
        """Move to gateway *new*: re-create every mapping there, release them on the old one.

        Opens *new*'s methods (unless still open from before), fires MOVED on
        every mapping (lifecycle rule 12), then deletes each lease on the old
        gateway with one attempt bounded by :data:`RELEASE_TIMEOUT`; what that
        attempt cannot delete is forgotten (logged): the old gateway is off
        the path, and the lease lapses there. The old gateway's methods stay
        open until the next move (a late answer, a delete retried); the ones
        before it close.
        """
        if self._connect is None:
            raise PortBrokerError("this broker does not follow the default route")
        old = self.gateway
        current = next((h for h in self._gateways_held if h.gateway == old), None)
        if current is None:
            current = _Held(old, self.pcp_server, self._method_set, None)
            self._gateways_held.append(current)
        target = next((h for h in self._gateways_held if h.gateway == new), None)
        if target is None:
            done = trio.Event()
            try:
                method_set, choice = await self._nursery.start(self._hold_gateway, new, done)
            except (OSError, PortBrokerError) as exc:
                logger.warning(
                    "default route now via %s, but its methods cannot be opened (%s):"
                    " staying on %s",
                    new,
                    exc,
                    old,
                )
                return
            target = _Held(new, choice, method_set, done)
            self._gateways_held.append(target)
        left = [
            m.lease
            for m in self._mappings
            if m.lease is not None and m.lease.gateway in current.boxes
        ]
        self.gateway, self.pcp_server = new, target.choice
        self._method_set, self._methods = target.method_set, target.method_set.methods
        self._report, self._unavailable, self._peer_unavailable = None, {}, None
        self._left -= target.boxes
        self.moves += 1
        logger.warning(
            "default route moved from gateway %s to %s: re-creating %d mapping(s) there",
            old,
            new,
            len(self._mappings),
        )
        for channel in list(self._gateway_subscribers):
            try:
                channel.send_nowait(GatewayChanged(old, new))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._gateway_subscribers.remove(channel)
        for mapping in list(self._mappings):
            self._apply(
                mapping,
                self._fire_safely(mapping, Trigger.MOVED, old_gateway=old, new_gateway=new),
            )
        async with trio.open_nursery() as nursery:
            for lease in left:
                nursery.start_soon(self._release_left, lease)
        for held in list(self._gateways_held):
            if held is target or held is current or held.done is None:
                continue
            self._gateways_held.remove(held)
            self._left |= held.boxes - target.boxes - current.boxes
            held.done.set()

    async def _release_left(self, lease: Lease) -> None:
        failure = await self._delete_once(lease, RELEASE_TIMEOUT)
        if failure is None:
            logger.info("%s: deleted on the gateway left behind", _lease_label(lease))
        else:
            logger.warning(
                "%s: not deleted on gateway %s, which the broker left (%s): forgotten;"
                " it lapses there on its own",
                _lease_label(lease),
                lease.gateway,
                failure.reason,
            )

    async def _hold_gateway(
        self,
        gateway: IPAddress,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[tuple[MethodSet, PcpServerChoice]],
    ) -> None:
        """Keep *gateway*'s methods open until *done* is set (or the broker closes)."""
        assert self._connect is not None
        async with self._connect(gateway) as (method_set, choice):
            task_status.started((method_set, choice))
            await done.wait()

    # -- release ----------------------------------------------------------------

    async def _release(self, mapping: Mapping) -> None:
        step = mapping.lifecycle.fire(Trigger.RELEASE, trio.current_time())
        action = step.action
        if isinstance(action, Delete) and not action.quiet:
            self._apply(mapping, step)
            failure = await self._delete_once(action.lease, RELEASE_TIMEOUT, shield=True)
            now = trio.current_time()
            if failure is None:
                outcome = mapping.lifecycle.fire(
                    Trigger.DELETED, now, token=action.token, confirmed=True
                )
            else:
                # The lifecycle ends the mapping and hands the lease over to
                # the retries (rule 10): this task returns now.
                outcome = mapping.lifecycle.fire(
                    Trigger.FAILED, now, token=action.token, failure=failure
                )
            self._apply(mapping, outcome)
        elif step.action is not None:
            self._apply(mapping, step)
        elif mapping.state is State.RELEASING:
            # Another task is deleting it: return when it is done.
            with trio.CancelScope(shield=True):
                await mapping._released.wait()

    async def _release_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for mapping in list(self._mappings):
                nursery.start_soon(mapping.release)

    def _publish(self, mapping: Mapping, event: MappingEvent) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(BrokerEvent(mapping, event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    # -- unsolicited announcements ------------------------------------------------

    def _announced(self, server: IPAddress, response: Response, now: float) -> None:
        self._observe(server, response, now, False, announcement=True)


# A network monitor that broke is opened again after this long, doubling up to
# the maximum while it keeps breaking.
MONITOR_REOPEN_DELAY: Final = 5.0
MONITOR_REOPEN_MAX: Final = 300.0


async def _follow(
    broker: Broker,
    watch: NetworkWatch | None,
    pinned: bool,
    settle: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run portbroker.roaming's follower, on the host's own monitor unless *watch* is given."""
    from portbroker.roaming import follow_network

    if watch is not None:
        await follow_network(broker, watch, pinned=pinned, settle=settle, task_status=task_status)
        return
    from portbroker.netmon import open_network_monitor

    # Started at once: the monitor's first snapshot is compared with the
    # gateway resolved before it, so a change in between is still a move.
    task_status.started()
    opened = False
    delay = MONITOR_REOPEN_DELAY
    while True:
        failure: OSError | None = None
        try:
            async with open_network_monitor() as monitor:
                opened = True
                await follow_network(broker, monitor, pinned=pinned, settle=settle)
        except* OSError as group:  # the first snapshot, or the monitor's socket later
            first = group.exceptions[0]
            failure = first if isinstance(first, OSError) else OSError(str(first))
        if not opened:
            # The broker still works; it just stays where it is (as without follow).
            reason = failure if failure is not None else "no network monitor"
            logger.warning("cannot watch the network (%s): not following the default route", reason)
            return
        # It ran, then broke (a socket error): the app must not go down with
        # it, nor silently stop following. Open a new one; its first snapshot
        # against the broker's gateway catches a move made in between.
        logger.warning(
            "network monitor failed (%s): watching the network again in %.0f s",
            failure or "its stream ended",
            delay,
        )
        await trio.sleep(delay)
        opened = False
        delay = min(delay * 2, MONITOR_REOPEN_MAX)


async def _watch_resume(
    broker: Broker,
    resumes: AsyncIterable[Resumed] | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tell *broker* of every resume (portbroker.clockwatch), from *resumes* or the host's clocks."""
    watch = ClockWatch() if resumes is None else resumes
    task_status.started()
    async for resumed in watch:
        broker._resumed(resumed)


@contextlib.asynccontextmanager
async def open_broker(
    gateway: str | IPAddress | None = None,
    methods: Sequence[str] = METHOD_NAMES,
    probe_timeout: float = 2.0,
    *,
    pcp_server: str | IPAddress | None = None,
    port: int = SERVER_PORT,
    upnp_port: int = 1900,
    ssdp_multicast: bool = True,
    recovery_delay: float = 5.0,
    announce_port: int | None = ANNOUNCE_PORT,
    link_factory: LinkFactory | None = None,
    seed: int | None = None,
    dhcp_leases: Sequence[str | os.PathLike[str]] | None = None,
    pcp_client_address: str | IPAddress | None = None,
    follow: bool = False,
    network_monitor: NetworkWatch | None = None,
    follow_settle: float = FOLLOW_SETTLE,
    watch_resume: bool | None = None,
    resume_watch: AsyncIterable[Resumed] | None = None,
) -> AsyncIterator[Broker]:
    """A broker for one gateway; everything it holds is released on exit.

    Args:
        gateway: the gateway's address; None means $PORTBROKER_GATEWAY, else the
            default route (RFC 6887 §8.1).
        methods: the methods to use, most preferred first.
        probe_timeout: how long any one probe may take. Real routers answer
            UPnP slowly; 2 s keeps them.
        pcp_server: a PCP server other than the gateway (RFC 7488). It wins
            over one DHCP announced (docs/double-nat.md).
        port: the PCP/NAT-PMP server port (5351; tests use others).
        upnp_port: the gateway's SSDP port for unicast searches (1900).
        ssdp_multicast: also search by multicast (239.255.255.250). Off means
            only the unicast search to the gateway; never multicast in tests
            outside a lab namespace.
        recovery_delay: the upper bound of the random delay before re-creating
            mappings a gateway lost (RFC 6887 §14.1: 5 s).
        announce_port: where to listen for unsolicited announcements (5350);
            None to not listen.
        link_factory: makes the datagram link to (address, port); tests pass
            :meth:`FakeGateway.link_factory`.
        seed: seeds the jitter (renewal times, recovery delays) for tests.
        dhcp_leases: DHCP lease files (or directories of them) to learn a PCP
            server from (RFC 7291, docs/double-nat.md). None: the system's
            lease files, read only when the gateway is the default route
            (neither *gateway* nor $PORTBROKER_GATEWAY given); ``()``: never.
        pcp_client_address: the PCP client address field to send (RFC 6887
            §8.1) instead of this host's address toward the server: behind
            another NAT, the address that NAT maps us to, which is where the
            server sees us come from (docs/double-nat.md, nested mappings).
        follow: follow the host's network (:mod:`portbroker.roaming`, a
            :func:`portbroker.netmon.open_network_monitor` of its own): when
            the default route leads to another gateway, release the mappings
            on the old one and re-create them on the new one
            (``GatewayChanged``, then ``Restored``); on a link or address
            change, re-check them. A pinned gateway (*gateway* or
            $PORTBROKER_GATEWAY given) never moves; it re-checks. On a move
            the PCP server becomes the new gateway, unless *pcp_server* was
            given.
        network_monitor: the changes to follow instead of the host's
            (implies *follow*): anything with ``snapshot()`` and async
            iteration of netmon changes, such as
            :class:`portbroker.testing.FakeNetwork`. Without *gateway*, the
            first gateway is its snapshot's IPv4 default route.
        follow_settle: how long a new default route must hold before the
            broker moves (a flapping route moves it once, or not at all).
        watch_resume: notice a suspend or a stop (a
            :class:`portbroker.clockwatch.ClockWatch`: a wake-up every 2 s)
            and then renew or re-create every mapping within 0-5 s
            (lifecycle rule 14), pinned gateway or not. None (the
            default): when following (*follow* or *network_monitor*).
        resume_watch: the resumes to act on instead of the host's clocks
            (implies *watch_resume*): an async iterable of
            :class:`portbroker.clockwatch.Resumed`, for tests.

    Raises:
        GatewayNotFound: no gateway given and no default route.
        ValueError: an unknown method name or a malformed address.
        MethodUnavailable: a PCP / NAT-PMP socket could not be opened
            (no route to the gateway, say).
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHOD_NAMES)}; got {list(methods)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods lists one twice: {list(methods)}")
    if not probe_timeout > 0:
        raise ValueError(f"probe_timeout must be positive, got {probe_timeout}")
    if not follow_settle >= 0:
        raise ValueError(f"follow_settle must be a non-negative number, got {follow_settle}")
    pinned = gateway is not None or bool(os.environ.get(ENV_GATEWAY, "").strip())
    if network_monitor is not None and not pinned:
        routed = network_monitor.snapshot().default_gateway(4)
        if routed is None:
            raise GatewayNotFound(
                "the network monitor shows no IPv4 default route with a gateway: name the"
                " gateway, or wait for the network"
            )
        gateway = routed
    gateway_address = resolve_gateway(gateway)
    # RFC 7291 discovery reads the host's lease files only for the host's own
    # network (the default route): a named gateway is a choice of network,
    # and tests, which always name theirs, never read this machine's leases.
    default_route = gateway is None and not os.environ.get(ENV_GATEWAY, "").strip()
    discovered = []
    if pcp_server is None and "pcp" in methods:
        if dhcp_leases is not None:
            discovered = discover_pcp_servers(dhcp_leases) if dhcp_leases else []
        elif default_route:
            discovered = discover_pcp_servers(None)
    choice = choose_pcp_server(pcp_server, gateway_address, discovered)
    server = choice.address
    client_address = (
        None
        if pcp_client_address is None
        else checked_address(pcp_client_address, "pcp_client_address")
    )
    rng = random.Random(seed)
    broker: Broker | None = None

    def observe(
        address: IPAddress, response: Response, now: float, matched: bool, asked_at: float
    ) -> None:
        if broker is not None:
            broker._observe(address, response, now, matched, asked_at=asked_at)

    def report(signal: GatewaySignal) -> None:
        # This gateway's, not whichever the broker is on: after a move its
        # UPnP method still reports (a renewal in flight, a delete's SSDP).
        if broker is not None:
            broker._on_verdict(gateway_address, broker.tracker(gateway_address).signal(signal))

    @contextlib.asynccontextmanager
    async def connect(new: IPAddress) -> AsyncIterator[tuple[MethodSet, PcpServerChoice]]:
        """Another gateway's methods, as the first one's (portbroker.roaming)."""
        new_choice = choice if pcp_server is not None else PcpServerChoice(new, "the gateway")

        def report_new(signal: GatewaySignal) -> None:
            if broker is not None:
                broker._on_verdict(new, broker.tracker(new).signal(signal))

        def deliver_new(response: Response, now: float) -> None:
            if broker is not None:
                broker._announced(new, response, now)

        async with (
            open_methods(
                methods,
                gateway=new,
                pcp_server=new_choice.address,
                port=port,
                upnp_port=upnp_port,
                ssdp_multicast=ssdp_multicast,
                rng=rng,
                observe=observe,
                report=report_new,
                link_factory=link_factory,
                pcp_client_address=client_address,
            ) as method_set,
            trio.open_nursery() as listening,
        ):
            if announce_port is not None and method_set.transports:
                await listening.start(listen_announcements, new, announce_port, port, deliver_new)
            try:
                yield method_set, new_choice
            finally:
                listening.cancel_scope.cancel()

    with collapse_single():
        async with (
            open_methods(
                methods,
                gateway=gateway_address,
                pcp_server=server,
                port=port,
                upnp_port=upnp_port,
                ssdp_multicast=ssdp_multicast,
                rng=rng,
                observe=observe,
                report=report,
                link_factory=link_factory,
                pcp_client_address=client_address,
            ) as method_set,
            trio.open_nursery() as nursery,
        ):
            broker = Broker(
                gateway=gateway_address,
                nursery=nursery,
                method_set=method_set,
                probe_timeout=probe_timeout,
                recovery_delay=recovery_delay,
                rng=rng,
                pcp_server=choice,
            )
            await nursery.start(broker._scheduler)
            if announce_port is not None and method_set.transports:
                announcing = gateway_address

                def deliver(response: Response, now: float) -> None:
                    assert broker is not None
                    broker._announced(announcing, response, now)

                await nursery.start(
                    listen_announcements, gateway_address, announce_port, port, deliver
                )
            if follow or network_monitor is not None:
                broker._connect = connect
                await nursery.start(_follow, broker, network_monitor, pinned, follow_settle)
            if watch_resume is None:
                watch_resume = follow or network_monitor is not None
            if watch_resume or resume_watch is not None:
                await nursery.start(_watch_resume, broker, resume_watch)
            try:
                yield broker
            finally:
                with trio.CancelScope(shield=True):
                    await broker._release_all()
                left = broker.undeleted()
                if left:
                    # The retries end with the broker (rule 10); undeleted()
                    # still names them for whoever keeps records.
                    logger.warning(
                        "broker closing with %d delete(s) not done (each stays on the"
                        " gateway until its lease runs out): %s",
                        len(left),
                        ", ".join(_lease_label(lease) for lease in left),
                    )
                for channel in broker._subscribers:
                    channel.close()
                nursery.cancel_scope.cancel()
                broker._closed = True
