"""Clients of the portbroker daemon: one sans-IO core, a trio client and a blocking one.

    async with portbroker.client.open_client() as client:
        mapping = await client.map(8080, "tcp")
        async for event in client.watch(): ...

    with portbroker.client.BlockingClient() as client:
        print(client.map(8080, "tcp", persist=True))

:class:`ClientCore` is the protocol (docs/daemon-protocol.md) without I/O: it
numbers requests, encodes them and cuts what the daemon sends into replies,
routed to their request's id, and events; both clients only move its bytes. A
line from the daemon that is not valid JSON, or longer than the protocol
allows, is :class:`DaemonProtocolError` (the connection is then unusable),
never a parser's exception.

The socket is found by the *path* argument, then ``$PORTBROKER_SOCKET``, then
the system daemon's ``/run/portbroker/portbroker.sock`` whenever it exists (for
every user), then the user's own (``$XDG_RUNTIME_DIR/portbroker.sock``).
Errors the daemon reports raise :class:`DaemonRequestError` with its stable
``code``; a socket the user may not open raises :class:`DaemonAccessDenied`.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import itertools
import json
import math
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from portbroker._basics import DEFAULT_LIFETIME
from portbroker.daemon import framing
from portbroker.daemon.framing import MAX_LINE
from portbroker.daemon.paths import ENV_SOCKET
from portbroker.errors import PortBrokerError

# trio only where the trio client runs (and no attrs, no portbroker.types): the blocking client (and so
# `portbroker list` and `map` through the daemon) does without it, and
# importing it is most of a short command's time (benchmarks/cli_daemon.py).
if TYPE_CHECKING:
    import trio

__all__ = [
    "ENV_SOCKET",
    "BlockingClient",
    "Client",
    "ClientCore",
    "DaemonAccessDenied",
    "DaemonNotRunning",
    "DaemonProtocolError",
    "DaemonRequestError",
    "Event",
    "Reply",
    "open_client",
    "socket_path",
]

RECEIVE_SIZE = 65536


class DaemonNotRunning(PortBrokerError):
    """No daemon listens on the socket path (or it closed the connection)."""


class DaemonAccessDenied(PortBrokerError):
    """The daemon's socket exists but this user may not open it.

    ``path`` is the socket, ``group`` the group that may use it (None when it
    cannot be told).
    """

    def __init__(self, path: Path, group: str | None, detail: str) -> None:
        self.path = path
        self.group = group
        if group is not None:
            todo = f"ask the administrator to add you to group {group!r} (then log in again)"
        else:
            todo = "ask the administrator for access"
        super().__init__(
            f"permission denied on the portbroker daemon's socket {path} ({detail}): "
            f"{todo}, or use another daemon's socket with --socket PATH or ${ENV_SOCKET}"
        )


class DaemonProtocolError(PortBrokerError):
    """The daemon sent something that is not its protocol (or the peer is no daemon)."""


class DaemonRequestError(PortBrokerError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


def socket_path(explicit: str | Path | None = None) -> Path:
    """The socket a client connects to (see the module's docstring for the order)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_SOCKET):
        return Path(os.environ[ENV_SOCKET])
    # Not from the server module, which imports the broker (and trio).
    from portbroker.daemon.paths import connect_socket_path

    return connect_socket_path()


def access_denied(path: Path) -> DaemonAccessDenied:
    """The error for a socket at *path* that refused us (EACCES/EPERM), naming
    the group that may use it: the socket's, or that of the directory that
    keeps us from even seeing it."""
    for where in (path, path.parent):
        try:
            info = where.stat()
        except OSError:
            continue
        try:
            group: str | None = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        kind = "socket" if stat.S_ISSOCK(info.st_mode) else "directory"
        detail = f"{kind} {where}: group {group}, mode {stat.S_IMODE(info.st_mode):04o}"
        # Membership helps only where the group has access (a socket: rw; a
        # directory: x): advice to join group 'root' of a 0600 socket grants
        # nothing, and is advice to give a user root's group.
        needed = 0o060 if kind == "socket" else 0o010
        if info.st_mode & needed != needed:
            return DaemonAccessDenied(path, None, f"{detail}: only its owner may use it")
        return DaemonAccessDenied(path, group, detail)
    return DaemonAccessDenied(path, None, "its directory cannot be read")


def _unusable(path: Path, exc: OSError) -> DaemonNotRunning:
    """No daemon can listen at *path* (a symlink loop, a file where a directory
    should be, a path too long for a Unix socket): said of the path, not as
    "cannot use the network"."""
    return DaemonNotRunning(f"no portbroker daemon at {path} ({exc.strerror or exc})")


class Reply(NamedTuple):
    """The reply to request ``id`` (the whole line, ``ok`` included)."""

    id: int
    message: dict[str, Any]


class Event(NamedTuple):
    """An event line (after ``watch``)."""

    message: dict[str, Any]


# Error codes the daemon sends, with no id, on a connection it is closing.
CLOSING_CODES: Final = frozenset({"too_many_connections", "idle"})


CLOSE_READ_TIMEOUT: Final = 1.0  # how long a failed send waits to read the daemon's reason
# A reply line may be far longer than a request: root's ``list`` describes
# every user's mappings (some 350 bytes each), 100,000 of them included. Still
# bounded, so that something else on the socket cannot fill our memory.
MAX_REPLY_LINE: Final = 64 * 1024 * 1024


class ClientCore:
    """The client's side of the protocol, sans-IO.

    :meth:`request` returns the id and the line to send; :meth:`receive` takes
    bytes from the daemon and returns the :class:`Reply` objects (for pending
    ids only) and :class:`Event` objects they completed; :meth:`end` is the end
    of the stream.
    """

    def __init__(self, max_line: int = MAX_LINE, max_reply_line: int | None = None) -> None:
        if max_reply_line is None:
            max_reply_line = MAX_REPLY_LINE
        self._ids = itertools.count(1)
        self._framer = framing.LineFramer(max_reply_line)
        self._pending: set[int] = set()
        self.max_line = max_line  # of a request (the daemon's bound)
        self.max_reply_line = max_reply_line
        # Why the daemon is closing this connection, when it said so (a line
        # with no id: too many connections from this user, or idle).
        self.closing: DaemonRequestError | None = None

    def request(self, op: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """A new request: its id and its line.

        Raises:
            DaemonRequestError: ``bad_request`` (a parameter JSON cannot carry,
                such as NaN) or ``line_too_long``, as the daemon would answer.
        """
        request_id = next(self._ids)
        try:
            line = framing.encode({"id": request_id, "op": op, **params})
        except framing.FramingError as exc:
            raise DaemonRequestError("bad_request", str(exc), {}) from None
        if len(line) - 1 > self.max_line:
            raise DaemonRequestError(
                "line_too_long",
                f"the request is {len(line) - 1} bytes; a line may be at most {self.max_line}",
                {},
            )
        self._pending.add(request_id)
        return request_id, line

    def forget(self, request_id: int) -> None:
        """A reply to *request_id* is no longer awaited (it is dropped if it comes)."""
        self._pending.discard(request_id)

    def receive(self, data: bytes) -> list[Reply | Event]:
        """Bytes from the daemon -> the replies and events they completed.

        Raises:
            DaemonProtocolError: a line too long, not JSON, or not an object.
        """
        out: list[Reply | Event] = []
        for line in self._framer.feed(data):
            if isinstance(line, framing.LineTooLong):
                raise DaemonProtocolError(
                    f"the daemon sent a line over {line.limit} bytes; is this a portbroker daemon?"
                )
            if line.strip():
                item = self._message(line)
                if item is not None:
                    out.append(item)
        return out

    def end(self) -> None:
        """The daemon closed the connection.

        Raises:
            DaemonProtocolError: it stopped in the middle of a line.
        """
        if self._framer.close() is not None:
            raise DaemonProtocolError("the daemon closed the connection in the middle of a line")

    def _message(self, line: bytes) -> Reply | Event | None:
        try:
            message = framing.parse_line(line, max_line=self.max_reply_line)
        except framing.FramingError as exc:
            raise DaemonProtocolError(
                f"the daemon sent a malformed line ({exc}); is this a portbroker daemon?"
            ) from None
        if not isinstance(message, dict):
            raise DaemonProtocolError(
                f"the daemon sent a JSON {type(message).__name__}, not an object"
            )
        if "event" in message:
            # {"event": NAME, "mapping": {...}, "detail": {...}}
            # (docs/daemon-protocol.md): what watchers print from.
            mapping = message.get("mapping")
            if not (
                isinstance(message["event"], str)
                and isinstance(mapping, dict)
                and isinstance(mapping.get("id"), str)
            ):
                raise DaemonProtocolError(
                    f"the daemon sent an event without a name and a mapping"
                    f" ({_clipped(message)}); is this a portbroker daemon?"
                )
            return Event(message)
        request_id = message.get("id")
        if type(request_id) is int and request_id in self._pending:
            self._pending.discard(request_id)
            return Reply(request_id, message)
        error = message.get("error")
        # The code is checked to be a string first: a list or an object is
        # no closing notice (and not hashable).
        if (
            request_id is None
            and isinstance(error, dict)
            and isinstance(error.get("code"), str)
            and error["code"] in CLOSING_CODES
        ):
            self.closing = DaemonRequestError(str(error["code"]), str(error.get("message")), error)
        # A reply to no request of ours (an error about a line we never sent):
        # nothing waits for it.
        return None


def _map_params(
    port: int,
    protocol: str,
    lifetime: int,
    external_port: int | None,
    exact: bool,
    persist: bool,
    via: str | None,
    internal_address: str | None = None,
    filters: Sequence[str] = (),
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "port": port,
        "protocol": protocol,
        "lifetime": lifetime,
        "external_port": external_port,
        "exact": exact,
        "persist": persist,
        "via": via,
    }
    # Sent only when used: a third-party mapping or filters
    # (docs/third-party-and-filter.md).
    if internal_address is not None:
        params["internal_address"] = str(internal_address)
    if filters:
        params["filters"] = [str(f) for f in filters]
    return params


def _publish_params(
    port: int, protocol: str, service_type: str, name: str, txt: dict[str, str] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"port": port, "protocol": protocol, "type": service_type}
    params["name"] = name
    if txt:
        params["txt"] = dict(txt)
    return params


def _result(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    error = reply.get("error")
    # An error is {"code": "...", "message": "..."} (docs/daemon-protocol.md):
    # anything else is not the daemon's protocol, and "None: None" would be
    # no explanation.
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        raise DaemonProtocolError(
            f"the daemon refused a request without an error code ({_clipped(error)});"
            " is this a portbroker daemon?"
        )
    raise DaemonRequestError(error["code"], str(error.get("message")), error)


def _clipped(value: object, limit: int = 80) -> str:
    """*value* as JSON, cut to *limit* characters (it may be a daemon's whole line)."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(reply: dict[str, Any], op: str, key: str, kind: type) -> Any:
    """``reply[key]``, which the protocol makes a *kind* (docs/daemon-protocol.md's
    table of ops): a daemon that answers otherwise is not speaking it, which is
    DaemonProtocolError, not a KeyError or TypeError of ours."""
    value = reply.get(key)
    if not isinstance(value, kind):
        raise DaemonProtocolError(
            f"the daemon's reply to {op} has no {key!r} {_KINDS[kind]}"
            f" ({_clipped(value)}); is this a portbroker daemon?"
        )
    return value


_KINDS: Final[dict[type, str]] = {dict: "object", list: "list", str: "string"}


def _mapping(value: object, op: str) -> dict[str, Any]:
    """A mapping object of a reply: an object with a string ``id`` at least."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise DaemonProtocolError(
            f"the daemon's reply to {op} holds {_clipped(value)}, not a mapping;"
            " is this a portbroker daemon?"
        )
    return dict(value)


def _mappings(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return [_mapping(item, "list") for item in _field(reply, "list", "mappings", list)]


class Client:
    """A trio client; create it with :func:`open_client`."""

    def __init__(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        import trio

        self._stream = stream
        self._core = ClientCore()
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._lock = trio.Lock()
        self._failure: DaemonProtocolError | None = None
        self._reading = True
        self._read_done = trio.Event()
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        import trio

        try:
            while True:
                chunk = await self._stream.receive_some(RECEIVE_SIZE)
                if not chunk:
                    self._core.end()
                    break
                for item in self._core.receive(chunk):
                    if isinstance(item, Event):
                        self._events_send.send_nowait(item.message)
                    else:
                        channel = self._waiting.pop(item.id, None)
                        if channel is not None:
                            channel.send_nowait(item.message)
        except DaemonProtocolError as exc:
            self._failure = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._reading = False
            self._read_done.set()
            self._events_send.close()
            for channel in self._waiting.values():
                channel.close()
            self._waiting.clear()

    def _closed(self) -> PortBrokerError:
        return (
            self._core.closing
            or self._failure
            or DaemonNotRunning("the daemon closed the connection")
        )

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its successful reply.

        Raises:
            DaemonRequestError: the daemon refused it.
            DaemonNotRunning: the connection closed.
            DaemonProtocolError: the daemon sent something malformed.
        """
        import trio

        request_id, line = self._core.request(op, params)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        try:
            if not self._reading:  # nothing would ever answer
                raise self._closed()
            async with self._lock:
                await self._stream.send_all(line)
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise self._closed() from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # The daemon may have said why before it closed: let it be read.
            with trio.move_on_after(CLOSE_READ_TIMEOUT):
                await self._read_done.wait()
            raise self._closed() from exc
        finally:
            self._waiting.pop(request_id, None)
            self._core.forget(request_id)
        return _result(reply)

    async def hello(self) -> dict[str, Any]:
        return await self.request("hello", versions=[1])

    async def probe(self) -> dict[str, Any]:
        return await self.request("probe")

    async def map(
        self,
        port: int,
        protocol: str = "tcp",
        *,
        lifetime: int = DEFAULT_LIFETIME,
        external_port: int | None = None,
        exact: bool = False,
        persist: bool = False,
        via: str | None = None,
        internal_address: str | None = None,
        filters: Sequence[str] = (),
    ) -> dict[str, Any]:
        reply = await self.request(
            "map",
            **_map_params(
                port,
                protocol,
                lifetime,
                external_port,
                exact,
                persist,
                via,
                internal_address,
                filters,
            ),
        )
        return _mapping(reply.get("mapping"), "map")

    async def unmap(self, port: int, protocol: str = "tcp") -> str:
        reply = await self.request("unmap", port=port, protocol=protocol)
        return str(_field(reply, "unmap", "unmapped", str))

    async def list(self) -> list[dict[str, Any]]:
        return _mappings(await self.request("list"))

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Events of the caller's mappings (all, for root) until the connection ends.

        Raises:
            DaemonProtocolError: the connection ended on a malformed line.
        """
        await self.request("watch")
        async for event in self._events:
            yield event
        if self._failure is not None:
            raise self._failure

    async def publish(
        self,
        port: int,
        protocol: str = "tcp",
        *,
        service_type: str,
        name: str,
        txt: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Publish the mapping of *port*/*protocol* as a DNS-SD service (docs/dnssd.md).

        It stays published until :meth:`unpublish` or the mapping's end.
        """
        reply = await self.request(
            "publish", **_publish_params(port, protocol, service_type, name, txt)
        )
        return dict(_field(reply, "publish", "published", dict))

    async def unpublish(
        self, port: int, protocol: str = "tcp", *, service_type: str, name: str
    ) -> dict[str, Any]:
        reply = await self.request(
            "unpublish", **_publish_params(port, protocol, service_type, name, None)
        )
        return dict(_field(reply, "unpublish", "unpublished", dict))


@contextlib.asynccontextmanager
async def open_client(path: str | Path | None = None) -> AsyncIterator[Client]:
    """A :class:`Client` connected to the daemon at *path* (:func:`socket_path`).

    Raises:
        DaemonNotRunning: nothing listens there.
        DaemonAccessDenied: this user may not open the socket.

    An exception raised in the block leaves it as itself (not in an
    ExceptionGroup).
    """
    import trio

    from portbroker._util import collapse_single

    target = socket_path(path)
    try:
        stream = await trio.open_unix_socket(str(target))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(f"no portbroker daemon at {target}") from exc
    except PermissionError as exc:
        raise access_denied(target) from exc
    except OSError as exc:
        raise _unusable(target, exc) from exc
    # The nursery is the client's own (its reader): what the caller's block
    # raises comes out as itself, not wrapped in an ExceptionGroup.
    with collapse_single():
        async with stream, trio.open_nursery() as nursery:
            yield Client(stream, nursery)
            nursery.cancel_scope.cancel()


class BlockingClient:
    """For programs without an event loop. Not thread-safe; one request at a time.

    Raises (from the constructor) DaemonNotRunning or DaemonAccessDenied as
    :func:`open_client` does, or TimeoutError when the daemon accepts no
    connection within *timeout* (its listen queue full: stopped or stuck); a
    request that outlives *timeout* raises TimeoutError (None: no timeout, as
    the trio client).
    """

    def __init__(self, path: str | Path | None = None, *, timeout: float | None = 60.0) -> None:
        self.path = socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(timeout)
        except TimeoutError:
            self._sock.close()
            raise
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonNotRunning(f"no portbroker daemon at {self.path}") from exc
        except PermissionError as exc:
            self._sock.close()
            raise access_denied(self.path) from exc
        except OSError as exc:
            self._sock.close()
            raise _unusable(self.path, exc) from exc
        self._core = ClientCore()
        self._received: collections.deque[Reply | Event] = collections.deque()
        self._ended = False
        self._failure: DaemonProtocolError | None = None
        self.events: list[dict[str, Any]] = []

    def _connect(self, timeout: float | None) -> None:
        """Connect, waiting up to *timeout* for a daemon whose listen queue is full.

        With a timeout the socket does not block, and a Unix socket's full
        queue (a daemon stopped or stuck, not accepting) is EAGAIN at once:
        that is a daemon not answering (TimeoutError), not none there.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(self.path))
                return
            except BlockingIOError as exc:
                if deadline is None or time.monotonic() >= deadline:
                    raise TimeoutError(f"the daemon at {self.path} accepts no connection") from exc
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its successful reply (events that come
        first are kept in :attr:`events`).

        Raises:
            DaemonRequestError: the daemon refused it.
            DaemonNotRunning: the connection closed.
            DaemonProtocolError: the daemon sent something malformed.
        """
        request_id, line = self._core.request(op, params)
        try:
            try:
                self._sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError) as exc:
                self._drain()  # it may have said why before it closed
                raise self._core.closing or DaemonNotRunning(
                    "the daemon closed the connection"
                ) from exc
            for item in self._items():
                if isinstance(item, Event):
                    self.events.append(item.message)
                elif item.id == request_id:
                    return _result(item.message)
        finally:
            self._core.forget(request_id)
        raise self._core.closing or DaemonNotRunning("the daemon closed the connection")

    def _drain(self) -> None:
        """Read what the daemon sent before closing (its reason), briefly."""
        timeout = self._sock.gettimeout()
        self._sock.settimeout(CLOSE_READ_TIMEOUT)
        try:
            while True:
                chunk = self._sock.recv(RECEIVE_SIZE)
                if not chunk:
                    return
                self._received.extend(self._core.receive(chunk))
        except (OSError, DaemonProtocolError):
            return
        finally:
            self._sock.settimeout(timeout)

    def _items(self) -> Iterator[Reply | Event]:
        """What the daemon sends, item by item, until it closes the connection."""
        while True:
            while self._received:
                yield self._received.popleft()
            if self._failure is not None:
                raise self._failure
            if self._ended:
                return
            try:
                chunk = self._sock.recv(RECEIVE_SIZE)
            except ConnectionResetError:
                chunk = b""
            try:
                if not chunk:
                    self._ended = True
                    self._core.end()
                    return
                self._received.extend(self._core.receive(chunk))
            except DaemonProtocolError as exc:
                self._failure = exc  # the stream is out of step: every later call says so
                raise

    def hello(self) -> dict[str, Any]:
        return self.request("hello", versions=[1])

    def probe(self) -> dict[str, Any]:
        return self.request("probe")

    def map(
        self,
        port: int,
        protocol: str = "tcp",
        *,
        lifetime: int = DEFAULT_LIFETIME,
        external_port: int | None = None,
        exact: bool = False,
        persist: bool = False,
        via: str | None = None,
        internal_address: str | None = None,
        filters: Sequence[str] = (),
    ) -> dict[str, Any]:
        reply = self.request(
            "map",
            **_map_params(
                port,
                protocol,
                lifetime,
                external_port,
                exact,
                persist,
                via,
                internal_address,
                filters,
            ),
        )
        return _mapping(reply.get("mapping"), "map")

    def unmap(self, port: int, protocol: str = "tcp") -> str:
        reply = self.request("unmap", port=port, protocol=protocol)
        return str(_field(reply, "unmap", "unmapped", str))

    def list(self) -> list[dict[str, Any]]:
        return _mappings(self.request("list"))

    def watch(self) -> Iterator[dict[str, Any]]:
        """Events until the connection ends (blocks between them)."""
        self.request("watch")
        yield from self.events
        self.events.clear()
        for item in self._items():
            if isinstance(item, Event):
                yield item.message

    def publish(
        self,
        port: int,
        protocol: str = "tcp",
        *,
        service_type: str,
        name: str,
        txt: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """As :meth:`Client.publish`."""
        reply = self.request("publish", **_publish_params(port, protocol, service_type, name, txt))
        return dict(_field(reply, "publish", "published", dict))

    def unpublish(
        self, port: int, protocol: str = "tcp", *, service_type: str, name: str
    ) -> dict[str, Any]:
        reply = self.request(
            "unpublish", **_publish_params(port, protocol, service_type, name, None)
        )
        return dict(_field(reply, "unpublish", "unpublished", dict))
