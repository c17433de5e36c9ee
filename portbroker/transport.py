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

import contextlib
import errno
import itertools
import logging
import math
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextvars import ContextVar
from ipaddress import IPv6Address, ip_address
from typing import Final, Protocol

import attrs
import trio

from portbroker.errors import LinkError, MalformedMessage, NoAnswer, PortBrokerError
from portbroker.types import IPAddress, unscoped
from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import to_address

__all__ = [
    "DatagramLink",
    "Response",
    "Transport",
    "TransportStats",
    "UdpLink",
    "listen_announcements",
    "natpmp_schedule",
    "open_udp_link",
    "probe_schedule",
    "rfc6887_schedule",
]

Response = pcp.PcpResponse | natpmp.NatPmpResponse
MAX_DATAGRAM: Final = 2048
# Datagrams the receive loop reads in one go when more are queued (Transport._drain).
MAX_DRAIN: Final = 256
# Of those, how many no request takes (foreign, malformed, unmatched) before
# it yields anyway: each costs a pass over every waiting request
# (Transport._ignore_all, _count_rejected), so a flood of them, spoofed or
# stale, would hold the event loop for 256 of those passes at a time.
MAX_DRAIN_REJECTED: Final = 16
# After an ICMP refusal, further requests within this time fail without being
# sent: PCP and NAT-PMP share the port, so one refusal answers both, and
# gateways rate-limit ICMP errors (Linux: one per second per peer after a
# burst), so every unneeded probe makes the next answer slower.
REFUSAL_MEMORY: Final = 1.0
# Errors a connected UDP socket reports for an ICMP error about an earlier
# datagram (Linux sets them as the socket's pending error): they concern every
# request on the socket, not only the one whose send or receive surfaced them.
_SOCKET_WIDE: Final = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
# A receive that keeps failing (a closed or broken socket) must not spin the
# loop: after the first error in a row, wait this long, doubling up to a second.
_RECEIVE_RETRY: Final = 0.01
_RECEIVE_RETRY_MAX: Final = 1.0
# When portbroker's own budget for a request (see budget()) is about to end a
# request that did get replies, all rejected, give up this much earlier with a
# NoAnswer that says what was ignored (a timeout could only say "no answer").
_REPORT_MARGIN: Final = 0.001
_BUDGET: ContextVar[trio.CancelScope | None] = ContextVar("portbroker_budget", default=None)
# A request that ended unanswered may still be answered: a busy server (the
# lab's miniupnpd under load) works through its queue of our retransmissions
# long after we gave up, and stamps each answer with its clock when it *starts*
# on that datagram (miniupnpd natpmp.c writes the epoch before the nftables
# calls). Such an answer reaches whichever request with the same key waits
# then, so for this long the key's oldest unanswered send stays the earliest
# moment an answer can have been stamped (seen in CI as a spurious
# "natpmp epoch too-slow (0 -> 5)" on a healthy gateway).
LATE_ANSWER_MEMORY: Final = 120.0


@contextlib.contextmanager
def budget(scope: trio.CancelScope) -> Iterator[None]:
    """Mark *scope* as portbroker's own time budget for the requests made inside it.

    Only such a budget is reported early as a NoAnswer that names the ignored
    replies; a deadline of the caller's (an app's ``move_on_after``) is a plain
    cancellation, as trio promises, and is never turned into an exception.
    The scope's deadline is read live, so a budget that is extended (the
    broker's patience with a slow server) is followed.
    """
    token = _BUDGET.set(scope)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _settled(waiter: _Waiter) -> Response | None:
    """The waiter's response, or its error raised, or None while it waits."""
    if waiter.error is not None:
        raise waiter.error
    return waiter.response


def _report_at() -> float:
    scope = _BUDGET.get()
    if scope is None:
        return math.inf
    if trio.current_effective_deadline() < scope.deadline:
        return math.inf  # a tighter deadline of the caller's: its business
    return scope.deadline - _REPORT_MARGIN


logger = logging.getLogger("portbroker")


def _target(remote: tuple[IPAddress, int]) -> str:
    address, port = remote
    return f"[{address}]:{port}" if isinstance(address, IPv6Address) else f"{address}:{port}"


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
        # The (non-blocking) stdlib socket under trio's, for receive_nowait.
        self._raw: socket.socket | None = getattr(sock, "_sock", None)

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

    def receive_nowait(self) -> tuple[bytes, tuple[str, int]] | None:
        """A datagram already queued, or None; errors as :meth:`receive` raises them."""
        if self._raw is None:
            return None
        try:
            data, source = self._raw.recvfrom(MAX_DATAGRAM)
        except BlockingIOError:
            return None
        return data, (source[0], source[1])

    def close(self) -> None:
        self._sock.close()


async def open_udp_link(address: IPAddress, port: int) -> UdpLink:
    """A UDP socket connected to *address*:*port*.

    Connecting sends nothing; it picks our source address by routing, which
    is what PCP's Client IP Address field must carry.

    Raises:
        LinkError: the local stack cannot reach *address* at all (no route:
            ENETUNREACH; no IPv6: EAFNOSUPPORT; ...).
    """
    family = socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET
    target = _target((address, port))
    try:
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise LinkError("open a socket for", target, exc) from exc
    try:
        await sock.connect((str(address), port))
    except OSError as exc:
        sock.close()
        raise LinkError("connect to", target, exc) from exc
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


# RFC 6886 §3.1 doubles the wait after each NAT-PMP send up to 64 s (nine
# sends over about 128 s). Under heavy loss that leaves a request without a
# send for tens of seconds while its answer is all it waits for: in the lab at
# 60 % loss a map took over two minutes. We keep the RFC's start and its total
# time but cap the interval (a SHOULD we depart from, for a map that is
# answered within seconds of the loss letting one exchange through); the
# broker's budget ends the schedule sooner when the gateway is silent.
NATPMP_MAX_INTERVAL: Final = 2.0
NATPMP_SCHEDULE_TOTAL: Final = 127.75  # the RFC's 0.25 + 0.5 + ... + 64 s


def natpmp_schedule() -> Iterator[float]:
    """250 ms, doubling up to :data:`NATPMP_MAX_INTERVAL`, for as long as
    RFC 6886 §3.1's nine sends would take."""
    interval, waited = 0.25, 0.0
    while waited < NATPMP_SCHEDULE_TOTAL:
        wait = min(interval, NATPMP_SCHEDULE_TOTAL - waited)
        yield wait
        waited += wait
        interval = min(interval * 2, NATPMP_MAX_INTERVAL)


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
    key = ("pcp", int(request.opcode), data.nonce, data.protocol, data.internal_port)
    if isinstance(data, pcp.PeerData):
        # §12.4: a PEER answer must also echo the remote peer.
        return (*key, data.remote_peer_address, data.remote_peer_port)
    return key


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
            if response.opcode == pcp.Opcode.ANNOUNCE:
                return prefix, prefix
            if _names_no_request(response):
                # Version negotiation (RFC 6887 §9) or a request the server
                # could not parse: it cannot carry the nonce, so it answers
                # every request of that opcode (as a hint, see _deliver).
                return None, prefix
            # Any other MAP/PEER answer must echo the nonce (§11.4 is what
            # stops an off-path host from answering for the server): a
            # header-only NO_RESOURCES, say, answers nobody.
            return (*prefix, "no nonce"), (*prefix, "no nonce")
        exact = (*prefix, data.nonce, data.protocol, data.internal_port)
        if isinstance(data, pcp.PeerData):
            exact = (*exact, data.remote_peer_address, data.remote_peer_port)
        return exact, prefix
    prefix = ("natpmp", int(response.opcode))
    if isinstance(response, natpmp.MapResponse):
        return (*prefix, response.internal_port), prefix
    if isinstance(response, natpmp.ExternalAddressResponse):
        return prefix, prefix
    return None, prefix  # the 8-byte error form names only the opcode


def _names_no_request(response: pcp.PcpResponse) -> bool:
    """A header-only PCP reply that may legitimately answer any request of its opcode."""
    return response.version != pcp.VERSION or response.result_code in (
        pcp.ResultCode.UNSUPP_VERSION,
        pcp.ResultCode.MALFORMED_REQUEST,
    )


def decode_datagram(data: bytes) -> Response:
    """PCP or NAT-PMP, by the version byte (as servers split them, miniupnpd.c).

    A version-0 datagram with result 1 answers a PCP request (a NAT-PMP server
    saying "unsupported version"), since no NAT-PMP request we send is of
    another version; any other version-0 datagram is NAT-PMP.
    """
    if data[:1] == b"\x00" and data[2:4] != b"\x00\x01":
        return natpmp.decode_response(data)
    return pcp.decode_response(data)


def _mismatch(response: Response, key: tuple[Hashable, ...]) -> str | None:
    """Why *response* does not answer the request waiting under *key*.

    None when it is not a rejected reply for that request at all: an
    announcement (RFC 6887 §14.1, RFC 6886 §3.2.1: unsolicited by design) or a
    message of the other protocol, which belongs to another conversation on
    the shared port.
    """
    if isinstance(response, pcp.PcpResponse):
        if key[0] != "pcp":
            return None
        if response.opcode == pcp.Opcode.ANNOUNCE and response.result_code == 0:
            return None
        if int(response.opcode) != key[1]:
            return "wrong opcode"
        data = response.data
        if data is None:
            return "no nonce"  # a header-only answer that must have named its request
        if len(key) < 5:
            return "wrong opcode"
        if (data.protocol, data.internal_port) != key[3:5]:
            return "other mapping"
        if (
            isinstance(data, pcp.PeerData)
            and data.nonce == key[2]
            and (data.remote_peer_address, data.remote_peer_port) != key[5:7]
        ):
            return "remote peer mismatch"  # RFC 6887 §12.4
        return "nonce mismatch"  # RFC 6887 §11.4: the nonce tells requests apart
    if key[0] != "natpmp" or isinstance(response, natpmp.ExternalAddressResponse):
        return None
    if int(response.opcode) != key[1]:
        return "wrong opcode"
    return "wrong internal port"


@attrs.define
class TransportStats:
    sent: int = 0
    received: int = 0
    foreign: int = 0  # from an address or port other than the server's
    malformed: int = 0
    unmatched: int = 0  # valid, but no request was waiting for it
    refused: int = 0  # ICMP port unreachable
    link_errors: int = 0  # other socket errors (EPERM, ENOBUFS, ...)


@attrs.define(eq=False)
class _Waiter:
    key: tuple[Hashable, ...]
    event: trio.Event = attrs.Factory(trio.Event)
    response: Response | None = None
    error: BaseException | None = None
    # Datagrams that arrived while this request waited and were rejected, by
    # why (NoAnswer.ignored).
    ignored: Counter[str] = attrs.Factory(Counter)
    asked_at: float | None = None  # when the request was first sent

    @property
    def pending(self) -> bool:
        return self.response is None and self.error is None


# observer(response, now, matched, asked_at): *asked_at* is when the request
# it answers was first sent (*now* for an unsolicited one). The server stamped
# its epoch somewhere in between: a reply that waited in a busy server's queue
# must not look like a clock that stood still (EpochTracker).
Observer = Callable[[Response, float, bool, float], None]


class Transport:
    """Requests and responses on one :class:`DatagramLink`.

    Run :meth:`run` in a nursery (it is the receive loop), then call
    :meth:`request` from any number of tasks.

    *observer* is called as ``observer(response, now, matched, asked_at)`` for every
    valid response from the server, before it is handed to its request.

    Socket errors never end :meth:`run`: ICMP port unreachable fails every
    waiting request with ``ConnectionRefusedError`` (the fast "closed" path);
    any other error (EPERM from a host firewall, ENETUNREACH, ENOBUFS, ...)
    fails the request(s) it concerns with :class:`~portbroker.errors.LinkError`.

    Rejected datagrams (wrong source, malformed, wrong nonce, opcode or
    internal port) are counted against the requests waiting when they arrive,
    so a request that ends unanswered says what came back instead
    (:class:`~portbroker.errors.NoAnswer` ``ignored``). A reply that another
    waiting request takes is not "ignored" by anyone; announcements and the
    other protocol's messages are not counted either (see :func:`_mismatch`).
    """

    def __init__(self, link: DatagramLink, observer: Observer | None = None) -> None:
        self.link = link
        self.observer = observer
        self.stats = TransportStats()
        self._waiters: dict[tuple[Hashable, ...], set[_Waiter]] = {}
        # key -> (first send of its oldest unanswered request, last send of any)
        self._unanswered: dict[tuple[Hashable, ...], tuple[float, float]] = {}
        self._refused_at: float | None = None
        self._target = _target(link.remote)
        self._logged_errnos: set[int] = set()
        # The server's (address, port) as the link last wrote a datagram's
        # source that passed _foreign; one per datagram is otherwise parsed.
        self._server_source: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive loop; runs until cancelled (or the link is closed), whatever
        the socket reports."""
        task_status.started()
        failures = 0
        while True:
            try:
                data, source = await self.link.receive()
            except trio.ClosedResourceError:
                # Someone closed the link under us: nothing more will arrive.
                closed = OSError(errno.EBADF, "the link was closed")
                self._fail_all(LinkError("receive from", self._target, closed))
                return
            except OSError as exc:
                failures += 1
                self._receive_failed(exc)
                if failures > 1:
                    await trio.sleep(min(_RECEIVE_RETRY * 2 ** (failures - 2), _RECEIVE_RETRY_MAX))
                continue
            failures = 0
            self._deliver(data, source)
            self._drain()

    def _drain(self) -> None:
        """Deliver what the link holds already (up to :data:`MAX_DRAIN`) without yielding.

        One datagram per pass through trio's scheduler starves this loop when
        thousands of requests are in flight: each pass runs every task that
        is ready, answers wait in the socket until their requests time out,
        and the retransmissions add to the load (benchmarks/scale.py saw
        50,000 mappings collapse so). A link without ``receive_nowait`` (a
        memory link) is read one datagram at a time, as before.
        """
        receive_nowait = getattr(self.link, "receive_nowait", None)
        if receive_nowait is None:
            return
        stats = self.stats
        rejected = 0
        for _ in range(MAX_DRAIN):
            try:
                got = receive_nowait()
            except OSError as exc:
                self._receive_failed(exc)
                return
            if got is None:
                return
            before = stats.foreign + stats.malformed + stats.unmatched
            self._deliver(*got)
            if stats.foreign + stats.malformed + stats.unmatched != before:
                rejected += 1
                if rejected >= MAX_DRAIN_REJECTED:
                    return  # the rest waits for the next pass (see MAX_DRAIN_REJECTED)

    def _receive_failed(self, exc: OSError) -> None:
        if exc.errno == errno.ECONNREFUSED:
            # ICMP port unreachable: nobody serves this port. Everyone waiting
            # learns it now; later sends may still succeed.
            self.stats.refused += 1
            self._refused_at = trio.current_time()
            self._fail_all(exc)
            return
        # Anything else the socket reports (ICMP host unreachable, ENOBUFS...)
        # is about the socket, so about every request on it.
        self.stats.link_errors += 1
        self._log_once(exc, "receive from")
        self._fail_all(LinkError("receive from", self._target, exc))

    def _log_once(self, exc: OSError, action: str) -> None:
        code = exc.errno or 0
        if code not in self._logged_errnos:
            self._logged_errnos.add(code)
            logger.warning("%s", LinkError(action, self._target, exc))

    def _pending(self) -> Iterator[_Waiter]:
        for group in self._waiters.values():
            for waiter in group:
                if waiter.pending:
                    yield waiter

    def _ignore_all(self, reason: str) -> None:
        for waiter in self._pending():
            waiter.ignored[reason] += 1

    def _deliver(self, data: bytes, source: tuple[str, int]) -> None:
        why = self._foreign(source)
        if why is not None:
            self.stats.foreign += 1
            self._ignore_all(why)
            return
        try:
            response = decode_datagram(data)
        except MalformedMessage:
            self.stats.malformed += 1
            self._ignore_all("malformed")
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
            # Solicited only when it named its request: a reply that answers
            # "every request of that opcode" is a hint, whoever sent it.
            named = exact is not None
            now = trio.current_time()
            asked = [w.asked_at for w in waiters if w.asked_at is not None]
            if asked and exact is not None:
                earlier = self._unanswered.get(exact)
                if earlier is not None and now - earlier[1] < LATE_ANSWER_MEMORY:
                    asked.append(earlier[0])
            self.observer(response, now, bool(waiters) and named, min(asked, default=now))
        if not waiters:
            self.stats.unmatched += 1
            self._count_rejected(response)
        for waiter in waiters:
            if waiter.pending:
                waiter.response = response
                waiter.event.set()

    def _count_rejected(self, response: Response) -> None:
        """Count a reply no request took against the requests it was likely meant for.

        Those of its opcode if any waits (they learn "nonce mismatch" or
        "wrong internal port"); otherwise every request of its protocol
        ("wrong opcode"): while MAP requests wait, a stray MAP reply is not
        "ignored" by a waiting ANNOUNCE.
        """
        pending = list(self._pending())
        opcode = (
            "pcp" if isinstance(response, pcp.PcpResponse) else "natpmp",
            int(response.opcode),
        )
        same_opcode = [w for w in pending if w.key[:2] == opcode]
        for waiter in same_opcode or pending:
            reason = _mismatch(response, waiter.key)
            if reason is not None:
                waiter.ignored[reason] += 1

    def _foreign(self, source: tuple[str, int]) -> str | None:
        """None if *source* is the server; else why not (RFC 6887 §8.3, RFC 6886 §3.1)."""
        if source == self._server_source:
            return None  # as the last datagram that passed: no need to parse it again
        try:
            address = to_address(ip_address(source[0].split("%")[0]))
        except ValueError:
            return "wrong source address"
        if address != unscoped(self.link.remote[0]):
            return "wrong source address"
        if source[1] != self.link.remote[1]:
            return "wrong source port"
        self._server_source = source
        return None

    def _fail_all(self, error: BaseException) -> None:
        for waiter in self._pending():
            waiter.error = error
            waiter.event.set()

    def _send_failed(self, exc: OSError) -> BaseException:
        """The error this request gets for a failed send; others may get it too."""
        if exc.errno == errno.ECONNREFUSED:
            # The socket's pending ICMP port unreachable (from any earlier
            # datagram) surfaces on send and is cleared by it: every waiter
            # must hear of it, not only this one.
            self.stats.refused += 1
            self._refused_at = trio.current_time()
            self._fail_all(exc)
            return exc
        self.stats.link_errors += 1
        self._log_once(exc, "send to")
        error = LinkError("send to", self._target, exc)
        if exc.errno in _SOCKET_WIDE:
            self._fail_all(error)
        # EPERM (a netfilter DROP in OUTPUT), ENOBUFS, EADDRNOTAVAIL...: this
        # send failed; the others find out on their own next send.
        return error

    async def request(
        self, payload: bytes, key: tuple[Hashable, ...], schedule: Iterable[float]
    ) -> Response:
        """Send *payload* on *schedule* until a response matching *key* arrives.

        Each value of *schedule* is how long to wait after a send before
        sending again; when it runs out, :class:`NoAnswer`. Bound endless
        schedules with a cancel scope: if replies did arrive but were all
        rejected, the request ends a moment before that scope's deadline with
        a NoAnswer naming them, so the caller learns more than "timed out".

        Raises:
            ConnectionRefusedError: the server's port is closed (ICMP).
            LinkError: the local network stack would not send or receive.
            NoAnswer: the schedule ran out (``ignored`` counts rejected replies).
        """
        if self._refused_at is not None and trio.current_time() - self._refused_at < REFUSAL_MEMORY:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, "refused (ICMP port unreachable) a moment ago"
            )
        waiter = _Waiter(key)
        self._waiters.setdefault(key, set()).add(waiter)
        sends = 0
        try:
            for wait in schedule:
                sends += 1
                if not math.isfinite(wait) or wait <= 0:
                    raise ValueError(f"bad retransmission interval {wait!r}")
                self.stats.sent += 1
                if waiter.asked_at is None:
                    waiter.asked_at = trio.current_time()
                try:
                    await self.link.send(payload)
                except OSError as exc:
                    error = self._send_failed(exc)
                    if waiter.response is not None:
                        return waiter.response
                    if error is exc:
                        raise
                    raise error from exc
                resend_at = trio.current_time() + wait
                while True:
                    with trio.move_on_at(min(resend_at, _report_at())):
                        await waiter.event.wait()
                    settled = _settled(waiter)
                    if settled is not None:
                        return settled
                    now = trio.current_time()
                    if now >= resend_at:
                        break
                    if now < _report_at():
                        continue  # the budget was extended meanwhile
                    # Our own budget is a moment away from its end.
                    if waiter.ignored:
                        raise self._no_answer(waiter)
                    # Nothing to add to a plain timeout: let it come.
                    with trio.move_on_at(resend_at):
                        await waiter.event.wait()
                    settled = _settled(waiter)
                    if settled is not None:
                        return settled
                    break
            raise self._no_answer(waiter)
        finally:
            group = self._waiters[key]
            group.discard(waiter)
            if not group:
                del self._waiters[key]
            # Unanswered, or answered after a retransmission: an answer to an
            # earlier send (stamped then) may still come, and the next request
            # with this key (a PCP renewal keeps its nonce) would take it. A
            # broker too busy to read its socket for a while (benchmarks/
            # scale.py, 10,000 creates) got such copies in a renewal and saw
            # "pcp epoch too-fast" on a healthy server.
            if waiter.asked_at is not None and (waiter.response is None or sends > 1):
                self._remember_unanswered(key, waiter.asked_at)

    def _remember_unanswered(self, key: tuple[Hashable, ...], asked_at: float) -> None:
        now = trio.current_time()
        first, last = self._unanswered.pop(key, (asked_at, now))
        if now - last >= LATE_ANSWER_MEMORY:
            first = asked_at
        # Re-inserted, so the dict stays ordered by last send: expired
        # entries are at its front.
        self._unanswered[key] = (min(first, asked_at), now)
        for old, (_, last) in list(itertools.islice(self._unanswered.items(), 8)):
            if now - last < LATE_ANSWER_MEMORY:
                break
            del self._unanswered[old]

    def _no_answer(self, waiter: _Waiter) -> NoAnswer:
        return NoAnswer(f"no answer from {self._target}", ignored=dict(waiter.ignored))


# -- announcements ------------------------------------------------------------


async def listen_announcements(
    gateway: IPAddress,
    port: int,
    server_port: int,
    deliver: Callable[[Response, float], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Take PCP ANNOUNCE and NAT-PMP address announcements on UDP *port*.

    RFC 6887 §14.1 / RFC 6886 §3.2.1: they arrive multicast to 224.0.0.1 (or
    ff02::1) and unicast; several processes may listen, hence
    SO_REUSEADDR/SO_REUSEPORT. Only datagrams from exactly
    (*gateway*, *server_port*) that decode are handed to
    ``deliver(response, now)``; the rest are dropped. What they mean is the
    caller's business: an announcement is a hint to ask the gateway, never a
    fact (anyone on the link can send one).

    If the port cannot be bound, that is logged once and this returns (after
    ``task_status.started()``): the epoch check on every solicited response
    still catches a reboot. No socket error escapes.
    """
    family = socket.AF_INET6 if isinstance(gateway, IPv6Address) else socket.AF_INET
    try:
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        logger.warning("cannot listen for announcements on UDP %d: %s", port, exc)
        task_status.started()
        return
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
        _join_all_nodes(sock, family)
        task_status.started()
        logged: set[int] = set()
        failures = 0
        while True:
            try:
                data, source = await sock.recvfrom(MAX_DATAGRAM)
            except OSError as exc:
                # An unconnected socket can still carry a pending ICMP error;
                # a broken one keeps failing: log once per errno, slow down.
                failures += 1
                if exc.errno not in logged:
                    logged.add(exc.errno or 0)
                    logger.warning("announcement listener on UDP %d: %s", port, exc)
                await trio.sleep(min(_RECEIVE_RETRY * 2 ** (failures - 1), _RECEIVE_RETRY_MAX))
                continue
            failures = 0
            try:
                address = to_address(ip_address(str(source[0]).split("%")[0]))
                if (address, source[1]) != (unscoped(gateway), server_port):
                    continue
                response = decode_datagram(data)
            except (ValueError, PortBrokerError):
                continue
            deliver(response, trio.current_time())


def _join_all_nodes(sock: trio.socket.SocketType, family: int) -> None:
    """Join the all-nodes group the announcements go to (RFC 6887 §14.1).

    The kernel has every interface in 224.0.0.1 / ff02::1 already, so a
    failure here (no multicast route, no IPv6) costs nothing: logged at debug.
    """
    try:
        if family == socket.AF_INET:
            sock.setsockopt(
                socket.IPPROTO_IP,
                socket.IP_ADD_MEMBERSHIP,
                pcp.ANNOUNCE_MULTICAST_V4.packed + socket.inet_aton("0.0.0.0"),
            )
        else:
            sock.setsockopt(
                socket.IPPROTO_IPV6,
                socket.IPV6_JOIN_GROUP,
                pcp.ANNOUNCE_MULTICAST_V6.packed + struct.pack("@I", 0),
            )
    except OSError as exc:
        logger.debug("joining the announcement group: %s", exc)
