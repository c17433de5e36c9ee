"""Clients of the portbroker daemon: one for trio, one for blocking code.

    async with portbroker.client.open_client() as client:
        mapping = await client.map(8080, "tcp")
        async for event in client.watch(): ...

    with portbroker.client.BlockingClient() as client:
        print(client.map(8080, "tcp", persist=True))

The socket is found by the *path* argument, then $PORTBROKER_SOCKET, then the
default path (``/run/portbroker/portbroker.sock`` for root,
``$XDG_RUNTIME_DIR/portbroker.sock`` otherwise). Errors the daemon reports
raise :class:`DaemonRequestError` with its stable ``code``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio

from portbroker.errors import PortBrokerError
from portbroker.types import DEFAULT_LIFETIME

__all__ = [
    "ENV_SOCKET",
    "BlockingClient",
    "Client",
    "DaemonNotRunning",
    "DaemonRequestError",
    "open_client",
    "socket_path",
]

ENV_SOCKET = "PORTBROKER_SOCKET"


class DaemonNotRunning(PortBrokerError):
    """No daemon listens on the socket path."""


class DaemonRequestError(PortBrokerError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


def socket_path(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_SOCKET):
        return Path(os.environ[ENV_SOCKET])
    from portbroker.daemon.server import default_socket_path

    return default_socket_path()


def _map_params(
    port: int,
    protocol: str,
    lifetime: int,
    external_port: int | None,
    exact: bool,
    persist: bool,
    via: str | None,
) -> dict[str, Any]:
    return {
        "port": port,
        "protocol": protocol,
        "lifetime": lifetime,
        "external_port": external_port,
        "exact": exact,
        "persist": persist,
        "via": via,
    }


def _result(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    raise DaemonRequestError(str(error.get("code")), str(error.get("message")), error)


class Client:
    """A trio client; create it with :func:`open_client`."""

    def __init__(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._lock = trio.Lock()
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if "event" in message:
                        self._events_send.send_nowait(message)
                    elif isinstance(message.get("id"), int) and message["id"] in self._waiting:
                        self._waiting.pop(message["id"]).send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._events_send.close()
            for channel in self._waiting.values():
                channel.close()

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its successful reply.

        Raises:
            DaemonRequestError: the daemon refused it.
            DaemonNotRunning: the connection closed.
        """
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        line = json.dumps({"id": request_id, "op": op, **params}).encode() + b"\n"
        try:
            async with self._lock:
                await self._stream.send_all(line)
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise DaemonNotRunning("the daemon closed the connection") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise DaemonNotRunning("the daemon closed the connection") from exc
        finally:
            self._waiting.pop(request_id, None)
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
    ) -> dict[str, Any]:
        reply = await self.request(
            "map", **_map_params(port, protocol, lifetime, external_port, exact, persist, via)
        )
        return dict(reply["mapping"])

    async def unmap(self, port: int, protocol: str = "tcp") -> str:
        return str((await self.request("unmap", port=port, protocol=protocol))["unmapped"])

    async def list(self) -> list[dict[str, Any]]:
        return list((await self.request("list"))["mappings"])

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Events of the caller's mappings (all, for root) until the connection ends."""
        await self.request("watch")
        async for event in self._events:
            yield event


@contextlib.asynccontextmanager
async def open_client(path: str | Path | None = None) -> AsyncIterator[Client]:
    target = socket_path(path)
    try:
        stream = await trio.open_unix_socket(str(target))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(f"no portbroker daemon at {target}") from exc
    async with stream, trio.open_nursery() as nursery:
        yield Client(stream, nursery)
        nursery.cancel_scope.cancel()


class BlockingClient:
    """For programs without an event loop. Not thread-safe; one request at a time."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 60.0) -> None:
        self.path = socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonNotRunning(f"no portbroker daemon at {self.path}") from exc
        self._reader = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self._sock.sendall(json.dumps({"id": request_id, "op": op, **params}).encode() + b"\n")
        for message in self._messages():
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == request_id:
                return _result(message)
        raise DaemonNotRunning("the daemon closed the connection")

    def _messages(self) -> Iterator[dict[str, Any]]:
        for line in self._reader:
            yield json.loads(line)

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
    ) -> dict[str, Any]:
        reply = self.request(
            "map", **_map_params(port, protocol, lifetime, external_port, exact, persist, via)
        )
        return dict(reply["mapping"])

    def unmap(self, port: int, protocol: str = "tcp") -> str:
        return str(self.request("unmap", port=port, protocol=protocol)["unmapped"])

    def list(self) -> list[dict[str, Any]]:
        return list(self.request("list")["mappings"])

    def watch(self) -> Iterator[dict[str, Any]]:
        """Events until the connection ends (blocks between them)."""
        self.request("watch")
        yield from self.events
        self.events.clear()
        for message in self._messages():
            if "event" in message:
                yield message
