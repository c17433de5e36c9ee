"""FakeGateway: an in-process PCP + NAT-PMP server for tests.

It keeps a real mapping table with RFC 6887's nonce rules (a MAP or delete
for someone else's mapping with another nonce is NOT_AUTHORIZED), lifetimes
and an epoch, and it has fault knobs: drop, duplicate, reorder and delay
replies; force result codes; lose all state (epoch reset); change the external
address and announce it; answer from a wrong source address or port, with a
wrong nonce or internal port; grant port 0 or an unusable address; refuse
ANNOUNCE but serve MAP; behave as a NAT-PMP-only box (the 8-byte answer to
PCP); refuse like a closed port. PCP PEER (RFC 6887 §12) keeps a table of
its own (``peers``); ``peer_enabled`` off answers it UNSUPP_OPCODE and
``wrong_remote`` names another remote peer in the answer.

Two ways to reach it:

- :meth:`FakeGateway.memory_link` — a :class:`~portbroker.transport.DatagramLink`
  in memory, for tests under trio's MockClock (no real datagram in flight, so
  autojump cannot fire retransmission timers early);
- :meth:`FakeGateway.serve_udp` — a real UDP socket on 127.0.0.1, for tests of
  the whole stack, the CLI included.

Pass it to the broker with ``open_broker(gateway="127.0.0.1", port=gw.port)``
(UDP) or ``open_broker(gateway=..., link_factory=gw.link_factory)`` (memory).
"""

from __future__ import annotations

import heapq
import math
import random
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import attrs
import trio

from portbroker.errors import MalformedMessage
from portbroker.types import IPAddress
from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import to_address
from portbroker.wire.pcp import ErrorClass, ResultCode

__all__ = ["FakeGateway", "FakeMapping", "MemoryLink"]

_TCP, _UDP = 6, 17
_NATPMP_PROTOCOLS: Final = {natpmp.Opcode.MAP_UDP: _UDP, natpmp.Opcode.MAP_TCP: _TCP}


@attrs.define
class FakeMapping:
    internal_address: IPAddress
    protocol: int
    internal_port: int
    external_port: int
    expires_at: float
    nonce: bytes | None  # None for NAT-PMP mappings
    via: str  # "pcp" | "natpmp"
    remote: tuple[IPAddress, int] | None = None  # a PCP PEER's remote peer (RFC 6887 §12)
    filters: tuple[pcp.Filter, ...] = ()  # PCP FILTER options it was granted with
    renewed: bool = False  # granted again at least once (a PCP pinhole)


@attrs.define(eq=False)
class MemoryLink:
    """A client's in-memory conversation with a :class:`FakeGateway`."""

    gateway: FakeGateway
    _local: IPAddress
    _queue: list[tuple[float, int, bytes, tuple[str, int]]] = attrs.Factory(list)
    _seq: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)
    _refused: int = 0
    closed: bool = False
    # Local socket faults, as the kernel reports them: every send raises
    # *send_error* (EPERM is what a netfilter DROP in OUTPUT gives); receives
    # raise what :meth:`fail_receive` queued, or *receive_error* every time.
    send_error: OSError | None = None
    receive_error: OSError | None = None
    _receive_errors: list[OSError] = attrs.Factory(list)
    sends: int = 0
    receives: int = 0

    @property
    def local_address(self) -> IPAddress:
        return self._local

    @property
    def remote(self) -> tuple[IPAddress, int]:
        return (self.gateway.address, self.gateway.port)

    def fail_receive(self, error: OSError) -> None:
        """The next receive raises *error* (a pending socket error)."""
        self._receive_errors.append(error)
        self._wake()

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sends += 1
        if self.send_error is not None:
            raise self.send_error
        if self.gateway.closed:
            # A closed port answers ICMP port unreachable; the next receive
            # on a connected socket raises ECONNREFUSED.
            self._refused += 1
            self._wake()
            return
        for reply in self.gateway.handle(data, (str(self._local), 40000)):
            self.gateway.deliver(self, reply)

    def put(self, data: bytes, source: tuple[str, int], delay: float = 0.0) -> None:
        """Queue *data* for the client, arriving after *delay* seconds."""
        self._seq += 1
        heapq.heappush(self._queue, (trio.current_time() + delay, self._seq, data, source))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        self.receives += 1
        await trio.lowlevel.checkpoint()
        while True:
            if self.receive_error is not None:
                raise self.receive_error
            if self._receive_errors:
                raise self._receive_errors.pop(0)
            if self._refused:
                self._refused -= 1
                raise ConnectionRefusedError(111, "Connection refused (FakeGateway closed)")
            now = trio.current_time()
            if self._queue and self._queue[0][0] <= now:
                _at, _seq, data, source = heapq.heappop(self._queue)
                return data, source
            changed = self._changed
            with trio.move_on_at(self._queue[0][0] if self._queue else math.inf):
                await changed.wait()

    def close(self) -> None:
        self.closed = True
        self.gateway.links.discard(self)


@attrs.define(eq=False)
class FakeGateway:
    """A PCP + NAT-PMP gateway in the test process. See the module docstring.

    The clock is trio's, so it follows MockClock. Knobs may be changed at any
    time; they apply to the next reply.
    """

    address: IPAddress = attrs.field(default=IPv4Address("127.0.0.1"), converter=to_address)
    port: int = 5351
    external_address: IPAddress = attrs.field(
        default=IPv4Address("203.0.113.7"), converter=to_address
    )
    min_lifetime: int = 120  # RFC 6887 §15 recommends 120 s
    max_lifetime: int = 86400
    seed: int = 0

    # -- fault knobs --
    pcp_enabled: bool = True
    natpmp_enabled: bool = True
    natpmp_only: bool = False  # answer PCP with NAT-PMP's 8-byte "unsupported version"
    closed: bool = False  # behave as a closed port (ICMP port unreachable)
    drop_rate: float = 0.0  # fraction of replies lost
    duplicate: bool = False  # every reply sent twice
    reorder: bool = False  # replies take a random 0-0.5 s, so close ones swap
    delay: float = 0.0  # seconds before a reply arrives
    forced_result: int | None = None  # PCP result for every MAP
    forced_lifetime: int | None = None  # lifetime sent with forced_result
    forced_natpmp_result: int | None = None
    wrong_source: bool = False  # replies come from another address
    source_port: int | None = None  # (memory links) replies come from this port, not ``port``
    wrong_nonce: bool = False  # PCP MAP replies carry another nonce (RFC 6887 §11.4)
    natpmp_wrong_internal_port: bool = False  # NAT-PMP map replies name internal port + 1
    announce_unsupported: bool = False  # ANNOUNCE gets UNSUPP_OPCODE; MAP still works
    grant_port_zero: bool = False  # a PCP MAP succeeds with external port 0 (kept inside)
    natpmp_grant_port_zero: bool = False  # the same for a NAT-PMP map
    silent_deletes: bool = False  # PCP MAP requests with lifetime 0 go unanswered
    # miniupnpd 2.3.1 (nftables, seen in the lab): once an IPv6 pinhole has been
    # renewed, its delete (same nonce) is answered NOT_AUTHORIZED; a MAP with
    # that nonce still updates it.
    renewed_pinholes_undeletable: bool = False
    granted_address: IPAddress | None = attrs.field(  # PCP MAP replies name this address
        default=None, converter=attrs.converters.optional(to_address)
    )
    peer_enabled: bool = True  # False: PEER gets UNSUPP_OPCODE (a PCP server without PEER)
    wrong_remote: bool = False  # PEER replies name remote peer port + 1 (RFC 6887 §12.4)
    # PEER bindings (RFC 6887 §12), by (internal address, protocol, internal
    # port, remote address, remote port): a table apart from MAP's.
    peers: dict[tuple[str, int, int, str, int], FakeMapping] = attrs.Factory(dict)
    # THIRD_PARTY (RFC 6887 §13.1): False answers UNSUPP_OPTION, as miniupnpd
    # does without pcp_allow_thirdparty=yes.
    pcp_third_party: bool = True
    # A server that ignores THIRD_PARTY (a bug, §13.1 makes it mandatory):
    # it maps the sender and leaves the option out of its answer.
    pcp_ignore_third_party: bool = False
    # FILTER (§13.3): "enforce" keeps them and echoes only processed options
    # (the RFC); "echo_all" echoes every option, an unknown optional one too,
    # and ignores FILTER (miniupnpd 2.3.1); "omit" grants without echoing
    # FILTER; "unsupported" answers UNSUPP_OPTION.
    pcp_filter: str = "enforce"

    mappings: dict[tuple[str, int, int], FakeMapping] = attrs.Factory(dict)
    requests: list[pcp.PcpRequest | natpmp.NatPmpRequest] = attrs.Factory(list)
    request_times: list[float] = attrs.Factory(list)  # when each of ``requests`` arrived
    links: set[MemoryLink] = attrs.Factory(set)
    epoch_origin: float | None = None
    _rng: random.Random = attrs.field(init=False)
    _udp: trio.socket.SocketType | None = None
    _udp_clients: set[tuple[str, int]] = attrs.Factory(set)
    _taken: dict[int, dict[int, tuple[str, int, int]]] = attrs.Factory(dict)
    _next_expiry: float = math.inf

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # -- clock and epoch --

    def _now(self) -> float:
        now = trio.current_time()
        if self.epoch_origin is None:
            self.epoch_origin = now
        return now

    @property
    def epoch(self) -> int:
        now = self._now()
        assert self.epoch_origin is not None
        return int(now - self.epoch_origin)

    def reset(self) -> None:
        """Lose every mapping and restart the epoch: a gateway reboot."""
        self.mappings.clear()
        self.peers.clear()
        self._taken.clear()
        self.epoch_origin = trio.current_time()

    async def change_external_address(self, address: IPAddress | str) -> None:
        """New external address; the epoch restarts (RFC 6887 §8.5) and an ANNOUNCE goes out.

        Mappings survive with their ports, as on a gateway that keeps its table
        across a WAN reconnect.
        """
        self.external_address = to_address(address)
        self.epoch_origin = trio.current_time()
        await self.announce()

    async def announce(self) -> None:
        """Send an unsolicited ANNOUNCE (RFC 6887 §14.1) and a NAT-PMP address
        announcement (RFC 6886 §3.2.1) to every client seen."""
        messages = [
            pcp.encode_response(
                pcp.PcpResponse(pcp.Opcode.ANNOUNCE, ResultCode.SUCCESS, 0, self.epoch)
            ),
            natpmp.encode_response(
                natpmp.ExternalAddressResponse(0, self.epoch, self.external_address)
            ),
        ]
        for message in messages:
            for link in list(self.links):
                link.put(message, self._source())
            if self._udp is not None:
                for client in self._udp_clients:
                    await self._udp.sendto(message, client)

    # -- how replies travel --

    def _source(self) -> tuple[str, int]:
        port = self.port if self.source_port is None else self.source_port
        if self.wrong_source:
            return ("192.0.2.99", port)
        return (str(self.address), port)

    def memory_link(self, client_address: IPAddress | str = "192.168.1.100") -> MemoryLink:
        link = MemoryLink(self, to_address(client_address))
        self.links.add(link)
        return link

    def link_factory(
        self, client_address: IPAddress | str = "192.168.1.100"
    ) -> Callable[[IPAddress, int], Awaitable[MemoryLink]]:
        """For ``open_broker(link_factory=...)``: every link is a memory link."""

        async def factory(_address: IPAddress, _port: int) -> MemoryLink:
            await trio.lowlevel.checkpoint()
            return self.memory_link(client_address)

        return factory

    def deliver(self, link: MemoryLink, reply: bytes) -> None:
        """Apply the fault knobs to one reply on its way to *link*."""
        if self._rng.random() < self.drop_rate:
            return
        for _ in range(2 if self.duplicate else 1):
            # Reordering as networks do it: each copy takes its own 0-0.5 s,
            # so replies sent close together overtake each other.
            jitter = self._rng.uniform(0.0, 0.5) if self.reorder else 0.0
            link.put(reply, self._source(), self.delay + jitter)

    async def serve_udp(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on a real UDP socket at ``address:port`` (port 0 picks one)."""
        family = socket.AF_INET6 if isinstance(self.address, IPv6Address) else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            await sock.bind((str(self.address), self.port))
            self.port = sock.getsockname()[1]
            self._udp = sock
            task_status.started()
            try:
                while True:
                    data, client = await sock.recvfrom(2048)
                    self._udp_clients.add((client[0], client[1]))
                    if self.closed:
                        continue
                    for reply in self.handle(data, (client[0], client[1])):
                        if self._rng.random() < self.drop_rate:
                            continue
                        for _ in range(2 if self.duplicate else 1):
                            await sock.sendto(reply, client)
            finally:
                self._udp = None

    # -- the server logic (sans-IO) --

    def handle(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        """Answer one datagram from *source*; an empty list means silence."""
        if not data:
            return []
        if data[0] == natpmp.VERSION:
            if ":" in source[0]:
                # NAT-PMP is IPv4 only (RFC 6886); miniupnpd 2.3.1 reads a
                # NAT-PMP request that came over IPv6 and answers nothing.
                return []
            return self._handle_natpmp(data, source) if self.natpmp_enabled else []
        if self.natpmp_only:
            # RFC 6886 §3.5 (erratum 3618): 8 bytes, opcode 128 + op, result 1.
            op = data[1] & 0x7F if len(data) > 1 else 0
            return [bytes((0, 0x80 | op, 0, 1)) + self.epoch.to_bytes(4, "big")]
        if not self.pcp_enabled:
            return []
        return self._handle_pcp(data, source)

    def _store(self, key: tuple[str, int, int], mapping: FakeMapping) -> None:
        self._forget(key)
        self.mappings[key] = mapping
        self._taken.setdefault(mapping.protocol, {})[mapping.external_port] = key
        self._next_expiry = min(self._next_expiry, mapping.expires_at)

    def _forget(self, key: tuple[str, int, int]) -> None:
        mapping = self.mappings.pop(key, None)
        if mapping is not None:
            ports = self._taken.get(mapping.protocol, {})
            if ports.get(mapping.external_port) == key:
                del ports[mapping.external_port]

    def _expire(self) -> None:
        # Scan only when something can have expired: thousands of mappings
        # must not make every request O(n).
        now = self._now()
        if now < self._next_expiry:
            return
        for key in [k for k, m in self.mappings.items() if m.expires_at <= now]:
            self._forget(key)
        self._next_expiry = min((m.expires_at for m in self.mappings.values()), default=math.inf)

    def _grant_lifetime(self, requested: int) -> int:
        return max(self.min_lifetime, min(requested, self.max_lifetime))

    def _free_port(self, protocol: int, wanted: int, key: tuple[str, int, int]) -> int | None:
        taken = self._taken.get(protocol, {})

        def free(port: int) -> bool:
            return taken.get(port, key) == key

        if wanted and free(wanted):
            return wanted
        for _ in range(1000):
            port = self._rng.randrange(1024, 65536)
            if free(port):
                return port
        return None

    def _pcp_error(self, request: pcp.PcpRequest, code: ResultCode) -> bytes:
        lifetime = self.forced_lifetime
        if lifetime is None:
            lifetime = 30 if code.error_class is ErrorClass.SHORT else 1800
        return pcp.encode_response(
            pcp.PcpResponse(
                request.opcode, code, lifetime, self.epoch, request.data, request.options
            )
        )

    def _handle_pcp(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        try:
            request = pcp.decode_request(data)
        except MalformedMessage as exc:
            if exc.result_code is None or len(data) < 2:
                return []
            op = getattr(exc, "opcode", data[1] & 0x7F)
            return [
                pcp.encode_response(
                    pcp.PcpResponse(
                        op,
                        exc.result_code,
                        1800,
                        self.epoch,
                        reserved=bytes(data[12:24]).ljust(12, b"\0"),
                    )
                )
            ]
        self.requests.append(request)
        self.request_times.append(self._now())
        if request.client_address != to_address(source[0]):
            # RFC 6887 §8.2: another NAT rewrote the source.
            return [self._pcp_error(request, ResultCode.ADDRESS_MISMATCH)]
        if any(isinstance(o, pcp.UnknownOption) and o.code.is_mandatory for o in request.options):
            return [self._pcp_error(request, ResultCode.UNSUPP_OPTION)]
        if request.opcode == pcp.Opcode.ANNOUNCE:
            if self.announce_unsupported:
                # Seen in the wild: a server that serves MAP but not ANNOUNCE.
                return [self._pcp_error(request, ResultCode.UNSUPP_OPCODE)]
            return [
                pcp.encode_response(
                    pcp.PcpResponse(pcp.Opcode.ANNOUNCE, ResultCode.SUCCESS, 0, self.epoch)
                )
            ]
        if request.opcode not in (pcp.Opcode.MAP, pcp.Opcode.PEER) or (
            request.opcode == pcp.Opcode.PEER and not self.peer_enabled
        ):
            return [self._pcp_error(request, ResultCode.UNSUPP_OPCODE)]
        if self.silent_deletes and request.lifetime == 0:
            return []
        if self.forced_result is not None:
            return [self._pcp_error(request, ResultCode(self.forced_result))]
        if request.opcode == pcp.Opcode.PEER:
            return [self._pcp_peer(request)]
        return [self._pcp_map(request)]

    def _pcp_peer(self, request: pcp.PcpRequest) -> bytes:
        """PEER (RFC 6887 §12.3): create, extend or (lifetime 0) drop one flow's binding.

        The external endpoint is endpoint-independent (RFC 4787 EIM, what most
        NATs do): a MAP of the same internal endpoint, or another PEER of it,
        lends its external port; a PEER suggesting a port it cannot have fails
        with CANNOT_PROVIDE_EXTERNAL (PEER behaves as with PREFER_FAILURE).
        Lifetime 0 deletes the binding, as miniupnpd does (RFC 6887 §15 says a
        PEER cannot shorten one; servers differ).
        """
        data = request.data
        assert isinstance(data, pcp.PeerData)
        internal = request.client_address
        for option in request.options:
            if isinstance(option, pcp.ThirdParty) and not self.pcp_ignore_third_party:
                # As for MAP (§13.1; miniupnpd checks THIRD_PARTY for both opcodes).
                if option.internal_address == request.client_address:
                    return self._pcp_error(request, ResultCode.MALFORMED_REQUEST)
                if not self.pcp_third_party:
                    return self._pcp_error(request, ResultCode.UNSUPP_OPTION)
                internal = option.internal_address
        if any(isinstance(o, pcp.PreferFailure) for o in request.options):
            return self._pcp_error(request, ResultCode.MALFORMED_REQUEST)  # §12.1
        if data.protocol == 0 or data.internal_port == 0 or data.remote_peer_port == 0:
            return self._pcp_error(request, ResultCode.MALFORMED_REQUEST)  # §12.1
        if data.protocol not in (_TCP, _UDP):
            return self._pcp_error(request, ResultCode.UNSUPP_PROTOCOL)
        self._expire()
        now = self._now()
        for stale in [k for k, m in self.peers.items() if m.expires_at <= now]:
            del self.peers[stale]
        key = (
            str(internal),
            data.protocol,
            data.internal_port,
            str(data.remote_peer_address),
            data.remote_peer_port,
        )
        existing = self.peers.get(key)
        if existing is not None and existing.nonce != data.nonce:
            return self._pcp_error(request, ResultCode.NOT_AUTHORIZED)
        if request.lifetime == 0:
            self.peers.pop(key, None)
            return self._peer_reply(request, 0, 0)
        port: int | None
        if existing is not None:
            port = existing.external_port
        else:
            map_key = (str(internal), data.protocol, data.internal_port)
            same_endpoint = [m for k, m in self.peers.items() if k[:3] == map_key]
            if map_key in self.mappings:
                port = self.mappings[map_key].external_port
            elif same_endpoint:
                port = same_endpoint[0].external_port
            else:
                port = self._free_port(
                    data.protocol, data.external_port or data.internal_port, map_key
                )
        if port is None:
            return self._pcp_error(request, ResultCode.NO_RESOURCES)
        if data.external_port and port != data.external_port:
            return self._pcp_error(request, ResultCode.CANNOT_PROVIDE_EXTERNAL)
        lifetime = self._grant_lifetime(request.lifetime)
        self.peers[key] = FakeMapping(
            internal,
            data.protocol,
            data.internal_port,
            port,
            now + lifetime,
            data.nonce,
            "pcp",
            (data.remote_peer_address, data.remote_peer_port),
        )
        return self._peer_reply(request, port, lifetime)

    def _peer_reply(self, request: pcp.PcpRequest, port: int, lifetime: int) -> bytes:
        data = request.data
        assert isinstance(data, pcp.PeerData)
        nonce = bytes(b ^ 0xFF for b in data.nonce) if self.wrong_nonce else data.nonce
        remote_port = (
            data.remote_peer_port % 65535 + 1 if self.wrong_remote else data.remote_peer_port
        )
        return pcp.encode_response(
            pcp.PcpResponse(
                pcp.Opcode.PEER,
                ResultCode.SUCCESS,
                lifetime,
                self.epoch,
                pcp.PeerData(
                    nonce,
                    data.protocol,
                    data.internal_port,
                    0 if self.grant_port_zero else port,
                    self.granted_address or self.external_address,
                    remote_port,
                    data.remote_peer_address,
                ),
                self._answered_options(request),
            )
        )

    def _pcp_map(self, request: pcp.PcpRequest) -> bytes:
        data = request.data
        assert isinstance(data, pcp.MapData)
        internal = request.client_address
        for option in request.options:
            if isinstance(option, pcp.ThirdParty) and not self.pcp_ignore_third_party:
                if option.internal_address == request.client_address:
                    return self._pcp_error(request, ResultCode.MALFORMED_REQUEST)  # §13.1
                if not self.pcp_third_party:
                    return self._pcp_error(request, ResultCode.UNSUPP_OPTION)
                internal = option.internal_address
        filters = tuple(o for o in request.options if isinstance(o, pcp.Filter))
        if filters and self.pcp_filter == "unsupported":
            return self._pcp_error(request, ResultCode.UNSUPP_OPTION)
        if data.protocol == 0 and data.internal_port != 0:
            return self._pcp_error(request, ResultCode.MALFORMED_REQUEST)
        if data.protocol not in (_TCP, _UDP):
            return self._pcp_error(request, ResultCode.UNSUPP_PROTOCOL)
        self._expire()
        key = (str(internal), data.protocol, data.internal_port)
        existing = self.mappings.get(key)
        if existing is not None and existing.nonce != data.nonce:
            # RFC 6887 §11.3: another client's mapping (or ours, forgotten).
            return self._pcp_error(request, ResultCode.NOT_AUTHORIZED)
        now = self._now()
        if request.lifetime == 0:
            if existing is not None and existing.renewed and self.renewed_pinholes_undeletable:
                return self._pcp_error(request, ResultCode.NOT_AUTHORIZED)
            self._forget(key)
            return self._pcp_reply(request, data.external_port, data.external_address, 0)
        prefer_failure = any(isinstance(o, pcp.PreferFailure) for o in request.options)
        if isinstance(internal, IPv6Address):
            return self._pcp_pinhole(request, key, internal)
        if existing is not None:
            port: int | None = existing.external_port
        else:
            port = self._free_port(data.protocol, data.external_port or data.internal_port, key)
        if port is None:
            return self._pcp_error(request, ResultCode.NO_RESOURCES)
        if prefer_failure and data.external_port and port != data.external_port:
            return self._pcp_error(request, ResultCode.CANNOT_PROVIDE_EXTERNAL)
        lifetime = self._grant_lifetime(request.lifetime)
        self._store(
            key,
            FakeMapping(
                internal,
                data.protocol,
                data.internal_port,
                port,
                now + lifetime,
                data.nonce,
                "pcp",
                filters=filters if self.pcp_filter == "enforce" else (),
            ),
        )
        return self._pcp_reply(
            request,
            0 if self.grant_port_zero else port,
            self.granted_address or self.external_address,
            lifetime,
        )

    def _pcp_pinhole(
        self,
        request: pcp.PcpRequest,
        key: tuple[str, int, int],
        internal: IPv6Address,
    ) -> bytes:
        """A MAP for an IPv6 internal address: a firewall pinhole, no translation.

        A firewall (RFC 6887 §1: PCP controls simple firewalls too) translates
        nothing: the external address and port are the internal ones, as
        miniupnpd 2.3.1 answers (seen in the lab).
        """
        data = request.data
        assert isinstance(data, pcp.MapData)
        lifetime = self._grant_lifetime(request.lifetime)
        self._store(
            key,
            FakeMapping(
                internal,
                data.protocol,
                data.internal_port,
                data.internal_port,
                self._now() + lifetime,
                data.nonce,
                "pcp",
                renewed=key in self.mappings,
            ),
        )
        return self._pcp_reply(request, data.internal_port, internal, lifetime)

    def _pcp_reply(
        self, request: pcp.PcpRequest, port: int, address: IPAddress, lifetime: int
    ) -> bytes:
        data = request.data
        assert isinstance(data, pcp.MapData)
        nonce = bytes(b ^ 0xFF for b in data.nonce) if self.wrong_nonce else data.nonce
        return pcp.encode_response(
            pcp.PcpResponse(
                pcp.Opcode.MAP,
                ResultCode.SUCCESS,
                lifetime,
                self.epoch,
                pcp.MapData(nonce, data.protocol, data.internal_port, port, address),
                self._answered_options(request),
            )
        )

    def _answered_options(self, request: pcp.PcpRequest) -> tuple[pcp.Option, ...]:
        """The options a SUCCESS carries: those processed (RFC 6887 §7.3, §13)."""
        if self.pcp_filter == "echo_all":
            return request.options
        return tuple(
            o
            for o in request.options
            if not (isinstance(o, pcp.UnknownOption) and not o.code.is_mandatory)
            and not (isinstance(o, pcp.ThirdParty) and self.pcp_ignore_third_party)
            and not (isinstance(o, pcp.Filter) and self.pcp_filter == "omit")
        )

    def _handle_natpmp(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        try:
            request = natpmp.decode_request(data)
        except MalformedMessage as exc:
            if exc.result_code is None:
                return []
            opcode = getattr(exc, "opcode", 0)
            return [
                natpmp.encode_response(natpmp.ShortResponse(opcode, exc.result_code, self.epoch))
            ]
        self.requests.append(request)
        self.request_times.append(self._now())
        if isinstance(request, natpmp.ExternalAddressRequest):
            return [
                natpmp.encode_response(
                    natpmp.ExternalAddressResponse(0, self.epoch, self.external_address)
                )
            ]
        protocol = _NATPMP_PROTOCOLS[request.opcode]
        if self.forced_natpmp_result is not None:
            return [
                natpmp.encode_response(
                    natpmp.MapResponse(
                        request.opcode,
                        self.forced_natpmp_result,
                        self.epoch,
                        request.internal_port,
                        0,
                        0,
                    )
                )
            ]
        self._expire()
        key = (source[0], protocol, request.internal_port)
        if request.lifetime == 0:
            if request.internal_port == 0:
                for k in [k for k in self.mappings if k[0] == source[0] and k[1] == protocol]:
                    self._forget(k)
            else:
                self._forget(key)
            return [
                natpmp.encode_response(
                    natpmp.MapResponse(request.opcode, 0, self.epoch, request.internal_port, 0, 0)
                )
            ]
        existing = self.mappings.get(key)
        port = (
            existing.external_port
            if existing is not None
            else self._free_port(protocol, request.suggested_external_port, key)
        )
        if port is None:
            return [
                natpmp.encode_response(
                    natpmp.MapResponse(request.opcode, 4, self.epoch, request.internal_port, 0, 0)
                )
            ]
        lifetime = min(request.lifetime, self.max_lifetime)
        self._store(
            key,
            FakeMapping(
                to_address(source[0]),
                protocol,
                request.internal_port,
                port,
                self._now() + lifetime,
                existing.nonce if existing else None,
                "natpmp",
            ),
        )
        return [
            natpmp.encode_response(
                natpmp.MapResponse(
                    request.opcode,
                    0,
                    self.epoch,
                    request.internal_port ^ (1 if self.natpmp_wrong_internal_port else 0),
                    0 if self.natpmp_grant_port_zero else port,
                    lifetime,
                )
            )
        ]

    # -- assertions helpers --

    def peer_for(
        self, protocol: str, internal_port: int, remote: tuple[IPAddress | str, int]
    ) -> FakeMapping | None:
        """The live PEER binding of *internal_port*/*protocol* to *remote*, if any."""
        number = _TCP if protocol == "tcp" else _UDP
        now = self._now()
        wanted = (to_address(remote[0]), remote[1])
        for mapping in self.peers.values():
            if (
                mapping.protocol == number
                and mapping.internal_port == internal_port
                and mapping.remote == wanted
                and mapping.expires_at > now
            ):
                return mapping
        return None

    def mapping_for(self, protocol: str, internal_port: int) -> FakeMapping | None:
        """The live mapping of *internal_port*/*protocol* ("tcp"/"udp"), if any."""
        number = _TCP if protocol == "tcp" else _UDP
        self._expire()
        for mapping in self.mappings.values():
            if mapping.protocol == number and mapping.internal_port == internal_port:
                return mapping
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m portbroker.testing.fake_gateway``: serve on UDP until killed.

    Prints ``port <n>`` once listening, for tests that drive the CLI.
    """
    import argparse

    parser = argparse.ArgumentParser(description="A FakeGateway on a real UDP socket.")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--external-address", default="203.0.113.7")
    parser.add_argument("--natpmp-only", action="store_true")
    parser.add_argument("--no-pcp", action="store_true")
    parser.add_argument("--no-natpmp", action="store_true")
    parser.add_argument(
        "--announce-unsupported",
        action="store_true",
        help="answer ANNOUNCE with UNSUPP_OPCODE (MAP still works)",
    )
    parser.add_argument(
        "--grant-port-zero", action="store_true", help="PCP MAP succeeds with external port 0"
    )
    parser.add_argument(
        "--natpmp-grant-port-zero",
        action="store_true",
        help="NAT-PMP map succeeds with external port 0",
    )
    parser.add_argument(
        "--pcp-result", type=int, default=None, help="answer every PCP MAP with this result code"
    )
    args = parser.parse_args(argv)
    gateway = FakeGateway(
        address=args.address,
        port=args.port,
        external_address=args.external_address,
        natpmp_only=args.natpmp_only,
        pcp_enabled=not args.no_pcp,
        natpmp_enabled=not args.no_natpmp,
        announce_unsupported=args.announce_unsupported,
        grant_port_zero=args.grant_port_zero,
        natpmp_grant_port_zero=args.natpmp_grant_port_zero,
        forced_result=args.pcp_result,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve_udp)
            print(f"port {gateway.port}", flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
