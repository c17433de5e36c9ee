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
import enum
import errno
import grp
import heapq
import itertools
import logging
import math
import os
import pwd
import resource
import select
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from glob import escape as glob_escape
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
from portbroker.daemon.ownership import PRIVILEGED_PORTS, Entry, Hold, Ownership, Peer, Policy
from portbroker.daemon.paths import (
    SYSTEM_SOCKET_PATH,
    connect_socket_path,
    default_socket_path,
    user_socket_path,
)
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.publishing import MAX_PUBLICATIONS, Publishing
from portbroker.daemon.state import (
    DaemonRecord,
    RecordError,
    StateStore,
    daemon_record,
    parse_daemon_record,
)
from portbroker.errors import (
    LinkError,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    PortBrokerError,
)
from portbroker.lifecycle import (
    RECOVERY_BACKOFF,
    FailureKind,
    Released,
    State,
    classify,
    event_detail,
    supersedes,
)
from portbroker.probe import NoMethodAvailable, report_json
from portbroker.types import (
    DEFAULT_LIFETIME,
    MAX_FILTERS,
    MAX_LIFETIME,
    MIN_LIFETIME,
    IPAddress,
    Lease,
    MappingRequest,
    RemoteFilter,
    no_host_reason,
    unscoped,
)
from portbroker.wire._fields import to_address

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
# Records of the state file adopted (or deleted) at once after a start: enough
# that a silent gateway (a budget of 8 s each) does not hold the rest back for
# long, few enough not to flood a gateway that answers.
RESTORE_CONCURRENCY: Final = 16


class DaemonError(PortBrokerError):
    """The daemon cannot start (socket in use, bad path, bad group)."""


def bind_socket_path(explicit: str | Path | None = None) -> Path:
    """The daemon's socket: *explicit* (``--socket``), ``$PORTBROKER_SOCKET``, or
    :func:`default_socket_path`."""
    if explicit:
        return Path(explicit)
    if os.environ.get(proto.ENV_SOCKET):
        return Path(os.environ[proto.ENV_SOCKET])
    return default_socket_path()


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
    # Who besides root may map for another host (docs/third-party-and-filter.md).
    third_party_groups: tuple[str, ...] = ()
    # DNS-SD publications (docs/dnssd.md): per user; the addresses zeroconf
    # binds (None: the interface of each mapping's internal address).
    max_publications: int = MAX_PUBLICATIONS
    publish_interfaces: tuple[str, ...] | None = None
    # Following the network (docs/roaming.md): without *gateway*, every
    # client's mappings move with the default route; whatever the gateway, a
    # suspend or a stop renews them all within 0-5 s (lifecycle rule 14).
    follow: bool = True
    watch_resume: bool = True

    def policy(self) -> Policy:
        """The ownership policy; unknown group names are a DaemonError."""
        gids = set()
        for name in self.privileged_groups:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                raise DaemonError(f"no such group {name!r} (--privileged-group)") from None
        third_party_gids = set()
        for name in self.third_party_groups:
            try:
                third_party_gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                raise DaemonError(f"no such group {name!r} (--third-party-group)") from None
        try:
            return Policy(
                grace=self.grace,
                max_mappings=self.max_mappings,
                max_connections=self.max_connections,
                # Holds follow the mapping quota: a user allowed 10,000
                # mappings must be able to hold them (apps share the rest).
                max_holds=max(1024, 2 * self.max_mappings),
                allow_privileged_ports=self.allow_privileged_ports,
                privileged_gids=frozenset(gids),
                third_party_gids=frozenset(third_party_gids),
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
    last_active: float = 0.0  # when it last sent a request
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


class RestoreState(enum.Enum):
    RESTORING = "restoring"


@attrs.define(eq=False)
class Restoring:
    """A mapping of the state file not adopted yet, in place of its :class:`Mapping`.

    It stands in :attr:`Daemon.shared` from the first second, so ``list``
    shows it (state ``restoring``), its owner's ``map`` joins it and ``unmap``
    ends it (:meth:`release`: deleted on the gateway) while the gateway is
    silent; adopted, it gives way to the real mapping.
    """

    request: MappingRequest
    lease: Lease
    record: dict[str, Any]  # as read from the state file
    retire: Callable[[Restoring], Awaitable[None]]
    failures: int = 0
    first: bool = False  # one of the records read at start, its first attempt to come
    scope: trio.CancelScope | None = None  # the adoption under way

    @property
    def key(self) -> tuple[str, int]:
        return (self.request.protocol.value, self.request.internal_port)

    @property
    def state(self) -> RestoreState:
        return RestoreState.RESTORING

    async def release(self) -> None:
        await self.retire(self)


@attrs.define(eq=False)
class Retiring:
    """A mapping to delete on the gateway (``pending_delete`` in the state file).

    Its owner is gone, or it was unmapped before it was adopted, or a delete
    failed: it stays recorded until a delete succeeds, the gateway refuses it,
    or the lease has run out.
    """

    lease: Lease
    record: dict[str, Any]  # pending_delete: true
    failures: int = 0
    first: bool = False  # as Restoring.first

    @property
    def label(self) -> str:
        return f"{self.lease.internal_port}/{self.lease.protocol.value}"


def _handle(entry: Entry) -> Mapping | Restoring:
    """What stands behind a granted *entry*: its broker mapping, or the
    stand-in of a state-file record still being restored."""
    assert isinstance(entry.handle, Mapping | Restoring), f"{entry.id} has no mapping yet"
    return entry.handle


def _third_party_params(
    request: Request,
) -> tuple[IPAddress | None, tuple[RemoteFilter, ...]]:
    """A map's ``internal_address`` (another host: THIRD_PARTY) and ``filters``.

    Raises:
        ProtocolError: BAD_REQUEST, naming the field and what is wrong.
    """
    text = request.get("internal_address", str)
    address = None
    if text is not None:
        try:
            # Unscoped: interface_addresses() has none, and the gateway never
            # sees one ("2001:db8::5%eth0" was no address of this host's, so
            # past the privileged-port rule, yet mapped this host's port).
            address = unscoped(to_address(text.strip()))
        except (ValueError, TypeError):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"'internal_address' must be an IP address, not {text!r}"
            ) from None
        reason = no_host_reason(address)
        if reason is not None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"'internal_address' {address} names no lan host ({reason})"
            )
    texts = request.get("filters", list, [])
    if len(texts) > MAX_FILTERS:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'filters' may hold at most {MAX_FILTERS}, not {len(texts)}"
        )
    filters = []
    for item in texts:
        if not isinstance(item, str):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "'filters' is a list of strings like \"11.0.0.2/32:5000\""
            )
        try:
            filters.append(RemoteFilter.parse(item))
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'filters': {exc}") from None
    if len(set(filters)) != len(filters):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'filters' names the same filter twice")
    return address, tuple(filters)


def _is_this_host(address: IPAddress) -> bool:
    """Is *address* one of this host's own (getifaddrs(3))?

    A map naming one is no third party's: PCP sends no THIRD_PARTY for the
    address it sends from, and maps another of this host's addresses with it;
    either way the port is this host's (its sshd), under the privileged-port
    rule. When the interfaces cannot be read, every address counts as this
    host's: the stricter rule.
    """
    from portbroker.p2p import interface_addresses

    address = unscoped(address)  # getifaddrs gives none
    try:
        return any(entry.address == address for entry in interface_addresses())
    except OSError:
        return True


def describe(entry: Entry) -> dict[str, Any]:
    """A ``mapping`` object of the protocol (docs/daemon-protocol.md)."""
    mapping = _handle(entry)
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
            # As `map --json` says it (docs/double-nat.md): a client behind a
            # double NAT learns that its mapping reaches no further than the ISP.
            public=lease.reachability.public,
            reachability=lease.reachability.reason,
        )
        if lease.filters:
            out["filters"] = [str(f) for f in lease.filters]
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
        self._urgent = trio.Event()  # someone waits in synced(): write now
        self._write_error: str | None = None  # why the last write failed
        self._changes = 0  # generation of the in-memory state
        self._written = 0  # generation the state file holds
        self._wrote = trio.Event()
        self._by_mapping: dict[int, Entry] = {}  # id(Mapping) -> entry, for events
        # Each entry's state-file record, recomputed only when the entry
        # changes: a write with 10,000 mappings must not redo them all.
        self._record_cache: dict[tuple[str, int], dict[str, Any]] = {}
        # Keys mapped for another host (THIRD_PARTY): the state file says so
        # ("third_party": true), so a restart knows it too.
        self._third_party: set[tuple[str, int]] = set()
        self._grace_changed = trio.Event()
        self._refusals: dict[int, tuple[float, int]] = {}  # uid -> (last logged, since)
        # Restore (see restore()): deletes not confirmed yet, attempts to
        # repeat (due time, sequence, item), and whether the state file has
        # been read (until then nothing may overwrite it).
        self._retiring: dict[int, Retiring] = {}
        self._retry: list[tuple[float, int, Restoring | Retiring]] = []
        self._retry_wake = trio.Event()
        self._retry_seq = itertools.count()
        self._first_left = 0
        self._loaded = False
        self.restored = trio.Event()  # every record read at start had its first attempt
        self._group_cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}
        # Refused connections waiting for their first request, oldest first.
        self._refusing: collections.deque[trio.CancelScope] = collections.deque()
        self.publishing = Publishing(
            nursery, max_per_uid=config.max_publications, interfaces=config.publish_interfaces
        )

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

    async def synced(self) -> str | None:
        """Return once the state file holds every change made so far.

        map and unmap reply only after this, so a change an app was told of
        survives a crash right after. Returns ``None``, or why the file could
        not be written (the reply then says so: ``saved`` false).
        """
        target = self._changes
        self._urgent.set()
        while self._written < target:
            await self._wrote.wait()
        return self._write_error

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the state file after every change.

        Changes that arrive while a write is under way are written by the next
        one, so a burst of requests costs a few writes, not one fsync each;
        :meth:`synced` lets a reply wait for the write that covers it. A change
        nobody waits for (a renewal: every broker event is one) waits up to
        :data:`LAZY_WRITE_DELAY` for company: with 100,000 mappings a renewal
        every few milliseconds must not mean a 40 MB rewrite each.
        """
        task_status.started()
        while True:
            await self._dirty.wait()
            if not self._urgent.is_set():
                with trio.move_on_after(LAZY_WRITE_DELAY):
                    await self._urgent.wait()
            self._dirty = trio.Event()
            self._urgent = trio.Event()
            generation = self._changes
            records = self._records()
            try:
                await trio.to_thread.run_sync(self.store.save, records)
            except OSError as exc:
                logger.error("cannot write the state file %s: %s", self.store.path, exc)
                self._write_error = f"cannot write the state file {self.store.path}: {exc}"
            else:
                self._write_error = None
            self._written = generation
            self._wrote.set()
            self._wrote = trio.Event()

    async def watch_undeleted(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the state file's ``pending_delete`` records in step with the
        broker's retries: the broker says nothing when a retried delete
        finally goes through, so its list is looked at every few seconds."""
        task_status.started()
        last: frozenset[Lease] = frozenset()
        while True:
            await trio.sleep(UNDELETED_CHECK)
            current = frozenset(self.broker.undeleted())
            if current != last:
                last = current
                self._save()

    def _write(self, *, exiting: bool = False, records: list[dict[str, Any]] | None = None) -> None:
        """Write the state file now: *records*, or :meth:`_records` (*exiting* as there)."""
        if not self._loaded:
            return  # never read: what is on disk is still all there is
        try:
            self.store.save(self._records(exiting=exiting) if records is None else records)
        except OSError as exc:
            logger.error("cannot write the state file %s: %s", self.store.path, exc)

    def _records(self, *, exiting: bool = False) -> list[dict[str, Any]]:
        """Every record the state file must hold.

        Each entry's mapping with its holds, entries still being restored
        included, then the deletes not yet confirmed. *exiting* (a clean
        stop): only persisted holds, since the daemon's exit ends the others;
        an entry not adopted yet with none is recorded as ``pending_delete``
        so the next start deletes it.
        """
        self._take_given_up()
        records = []
        for entry in self.shared.values():
            if entry.handle is None:
                continue  # reserved: the gateway has not answered yet
            if not exiting:
                cached = self._record_cache.get(entry.key)
                if cached is not None:
                    records.append(cached)
                    continue
            mapping, holds = _handle(entry), entry.holds
            pending = False
            if exiting:
                persisted = [h for h in holds if h.persist]
                if persisted or not isinstance(mapping, Restoring):
                    holds = persisted
                else:
                    pending = True
            lease = mapping.lease
            if lease is None or not holds:
                continue
            if not exiting and mapping.state is State.RELEASED:
                continue
            record = daemon_record(
                lease, entry.owner_uid, holds, mapping.request.lifetime, pending_delete=pending
            )
            if entry.key in self._third_party:
                record["third_party"] = True
            if not exiting:
                self._record_cache[entry.key] = record
            records.append(record)
        records.extend(item.record for item in self._retiring.values())
        # Deletes the broker is still retrying (a gateway that did not answer
        # an unmap): should this process die, the next start finishes them.
        undeleted = self.broker.undeleted()
        if undeleted:  # usually none: no pass over every record for nothing
            recorded = {(r["protocol"], r["internal_port"]) for r in records}
            records.extend(
                _pending_delete_record(lease)
                for lease in undeleted
                if (lease.protocol.value, lease.internal_port) not in recorded
            )
        return records

    def _take_given_up(self) -> None:
        """Deletes whose bounded retries in the broker ran out, their lease still
        running: the mapping may still be open on the gateway, so it stays on
        file and is tried again later, for as long as the daemon runs
        (docs/daemon-protocol.md, Persistence). Taken here, where every write
        of the state file starts, so that no write ever leaves one out."""
        for lease in self.broker.take_given_up():
            item = self._retire(lease, _pending_delete_record(lease))
            item.failures = len(RECOVERY_BACKOFF) - 1  # next try after the longest wait
            self._retry_later(item, None, quiet=True)

    async def _drop(self, entry: Entry) -> None:
        """*entry* left the registry (its last hold went): end it at the gateway."""
        await self._release(entry, self._dropping(entry))

    def _busy(self, key: tuple[str, int]) -> trio.Event | None:
        """What a map of *key* must wait for first: its creation by another
        client, or its delete still in flight; None when it may go ahead."""
        if self.owners.creating(key):
            return self._pending[key]
        return self._releasing.get(key)

    def _dropping(self, entry: Entry) -> trio.Event:
        """What must hold from the instant *entry* left the registry, with no
        checkpoint between: a map of its port waits for the delete (set when
        the delete is done). Done in a task of its own, this left a scheduler
        batch in which the port was neither held nor being released, and a
        map of it reached the broker, which still held the old mapping: the
        app got an `internal` error, "already mapped by this broker" (a CI
        run caught the window: the port gone from the registry, its mapping
        not yet releasing)."""
        self.publishing.gone(entry.key)  # withdrawn first: it will not be reachable
        self._save(entry)
        # Still found by its mapping until its Released event (events()
        # forgets it then): watchers hear that it ended. One already over
        # (FAILED) will publish none, nor will a stand-in (Restoring).
        handle = _handle(entry)
        if isinstance(handle, Mapping) and handle.state not in (State.RELEASED, State.FAILED):
            self._by_mapping[id(_handle(entry))] = entry
        # The broker holds the mapping until its delete is done: a map of the
        # same port meanwhile waits for that (see _map).
        self._releasing[entry.key] = done = trio.Event()
        return done

    async def _release(self, entry: Entry, done: trio.Event) -> None:
        await self._released(entry.key, _handle(entry), done)

    async def _released(
        self, key: tuple[str, int], handle: Mapping | Restoring, done: trio.Event
    ) -> None:
        """Release *handle*, whose port was marked as being deleted (*done*),
        then lift the mark: the maps of the port waiting on it go ahead."""
        try:
            await handle.release()
        finally:
            if self._releasing.get(key) is done:
                del self._releasing[key]
            done.set()

    # -- restore after a restart ----------------------------------------------------

    def _load(self, now: float) -> list[tuple[dict[str, Any], DaemonRecord, MappingRequest]]:
        """The state file's usable records (in a worker thread: 100,000 take a second).

        A record that fails validation is set aside with a log line naming it
        (:meth:`StateStore.load_checked`), never fatal; of two live records of
        one endpoint the first is kept.
        """
        seen: set[tuple[str, int]] = set()

        def check(record: Any) -> tuple[dict[str, Any], DaemonRecord, MappingRequest]:
            parsed = parse_daemon_record(record, now=now)
            if not parsed.pending_delete:
                if parsed.key in seen:
                    raise RecordError(f"a second record of {parsed.key[1]}/{parsed.key[0]}")
                seen.add(parsed.key)
            lease = parsed.lease
            # Only a record marked third-party (whose owner restore() checks
            # against --third-party-group) names another host. Any other is
            # this host's own, whatever address it had then: renewed with
            # that address, a record from before a DHCP change (or edited by
            # hand) would go out as THIRD_PARTY for whoever holds it now.
            third_party = record.get("third_party") is True
            request = MappingRequest(
                lease.internal_port,
                lease.protocol,
                parsed.lifetime_requested,
                internal_address=lease.internal_address if third_party else None,
                filters=lease.filters,
            )
            return record, parsed, request

        good, _rejected = self.store.load_checked(check)
        self._clear_temporary_files()
        return good

    def _clear_temporary_files(self) -> None:
        """Remove what writes cut short left (``.<name>.XXXXXXXX``, see
        :func:`portbroker._util.atomic_write_json`): a SIGKILL during a write
        leaves its temporary file, and each crash another. The daemon is its
        state file's only writer, and has written nothing yet."""
        path = self.store.path
        with contextlib.suppress(OSError):
            for leftover in path.parent.glob(f".{glob_escape(path.name)}.*"):
                if len(leftover.name) == len(path.name) + 10 and leftover.is_file():
                    logger.info("removing %s, left by a write that was cut short", leftover)
                    with contextlib.suppress(OSError):
                        leftover.unlink()

    async def restore(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Adopt the state file's mappings; delete the ones nobody owns any more.

        Started (``task_status``) once the file is read and every record is in
        memory: a mapping being restored is in :attr:`shared` (a
        :class:`Restoring`), one to delete in the deletes to confirm. Then, at
        most :data:`RESTORE_CONCURRENCY` at once, each is adopted (PCP: the
        same nonce) or deleted on the gateway; one that fails for want of an
        answer is tried again after :data:`~portbroker.lifecycle.RECOVERY_BACKOFF`,
        for as long as the daemon runs. A record goes only when resolved: its
        owner unmaps it, the gateway refuses it for good, or (a delete) it is
        deleted or its lease has run out. Until then the state file holds it,
        whatever happens to this process. Runs until cancelled.
        """
        now = trio.current_time()
        loaded = await trio.to_thread.run_sync(self._load, now, abandon_on_cancel=True)
        first: list[Restoring | Retiring] = []
        for record, parsed, request in loaded:
            holds = [Hold(h.uid, h.pid, h.persist, None) for h in parsed.holds]
            # Apps still running may reconnect (the ownership rules give
            # them the usual grace period); persisted holds stay.
            alive = [h for h in holds if h.persist or _pid_alive(h.pid)]
            if parsed.pending_delete or not alive:
                if not parsed.pending_delete:
                    logger.info(
                        "%d/%s: owner gone; deleting it on the gateway",
                        parsed.key[1],
                        parsed.key[0],
                    )
                first.append(self._retire(parsed.lease, record))
                continue
            third_party = record.get("third_party") is True
            if third_party and not self._may_keep_third_party(parsed.owner_uid):
                logger.warning(
                    "%d/%s: uid %d may not map for another host (%s) under this daemon's"
                    " policy; deleting it on the gateway",
                    parsed.key[1],
                    parsed.key[0],
                    parsed.owner_uid,
                    parsed.lease.internal_address,
                )
                first.append(self._retire(parsed.lease, record))
                continue
            this_host = third_party and _is_this_host(parsed.lease.internal_address)
            if (not third_party or this_host) and not self._may_keep_port(
                parsed.owner_uid, parsed.key[1]
            ):
                # Allowed when it was made (--allow-privileged-ports, a group),
                # not under this daemon's policy: it is not renewed for good.
                logger.warning(
                    "%d/%s: uid %d may not map ports below %d under this daemon's policy;"
                    " deleting it on the gateway",
                    parsed.key[1],
                    parsed.key[0],
                    parsed.owner_uid,
                    PRIVILEGED_PORTS,
                )
                first.append(self._retire(parsed.lease, record))
                continue
            placeholder = Restoring(request, parsed.lease, record, self._retire_restoring)
            if third_party:
                self._third_party.add(parsed.key)
            else:
                self._third_party.discard(parsed.key)
            self._install_restored(parsed.key, parsed.owner_uid, alive, placeholder)
            if len(alive) == len(holds):
                # Unchanged: written back as read (100,000 records must not
                # all be re-encoded before the first write).
                self._record_cache[parsed.key] = record
            first.append(placeholder)
        for item in first:
            item.first = True
        self._loaded = True
        self._first_left = len(first)
        if not first:
            self.restored.set()
        self._save()
        task_status.started()
        send, receive = trio.open_memory_channel[Restoring | Retiring](0)
        async with trio.open_nursery() as nursery:
            for _ in range(RESTORE_CONCURRENCY):
                nursery.start_soon(self._restore_worker, receive)
            for item in first:
                await send.send(item)
            del first
            while True:
                if not self._retry:
                    await self._retry_wake.wait()
                    self._retry_wake = trio.Event()
                    continue
                due, _seq, item = self._retry[0]
                if due > trio.current_time():
                    with trio.move_on_at(due):
                        await self._retry_wake.wait()
                    if self._retry_wake.is_set():
                        self._retry_wake = trio.Event()
                    continue
                heapq.heappop(self._retry)
                await send.send(item)

    def _adopted(self, entry: Entry, mapping: Mapping) -> None:
        """*entry*'s stand-in gives way to the mapping the broker now keeps alive."""
        self._by_mapping.pop(id(entry.handle), None)
        entry.handle = mapping
        if mapping.lease is not None:
            entry.external_port = mapping.lease.external_port
        self._save(entry)
        logger.info("%s: adopted from the state file (%d hold(s))", entry.id, len(entry.holds))

    def _retire(self, lease: Lease, record: dict[str, Any]) -> Retiring:
        item = Retiring(lease, {**record, "pending_delete": True})
        self._retiring[id(item)] = item
        self._save()
        return item

    def _resolved(self, item: Retiring) -> None:
        if self._retiring.pop(id(item), None) is not None:
            self._save()

    async def _retire_restoring(self, placeholder: Restoring) -> None:
        """Unmapped (or its grace over) before it was adopted: delete it on the gateway."""
        if placeholder.scope is not None:
            placeholder.scope.cancel()
        item = self._retire(placeholder.lease, placeholder.record)
        # Retried later should this attempt fail, or the request be cancelled.
        self._retry_later(item, None, quiet=True)
        await self._try_delete(item)

    def _retry_later(
        self,
        item: Restoring | Retiring,
        error: BaseException | None,
        retry_after: float | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        item.failures += 1
        delay = RECOVERY_BACKOFF[min(item.failures, len(RECOVERY_BACKOFF)) - 1]
        delay = max(delay, retry_after or 0.0)
        if not quiet:
            label = item.label if isinstance(item, Retiring) else f"{item.key[1]}/{item.key[0]}"
            doing = "delete" if isinstance(item, Retiring) else "take over"
            # Once per record at warning: 100,000 records must not flood the log.
            logger.log(
                logging.WARNING if item.failures == 1 else logging.INFO,
                "%s: could not %s it yet (%s); trying again in %g s",
                label,
                doing,
                error,
                delay,
            )
        heapq.heappush(self._retry, (trio.current_time() + delay, next(self._retry_seq), item))
        self._retry_wake.set()

    async def _restore_worker(
        self, receive: trio.MemoryReceiveChannel[Restoring | Retiring]
    ) -> None:
        async for item in receive:
            try:
                if isinstance(item, Restoring):
                    await self._try_adopt(item)
                else:
                    await self._try_delete(item)
            except Exception as exc:  # a bug must not lose the record, nor end the daemon
                logger.error("restoring a record failed: a bug", exc_info=exc)
                self._retry_later(item, exc)
            finally:
                if item.first:
                    item.first = False
                    self._first_left -= 1
                    if self._first_left == 0:
                        self.restored.set()

    async def _try_adopt(self, placeholder: Restoring) -> None:
        key = placeholder.key
        entry = self.shared.get(key)
        if entry is None or entry.handle is not placeholder:
            return  # unmapped meanwhile
        mapping: Mapping | None = None
        with trio.CancelScope() as placeholder.scope:
            try:
                mapping = await self.broker.adopt(placeholder.request, placeholder.lease)
            except MappingError as exc:
                failure = classify(exc, expires_in=_expires_in(placeholder.lease))
                if failure.kind is not FailureKind.REFUSED:
                    self._retry_later(placeholder, exc, failure.retry_after)
                    return
                logger.warning("%s: the gateway refuses it (%s); forgetting it", entry.id, exc)
                if self.shared.get(key) is entry:
                    self.publishing.gone(key)  # published while restoring: it is gone
                    self.owners.forget(key)
                    self._save(entry)
                return
            except (PortBrokerError, ValueError) as exc:
                self._retry_later(placeholder, exc)
                return
            finally:
                placeholder.scope = None
        if mapping is None:
            return  # cancelled: unmapped meanwhile, and being deleted
        if self.shared.get(key) is not entry or entry.handle is not placeholder:
            await mapping.release()
            return
        self._adopted(entry, mapping)

    async def _try_delete(self, item: Retiring) -> None:
        """One attempt now; should it fail, the broker's own retries take over
        (bounded: issue 8), and its ``undeleted()`` keeps the record in the
        state file meanwhile (:meth:`_records`)."""
        if id(item) not in self._retiring:
            return  # done meanwhile
        lease = item.lease
        key = (lease.protocol.value, lease.internal_port)
        while self.owners.creating(key):  # a map of its port is in flight: its outcome first
            await self._pending[key].wait()
        if id(item) not in self._retiring:
            return
        entry = self.shared.get(key)
        current = None if entry is None else getattr(entry.handle, "lease", None)
        if current is not None and supersedes(current, lease):
            # Mapped again since (while this delete waited its turn): deleting
            # the old lease would delete the new mapping (NAT-PMP and UPnP
            # name it by port), as the broker's own retries know (rule 10).
            logger.info("%s: not deleted: a new mapping takes its place", item.label)
            self._resolved(item)
            return
        if not lease.permanent and trio.current_time() >= lease.expires_at:
            logger.info("%s: its lease has run out; nothing left to delete", item.label)
            self._resolved(item)
            return
        try:
            done = await self.broker.delete(lease, retry=True)
        except ValueError as exc:
            # Its method is not enabled in this daemon: kept on file for a
            # daemon that has it, not retried here.
            logger.warning(
                "%s: cannot delete it here (%s); left in the state file", item.label, exc
            )
            return
        if done:
            logger.info("%s: deleted on the gateway", item.label)
        elif lease not in self.broker.undeleted():
            logger.warning("%s: the gateway refuses to delete it; forgetting it", item.label)
        self._resolved(item)

    def _leave(self, *, crashed: bool) -> list[dict[str, Any]] | None:
        """The last write of the state file, as the daemon ends.

        A clean stop (SIGTERM, cancellation): persisted mappings are detached
        (left on the gateway, recorded for the next start); the broker's exit
        deletes the connection-bound ones. Any other exit (a crash) releases
        nothing: every mapping is detached and recorded, connection-bound ones
        with their pids, so the next start adopts what is persisted and
        deletes what belonged to apps that are gone.
        """
        if not self._loaded:
            return None
        # Before detaching: a detached mapping reads as released.
        records = self._records(exiting=not crashed)
        for entry in list(self.shared.values()):
            mapping = entry.handle
            if not isinstance(mapping, Mapping) or mapping.state in (State.RELEASED, State.FAILED):
                continue
            if crashed or any(h.persist for h in entry.holds):
                with contextlib.suppress(PortBrokerError):
                    self.broker.detach(mapping)
        self._write(records=records)
        return records

    def _install_restored(
        self, key: tuple[str, int], owner_uid: int, holds: list[Hold], mapping: Restoring
    ) -> Entry:
        """The in-memory entry of a record being restored (the one place restore makes one)."""
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
            return {"mapping": describe(entry), **_saved(await self.synced())}
        if request.op == "unmap":
            unmapped = await self._unmap(client, request)
            return {"unmapped": unmapped, **_saved(await self.synced())}
        if request.op == "list":
            return {"mappings": [describe(e) for e in self.owners.visible(client.uid)]}
        if request.op in ("publish", "unpublish"):
            return await self._publish(client, request)
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
        internal_address, filters = _third_party_params(request)
        key = (protocol, port)
        while True:
            # Before the claim, after every wait too: a wait for another
            # client's creation can be long, and a client behind a full
            # pipeline may hang up meanwhile unseen by its reader.
            self._check_hung_up(client)
            busy = self._busy(key)
            if busy is None:
                break
            await busy.wait()
        dead = self.shared.get(key)
        if (
            dead is not None
            and self._visible(client.uid, dead)
            and _handle(dead).state in (State.FAILED, State.RELEASED)
        ):
            # The gateway ended it for good (its apps heard Failed): asked for
            # again by its owner, it is made afresh, not joined dead.
            self.owners.forget(key)
            self._save(dead)
        self._check_same_target(client, key, internal_address, filters)
        entry = self.owners.claim(
            client.conn,
            key,
            persist=persist,
            external_port=external_port,
            now=trio.current_time(),
            third_party=internal_address is not None,
            this_host=internal_address is not None and _is_this_host(internal_address),
        )
        if not entry.creating:
            self._save(entry)  # joined
            return entry
        # Retried deletes of another host's mapping of this port, which the
        # broker would drop as superseded by this map (lifecycle rule 10):
        # taken over below, see _keep_deleting.
        others = self._other_hosts_undeleted(key, internal_address)
        if internal_address is not None:
            self._third_party.add(key)
        else:
            self._third_party.discard(key)
        self._pending[key] = done = trio.Event()
        try:
            mapping = await self.broker.map(
                port,
                protocol,
                lifetime=lifetime,
                external_port=external_port,
                exact=exact,
                via=via,
                internal_address=internal_address,
                filters=filters,
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
        self._keep_deleting(others)
        lease = mapping.lease
        self._check_hung_up(client)  # then created() rolls it back
        kept = self.owners.created(key, mapping, lease.external_port if lease else None)
        if kept is None:
            # Its requester left before it was made: nobody would own it.
            logger.info("%d/%s: the client left before it was made; deleting it", port, protocol)
            # Marked before the first checkpoint, like _dropping: a map of
            # the port waiting for this creation waits for the delete too
            # (the broker holds the mapping until then).
            self._releasing[key] = releasing = trio.Event()
            with trio.CancelScope(shield=True):
                await self._released(key, mapping, releasing)
            raise ProtocolError(ErrorCode.GONE, "the connection closed before the map was made")
        self._save(kept)
        return kept

    def _other_hosts_undeleted(
        self, key: tuple[str, int], internal_address: IPAddress | None
    ) -> list[Lease]:
        """The broker's retried deletes at *key* of a mapping for another host
        than *internal_address* (None: this host) names.

        The broker ends a retried delete when the port is mapped again, since
        deleting the old entry would delete the new one: true of this host's
        own old mapping (PCP and NAT-PMP name it by the internal endpoint),
        not of a camera's, another gateway entry, which would then stay open
        until its lease ran out. Only the daemon knows whose a key was last
        (:attr:`_third_party`).
        """
        if key not in self._third_party and internal_address is None:
            return []  # this host's before and now: rule 10 is right
        return [
            lease
            for lease in self.broker.undeleted()
            if (lease.protocol.value, lease.internal_port) == key
            and lease.internal_address != internal_address
            # An older mapping of this host's own: superseded indeed.
            and not (internal_address is None and _is_this_host(lease.internal_address))
        ]

    def _keep_deleting(self, leases: list[Lease]) -> None:
        """Deletes of :meth:`_other_hosts_undeleted` the broker dropped: the
        daemon's, tried again (and kept in the state file) like a restore's."""
        if not leases:
            return
        left = set(self.broker.undeleted())
        for lease in leases:
            if lease not in left:
                logger.info(
                    "%d/%s: still deleting %s's old mapping (another gateway entry)",
                    lease.internal_port,
                    lease.protocol.value,
                    lease.internal_address,
                )
                self._retry_later(
                    self._retire(lease, _pending_delete_record(lease)), None, quiet=True
                )

    def _check_same_target(
        self,
        client: Client,
        key: tuple[str, int],
        internal_address: IPAddress | None,
        filters: tuple[RemoteFilter, ...],
    ) -> None:
        """A map that would join *key*'s mapping must ask for the same host and filters.

        Mappings are keyed by (protocol, internal port) whatever the host, so
        a third-party map of the camera's 8080 must not silently join this
        host's own 8080, nor a filtered request an unfiltered mapping.

        Raises:
            ProtocolError: CONFLICT, naming the caller's own mapping only.
        """
        entry = self.shared.get(key)
        if entry is None or entry.creating or not self._visible(client.uid, entry):
            return  # new, or another user's: claim() answers that
        mapping = _handle(entry)
        held = mapping.request
        # A restored request names its (own) address; _third_party says whose.
        held_address = held.internal_address if key in self._third_party else None
        if held_address == internal_address and set(held.filters) == set(filters):
            return
        target = f"for {held_address}" if held_address else "for this host"
        if held.filters:
            target += f" only from {', '.join(str(f) for f in held.filters)}"
        raise ProtocolError(
            ErrorCode.CONFLICT,
            f"{entry.id} is already mapped {target}; unmap it first"
            " (one mapping per internal port and protocol, whichever host)",
        )

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

    async def _publish(self, client: Client, request: Request) -> dict[str, Any]:
        """``publish`` / ``unpublish`` one of the client's user's mappings (root: any)."""
        key = _mapping_key(request)
        entry = self.shared.get(key)
        if entry is None or entry.creating or not self._visible(client.uid, entry):
            raise ProtocolError(
                ErrorCode.NOT_FOUND, f"no mapping {key[1]}/{key[0]} of yours to publish"
            )
        if request.op == "unpublish":
            return await self.publishing.unpublish(entry, request)
        return await self.publishing.publish(client.uid, entry, _handle(entry), request)

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
                self._nursery.start_soon(self._release, entry, self._dropping(entry))
            # Holds that ended while others remain change the state file too
            # (their records are recomputed); a wake-up that ended nothing,
            # such as any client leaving, writes nothing.
            for entry in shrunk:
                self._save(entry)

    async def events(self) -> None:
        """Broker events -> watching clients, and the state file kept current."""
        async for item in self.broker.events():
            if isinstance(item.event, Released) and item.event.retrying:
                self._save()  # its delete goes on: the state file says so
            entry = self._by_mapping.get(id(item.mapping))
            if entry is None or entry.handle is not item.mapping:
                continue
            if not isinstance(item.event, Released):
                lease = item.mapping.lease
                if lease is not None:  # a new external port (Restored, ...)
                    entry.external_port = lease.external_port
                self._save(entry)
                self.publishing.changed(entry.key, item.event, lease)
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
                            self._grace_changed.set()
                            answers.cancel_scope.cancel()
                    # Every reply is queued: let them go out, then close.
                    send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                send.close()
                with trio.CancelScope(shield=True):
                    await self.disconnected(client)

    def _may_keep_third_party(self, uid: int) -> bool:
        """The third-party policy for a restored record of *uid*."""
        if uid == 0:
            return True
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:  # no such user any more: no groups
            return False
        try:
            self.owners.check_third_party(Peer(uid, 0, self._groups(uid, gid)))
        except ProtocolError:
            return False
        return True

    def _may_keep_port(self, uid: int, port: int) -> bool:
        """The privileged-port policy for a restored record of *uid*."""
        policy = self.owners.policy
        if port >= PRIVILEGED_PORTS or uid == 0 or policy.allow_privileged_ports:
            return True
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:  # no such user any more: no groups
            groups: frozenset[int] = frozenset()
        else:
            groups = self._groups(uid, gid)
        try:
            self.owners.check_port(Peer(uid, 0, groups), port)
        except ProtocolError:
            return False
        return True

    def _groups(self, uid: int, gid: int) -> frozenset[int]:
        """The user's groups, for --privileged-group only, looked up once per
        user per :data:`GROUPS_TTL`: a lookup can be slow (LDAP, sssd) and
        blocks the event loop, and a user can connect in a loop."""
        policy = self.owners.policy
        if not (policy.privileged_gids or policy.third_party_gids):
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
            key=lambda c: (c.conn in holding, c.watching, c.last_active),
        )
        self._log_refusal(
            busiest,
            victim.pid,
            f"{len(self.clients)} connections in all, the limit: closed one of its"
            f" {len(victims)} (the most of any user)",
        )
        victim.send(proto.error_reply(None, ErrorCode.TOO_MANY_CONNECTIONS, _SHED_MESSAGE))
        # Its writer gets a moment to deliver why, then the connection ends.
        victim.outbox.close()
        victim.cancel.deadline = min(victim.cancel.deadline, trio.current_time() + SHED_FLUSH)
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
        """Read request lines (:class:`.framing.LineFramer`) and answer each.

        A line over the limit gets one ``line_too_long`` and is skipped, never
        buffered. At end of stream an unterminated last line is answered too,
        and the replies of the requests still running are waited for, so a
        client that half-closes (``socat``, ``send_eof``) reads every answer.
        """
        limiter = trio.Semaphore(IN_FLIGHT)
        framer = framing.LineFramer(proto.MAX_LINE)
        idle = self.config.idle_timeout
        while True:
            try:
                with trio.move_on_after(idle) as waited:
                    chunk = await client.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if waited.cancelled_caught:
                if self._idle(client, limiter):
                    client.send(
                        proto.error_reply(
                            None,
                            ErrorCode.IDLE,
                            f"no request, mapping or watch for {idle:g} s: closing"
                            " (a connection that holds a mapping is never closed for this)",
                        )
                    )
                    return
                continue
            client.last_active = trio.current_time()
            if not chunk and _hung_up(client.stream):
                return  # gone: serve_client rolls back what is still running
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

    def _idle(self, client: Client, limiter: trio.Semaphore) -> bool:
        """Nothing running, nothing watched, nothing held: a connection that
        only takes a descriptor (issue 8: a thousand of them denied service)."""
        return (
            limiter.value == IN_FLIGHT
            and not client.watching
            and client.conn not in self.owners.holding(client.uid)
            and trio.current_time() - client.last_active >= self.config.idle_timeout
        )

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


_SHED_MESSAGE: Final = (
    "the daemon is at its connection limit and your user has the most connections open;"
    " this one was closed: use fewer connections"
)
REFUSAL_LOG_INTERVAL: Final = 60.0
SHED_FLUSH: Final = 1.0  # seconds a shed connection's writer has to say why
UNDELETED_CHECK: Final = 2.0  # seconds between looks at the broker's pending deletes
LAZY_WRITE_DELAY: Final = 2.0  # seconds a change nobody waits for may wait to be written
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


def _mapping_key(request: Request) -> tuple[str, int]:
    """The mapping a publish names: ``mapping`` ("8080/tcp"), or ``port`` and ``protocol``."""
    mapping_id = request.get("mapping", str)
    if mapping_id is None:
        port = request.port("port", required=True)
        assert port is not None
        return (request.protocol(), port)
    port_text, _, protocol = mapping_id.partition("/")
    if not (port_text.isascii() and port_text.isdigit()) or protocol not in ("tcp", "udp"):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'mapping' must look like '8080/tcp', not {mapping_id[:40]!r}"
        )
    return (protocol, int(port_text[:6]))


def _saved(error: str | None) -> dict[str, Any]:
    """What a map or unmap reply adds when the change is not on disk."""
    return {} if error is None else {"saved": False, "save_error": error}


def _pending_delete_record(lease: Lease) -> dict[str, Any]:
    """A state-file record that only asks the next start to delete *lease*.

    Its ``lifetime_requested`` must pass the next start's validation
    (:func:`.state.parse_daemon_record`) although nobody will ask for it: a
    permanent UPnP lease has lifetime 0, and a gateway may grant more than a
    request may ask for.
    """
    requested = min(max(lease.lifetime, MIN_LIFETIME), MAX_LIFETIME)
    return daemon_record(lease, 0, [], requested, pending_delete=True)


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


def _expires_in(lease: Lease) -> float | None:
    """What is left of *lease*, for :func:`~portbroker.lifecycle.classify`: a
    refusal whose ``retry_after`` lies beyond it is a refusal for good."""
    return None if lease.permanent else max(0.0, lease.expires_at - trio.current_time())


def _worded(exc: BaseException | None) -> bool:
    """A failure the code put in words (a PortBrokerError), not a bug."""
    return exc is not None and all(isinstance(leaf, PortBrokerError) for leaf in _leaves(exc))


def _only_cancelled(exc: BaseException) -> bool:
    return all(isinstance(leaf, trio.Cancelled) for leaf in _leaves(exc))


@contextlib.asynccontextmanager
async def serve(config: DaemonConfig) -> AsyncIterator[Daemon]:
    """Run a daemon (in the caller's trio run) until the block exits.

    The block is entered once the state file is read (:meth:`Daemon.restore`
    goes on in the background: :attr:`Daemon.restored` says when every record
    had its first attempt). Leaving it normally or by cancellation is a clean
    stop; any other exit, or a failure of any of the daemon's tasks, is a
    crash, and a crash leaves every mapping on the gateway
    (:meth:`Daemon._leave`).
    """
    sock = _listening_socket(config)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        with collapse_single():
            options: dict[str, Any] = {
                # One monitor and one ClockWatch for every client (the broker's).
                "follow": config.follow and config.gateway is None,
                "watch_resume": config.watch_resume,
                **config.broker_options,
            }
            async with open_broker(
                config.gateway, config.methods, config.probe_timeout, **options
            ) as broker:
                daemon: Daemon | None = None
                final: list[dict[str, Any]] | None = None
                crashed = True
                failure: BaseException | None = None
                try:
                    async with trio.open_nursery() as nursery:
                        daemon = Daemon(config, broker, nursery)
                        nursery.start_soon(daemon.events)
                        await nursery.start(daemon.writer)
                        await nursery.start(daemon.grace_timer)
                        await nursery.start(daemon.watch_undeleted)
                        # Clients queue in the listening socket's backlog until
                        # the file is read (a second for 100,000 records).
                        await nursery.start(daemon.restore)
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
                    crashed = False
                except BaseException as exc:
                    crashed = not _only_cancelled(exc)
                    failure = exc
                    raise
                finally:
                    if daemon is not None:
                        if crashed and (daemon._loaded or not _worded(failure)):
                            # (A state file that cannot be read stops it before
                            # anything was restored: its error, in words, is the
                            # caller's to tell, without a traceback.)
                            logger.error(
                                "the daemon failed: every mapping stays on the gateway",
                                exc_info=failure,
                            )
                        # The writer has stopped (its last write finished): this
                        # write is the last, but for the deletes below.
                        final = daemon._leave(crashed=crashed)
            # Out of the broker: it deleted the connection-bound mappings on its
            # way out. Those whose delete failed (a silent gateway) are recorded
            # for the next start to delete, so none is left open for good.
            recorded = {(r["protocol"], r["internal_port"]) for r in final or ()}
            undeleted = [
                lease
                for lease in broker.undeleted()
                if (lease.protocol.value, lease.internal_port) not in recorded
            ]
            if daemon is not None and final is not None and undeleted:
                logger.warning(
                    "%d delete(s) not confirmed by the gateway; the next start retries them",
                    len(undeleted),
                )
                daemon._write(records=final + [_pending_delete_record(x) for x in undeleted])
    finally:
        # Closed here too: a broker that failed to open (no gateway) never
        # served it, and the socket would leak until the garbage collector.
        listener.socket.close()
        with contextlib.suppress(OSError):
            if config.socket_path.is_socket():
                config.socket_path.unlink()


async def run_daemon(
    config: DaemonConfig, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled or SIGINT/SIGTERM (at any moment: during a restore too)."""
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    logger.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with serve(config):
                task_status.started()
                await trio.sleep_forever()
