"""One UDP conversation per gateway: requests, retransmission, response matching.

PCP and NAT-PMP share the server's port 5351, so one connected UDP socket per
gateway carries both, for every mapping the broker holds. A single receive
loop decodes each datagram and hands it to whichever request is waiting for
it (matched by opcode, nonce, protocol and internal port for PCP; opcode and
internal port for NAT-PMP, which has no transaction ID). Every decoded
response is also shown to an observer first, so the epoch check runs on all of
them, error replies and unsolicited ones included (RFC 6887 §8.3 step 7,
RFC 6886 §3.6).

A *connected* socket matters twice: the kernel reports ICMP port unreachable
as ECONNREFUSED on it, so a gateway without the service fails a request at
once instead of by timeout; and it only delivers datagrams from the gateway.
The source check here is kept anyway (RFC 6887 §8.3, RFC 6886 §3.1), for links
that are not kernel sockets and as defence in depth; what it drops is counted.

The link is injectable (:class:`DatagramLink`): tests use
:meth:`portbroker.testing.FakeGateway.memory_link` so that trio's MockClock
can run hours of retransmissions without a real datagram in flight.
"""

from __future__ import annotations

import errno
import math
import random
import socket
from collections.abc import Callable, Hashable, Iterable, Iterator
from ipaddress import IPv6Address, ip_address
from typing import Final, Protocol

import attrs
import trio

from portbroker.errors import MalformedMessage, NoAnswer
from portbroker.types import IPAddress
from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import to_address

__all__ = [
    "DatagramLink",
    "Response",
    "Transport",
    "TransportStats",
    "UdpLink",
    "natpmp_schedule",
    "open_udp_link",
    "probe_schedule",
    "rfc6887_schedule",
]

Response = pcp.PcpResponse | natpmp.NatPmpResponse
MAX_DATAGRAM: Final = 2048
# After an ICMP refusal, further requests within this time fail without being
# sent: PCP and NAT-PMP share the port, so one refusal answers both, and
# gateways rate-limit ICMP errors (Linux: one per second per peer after a
# burst), so every unneeded probe makes the next answer slower.
REFUSAL_MEMORY: Final = 1.0
_UNREACHABLE: Final = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)


class DatagramLink(Protocol):
    """A datagram conversation with one server address."""

    @property
    def local_address(self) -> IPAddress:
        """Our address as the server sees it (PCP's Client IP Address)."""
        ...

    @property
    def remote(self) -> tuple[IPAddress, int]:
        """The server's address and port."""
        ...

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        """The next datagram and its source; ConnectionRefusedError on ICMP unreachable."""
        ...

    def close(self) -> None: ...


class UdpLink:
    """A connected UDP socket (see the module docstring for why connected)."""

    def __init__(self, sock: trio.socket.SocketType, remote: tuple[IPAddress, int]) -> None:
        self._sock = sock
        self._remote = remote
        self._local = to_address(sock.getsockname()[0])

    @property
    def local_address(self) -> IPAddress:
        return self._local

    @property
    def remote(self) -> tuple[IPAddress, int]:
        return self._remote

    async def send(self, data: bytes) -> None:
        await self._sock.send(data)

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        data, source = await self._sock.recvfrom(MAX_DATAGRAM)
        return data, (source[0], source[1])

    def close(self) -> None:
        self._sock.close()


async def open_udp_link(address: IPAddress, port: int) -> UdpLink:
    """A UDP socket connected to *address*:*port*.

    Connecting sends nothing; it picks our source address by routing, which
    is what PCP's Client IP Address field must carry.
    """
    family = socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return UdpLink(sock, (address, port))


# -- retransmission schedules -------------------------------------------------


def rfc6887_schedule(rng: random.Random) -> Iterator[float]:
    """RFC 6887 §8.1.1: IRT 3 s, doubling to MRT 1024 s, RAND ±0.1, MRC = MRD = 0.

    Endless by design (the server may come up later): bound it with a cancel
    scope.
    """
    irt, mrt = 3.0, 1024.0
    rt = (1 + rng.uniform(-0.1, 0.1)) * irt
    while True:
        yield rt
        rt = (1 + rng.uniform(-0.1, 0.1)) * min(2 * rt, mrt)


def natpmp_schedule() -> Iterator[float]:
    """RFC 6886 §3.1: 250 ms, doubling, nine sends (the last waits 64 s)."""
    for attempt in range(9):
        yield 0.25 * 2**attempt


def probe_schedule(first: float = 0.25) -> Iterator[float]:
    """A fast schedule for probing a server that has not answered yet."""
    wait = first
    while True:
        yield wait
        wait *= 2


# -- matching -----------------------------------------------------------------


def pcp_key(request: pcp.PcpRequest) -> tuple[Hashable, ...]:
    """The key a response to *request* must match (RFC 6887 §8.3, §11.4)."""
    data = request.data
    if data is None:
        return ("pcp", int(request.opcode))
    return ("pcp", int(request.opcode), data.nonce, data.protocol, data.internal_port)


def natpmp_key(request: natpmp.NatPmpRequest) -> tuple[Hashable, ...]:
    """NAT-PMP has no transaction ID: opcode and internal port (RFC 6886 §3.3)."""
    if isinstance(request, natpmp.MapRequest):
        return ("natpmp", int(request.opcode), request.internal_port)
    return ("natpmp", 0)


def _response_keys(response: Response) -> tuple[tuple[Hashable, ...] | None, tuple[Hashable, ...]]:
    """(exact key or None, opcode-wide prefix) for a decoded response."""
    if isinstance(response, pcp.PcpResponse):
        prefix: tuple[Hashable, ...] = ("pcp", int(response.opcode))
        data = response.data
        if data is None:
            # ANNOUNCE, or a reply that cannot name its request (version
            # negotiation, a cut-short error): every request of that opcode.
            exact = prefix if response.opcode == pcp.Opcode.ANNOUNCE else None
            return exact, prefix
        return (*prefix, data.nonce, data.protocol, data.internal_port), prefix
    prefix = ("natpmp", int(response.opcode))
    if isinstance(response, natpmp.MapResponse):
        return (*prefix, response.internal_port), prefix
    if isinstance(response, natpmp.ExternalAddressResponse):
        return prefix, prefix
    return None, prefix  # the 8-byte error form names only the opcode


def decode_datagram(data: bytes) -> Response:
    """PCP or NAT-PMP, by the version byte (as servers split them, miniupnpd.c).

    A version-0 datagram with result 1 answers a PCP request (a NAT-PMP server
    saying "unsupported version"), since no NAT-PMP request we send is of
    another version; any other version-0 datagram is NAT-PMP.
    """
    if data[:1] == b"\x00" and data[2:4] != b"\x00\x01":
        return natpmp.decode_response(data)
    return pcp.decode_response(data)


@attrs.define
class TransportStats:
    sent: int = 0
    received: int = 0
    foreign: int = 0  # from an address or port other than the server's
    malformed: int = 0
    unmatched: int = 0  # valid, but no request was waiting for it
    refused: int = 0  # ICMP port unreachable


@attrs.define(eq=False)
class _Waiter:
    key: tuple[Hashable, ...]
    event: trio.Event = attrs.Factory(trio.Event)
    response: Response | None = None
    error: BaseException | None = None


Observer = Callable[[Response, float, bool], None]


class Transport:
    """Requests and responses on one :class:`DatagramLink`.

    Run :meth:`run` in a nursery (it is the receive loop), then call
    :meth:`request` from any number of tasks.

    *observer* is called as ``observer(response, now, matched)`` for every
    valid response from the server, before it is handed to its request.
    """

    def __init__(self, link: DatagramLink, observer: Observer | None = None) -> None:
        self.link = link
        self.observer = observer
        self.stats = TransportStats()
        self._waiters: dict[tuple[Hashable, ...], set[_Waiter]] = {}
        self._refused_at: float | None = None
        self._remote_text = (str(link.remote[0]), link.remote[1])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop; runs until cancelled."""
        task_status.started()
        while True:
            try:
                data, source = await self.link.receive()
            except OSError as exc:
                if exc.errno not in _UNREACHABLE:
                    raise
                # ICMP unreachable: nobody serves this port (or host). Everyone
                # waiting learns it now; later sends may still succeed.
                self.stats.refused += 1
                self._fail_all(exc)
                continue
            self._deliver(data, source)

    def _deliver(self, data: bytes, source: tuple[str, int]) -> None:
        if not self._from_server(source):
            self.stats.foreign += 1
            return
        try:
            response = decode_datagram(data)
        except MalformedMessage:
            self.stats.malformed += 1
            return
        self.stats.received += 1
        self._refused_at = None
        exact, prefix = _response_keys(response)
        waiters: set[_Waiter] = set()
        if exact is not None:
            waiters |= self._waiters.get(exact, set())
        else:
            for key, group in self._waiters.items():
                if key[: len(prefix)] == prefix:
                    waiters |= group
        if self.observer is not None:
            self.observer(response, trio.current_time(), bool(waiters))
        if not waiters:
            self.stats.unmatched += 1
        for waiter in waiters:
            if waiter.response is None and waiter.error is None:
                waiter.response = response
                waiter.event.set()

    def _from_server(self, source: tuple[str, int]) -> bool:
        try:
            return (to_address(ip_address(source[0].split("%")[0])), source[1]) == self.link.remote
        except ValueError:
            return False

    def _fail_all(self, error: BaseException) -> None:
        self._refused_at = trio.current_time()
        for group in self._waiters.values():
            for waiter in group:
                if waiter.response is None and waiter.error is None:
                    waiter.error = error
                    waiter.event.set()

    async def request(
        self, payload: bytes, key: tuple[Hashable, ...], schedule: Iterable[float]
    ) -> Response:
        """Send *payload* on *schedule* until a response matching *key* arrives.

        Each value of *schedule* is how long to wait after a send before
        sending again; when it runs out, :class:`NoAnswer`. Bound endless
        schedules with a cancel scope.

        Raises:
            ConnectionRefusedError: the server's port is closed (ICMP).
            NoAnswer: the schedule ran out.
        """
        if self._refused_at is not None and trio.current_time() - self._refused_at < REFUSAL_MEMORY:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, "refused (ICMP port unreachable) a moment ago"
            )
        waiter = _Waiter(key)
        self._waiters.setdefault(key, set()).add(waiter)
        try:
            for wait in schedule:
                if not math.isfinite(wait) or wait <= 0:
                    raise ValueError(f"bad retransmission interval {wait!r}")
                self.stats.sent += 1
                try:
                    await self.link.send(payload)
                except OSError as exc:
                    if exc.errno not in _UNREACHABLE:
                        raise
                    # The socket's pending ICMP error (from any earlier
                    # datagram) surfaces on send and is cleared by it: every
                    # waiter must hear of it, not only this one.
                    self.stats.refused += 1
                    self._fail_all(exc)
                with trio.move_on_after(wait):
                    await waiter.event.wait()
                if waiter.error is not None:
                    raise waiter.error
                if waiter.response is not None:
                    return waiter.response
            raise NoAnswer(f"no answer from {self._remote_text[0]}:{self._remote_text[1]}")
        finally:
            group = self._waiters[key]
            group.discard(waiter)
            if not group:
                del self._waiters[key]
