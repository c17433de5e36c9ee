"""The Broker: methods, mappings, one renewal scheduler, and recovery.

A :class:`Broker` talks to one gateway. It owns

- one :class:`~portbroker.transport.Transport` (one connected UDP socket) that
  carries PCP and NAT-PMP for every mapping, and whose observer runs the epoch
  check on every response;
- the methods (PCP, NAT-PMP, UPnP) and the cached probe decision;
- the live :class:`Mapping` objects, each driven by a sans-IO
  :class:`~portbroker.lifecycle.MappingLifecycle`;
- one scheduler task over a heap of deadlines for all mappings (renewals,
  re-creations), and the UDP 5350 listener for unsolicited announcements.

Leaving :func:`open_broker` releases every mapping the broker still holds.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import math
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.epoch import EpochObservation, check_natpmp_epoch, check_pcp_epoch
from portbroker.errors import MappingError, MethodUnavailable, NoAnswer, PortBrokerError
from portbroker.gateway import resolve_gateway
from portbroker.lifecycle import (
    MappingEvent,
    MappingLifecycle,
    Released,
    State,
    Trigger,
)
from portbroker.methods import Method
from portbroker.methods.natpmp import NatPmpMethod
from portbroker.methods.pcp import PcpMethod
from portbroker.probe import NoMethodAvailable, create_by_preference, probe_all
from portbroker.transport import DatagramLink, Response, Transport, decode_datagram, open_udp_link
from portbroker.types import (
    METHOD_NAMES,
    IPAddress,
    Lease,
    MappingRequest,
    ProbeReport,
    TransportProtocol,
)
from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import to_address

__all__ = ["Broker", "BrokerEvent", "Mapping", "NoMethodAvailable", "open_broker"]

logger = logging.getLogger("portbroker")

SERVER_PORT: Final = 5351
ANNOUNCE_PORT: Final = 5350
RELEASE_TIMEOUT: Final = 5.0  # how long a delete may take when releasing
RECOVERY_BACKOFF: Final = (2.0, 5.0, 15.0, 30.0, 60.0)

LinkFactory = Callable[[IPAddress, int], Awaitable[DatagramLink]]


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
    recovery_failures: int = 0
    _subscribers: list[trio.MemorySendChannel[MappingEvent]] = attrs.Factory(list)
    _busy: bool = False

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
    def internal_port(self) -> int:
        return self.request.internal_port

    @property
    def protocol(self) -> TransportProtocol:
        return self.request.protocol

    def events(self) -> trio.MemoryReceiveChannel[MappingEvent]:
        """A stream of this mapping's events from now on; it ends after Released."""
        send, receive = trio.open_memory_channel[MappingEvent](math.inf)
        if self.state in (State.RELEASED, State.FAILED):
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def _publish(self, events: Sequence[MappingEvent]) -> None:
        for event in events:
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
        return f"{self.request.internal_port}/{self.request.protocol.value}"

    async def release(self) -> None:
        """Delete the mapping on the gateway and stop renewing it.

        Idempotent. The delete runs shielded from cancellation, bounded by a
        few seconds, so a mapping is removed even when its owner is being
        cancelled; a delete the gateway refuses or never answers is reported
        in the Released event (``confirmed=False``) and the lease lapses.
        """
        await self.broker._release(self)


def _describe(event: MappingEvent) -> str:
    lease = getattr(event, "lease", None)
    name = type(event).__name__
    if lease is not None:
        return (
            f"{name} via {lease.method}: {lease.external_address}:{lease.external_port}"
            f" for {lease.lifetime} s"
        )
    return f"{name} {attrs.asdict(event)}"


class Broker:
    """Port mappings on one gateway. Create with :func:`open_broker`."""

    def __init__(
        self,
        *,
        gateway: IPAddress,
        nursery: trio.Nursery,
        methods: dict[str, Method],
        transport: Transport | None,
        probe_timeout: float,
        recovery_delay: float,
        rng: random.Random,
    ) -> None:
        self.gateway = gateway
        self.probe_timeout = probe_timeout
        self.recovery_delay = recovery_delay
        self.transport = transport
        self._nursery = nursery
        self._methods = methods
        self._rng = rng
        self._mappings: set[Mapping] = set()
        self._heap: list[tuple[float, int, Mapping]] = []
        self._seq = 0
        self._wake = trio.Event()
        self._unavailable: dict[str, str] = {}
        self._report: ProbeReport | None = None
        self._epochs: dict[str, EpochObservation] = {}
        self._subscribers: list[trio.MemorySendChannel[BrokerEvent]] = []
        self.state_losses = 0

    # -- public ---------------------------------------------------------------

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._methods)

    @property
    def mappings(self) -> frozenset[Mapping]:
        return frozenset(self._mappings)

    @property
    def selected_method(self) -> str | None:
        """The method the last probe or creation chose, if still trusted."""
        return self._report.selected if self._report else None

    async def probe(self) -> ProbeReport:
        """Ask every enabled method at once and report each (bounded by the probe timeout)."""
        report = await probe_all(self.gateway, list(self._methods.values()), self.probe_timeout)
        self._report = report
        self._unavailable = {
            o.method: o.error or "unavailable" for o in report.outcomes if not o.available
        }
        return report

    def events(self) -> trio.MemoryReceiveChannel[BrokerEvent]:
        """Every mapping's events, from now on, until the broker closes."""
        send, receive = trio.open_memory_channel[BrokerEvent](math.inf)
        self._subscribers.append(send)
        return receive

    async def map(
        self,
        internal_port: int,
        protocol: str | TransportProtocol = "tcp",
        *,
        lifetime: int = 7200,
        external_port: int | None = None,
        exact: bool = False,
        via: str | None = None,
        internal_address: IPAddress | str | None = None,
        description: str = "portbroker",
    ) -> Mapping:
        """Create a mapping and keep it alive until :meth:`Mapping.release`.

        *via* forces one method ("pcp", "natpmp", "upnp"); otherwise the most
        preferred one that works is used (probing it on the way if needed).

        Raises:
            ValueError: a bad port, protocol, lifetime or method name.
            MappingError: the gateway refused (``result_code`` says why).
            MethodUnavailable: no enabled method works with this gateway.
        """
        request = MappingRequest(
            internal_port,
            protocol,
            lifetime,
            external_port,
            exact,
            internal_address,
            description,
        )
        if via is not None and via not in self._methods:
            raise ValueError(
                f"method {via!r} is not enabled here; enabled: {', '.join(self._methods)}"
            )
        return self._start(request, await self._create(request, via))

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
        return self._start(request, await self._create_with(method, request, lease))

    def _start(self, request: MappingRequest, lease: Lease) -> Mapping:
        mapping = Mapping(self, request, MappingLifecycle(self._rng, self.recovery_delay))
        self._mappings.add(mapping)
        mapping._publish(mapping.lifecycle.fire(Trigger.GRANTED, trio.current_time(), lease=lease))
        self._schedule(mapping)
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

    def detach(self, mapping: Mapping) -> Lease:
        """Stop managing *mapping* without deleting it; return its lease.

        The mapping stays on the gateway until its lease runs out or someone
        deletes it with :meth:`delete` (the CLI's ``map`` without ``--hold``
        records the lease in a state file for ``unmap``).
        """
        lease = mapping._lease()
        self._mappings.discard(mapping)
        mapping.lifecycle.fire(Trigger.RELEASE, trio.current_time())
        mapping._close_subscribers()
        return lease

    async def delete(self, lease: Lease) -> None:
        """Delete a mapping from its lease (for example one :meth:`detach` returned).

        Raises:
            ValueError: the lease's method is not enabled on this broker.
            MappingError, MethodUnavailable, NoAnswer: the delete failed.
        """
        method = self._methods.get(lease.method)
        if method is None:
            raise ValueError(f"method {lease.method!r} is not enabled here")
        budget = max(4 * self.probe_timeout, 8.0)
        try:
            with trio.fail_after(budget):
                await method.delete(lease)
        except trio.TooSlowError:
            raise NoAnswer(f"{lease.method}: delete not answered within {budget:g} s") from None

    # -- creation ---------------------------------------------------------------

    async def _create(self, request: MappingRequest, via: str | None) -> Lease:
        if via is not None:
            return await self._create_with(self._methods[via], request)
        selected = self.selected_method
        if selected is not None:
            try:
                return await self._create_with(self._methods[selected], request)
            except (MethodUnavailable, NoAnswer) as exc:
                # The chosen method stopped working: forget the decision and race again.
                logger.info("method %s failed (%s); probing again", selected, exc)
                self._forget(selected, getattr(exc, "reason", str(exc)))
        methods = list(self._methods.values())
        lease, report = await create_by_preference(
            self.gateway,
            methods,
            request,
            self.probe_timeout,
            known_unavailable=self._unavailable,
        )
        self._report = report
        self._unavailable.update(
            {o.method: o.error or "unavailable" for o in report.outcomes if not o.available}
        )
        return lease

    async def _create_with(
        self, method: Method, request: MappingRequest, previous: Lease | None = None
    ) -> Lease:
        budget = max(4 * self.probe_timeout, 8.0)
        try:
            with trio.fail_after(budget):
                return await method.create(request, previous)
        except trio.TooSlowError:
            raise NoAnswer(f"{method.name}: no answer within {budget:g} s") from None

    def _forget(self, method: str, reason: str) -> None:
        self._unavailable[method] = reason
        if self._report is not None and self._report.selected == method:
            self._report = None

    # -- scheduling -------------------------------------------------------------

    def _schedule(self, mapping: Mapping) -> None:
        deadline = mapping.lifecycle.deadline
        if deadline is None or mapping not in self._mappings:
            return
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, mapping))
        self._wake.set()

    async def _scheduler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The one task that wakes mappings when their deadline comes."""
        task_status.started()
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                deadline, _seq, mapping = heapq.heappop(self._heap)
                if mapping._busy or mapping.lifecycle.deadline != deadline:
                    continue  # stale: rescheduled since, or already at work
                if mapping not in self._mappings:
                    continue
                mapping._busy = True
                self._nursery.start_soon(self._on_timer, mapping)
            self._wake = trio.Event()
            wake = self._wake
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await wake.wait()

    async def _on_timer(self, mapping: Mapping) -> None:
        try:
            trigger = mapping.lifecycle.timer_trigger
            if trigger is Trigger.RENEW_DUE:
                await self._renew(mapping)
            elif trigger is Trigger.EXPIRED:
                mapping._publish(
                    mapping.lifecycle.fire(
                        Trigger.EXPIRED, trio.current_time(), reason="lease expired unrenewed"
                    )
                )
            elif trigger is Trigger.RECREATE_DUE:
                await self._recreate(mapping)
        finally:
            mapping._busy = False
            self._schedule(mapping)

    def _attempt_budget(self, lease: Lease) -> float:
        # Long enough for a few retransmissions, never past the lease's expiry
        # (a renewal in flight must not hold back the Lost event).
        remaining = lease.expires_at - trio.current_time()
        return max(0.1, min(60.0, max(4.0, remaining / 4), remaining))

    async def _renew(self, mapping: Mapping) -> None:
        lifecycle = mapping.lifecycle
        lease = mapping._lease()
        mapping._publish(lifecycle.fire(Trigger.RENEW_DUE, trio.current_time()))
        method = self._methods.get(lease.method)
        if method is None:
            mapping._publish(
                lifecycle.fire(Trigger.REFUSED, trio.current_time(), reason="method gone")
            )
            return
        try:
            with trio.fail_after(self._attempt_budget(lease)):
                renewed = await method.create(mapping.request, lease)
        except MappingError as exc:
            if (
                exc.retry_after is not None
                and exc.retry_after < lease.expires_at - trio.current_time()
            ):
                logger.info("%s: renewal refused for now (%s)", mapping._label(), exc)
                mapping._publish(lifecycle.fire(Trigger.RENEW_FAILED, trio.current_time()))
            else:
                mapping._publish(
                    lifecycle.fire(Trigger.REFUSED, trio.current_time(), reason=str(exc))
                )
            return
        except (MethodUnavailable, NoAnswer, trio.TooSlowError) as exc:
            logger.info("%s: renewal got no answer (%s)", mapping._label(), exc or "timeout")
            mapping._publish(lifecycle.fire(Trigger.RENEW_FAILED, trio.current_time()))
            return
        if mapping.state is State.RELEASED:
            return
        mapping._publish(lifecycle.fire(Trigger.GRANTED, trio.current_time(), lease=renewed))

    async def _recreate(self, mapping: Mapping) -> None:
        lifecycle = mapping.lifecycle
        previous = lifecycle.lease
        mapping._publish(lifecycle.fire(Trigger.RECREATE_DUE, trio.current_time()))
        try:
            method = self._methods.get(previous.method) if previous else None
            if (
                method is not None
                and previous is not None
                and previous.method not in self._unavailable
            ):
                # Same nonce, previous port and address suggested (RFC 6887 §8.5);
                # after a refusal, start afresh.
                try:
                    lease = await self._create_with(
                        method,
                        mapping.request,
                        previous if mapping.recovery_failures == 0 else None,
                    )
                except (MethodUnavailable, NoAnswer) as exc:
                    self._forget(method.name, getattr(exc, "reason", str(exc)))
                    lease = await self._create(mapping.request, None)
            else:
                lease = await self._create(mapping.request, None)
        except (PortBrokerError, trio.TooSlowError) as exc:
            mapping.recovery_failures += 1
            backoff = RECOVERY_BACKOFF[min(mapping.recovery_failures, len(RECOVERY_BACKOFF)) - 1]
            retry_after = getattr(exc, "retry_after", None) or 0.0
            logger.warning(
                "%s: re-creating failed (%s); next try in %.0f s",
                mapping._label(),
                exc,
                max(backoff, retry_after),
            )
            mapping._publish(
                lifecycle.fire(
                    Trigger.RECREATE_FAILED, trio.current_time(), retry_in=max(backoff, retry_after)
                )
            )
            return
        if mapping.state is State.RELEASED:
            # Released while we were re-creating: undo the new mapping.
            with trio.move_on_after(RELEASE_TIMEOUT), contextlib.suppress(PortBrokerError):
                await self._methods[lease.method].delete(lease)
            return
        mapping.recovery_failures = 0
        mapping._publish(lifecycle.fire(Trigger.GRANTED, trio.current_time(), lease=lease))

    # -- state loss -------------------------------------------------------------

    def observe(self, response: Response, now: float, matched: bool) -> None:
        """The transport's observer: the epoch check on every response (RFC 6887 §8.5,
        RFC 6886 §3.6), and the NAT-PMP address announcement."""
        if isinstance(response, pcp.PcpResponse):
            family = "natpmp" if response.is_natpmp else "pcp"
        else:
            family = "natpmp"
        current = EpochObservation(response.epoch, now)
        previous = self._epochs.get(family)
        self._epochs[family] = current
        check = (check_pcp_epoch if family == "pcp" else check_natpmp_epoch)(previous, current)
        if check.state_lost:
            assert previous is not None
            self.state_lost(
                family,
                f"{family} epoch {check.value} ({previous.server_epoch} -> {current.server_epoch})",
            )
            return
        if (
            not matched
            and isinstance(response, natpmp.ExternalAddressResponse)
            and response.result_code == 0
        ):
            method = self._methods.get("natpmp")
            if isinstance(method, NatPmpMethod) and method.last_external_address not in (
                None,
                response.external_address,
            ):
                # RFC 6886 §3.2.1: the gateway announced a new address.
                method.last_external_address = response.external_address
                self.state_lost("natpmp", f"external address is now {response.external_address}")

    def state_lost(self, method: str, reason: str) -> None:
        """The gateway forgot *method*'s mappings: re-create each after a random delay."""
        self.state_losses += 1
        now = trio.current_time()
        affected = [m for m in self._mappings if m.lease is not None and m.lease.method == method]
        logger.warning(
            "gateway %s lost state (%s): re-creating %d mapping(s)",
            self.gateway,
            reason,
            len(affected),
        )
        for mapping in affected:
            mapping._publish(mapping.lifecycle.fire(Trigger.STATE_LOST, now, reason=reason))
            self._schedule(mapping)

    # -- release ----------------------------------------------------------------

    async def _release(self, mapping: Mapping) -> None:
        lifecycle = mapping.lifecycle
        if lifecycle.state in (State.RELEASED, State.FAILED):
            return
        lease = lifecycle.lease
        lifecycle.fire(Trigger.RELEASE, trio.current_time())
        confirmed = False
        if lease is not None:
            method = self._methods.get(lease.method)
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                try:
                    if method is not None:
                        await method.delete(lease)
                        confirmed = True
                except (PortBrokerError, OSError) as exc:
                    logger.warning("%s: delete failed: %s", mapping._label(), exc)
        self._mappings.discard(mapping)
        mapping._publish([Released(confirmed)])
        mapping._close_subscribers()

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

    async def listen_announcements(
        self,
        port: int,
        server_port: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take PCP ANNOUNCE and NAT-PMP address announcements on UDP *port*.

        RFC 6887 §14.1 / RFC 6886 §3.2.1: they arrive multicast to 224.0.0.1
        (or ff02::1) and unicast; several processes may listen, hence
        SO_REUSEADDR/SO_REUSEPORT. Only datagrams from the gateway's server
        port count. If the port cannot be bound the broker goes on without it
        (the epoch check on every response still catches a reboot).
        """
        family = socket.AF_INET6 if self.gateway.version == 6 else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            except OSError as exc:
                logger.warning("cannot listen for announcements on UDP %d: %s", port, exc)
                task_status.started()
                return
            if family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    # 224.0.0.1 is joined on every interface anyway; be explicit.
                    sock.setsockopt(
                        socket.IPPROTO_IP,
                        socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton("224.0.0.1") + socket.inet_aton("0.0.0.0"),
                    )
            task_status.started()
            while True:
                try:
                    data, source = await sock.recvfrom(2048)
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                        continue
                    raise
                try:
                    if (to_address(source[0].split("%")[0]), source[1]) != (
                        self.gateway,
                        server_port,
                    ):
                        continue
                    response = decode_datagram(data)
                except (ValueError, PortBrokerError):
                    continue
                self.observe(response, trio.current_time(), False)


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
) -> AsyncIterator[Broker]:
    """A broker for one gateway; everything it holds is released on exit.

    Args:
        gateway: the gateway's address; None means $PORTBROKER_GATEWAY, else the
            default route (RFC 6887 §8.1).
        methods: the methods to use, most preferred first.
        probe_timeout: how long any one probe may take. Real routers answer
            UPnP slowly; 2 s keeps them.
        pcp_server: a PCP server other than the gateway (RFC 7488).
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

    Raises:
        GatewayNotFound: no gateway given and no default route.
        ValueError: an unknown method name or a malformed address.
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHOD_NAMES)}; got {list(methods)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods lists one twice: {list(methods)}")
    if not probe_timeout > 0:
        raise ValueError(f"probe_timeout must be positive, got {probe_timeout}")
    gateway_address = resolve_gateway(gateway)
    server = to_address(pcp_server) if pcp_server is not None else gateway_address
    rng = random.Random(seed)
    make_link = link_factory or open_udp_link

    with collapse_single():
        async with trio.open_nursery() as nursery:
            transports: list[Transport] = []
            broker_methods: dict[str, Method] = {}
            broker: Broker | None = None

            def observer(response: Response, now: float, matched: bool) -> None:
                if broker is not None:
                    broker.observe(response, now, matched)

            async def transport_for(address: IPAddress) -> Transport:
                for existing in transports:
                    if existing.link.remote == (address, port):
                        return existing
                transport = Transport(await make_link(address, port), observer)
                transports.append(transport)
                await nursery.start(transport.run)
                return transport

            for name in methods:
                if name == "pcp":
                    broker_methods[name] = PcpMethod(await transport_for(server), server, rng=rng)
                elif name == "natpmp":
                    broker_methods[name] = NatPmpMethod(
                        await transport_for(gateway_address), gateway_address
                    )
                else:
                    from portbroker.methods.upnp import UpnpMethod

                    broker_methods[name] = UpnpMethod(
                        gateway_address, ssdp_port=upnp_port, multicast=ssdp_multicast, rng=rng
                    )
            broker = Broker(
                gateway=gateway_address,
                nursery=nursery,
                methods=broker_methods,
                transport=transports[0] if transports else None,
                probe_timeout=probe_timeout,
                recovery_delay=recovery_delay,
                rng=rng,
            )
            upnp = broker_methods.get("upnp")
            if upnp is not None:
                # The UPnP analogue of a failed epoch check (entry gone, BOOTID or
                # uptime moved) reaches the broker the same way.
                upnp.on_state_lost = lambda reason: broker.state_lost("upnp", reason)  # type: ignore[attr-defined]
            await nursery.start(broker._scheduler)
            if announce_port is not None and transports:
                await nursery.start(broker.listen_announcements, announce_port, port)
            try:
                yield broker
            finally:
                with trio.CancelScope(shield=True):
                    await broker._release_all()
                for channel in broker._subscribers:
                    channel.close()
                nursery.cancel_scope.cancel()
                for transport in transports:
                    transport.link.close()
                for method in broker_methods.values():
                    close = getattr(method, "aclose", None)
                    if close is not None:
                        with trio.CancelScope(shield=True):
                            await close()
