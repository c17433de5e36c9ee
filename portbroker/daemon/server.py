"""The portbroker daemon: one broker shared by every app on the host.

Apps connect to a Unix socket and speak JSON lines (:mod:`.protocol`). The
daemon knows each client's uid and pid (SO_PEERCRED). A mapping is keyed by its
internal endpoint (protocol, port): two apps of the same user asking for the
same endpoint share one gateway mapping, counted by holds; another user asking
for it gets a conflict. A hold lives as long as its connection, plus a grace
period so that a restarting app can reclaim it, unless it was made with
``persist`` (then until an explicit unmap). Every change is written to the
state file atomically, with PCP nonces, so that after a crash the next daemon
renews what was persisted and deletes what nobody owns any more.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import attrs
import trio
import trio.lowlevel

from portbroker import __version__
from portbroker._util import collapse_single
from portbroker.broker import Broker, Mapping, open_broker
from portbroker.daemon import framing
from portbroker.daemon import protocol as proto
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.state import StateStore, lease_from_record, lease_record
from portbroker.errors import (
    LinkError,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    PortBrokerError,
)
from portbroker.lifecycle import Released, State, event_detail
from portbroker.probe import NoMethodAvailable, report_json
from portbroker.types import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME, MappingRequest

__all__ = [
    "SYSTEM_SOCKET_PATH",
    "DaemonConfig",
    "DaemonError",
    "bind_socket_path",
    "connect_socket_path",
    "default_socket_path",
    "run_daemon",
    "serve",
    "user_socket_path",
]

logger = logging.getLogger("portbroker.daemon")

OUTBOX: Final = 1024  # replies and events queued for a client before it is cut off
IN_FLIGHT: Final = 64  # requests one client may have running at once
SO_PEERCRED_FORMAT: Final = "3i"


class DaemonError(PortBrokerError):
    """The daemon cannot start (socket in use, bad path, bad group)."""


SYSTEM_SOCKET_PATH: Final = Path("/run/portbroker/portbroker.sock")


def user_socket_path() -> Path:
    """A user's own daemon: ``$XDG_RUNTIME_DIR/portbroker.sock``, else under ~/.cache."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "portbroker.sock"
    # No per-user runtime directory (no systemd login session): a private one.
    return Path.home() / ".cache" / "portbroker" / "portbroker.sock"


def default_socket_path() -> Path:
    """Where a daemon started without ``--socket`` binds: :data:`SYSTEM_SOCKET_PATH`
    for root, :func:`user_socket_path` otherwise (a user's daemon never tries
    the system path, even when the system daemon runs).

    Clients look elsewhere first: :func:`connect_socket_path`.
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET_PATH
    return user_socket_path()


def bind_socket_path(explicit: str | Path | None = None) -> Path:
    """The daemon's socket: *explicit* (``--socket``), ``$PORTBROKER_SOCKET``, or
    :func:`default_socket_path`."""
    if explicit:
        return Path(explicit)
    if os.environ.get(proto.ENV_SOCKET):
        return Path(os.environ[proto.ENV_SOCKET])
    return default_socket_path()


def connect_socket_path() -> Path:
    """Where a client connects by default: the system daemon's socket whenever it
    exists, for every user (the daemon the host shares); otherwise the user's
    own (:func:`user_socket_path`), or the system one for root.
    """
    try:
        SYSTEM_SOCKET_PATH.stat()
    except PermissionError:
        # Its directory is closed to us: the system daemon is there, and
        # connecting will say who may use it (DaemonAccessDenied).
        return SYSTEM_SOCKET_PATH
    except OSError:
        return default_socket_path()
    return SYSTEM_SOCKET_PATH


def default_state_path() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/portbroker/daemon-state.json")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "portbroker" / "daemon-state.json"


@attrs.frozen
class DaemonConfig:
    socket_path: Path = attrs.field(factory=default_socket_path, converter=Path)
    state_path: Path = attrs.field(factory=default_state_path, converter=Path)
    gateway: str | None = None
    methods: tuple[str, ...] = ("pcp", "natpmp", "upnp")
    group: str | None = None
    grace: float = 10.0  # seconds a connection-bound mapping outlives its connection
    max_mappings: int = 64  # distinct mappings one uid may hold
    probe_timeout: float = 2.0
    broker_options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Client:
    uid: int
    pid: int
    stream: trio.SocketStream
    outbox: trio.MemorySendChannel[bytes]
    cancel: trio.CancelScope
    watching: bool = False
    version: int = 1
    cut_off: bool = False

    @property
    def label(self) -> str:
        return f"uid {self.uid} pid {self.pid}"

    def send(self, message: bytes) -> None:
        """Queue a line (one of :func:`.protocol.encode`); a client that does not
        read is cut off, and told once in the log."""
        if self.cut_off:
            return
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            # Its writer is stuck in send_all: no error line could reach it.
            logger.warning("client %s does not read its replies: cut off", self.label)
            self.cut_off = True
            self.cancel.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@attrs.define(eq=False)
class Hold:
    uid: int
    pid: int
    persist: bool
    client: Client | None
    grace_until: float | None = None


@attrs.define(eq=False)
class Shared:
    """One gateway mapping and the holds that keep it."""

    protocol: str
    port: int
    owner_uid: int
    mapping: Mapping
    holds: list[Hold] = attrs.Factory(list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.protocol, self.port)

    @property
    def id(self) -> str:
        return f"{self.port}/{self.protocol}"

    def describe(self) -> dict[str, Any]:
        lease = self.mapping.lease
        out: dict[str, Any] = {
            "id": self.id,
            "protocol": self.protocol,
            "internal_port": self.port,
            "owner_uid": self.owner_uid,
            "state": self.mapping.state.value,
            "persist": any(h.persist for h in self.holds),
            "holders": len(self.holds),
        }
        if lease is not None:
            out.update(
                method=lease.method,
                internal_address=str(lease.internal_address),
                external_address=str(lease.external_address),
                external_port=lease.external_port,
                lifetime=lease.lifetime,
                gateway=str(lease.gateway),
                permanent=lease.permanent,
            )
        return out


class Daemon:
    def __init__(self, config: DaemonConfig, broker: Broker, nursery: trio.Nursery) -> None:
        self.config = config
        self.broker = broker
        self._nursery = nursery
        self.shared: dict[tuple[str, int], Shared] = {}
        self.clients: set[Client] = set()
        self.store = StateStore(config.state_path)
        self._pending: dict[tuple[str, int], trio.Event] = {}
        self._dirty = trio.Event()
        self._changes = 0  # generation of the in-memory state
        self._written = 0  # generation the state file holds
        self._wrote = trio.Event()
        self._by_mapping: dict[int, Shared] = {}  # id(Mapping) -> entry, for events
        self._held: dict[int, set[tuple[str, int]]] = {}  # uid -> keys it holds
        # Each entry's state-file record, recomputed only when the entry
        # changes: a write with 10,000 mappings must not redo them all.
        self._record_cache: dict[tuple[str, int], dict[str, Any]] = {}

    # -- bookkeeping ------------------------------------------------------------

    def _index(self, entry: Shared) -> None:
        """Keep the per-uid and per-mapping indexes true after *entry* changed."""
        holders = {h.uid for h in entry.holds} if self.shared.get(entry.key) is entry else set()
        for uid, keys in list(self._held.items()):
            if uid not in holders:
                keys.discard(entry.key)
                if not keys:
                    del self._held[uid]
        for uid in holders:
            self._held.setdefault(uid, set()).add(entry.key)
        if holders:
            self._by_mapping[id(entry.mapping)] = entry
        else:
            self._by_mapping.pop(id(entry.mapping), None)

    def _visible(self, uid: int, entry: Shared) -> bool:
        return uid == 0 or entry.owner_uid == uid

    def _save(self, entry: Shared | None = None) -> None:
        """Note a change (to *entry*); :meth:`writer` writes it out (bursts coalesce)."""
        if entry is not None:
            self._index(entry)
            self._record_cache.pop(entry.key, None)
        self._changes += 1
        self._dirty.set()

    async def synced(self) -> None:
        """Return once the state file holds every change made so far.

        map and unmap reply only after this, so a change an app was told of
        survives a crash right after.
        """
        target = self._changes
        while self._written < target:
            await self._wrote.wait()

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the state file after every change.

        Changes that arrive while a write is under way are written by the next
        one, so a burst of requests costs a few writes, not one fsync each;
        :meth:`synced` lets a reply wait for the write that covers it.
        """
        task_status.started()
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            generation = self._changes
            records = self._records()
            try:
                await trio.to_thread.run_sync(self.store.save, records)
            except OSError as exc:
                logger.error("cannot write the state file %s: %s", self.store.path, exc)
            self._written = generation
            self._wrote.set()
            self._wrote = trio.Event()

    def _write(self, *, exiting: bool = False) -> None:
        """Write the state file now (on exit: only the persisted mappings)."""
        try:
            self.store.save(self._records(exiting=exiting))
        except OSError as exc:
            logger.error("cannot write the state file %s: %s", self.store.path, exc)

    def _records(self, *, exiting: bool = False) -> list[dict[str, Any]]:
        records = []
        for entry in self.shared.values():
            if not exiting:
                cached = self._record_cache.get(entry.key)
                if cached is not None:
                    records.append(cached)
                    continue
            lease = entry.mapping.lease
            holds = [h for h in entry.holds if h.persist] if exiting else entry.holds
            if lease is None or not holds:
                continue
            if not exiting and entry.mapping.state is State.RELEASED:
                continue
            record = lease_record(lease)
            record.update(
                owner_uid=entry.owner_uid,
                holds=[{"uid": h.uid, "pid": h.pid, "persist": h.persist} for h in holds],
                lifetime_requested=entry.mapping.request.lifetime,
            )
            if not exiting:
                self._record_cache[entry.key] = record
            records.append(record)
        return records

    async def _drop(self, entry: Shared) -> None:
        self.shared.pop(entry.key, None)
        self._save(entry)
        await entry.mapping.release()

    # -- restore after a restart ----------------------------------------------------

    async def restore(self) -> None:
        """Adopt persisted mappings; delete the ones nobody owns any more."""
        records = self.store.load()
        for record in records:
            try:
                lease = lease_from_record(record)
                holds = [
                    Hold(int(h["uid"]), int(h["pid"]), bool(h["persist"]), None)
                    for h in record.get("holds", [])
                ]
                owner = int(record["owner_uid"])
                lifetime = int(record.get("lifetime_requested", lease.lifetime))
            except (KeyError, TypeError, ValueError) as exc:
                logger.error("state file: skipping a damaged record (%s)", exc)
                continue
            now = trio.current_time()
            alive = []
            for hold in holds:
                if hold.persist:
                    alive.append(hold)
                elif _pid_alive(hold.pid):
                    # Its app may reconnect: the usual grace period.
                    hold.grace_until = now + self.config.grace
                    alive.append(hold)
            request = MappingRequest(
                lease.internal_port,
                lease.protocol,
                # An old or hand-edited record may hold any number.
                min(max(lifetime, MIN_LIFETIME), MAX_LIFETIME),
                internal_address=lease.internal_address,
            )
            key = (lease.protocol.value, lease.internal_port)
            try:
                if not alive:
                    logger.info("%d/%s: owner gone; deleting it on the gateway", key[1], key[0])
                    await self.broker.delete(lease)
                    continue
                mapping = await self.broker.adopt(request, lease)
            except (PortBrokerError, ValueError) as exc:
                logger.warning("%d/%s: could not take over (%s)", key[1], key[0], exc)
                continue
            entry = Shared(key[0], key[1], owner, mapping, alive)
            self.shared[key] = entry
            self._index(entry)
            logger.info("%s: adopted from the state file (%d hold(s))", entry.id, len(alive))
            if any(h.grace_until is not None for h in alive):
                self._nursery.start_soon(self._expire_graced, entry)
        self._save()

    # -- ops ----------------------------------------------------------------------

    async def handle(self, client: Client, request: Request) -> dict[str, Any]:
        if request.op == "hello":
            versions = request.get("versions", list, list(proto.PROTOCOL_VERSIONS))
            common = sorted(
                set(proto.PROTOCOL_VERSIONS) & {v for v in versions if isinstance(v, int)}
            )
            if not common:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"this daemon speaks versions {list(proto.PROTOCOL_VERSIONS)}",
                )
            client.version = common[-1]
            return {
                "version": client.version,
                "versions": list(proto.PROTOCOL_VERSIONS),
                "server": f"portbroker/{__version__}",
                "uid": client.uid,
                "pid": client.pid,
                "gateway": str(self.broker.gateway),
            }
        if request.op == "probe":
            return report_json(await self.broker.probe())
        if request.op == "map":
            entry = await self._map(client, request)
            await self.synced()
            return {"mapping": entry.describe()}
        if request.op == "unmap":
            unmapped = await self._unmap(client, request)
            await self.synced()
            return {"unmapped": unmapped}
        if request.op == "list":
            return {
                "mappings": [
                    e.describe() for e in self.shared.values() if self._visible(client.uid, e)
                ]
            }
        client.watching = True  # watch
        return {"watching": "all" if client.uid == 0 else "own"}

    async def _map(self, client: Client, request: Request) -> Shared:
        port = request.port("port", required=True)
        assert port is not None
        protocol = request.protocol()
        lifetime = request.get("lifetime", int, DEFAULT_LIFETIME)
        if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"'lifetime' must be {MIN_LIFETIME}..{MAX_LIFETIME} seconds, got {lifetime}",
            )
        external_port = request.port("external_port", required=False)
        exact = request.get("exact", bool, False)
        persist = request.get("persist", bool, False)
        via = request.get("via", str)
        if via is not None and via not in self.broker.methods:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"'via' must be one of {', '.join(self.broker.methods)}"
            )
        if exact and external_port is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'exact' needs 'external_port'")
        key = (protocol, port)
        while key in self._pending:  # someone is creating it right now
            await self._pending[key].wait()
        entry = self.shared.get(key)
        if entry is not None:
            return self._join(client, entry, external_port, persist)
        held = len(self._held.get(client.uid, ()))
        if held >= self.config.max_mappings:
            raise ProtocolError(
                ErrorCode.TOO_MANY_MAPPINGS,
                f"uid {client.uid} holds {held} mappings, the limit (--max-mappings)",
            )
        if external_port is not None:
            for other in self.shared.values():
                lease = other.mapping.lease
                if (
                    lease is not None
                    and lease.external_port == external_port
                    and other.protocol == protocol
                ):
                    raise ProtocolError(
                        ErrorCode.CONFLICT,
                        f"external port {external_port}/{protocol} already maps to {other.id}",
                    )
        self._pending[key] = done = trio.Event()
        try:
            mapping = await self.broker.map(
                port, protocol, lifetime=lifetime, external_port=external_port, exact=exact, via=via
            )
        except MappingError as exc:
            raise ProtocolError(
                ErrorCode.MAPPING_FAILED,
                str(exc),
                method=exc.method,
                result_code=exc.result_code,
                retry_after=exc.retry_after,
            ) from exc
        except NoMethodAvailable as exc:
            raise ProtocolError(ErrorCode.NO_METHOD, str(exc)) from exc
        except (MethodUnavailable, NoAnswer) as exc:
            raise ProtocolError(ErrorCode.GATEWAY_SILENT, str(exc)) from exc
        finally:
            del self._pending[key]
            done.set()
        entry = Shared(protocol, port, client.uid, mapping)
        entry.holds.append(Hold(client.uid, client.pid, persist, None if persist else client))
        self.shared[key] = entry
        self._save(entry)
        return entry

    def _join(
        self, client: Client, entry: Shared, external_port: int | None, persist: bool
    ) -> Shared:
        if entry.owner_uid != client.uid and client.uid != 0:
            raise ProtocolError(
                ErrorCode.CONFLICT, f"{entry.id} is mapped by another user (uid {entry.owner_uid})"
            )
        lease = entry.mapping.lease
        if external_port is not None and lease is not None and lease.external_port != external_port:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"{entry.id} is already mapped to external port {lease.external_port}",
            )
        for hold in entry.holds:
            # A restarting app reclaims its hold within the grace period.
            if hold.client is None and not hold.persist and hold.uid == client.uid:
                hold.client, hold.grace_until, hold.pid = client, None, client.pid
                hold.persist = persist
                self._save(entry)
                return entry
        entry.holds.append(Hold(client.uid, client.pid, persist, None if persist else client))
        self._save(entry)
        return entry

    async def _unmap(self, client: Client, request: Request) -> str:
        mapping_id = request.get("mapping", str)
        if mapping_id is not None:
            port_text, _, protocol = mapping_id.partition("/")
            if not port_text.isdigit() or protocol not in ("tcp", "udp"):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"'mapping' must look like '8080/tcp', not {mapping_id!r}",
                )
            key = (protocol, int(port_text))
        else:
            port = request.port("port", required=True)
            assert port is not None
            key = (request.protocol(), port)
        entry = self.shared.get(key)
        if entry is None or not self._visible(client.uid, entry):
            # Another user's mapping is reported as absent: nothing about it leaks.
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no mapping {key[1]}/{key[0]} of yours")
        if any(h.client is client for h in entry.holds):
            # This connection's own holds; other apps keep theirs.
            entry.holds = [h for h in entry.holds if h.client is not client]
        elif client.uid == 0:
            entry.holds = []  # root may end any mapping
        else:
            # From another connection (`portbroker unmap` after `map`): the
            # user's persisted or orphaned holds, never those of live apps.
            remaining = [h for h in entry.holds if h.uid != client.uid or h.client is not None]
            if any(h.uid == client.uid for h in remaining):
                raise ProtocolError(
                    ErrorCode.CONFLICT,
                    f"{entry.id} is held by another of your running apps; it must unmap it",
                )
            entry.holds = remaining
        if entry.holds:
            self._save(entry)
        else:
            await self._drop(entry)
        return entry.id

    # -- connections -------------------------------------------------------------------

    async def disconnected(self, client: Client) -> None:
        self.clients.discard(client)
        now = trio.current_time()
        for entry in list(self.shared.values()):
            graced = False
            for hold in entry.holds:
                if hold.client is client:
                    hold.client = None
                    hold.grace_until = now + self.config.grace
                    graced = True
            if graced:
                self._nursery.start_soon(self._expire_graced, entry)

    async def _expire_graced(self, entry: Shared) -> None:
        deadline = min(
            (h.grace_until for h in entry.holds if h.grace_until is not None), default=None
        )
        if deadline is None:
            return
        await trio.sleep_until(deadline)
        now = trio.current_time()
        before = len(entry.holds)
        entry.holds = [h for h in entry.holds if h.grace_until is None or h.grace_until > now]
        if entry.holds:
            if len(entry.holds) != before:
                self._save(entry)
            if any(h.grace_until is not None for h in entry.holds):
                self._nursery.start_soon(self._expire_graced, entry)
        elif self.shared.get(entry.key) is entry:
            logger.info("%s: its app is gone and the grace period over; releasing", entry.id)
            await self._drop(entry)

    async def events(self) -> None:
        """Broker events -> watching clients, and the state file kept current."""
        async for item in self.broker.events():
            entry = self._by_mapping.get(id(item.mapping))
            if entry is None or entry.mapping is not item.mapping:
                continue
            if not isinstance(item.event, Released):
                self._save(entry)
            line = proto.encode(
                {
                    "event": type(item.event).__name__,
                    "mapping": entry.describe(),
                    "detail": event_detail(item.event),
                }
            )
            for client in list(self.clients):
                if client.watching and self._visible(client.uid, entry):
                    client.send(line)

    async def serve_client(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, _gid = struct.unpack(
                SO_PEERCRED_FORMAT,
                stream.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FORMAT)
                ),
            )
        except OSError:
            await stream.aclose()
            return
        send, receive = trio.open_memory_channel[bytes](OUTBOX)
        with trio.CancelScope() as cancel:
            client = Client(uid, pid, stream, send, cancel)
            self.clients.add(client)
            try:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream, receive, cancel)
                    await self._reader(client, nursery)
                    # Let queued replies go out, then close.
                    send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                send.close()
                with trio.CancelScope(shield=True):
                    await self.disconnected(client)

    async def _writer(
        self,
        stream: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[bytes],
        cancel: trio.CancelScope,
    ) -> None:
        try:
            async for line in receive:
                await stream.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            cancel.cancel()

    async def _reader(self, client: Client, nursery: trio.Nursery) -> None:
        """Read request lines (:class:`.framing.LineFramer`) and answer each.

        A line over the limit gets one ``line_too_long`` and is skipped, never
        buffered. At end of stream an unterminated last line is answered too,
        and the replies of the requests still running are waited for, so a
        client that half-closes (``socat``, ``send_eof``) reads every answer.
        """
        limiter = trio.Semaphore(IN_FLIGHT)
        framer = framing.LineFramer(proto.MAX_LINE)
        while True:
            try:
                chunk = await client.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            items: list[bytes | framing.LineTooLong] = []
            if chunk:
                items = framer.feed(chunk)
            else:
                last = framer.close()
                if last is not None:
                    items = [last]
            for item in items:
                if isinstance(item, framing.LineTooLong):
                    client.send(
                        proto.error_reply(
                            None,
                            ErrorCode.LINE_TOO_LONG,
                            f"a line may be at most {item.limit} bytes; skipped to its end",
                        )
                    )
                    continue
                if not item.strip():
                    continue
                await limiter.acquire()
                nursery.start_soon(self._answer, client, item, limiter)
            if not chunk:
                break
        for _ in range(IN_FLIGHT):  # every request still running has replied
            await limiter.acquire()

    async def _answer(self, client: Client, line: bytes, limiter: trio.Semaphore) -> None:
        """Answer one request line: a reply, or an error reply, whatever happens.

        A request's failure never reaches the daemon: a ProtocolError is its
        error reply, anything else :func:`_failure_reply` (a bug is logged with
        its traceback), and a reply that cannot be encoded becomes ``internal``.
        """
        request_id: Any = None
        try:
            try:
                try:
                    request = proto.parse_request(line)
                    request_id = request.id
                    result = await self.handle(client, request)
                    reply = proto.encode({"id": request_id, "ok": True, **result})
                except ProtocolError as exc:
                    reply = proto.error_reply(
                        exc.extra.pop("id", request_id), exc.code, exc.message, **exc.extra
                    )
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the daemon
                try:
                    reply = _failure_reply(request_id, exc)
                except Exception:  # describing the failure failed: still answer
                    logger.exception("request %r: its failure could not be described", request_id)
                    reply = proto.error_reply(
                        request_id, ErrorCode.INTERNAL, "internal error (see the daemon's log)"
                    )
            client.send(reply)
        finally:
            limiter.release()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _failure_reply(request_id: Any, exc: Exception) -> bytes:
    """The error reply for a request that failed with *exc*, in words.

    Whatever failed, this one request gets an error reply and the daemon goes
    on serving every other app. trio nurseries may group the failures; each
    leaf is told, the first one's code stands for them all. Every ``internal``
    reply is logged with its traceback: a failure no layer put in words (a
    bug), one no op turned into its own code, and a reply that could not be
    encoded (:class:`.framing.FramingError`).
    """
    replies: list[tuple[ErrorCode, str]] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, ProtocolError):
            replies.append((leaf.code, leaf.message))
        elif isinstance(leaf, framing.FramingError):
            logger.error("request %r: its reply could not be sent", request_id, exc_info=leaf)
            replies.append((ErrorCode.INTERNAL, f"internal error: {leaf}"))
        elif isinstance(leaf, ValueError):
            replies.append((ErrorCode.BAD_REQUEST, str(leaf)))
        elif isinstance(leaf, PortBrokerError):
            # In words, but no op turned it into its own code: the operator
            # gets the traceback, as for every internal reply.
            logger.error("request %r failed: %s", request_id, leaf, exc_info=leaf)
            replies.append((ErrorCode.INTERNAL, str(leaf)))
        elif isinstance(leaf, OSError):
            logger.error("request %r failed: %s", request_id, leaf, exc_info=leaf)
            # A local socket failure (EPERM from a host firewall...) that no
            # layer below put in words.
            known = isinstance(leaf.errno, int) and leaf.errno in errno.errorcode
            replies.append(
                (
                    ErrorCode.INTERNAL,
                    str(LinkError("use", "the network", leaf))
                    if known
                    else f"cannot use the network: {leaf.strerror or leaf}",
                )
            )
        else:
            logger.error("request %r failed: a bug", request_id, exc_info=leaf)
            replies.append((ErrorCode.INTERNAL, f"internal error: {type(leaf).__name__}: {leaf}"))
    return proto.error_reply(
        request_id, replies[0][0], "; ".join(dict.fromkeys(m for _, m in replies))
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _listening_socket(config: DaemonConfig) -> socket.socket:
    """The Unix socket: systemd's (LISTEN_FDS), or a new one at ``config.socket_path``."""
    if (
        os.environ.get("LISTEN_PID") == str(os.getpid())
        and int(os.environ.get("LISTEN_FDS", "0")) >= 1
    ):
        # sd_listen_fds(3): passed sockets start at fd 3.
        sock = socket.socket(fileno=3)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return sock
    path = config.socket_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise DaemonError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise DaemonError(f"cannot check {path}: {exc.strerror}") from exc
            logger.info("taking over the stale socket %s", path)
            path.unlink()
        else:
            raise DaemonError(f"another portbroker daemon is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never world-accessible, not even for an instant
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if config.group is not None:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            sock.close()
            path.unlink()
            raise DaemonError(f"no such group {config.group!r}") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(socket.SOMAXCONN)
    return sock


@contextlib.asynccontextmanager
async def serve(config: DaemonConfig) -> AsyncIterator[Daemon]:
    """Run a daemon (in the caller's trio run) until the block exits."""
    sock = _listening_socket(config)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        with collapse_single():
            async with open_broker(
                config.gateway, config.methods, config.probe_timeout, **config.broker_options
            ) as broker:
                async with trio.open_nursery() as nursery:
                    daemon = Daemon(config, broker, nursery)
                    nursery.start_soon(daemon.events)
                    await nursery.start(daemon.writer)
                    await daemon.restore()
                    nursery.start_soon(trio.serve_listeners, daemon.serve_client, [listener])
                    logger.info(
                        "portbroker daemon %s listening on %s (gateway %s)",
                        __version__,
                        config.socket_path,
                        broker.gateway,
                    )
                    try:
                        yield daemon
                    finally:
                        nursery.cancel_scope.cancel()
                # The writer has stopped (and its last write finished), so this
                # write is the last. Connection-bound holds end with the daemon
                # (the broker deletes them on exit); persisted ones stay on the
                # gateway, recorded for the next start.
                for entry in list(daemon.shared.values()):
                    if any(h.persist for h in entry.holds):
                        broker.detach(entry.mapping)
                daemon._write(exiting=True)
    finally:
        with contextlib.suppress(OSError):
            if config.socket_path.is_socket():
                config.socket_path.unlink()


async def run_daemon(
    config: DaemonConfig, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled or SIGINT/SIGTERM."""
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve(config):
            task_status.started()
            async for signum in signals:
                logger.info("signal %d: stopping", signum)
                return
