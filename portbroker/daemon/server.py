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

import collections
import contextlib
import errno
import grp
import logging
import math
import os
import pwd
import resource
import select
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
from portbroker.daemon import protocol as proto
from portbroker.daemon.ownership import Entry, Hold, Ownership, Peer, Policy
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

__all__ = ["DaemonConfig", "DaemonError", "default_socket_path", "run_daemon", "serve"]

logger = logging.getLogger("portbroker.daemon")

OUTBOX: Final = 1024  # replies and events queued for a client before it is cut off
IN_FLIGHT: Final = 64  # requests one client may have running at once
SO_PEERCRED_FORMAT: Final = "3i"


class DaemonError(PortBrokerError):
    """The daemon cannot start (socket in use, bad path, bad group)."""


def default_socket_path() -> Path:
    """``/run/portbroker/portbroker.sock`` for root, ``$XDG_RUNTIME_DIR/portbroker.sock`` otherwise."""
    if os.geteuid() == 0:
        return Path("/run/portbroker/portbroker.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "portbroker.sock"
    # No per-user runtime directory (no systemd login session): a private one.
    return Path.home() / ".cache" / "portbroker" / "portbroker.sock"


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
    # Limits that keep one user from hurting the others (docs/daemon-protocol.md).
    max_connections: int = 64  # connections one uid may have open
    idle_timeout: float = 60.0  # a connection that holds, watches and asks nothing
    # Internal ports below 1024: root only, unless allowed for all or for groups.
    allow_privileged_ports: bool = False
    privileged_groups: tuple[str, ...] = ()

    def policy(self) -> Policy:
        """The ownership policy; unknown group names are a DaemonError."""
        gids = set()
        for name in self.privileged_groups:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                raise DaemonError(f"no such group {name!r} (--privileged-group)") from None
        try:
            return Policy(
                grace=self.grace,
                max_mappings=self.max_mappings,
                max_connections=self.max_connections,
                allow_privileged_ports=self.allow_privileged_ports,
                privileged_gids=frozenset(gids),
            )
        except ValueError as exc:
            raise DaemonError(str(exc)) from None


@attrs.define(eq=False)
class Client:
    uid: int
    pid: int
    stream: trio.SocketStream
    outbox: trio.MemorySendChannel[bytes]
    cancel: trio.CancelScope
    conn: int = 0  # its id in the ownership registry
    watching: bool = False
    version: int = 1
    in_flight: int = 0  # requests being answered
    last_active: float = 0.0  # when it last sent a request

    @property
    def label(self) -> str:
        return f"uid {self.uid} pid {self.pid}"

    def send(self, message: bytes) -> None:
        """Queue a line; a client that does not read is cut off."""
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            logger.warning("client %s does not read its replies: cut off", self.label)
            self.cancel.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _mapping(entry: Entry) -> Mapping:
    """The broker mapping behind a granted *entry*."""
    assert isinstance(entry.handle, Mapping), f"{entry.id} has no mapping yet"
    return entry.handle


def describe(entry: Entry) -> dict[str, Any]:
    """A ``mapping`` object of the protocol (docs/daemon-protocol.md)."""
    mapping = _mapping(entry)
    lease = mapping.lease
    out: dict[str, Any] = {
        "id": entry.id,
        "protocol": entry.protocol,
        "internal_port": entry.port,
        "owner_uid": entry.owner_uid,
        "state": mapping.state.value,
        "persist": entry.persist,
        "holders": len(entry.holds),
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
        # The ownership rules live in their own module (sans-IO); this class
        # carries out what it decides.
        self.owners = Ownership(config.policy())
        self.shared = self.owners.entries  # key -> Entry (reserved ones included)
        self.clients: set[Client] = set()
        self.store = StateStore(config.state_path)
        self._pending: dict[tuple[str, int], trio.Event] = {}
        self._releasing: dict[tuple[str, int], trio.Event] = {}  # deletes in flight
        self._dirty = trio.Event()
        self._changes = 0  # generation of the in-memory state
        self._written = 0  # generation the state file holds
        self._wrote = trio.Event()
        self._by_mapping: dict[int, Entry] = {}  # id(Mapping) -> entry, for events
        # Each entry's state-file record, recomputed only when the entry
        # changes: a write with 10,000 mappings must not redo them all.
        self._record_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._grace_changed = trio.Event()
        self._refusals: dict[int, tuple[float, int]] = {}  # uid -> (last logged, since)
        self._group_cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}
        # Refused connections waiting for their first request, oldest first.
        self._refusing: collections.deque[trio.CancelScope] = collections.deque()

    # -- bookkeeping ------------------------------------------------------------

    def _index(self, entry: Entry) -> None:
        """Keep the per-mapping index true after *entry* changed."""
        if entry.handle is None:
            return
        if self.shared.get(entry.key) is entry and entry.holds:
            self._by_mapping[id(entry.handle)] = entry
        else:
            self._by_mapping.pop(id(entry.handle), None)

    def _visible(self, uid: int, entry: Entry) -> bool:
        return self.owners.may_see(uid, entry)

    def _save(self, entry: Entry | None = None) -> None:
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
            if entry.handle is None:
                continue  # reserved: the gateway has not answered yet
            if not exiting:
                cached = self._record_cache.get(entry.key)
                if cached is not None:
                    records.append(cached)
                    continue
            mapping = _mapping(entry)
            lease = mapping.lease
            holds = [h for h in entry.holds if h.persist] if exiting else entry.holds
            if lease is None or not holds:
                continue
            if not exiting and mapping.state is State.RELEASED:
                continue
            record = lease_record(lease)
            record.update(
                owner_uid=entry.owner_uid,
                holds=[{"uid": h.uid, "pid": h.pid, "persist": h.persist} for h in holds],
                lifetime_requested=mapping.request.lifetime,
            )
            if not exiting:
                self._record_cache[entry.key] = record
            records.append(record)
        return records

    async def _drop(self, entry: Entry) -> None:
        """*entry* left the registry (its last hold went): end it at the gateway."""
        self._save(entry)
        # Still found by its mapping until its Released event (events()
        # forgets it then): watchers hear that it ended. One already over
        # (FAILED) will publish none.
        if _mapping(entry).state not in (State.RELEASED, State.FAILED):
            self._by_mapping[id(_mapping(entry))] = entry
        # The broker holds the mapping until its delete is done: a map of the
        # same port meanwhile waits for that (see _map).
        self._releasing[entry.key] = done = trio.Event()
        try:
            await _mapping(entry).release()
        finally:
            if self._releasing.get(entry.key) is done:
                del self._releasing[entry.key]
            done.set()

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
            # Apps still running may reconnect (the ownership rules give them
            # the usual grace period); persisted holds stay.
            alive = [h for h in holds if h.persist or _pid_alive(h.pid)]
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
            entry = self._install_restored(key, owner, alive, mapping)
            logger.info("%s: adopted from the state file (%d hold(s))", entry.id, len(alive))
        self._save()

    def _install_restored(
        self, key: tuple[str, int], owner_uid: int, holds: list[Hold], mapping: Mapping
    ) -> Entry:
        lease = mapping.lease
        entry = self.owners.restored(
            key,
            owner_uid,
            holds,
            handle=mapping,
            external_port=lease.external_port if lease is not None else None,
            now=trio.current_time(),
        )
        self._index(entry)
        self._grace_changed.set()
        return entry

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
            return {"mapping": describe(entry)}
        if request.op == "unmap":
            unmapped = await self._unmap(client, request)
            await self.synced()
            return {"unmapped": unmapped}
        if request.op == "list":
            return {"mappings": [describe(e) for e in self.owners.visible(client.uid)]}
        client.watching = True  # watch
        return {"watching": "all" if client.uid == 0 else "own"}

    async def _map(self, client: Client, request: Request) -> Entry:
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
        self._check_hung_up(client)
        while True:
            if self.owners.creating(key):  # someone is creating it right now
                await self._pending[key].wait()
            elif key in self._releasing:  # its delete is still in flight
                await self._releasing[key].wait()
            else:
                break
        dead = self.shared.get(key)
        if (
            dead is not None
            and self._visible(client.uid, dead)
            and _mapping(dead).state in (State.FAILED, State.RELEASED)
        ):
            # The gateway ended it for good (its apps heard Failed): asked for
            # again by its owner, it is made afresh, not joined dead.
            self.owners.forget(key)
            self._save(dead)
        entry = self.owners.claim(
            client.conn, key, persist=persist, external_port=external_port, now=trio.current_time()
        )
        if not entry.creating:
            self._save(entry)  # joined
            return entry
        self._pending[key] = done = trio.Event()
        try:
            mapping = await self.broker.map(
                port, protocol, lifetime=lifetime, external_port=external_port, exact=exact, via=via
            )
        except BaseException as exc:
            # Cancelled too (the client hung up: the broker abandons the request).
            self.owners.create_failed(key)
            if isinstance(exc, MappingError):
                raise ProtocolError(
                    ErrorCode.MAPPING_FAILED,
                    str(exc),
                    method=exc.method,
                    result_code=exc.result_code,
                    retry_after=exc.retry_after,
                ) from exc
            if isinstance(exc, NoMethodAvailable):
                raise ProtocolError(ErrorCode.NO_METHOD, str(exc)) from exc
            if isinstance(exc, MethodUnavailable | NoAnswer):
                raise ProtocolError(ErrorCode.GATEWAY_SILENT, str(exc)) from exc
            raise
        finally:
            del self._pending[key]
            done.set()
        lease = mapping.lease
        self._check_hung_up(client)  # then created() rolls it back
        kept = self.owners.created(key, mapping, lease.external_port if lease else None)
        if kept is None:
            # Its requester left before it was made: nobody would own it.
            logger.info("%d/%s: the client left before it was made; deleting it", port, protocol)
            with trio.CancelScope(shield=True):
                await mapping.release()
            raise ProtocolError(ErrorCode.GONE, "the connection closed before the map was made")
        self._save(kept)
        return kept

    def _check_hung_up(self, client: Client) -> None:
        """A client that closed its socket is gone (serve_client does the
        same when its reader sees it): its maps not yet carried out are not
        done for nobody. Checked here too, since with IN_FLIGHT requests
        running the reader waits for a slot and reads nothing."""
        if self.owners.is_open(client.conn) and _hung_up(client.stream):
            self.owners.disconnect(client.conn, trio.current_time())
            self._grace_changed.set()
            client.cancel.cancel()  # its other requests too: nobody reads the replies

    async def _unmap(self, client: Client, request: Request) -> str:
        mapping_id = request.get("mapping", str)
        if mapping_id is not None:
            port_text, _, protocol = mapping_id.partition("/")
            if not (port_text.isascii() and port_text.isdigit()) or protocol not in ("tcp", "udp"):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"'mapping' must look like '8080/tcp', not {mapping_id[:40]!r}",
                )
            key = (protocol, int(port_text[:6]))
        else:
            port = request.port("port", required=True)
            assert port is not None
            key = (request.protocol(), port)
        entry, released = self.owners.unmap(client.conn, key)
        if released:
            await self._drop(entry)
        else:
            self._save(entry)
        return entry.id

    # -- connections -------------------------------------------------------------------

    async def disconnected(self, client: Client) -> None:
        self.clients.discard(client)
        self.owners.disconnect(client.conn, trio.current_time())
        self._grace_changed.set()

    async def grace_timer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One timer for every grace period: release what nobody reclaimed."""
        task_status.started()
        while True:
            self._grace_changed = changed = trio.Event()
            deadline = self.owners.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await changed.wait()
            shrunk: list[Entry] = []
            for entry in self.owners.expire(trio.current_time(), shrunk):
                logger.info("%s: its app is gone and the grace period over; releasing", entry.id)
                self._nursery.start_soon(self._drop, entry)
            # Holds that ended while others remain change the state file too
            # (their records are recomputed); a wake-up that ended nothing,
            # such as any client leaving, writes nothing.
            for entry in shrunk:
                self._save(entry)

    async def events(self) -> None:
        """Broker events -> watching clients, and the state file kept current."""
        async for item in self.broker.events():
            entry = self._by_mapping.get(id(item.mapping))
            if entry is None or entry.handle is not item.mapping:
                continue
            if not isinstance(item.event, Released):
                lease = item.mapping.lease
                if lease is not None:  # a new external port (Restored, ...)
                    entry.external_port = lease.external_port
                self._save(entry)
            line = proto.encode(
                {
                    "event": type(item.event).__name__,
                    "mapping": describe(entry),
                    "detail": event_detail(item.event),
                }
            )
            for client in list(self.clients):
                if client.watching and self._visible(client.uid, entry):
                    client.send(line)
            if isinstance(item.event, Released) and self.shared.get(entry.key) is not entry:
                self._by_mapping.pop(id(item.mapping), None)  # its last event

    async def serve_client(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, gid = struct.unpack(
                SO_PEERCRED_FORMAT,
                stream.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FORMAT)
                ),
            )
        except OSError:
            await stream.aclose()
            return
        try:
            conn = self.owners.connect(Peer(uid, pid, self._groups(uid, gid)))
        except ProtocolError as exc:
            # Over its limit: this user is told so; everyone else goes on.
            self._log_refusal(uid, pid, exc.message)
            await self._turn_away(stream, exc)
            return
        if len(self.clients) >= self.max_clients and not self._shed(uid):
            self.owners.disconnect(conn, trio.current_time())
            await self._turn_away(
                stream, ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS, _SHED_MESSAGE)
            )
            return
        send, receive = trio.open_memory_channel[bytes](OUTBOX)
        with trio.CancelScope() as cancel:
            client = Client(uid, pid, stream, send, cancel, conn, last_active=trio.current_time())
            self.clients.add(client)
            try:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream, receive, cancel)
                    async with trio.open_nursery() as answers:
                        await self._reader(client, answers)
                        if _hung_up(stream):
                            # Gone for good (closed, not only done writing as
                            # `socat` is): what it asked and we have not
                            # carried out is rolled back, not done for nobody.
                            self.owners.disconnect(client.conn, trio.current_time())
                            answers.cancel_scope.cancel()
                    # Every reply is queued: let them go out, then close.
                    send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                send.close()
                with trio.CancelScope(shield=True):
                    await self.disconnected(client)

    def _groups(self, uid: int, gid: int) -> frozenset[int]:
        """The user's groups, for --privileged-group only, looked up once per
        user per :data:`GROUPS_TTL`: a lookup can be slow (LDAP, sssd) and
        blocks the event loop, and a user can connect in a loop."""
        if not self.owners.policy.privileged_gids:
            return frozenset({gid})
        now = trio.current_time()
        cached = self._group_cache.get((uid, gid))
        if cached is not None and now - cached[0] < GROUPS_TTL:
            return cached[1]
        if len(self._group_cache) >= 4096:
            self._group_cache.clear()  # bounded; the next lookups refill it
        groups = _groups_of(uid, gid)
        self._group_cache[(uid, gid)] = (now, groups)
        return groups

    async def _turn_away(self, stream: trio.SocketStream, error: ProtocolError) -> None:
        """Refuse a connection. Only so many wait for their first request at
        once (a flood of refused connections must not pin descriptors): a
        newcomer ends the oldest wait, so the latest client, the one a user
        is looking at, still reads why."""
        wait = trio.CancelScope()
        self._refusing.append(wait)
        if len(self._refusing) > MAX_REFUSING:
            self._refusing.popleft().cancel()
        try:
            await _refuse(stream, error, wait)
        finally:
            with contextlib.suppress(ValueError):
                self._refusing.remove(wait)

    def _log_refusal(self, uid: int, pid: int, why: str) -> None:
        """One line per user per minute: a flood of refused connections must
        not become a flood of log lines (a log that blocks stalls everyone)."""
        now = trio.current_time()
        last, suppressed = self._refusals.get(uid, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[uid] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more refused since the last report)" if suppressed else ""
        logger.warning("uid %d pid %d refused: %s%s", uid, pid, why, more)
        self._refusals[uid] = (now, 0)

    @property
    def max_clients(self) -> int:
        """Connections served at once: what the file descriptor limit allows,
        keeping room for the gateway sockets and the state file."""
        return max(16, _fd_limit() - FD_RESERVE)

    def _shed(self, newcomer_uid: int) -> bool:
        """Too many connections in all: the user with the most gives one up.

        A newcomer of that user is refused (False); otherwise one of that
        user's connections is closed to make room (True): one that holds no
        mapping if there is one, the least recently active of those. One user
        opening connections without end costs that user, not the others.
        """
        busiest = self.owners.busiest_uid()
        if busiest is None or busiest == newcomer_uid:
            return False
        victims = [c for c in self.clients if c.uid == busiest]
        if not victims:
            return False
        # A connection that holds mappings goes last: closing it ends them
        # (after the grace period), closing an idle one costs nothing.
        holding = self.owners.holding(busiest)
        victim = min(
            victims,
            key=lambda c: (c.conn in holding, c.watching or c.in_flight > 0, c.last_active),
        )
        self._log_refusal(
            busiest,
            victim.pid,
            f"{len(self.clients)} connections in all, the limit: closed one of its"
            f" {len(victims)} (the most of any user)",
        )
        victim.send(proto.error_reply(None, ErrorCode.TOO_MANY_CONNECTIONS, _SHED_MESSAGE))
        victim.cancel.cancel()
        self.clients.discard(victim)
        # Over now for the limits too, not once its task has unwound: the next
        # newcomer of a burst must see this user's true count.
        self.owners.disconnect(victim.conn, trio.current_time())
        self._grace_changed.set()
        return True

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
        limiter = trio.Semaphore(IN_FLIGHT)
        buffer = b""
        skipping = False  # inside a line that was too long
        while True:
            try:
                chunk = await client.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not chunk:
                return
            buffer += chunk
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > proto.MAX_LINE:
                        if not skipping:
                            client.send(
                                proto.error_reply(
                                    None,
                                    ErrorCode.LINE_TOO_LONG,
                                    f"a line may be at most {proto.MAX_LINE} bytes; skipped",
                                )
                            )
                        skipping = True
                        buffer = b""
                    break
                line, buffer = buffer[:newline], buffer[newline + 1 :]
                if skipping:
                    skipping = False
                    continue
                if len(line) > proto.MAX_LINE:
                    client.send(
                        proto.error_reply(
                            None,
                            ErrorCode.LINE_TOO_LONG,
                            f"a line may be at most {proto.MAX_LINE} bytes",
                        )
                    )
                    continue
                if not line.strip():
                    continue
                await limiter.acquire()
                nursery.start_soon(self._answer, client, line, limiter)

    async def _answer(self, client: Client, line: bytes, limiter: trio.Semaphore) -> None:
        request_id: Any = None
        try:
            request = proto.parse_request(line)
            request_id = request.id
            result = await self.handle(client, request)
            client.send(proto.encode({"id": request_id, "ok": True, **result}))
        except ProtocolError as exc:
            client.send(
                proto.error_reply(
                    exc.extra.pop("id", request_id), exc.code, exc.message, **exc.extra
                )
            )
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the daemon
            client.send(_failure_reply(request_id, exc))
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
    leaf is told, the first one's code stands for them all.
    """
    replies: list[tuple[ErrorCode, str]] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, ProtocolError):
            replies.append((leaf.code, leaf.message))
        elif isinstance(leaf, ValueError):
            replies.append((ErrorCode.BAD_REQUEST, str(leaf)))
        elif isinstance(leaf, PortBrokerError):
            replies.append((ErrorCode.INTERNAL, str(leaf)))
        elif isinstance(leaf, OSError):
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


_SHED_MESSAGE: Final = (
    "the daemon is at its connection limit and your user has the most connections open;"
    " this one was closed: use fewer connections"
)
REFUSAL_LOG_INTERVAL: Final = 60.0
GROUPS_TTL: Final = 60.0  # how long a user's groups are taken as known
REFUSE_WAIT: Final = 1.0  # how long a refused connection may take to send its request
MAX_REFUSING: Final = 64  # refused connections waited on at once (the oldest gives way)
FD_RESERVE: Final = 64  # descriptors kept for gateway sockets, the state file, logs


def _fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_fd_limit(target: int = 65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards *target* (up to the hard limit).

    The default soft limit (1,024) would let about a thousand idle connections
    deny service to everyone; the systemd unit sets ``LimitNOFILE`` as well.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            return soft
        return wanted
    return soft


def _groups_of(uid: int, gid: int) -> frozenset[int]:
    """The user's groups (for --privileged-group): its primary gid from the
    socket, plus the groups the system lists for it."""
    try:
        name = pwd.getpwuid(uid).pw_name
        return frozenset(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        return frozenset({gid})


async def _refuse(stream: trio.SocketStream, error: ProtocolError, wait: trio.CancelScope) -> None:
    """One error line to a connection we will not serve, then close it.

    The line answers the client's first request, by its id, if it comes
    within :data:`REFUSE_WAIT` (and *wait* is not cancelled before): a client
    then reads the refusal as the reply to what it asked. Closing at once
    instead made its write fail (EPIPE) or, its request unread, reset the
    connection (ECONNRESET) before it read the line: a traceback, not the
    reason.
    """
    request_id = None
    with wait, trio.move_on_after(REFUSE_WAIT):
        request_id = await _first_request_id(stream)
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(proto.error_reply(request_id, error.code, error.message))
    await stream.aclose()


async def _first_request_id(stream: trio.SocketStream) -> Any:
    """The id of the first line the client sends (None if none can be read)."""
    buffer = b""
    while b"\n" not in buffer and len(buffer) <= proto.MAX_LINE:
        try:
            chunk = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        if not chunk:
            break
        buffer += chunk
    line = buffer.partition(b"\n")[0]
    try:
        return proto.parse_request(line[: proto.MAX_LINE]).id
    except ProtocolError as exc:
        return exc.extra.get("id")
    except Exception:  # noqa: BLE001 - a request we cannot read: answered without an id
        return None


def _hung_up(stream: trio.SocketStream) -> bool:
    """True when the peer closed its socket, not only its sending side.

    Linux reports POLLHUP on a Unix stream socket only when both directions
    are shut: a client that half-closed after its last request (``socat``,
    ``printf ... | nc -U``) still reads its replies.
    """
    poller = select.poll()
    try:
        poller.register(stream.socket.fileno(), select.POLLIN)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True


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
                    await nursery.start(daemon.grace_timer)
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
                    if entry.handle is not None and entry.persist:
                        broker.detach(_mapping(entry))
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
