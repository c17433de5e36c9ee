"""Who may hold which mapping, and for how long: the daemon's policy, sans-IO.

The daemon's socket code asks this module and does what it answers; nothing
here touches a socket, a clock or the gateway, so every rule is tested with
plain values (tests/test_ownership.py). The rules (docs/daemon-protocol.md,
"Sharing and lifetime" and "Limits"):

- A mapping is keyed by its internal endpoint (protocol, port). Its owner is
  the user who created it; the owner's apps share it, each with a *hold*.
  Another user asking for the same endpoint is refused, and is told only that
  it is in use: never whose, never which ports.
- A hold lives as long as its connection, then a grace period (an app that
  restarts within it gets its hold back); a persisted hold lasts until an
  explicit unmap. The mapping ends on the gateway when its last hold goes.
- ``unmap`` drops the holds of the connection that sends it; from a
  connection that holds none, the user's persisted and orphaned holds (never
  those of another running app). Root may end any mapping.
- Limits per user: distinct mappings (``max_mappings``), connections
  (``max_connections``), holds (``max_holds``). Root is bound by them too: a
  runaway root process must not starve everyone either.
- Internal ports below 1024 are root's unless the policy allows every user
  (``allow_privileged_ports``) or the user is in one of ``privileged_gids``:
  a user must not be able to expose sshd (22) or a DNS server (53) through
  a root daemon.
- A map whose requester left before it was carried out is rolled back
  (:meth:`Ownership.created` returns ``None``): nobody would own it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Final

import attrs

from portbroker.daemon.protocol import ErrorCode, ProtocolError

__all__ = [
    "PRIVILEGED_PORTS",
    "Entry",
    "Hold",
    "Key",
    "Ownership",
    "Peer",
    "Policy",
]

PRIVILEGED_PORTS: Final = 1024  # internal ports below this need root or a policy
Key = tuple[str, int]  # (protocol, internal port)


@attrs.frozen
class Peer:
    """Who is on a connection: from SO_PEERCRED, with the user's groups."""

    uid: int
    pid: int
    gids: frozenset[int] = frozenset()


@attrs.frozen
class Policy:
    grace: float = 10.0  # seconds a connection-bound hold outlives its connection
    max_mappings: int = 64  # distinct mappings one uid may hold
    max_connections: int = 64  # connections one uid may have open at once
    max_holds: int = 1024  # holds one uid may have (apps sharing mappings)
    allow_privileged_ports: bool = False
    privileged_gids: frozenset[int] = frozenset()
    # Who may map for another host's address (THIRD_PARTY): root and these.
    third_party_gids: frozenset[int] = frozenset()

    def __attrs_post_init__(self) -> None:
        for name in ("max_mappings", "max_connections", "max_holds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.grace >= 0:
            raise ValueError("grace must be a number of seconds, at least 0")


@attrs.define(eq=False)
class Hold:
    uid: int
    pid: int
    persist: bool
    conn: int | None  # the connection that holds it; None: persisted or in grace
    grace_until: float | None = None


@attrs.define(eq=False)
class Entry:
    """One gateway mapping and the holds that keep it."""

    key: Key
    owner_uid: int
    holds: list[Hold] = attrs.Factory(list)
    external_port: int | None = None  # once granted (conflict checks)
    creating: bool = False  # reserved: the gateway request is in flight
    requester: int | None = None  # while creating: the connection that asked
    handle: object = None  # the I/O layer's object for it (a broker Mapping)

    @property
    def protocol(self) -> str:
        return self.key[0]

    @property
    def port(self) -> int:
        return self.key[1]

    @property
    def id(self) -> str:
        return f"{self.key[1]}/{self.key[0]}"

    @property
    def persist(self) -> bool:
        return any(h.persist for h in self.holds)


@attrs.define
class _Conn:
    peer: Peer
    open: bool = True


class Ownership:
    """The registry of mappings, holds and connections, and the rules above.

    Every method either changes the registry and returns what the caller must
    do at the gateway, or raises :class:`~portbroker.daemon.protocol.ProtocolError`
    (the error reply) and changes nothing.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.entries: dict[Key, Entry] = {}
        self._conns: dict[int, _Conn] = {}
        self._conn_ids = itertools.count(1)
        self._connections: Counter[int] = Counter()  # uid -> open connections
        self._keys: dict[int, set[Key]] = {}  # uid -> keys it holds (or is creating)
        self._holds: Counter[int] = Counter()  # uid -> holds
        self._counted: dict[Key, tuple[frozenset[int], list[int]]] = {}  # what _track added
        self._grace: list[tuple[float, int, Key]] = []  # heap of grace deadlines
        self._seq = itertools.count()

    # -- connections -----------------------------------------------------------

    def connect(self, peer: Peer) -> int:
        """Admit a connection; returns its id.

        Raises:
            ProtocolError: TOO_MANY_CONNECTIONS, the user's limit.
        """
        count = self._connections[peer.uid]
        if count >= self.policy.max_connections:
            raise ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"uid {peer.uid} has {count} connections open, the limit"
                " (--max-connections); close some",
            )
        conn = next(self._conn_ids)
        self._conns[conn] = _Conn(peer)
        self._connections[peer.uid] += 1
        return conn

    def connections(self, uid: int) -> int:
        return self._connections[uid]

    def busiest_uid(self) -> int | None:
        """The uid with the most connections open (the first to shed under pressure)."""
        top = self._connections.most_common(1)
        return top[0][0] if top else None

    def is_open(self, conn: int) -> bool:
        state = self._conns.get(conn)
        return state is not None and state.open

    def holding(self, uid: int) -> set[int]:
        """The connections of *uid* that hold a mapping (cheap: its own entries only)."""
        return {
            h.conn
            for entry in self._held_by(uid)
            for h in entry.holds
            if h.conn is not None and h.uid == uid
        }

    def disconnect(self, conn: int, now: float) -> None:
        """The connection closed: its holds enter their grace period."""
        state = self._conns.pop(conn, None)
        if state is None:
            return
        uid = state.peer.uid
        self._connections[uid] -= 1
        if self._connections[uid] <= 0:
            del self._connections[uid]
        until = now + self.policy.grace
        for entry in self._held_by(uid):
            graced = False
            for hold in entry.holds:
                if hold.conn == conn:
                    hold.conn, hold.grace_until = None, until
                    graced = True
            if graced:
                heapq.heappush(self._grace, (until, next(self._seq), entry.key))

    # -- map -------------------------------------------------------------------

    def claim(
        self,
        conn: int,
        key: Key,
        *,
        persist: bool,
        external_port: int | None,
        now: float,
        third_party: bool = False,
        this_host: bool = False,
    ) -> Entry:
        """A map request. Returns the entry: joined (``creating`` False, nothing
        to do at the gateway) or reserved (``creating`` True: make it, then
        call :meth:`created` or :meth:`create_failed`).

        A key being created by someone else is the caller's to wait for
        (:meth:`creating`), then to claim again.

        Raises:
            ProtocolError: CONFLICT, TOO_MANY_MAPPINGS, TOO_MANY_HOLDS,
                PRIVILEGED_PORT, or GONE (the connection closed meanwhile).
        """
        state = self._conns.get(conn)
        if state is None or not state.open:
            raise ProtocolError(ErrorCode.GONE, "the connection closed before the map was made")
        peer = state.peer
        protocol, port = key
        if third_party:
            # The privileged-port rule keeps this host's services (sshd) in
            # root's hands; a third-party port is another host's, and the
            # right to map for other hosts is checked instead.
            self.check_third_party(peer)
        if not third_party or this_host:
            # An internal_address that is one of this host's own addresses
            # (*this_host*) names this host's services all the same.
            self.check_port(peer, port)
        entry = self.entries.get(key)
        if entry is not None:
            if entry.creating:
                raise AssertionError("claim() of a key being created: wait for it first")
            return self._join(conn, peer, entry, external_port, persist)
        self._check_holds(peer.uid)
        held = len(self._keys.get(peer.uid, ()))
        if held >= self.policy.max_mappings:
            raise ProtocolError(
                ErrorCode.TOO_MANY_MAPPINGS,
                f"uid {peer.uid} holds {held} mappings, the limit (--max-mappings)",
            )
        if external_port is not None:
            other = self._external_owner(protocol, external_port)
            if other is not None:
                raise ProtocolError(
                    ErrorCode.CONFLICT,
                    f"external port {external_port}/{protocol} "
                    + (
                        f"already maps to {other.id}"
                        if self._may_see(peer.uid, other)
                        else "is in use"
                    ),
                )
        # The port asked for counts as taken while the request is in flight: a
        # second user racing for it must not pass the check above meanwhile.
        entry = Entry(key, peer.uid, external_port=external_port, creating=True, requester=conn)
        entry.holds.append(Hold(peer.uid, peer.pid, persist, None if persist else conn))
        self.entries[key] = entry
        self._track(entry)
        return entry

    def creating(self, key: Key) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.creating

    def created(self, key: Key, handle: object, external_port: int | None) -> Entry | None:
        """The gateway granted the reserved *key*. ``None``: its requester is
        gone, so the caller must delete the mapping again (a map nobody would
        own, issue 8); the reservation is dropped."""
        entry = self.entries[key]
        assert entry.creating, "created() of a key not being created"
        entry.creating, entry.handle, entry.external_port = False, handle, external_port
        requester, entry.requester = entry.requester, None
        if requester is None or not self.is_open(requester):
            self._remove(entry)
            return None
        return entry

    def create_failed(self, key: Key) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.creating:
            self._remove(entry)

    def check_port(self, peer: Peer, port: int) -> None:
        """The privileged-port policy for internal *port*.

        Raises:
            ProtocolError: PRIVILEGED_PORT.
        """
        if port >= PRIVILEGED_PORTS or peer.uid == 0 or self.policy.allow_privileged_ports:
            return
        if peer.gids & self.policy.privileged_gids:
            return
        raise ProtocolError(
            ErrorCode.PRIVILEGED_PORT,
            f"internal port {port} is below {PRIVILEGED_PORTS}: only root may map it"
            " (the daemon's --allow-privileged-ports or --privileged-group lets others)",
        )

    def check_third_party(self, peer: Peer) -> None:
        """May *peer* map a port of another host (THIRD_PARTY, RFC 6887 §13.1)?

        Only root and members of ``third_party_gids``: such a mapping exposes
        a host that never asked for it (a camera), so it is the network
        administrator's to make.

        Raises:
            ProtocolError: THIRD_PARTY_FORBIDDEN.
        """
        if peer.uid == 0 or peer.gids & self.policy.third_party_gids:
            return
        raise ProtocolError(
            ErrorCode.THIRD_PARTY_FORBIDDEN,
            "only root may map a port of another host (internal_address);"
            " the daemon's --third-party-group NAME lets that group's members",
        )

    def _join(
        self, conn: int, peer: Peer, entry: Entry, external_port: int | None, persist: bool
    ) -> Entry:
        if not self._may_see(peer.uid, entry):
            # Not whose, not which external port: only that it is taken.
            raise ProtocolError(ErrorCode.CONFLICT, f"{entry.id} is in use by another user")
        if external_port is not None and entry.external_port not in (None, external_port):
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"{entry.id} is already mapped to external port {entry.external_port}",
            )
        for hold in entry.holds:
            # A restarting app reclaims its hold within the grace period.
            if hold.conn is None and not hold.persist and hold.uid == peer.uid:
                hold.conn, hold.grace_until, hold.pid = conn, None, peer.pid
                hold.persist = persist
                if persist:
                    hold.conn = None
                return entry
        # Only a new hold counts against the limit: an app taking back its own
        # holds after a restart adds none.
        self._check_holds(peer.uid)
        entry.holds.append(Hold(peer.uid, peer.pid, persist, None if persist else conn))
        self._track(entry)
        return entry

    def _check_holds(self, uid: int) -> None:
        if self._holds[uid] >= self.policy.max_holds:
            raise ProtocolError(
                ErrorCode.TOO_MANY_HOLDS,
                f"uid {uid} holds {self._holds[uid]} mappings across its apps, the limit",
            )

    # -- unmap -----------------------------------------------------------------

    def unmap(self, conn: int, key: Key) -> tuple[Entry, bool]:
        """Drop holds on *key* per the rules; returns (entry, released): when
        *released*, the last hold went and the caller deletes it at the gateway.

        Raises:
            ProtocolError: NOT_FOUND (also for another user's mapping: nothing
                about it leaks) or CONFLICT (held by another of your running apps).
        """
        state = self._conns.get(conn)
        uid = state.peer.uid if state is not None else -1
        entry = self.entries.get(key)
        if entry is None or entry.creating or not self._may_see(uid, entry):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no mapping {key[1]}/{key[0]} of yours")
        if any(h.conn == conn for h in entry.holds):
            # This connection's own holds; other apps keep theirs.
            entry.holds = [h for h in entry.holds if h.conn != conn]
        elif uid == 0:
            entry.holds = []  # root may end any mapping
        else:
            # From another connection (`portbroker unmap` after `map`): the
            # user's persisted or orphaned holds, never those of live apps.
            remaining = [h for h in entry.holds if h.uid != uid or h.conn is not None]
            if any(h.uid == uid for h in remaining):
                raise ProtocolError(
                    ErrorCode.CONFLICT,
                    f"{entry.id} is held by another of your running apps; it must unmap it",
                )
            entry.holds = remaining
        if entry.holds:
            self._track(entry)
            return entry, False
        self._remove(entry)
        return entry, True

    # -- grace -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work: the earliest grace deadline."""
        while self._grace:
            until, _, key = self._grace[0]
            entry = self.entries.get(key)
            if entry is not None and any(h.grace_until == until for h in entry.holds):
                return until
            heapq.heappop(self._grace)  # stale: reclaimed, unmapped or superseded
        return None

    def expire(self, now: float, shrunk: list[Entry] | None = None) -> list[Entry]:
        """End the holds whose grace is over; returns the entries released by
        it (removed here; the caller deletes them at the gateway). Entries
        that lost holds but remain are added to *shrunk* (their records change)."""
        released: list[Entry] = []
        while self._grace and self._grace[0][0] <= now:
            _, _, key = heapq.heappop(self._grace)
            entry = self.entries.get(key)
            if entry is None or entry.creating:
                # Being created: created() rolls it back (its requester is
                # gone) or create_failed() drops it; there is nothing to
                # release at the gateway yet.
                continue
            before = len(entry.holds)
            entry.holds = [h for h in entry.holds if h.grace_until is None or h.grace_until > now]
            if entry.holds:
                if len(entry.holds) != before:
                    self._track(entry)
                    if shrunk is not None:
                        shrunk.append(entry)
            else:
                self._remove(entry)
                released.append(entry)
        return released

    # -- restore ----------------------------------------------------------------

    def restored(
        self,
        key: Key,
        owner_uid: int,
        holds: Iterable[Hold],
        *,
        handle: object,
        external_port: int | None,
        now: float,
    ) -> Entry:
        """Adopt an entry from the state file. Holds of apps that still run
        (the caller checked their pids) get the usual grace to reconnect."""
        entry = Entry(key, owner_uid, list(holds), external_port, handle=handle)
        for hold in entry.holds:
            hold.conn = None
            if not hold.persist:
                hold.grace_until = now + self.policy.grace
                heapq.heappush(self._grace, (hold.grace_until, next(self._seq), key))
        self.entries[key] = entry
        self._track(entry)
        return entry

    def forget(self, key: Key) -> Entry | None:
        """Remove *key* without the rules (its mapping ended at the gateway)."""
        entry = self.entries.get(key)
        if entry is not None:
            self._remove(entry)
        return entry

    # -- queries ------------------------------------------------------------------

    def visible(self, uid: int) -> Iterator[Entry]:
        """The entries *uid* may see (root: all, in the order made; a user:
        its own, by port), created ones only.

        A user's come from its own index, not a walk of every entry: with
        100,000 mappings on the host, one user's pipelined lists must not
        cost the others their turn.
        """
        if uid == 0:
            candidates: Iterable[Entry] = self.entries.values()
        else:
            keys = sorted(self._keys.get(uid, ()), key=lambda key: (key[1], key[0]))
            candidates = [self.entries[key] for key in keys if key in self.entries]
        for entry in candidates:
            if not entry.creating and self._may_see(uid, entry):
                yield entry

    def may_see(self, uid: int, entry: Entry) -> bool:
        return self._may_see(uid, entry)

    def mappings_of(self, uid: int) -> int:
        return len(self._keys.get(uid, ()))

    def set_external_port(self, key: Key, port: int | None) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.external_port = port

    # -- bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _may_see(uid: int, entry: Entry) -> bool:
        return uid == 0 or entry.owner_uid == uid

    def _external_owner(self, protocol: str, port: int) -> Entry | None:
        for entry in self.entries.values():
            if entry.protocol == protocol and entry.external_port == port:
                return entry
        return None

    def _held_by(self, uid: int) -> list[Entry]:
        return [self.entries[k] for k in self._keys.get(uid, ()) if k in self.entries]

    def _track(self, entry: Entry) -> None:
        """Keep the per-uid indexes true after *entry* changed (or was added)."""
        self._untrack(entry)
        if self.entries.get(entry.key) is not entry:
            return
        # The owner counts the mapping against its quota while it exists.
        uids = frozenset(h.uid for h in entry.holds) | {entry.owner_uid}
        hold_uids = [h.uid for h in entry.holds]
        for uid in uids:
            self._keys.setdefault(uid, set()).add(entry.key)
        self._holds.update(hold_uids)
        self._counted[entry.key] = (uids, hold_uids)

    def _untrack(self, entry: Entry) -> None:
        previous = self._counted.pop(entry.key, None)
        if previous is None:
            return
        uids, hold_uids = previous
        for uid in uids:
            keys = self._keys.get(uid)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._keys[uid]
        self._holds.subtract(hold_uids)
        for uid in set(hold_uids):
            if self._holds[uid] <= 0:
                del self._holds[uid]

    def _remove(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        self._untrack(entry)
