"""The daemon's records in its state file; the file itself is :mod:`portbroker.state`.

A daemon record is a :func:`~portbroker.state.lease_record` plus who holds the
mapping::

    "owner_uid": 1000,
    "holds": [{"uid": 1000, "pid": 4242, "persist": true}],
    "lifetime_requested": 7200,
    "pending_delete": false

``pending_delete`` (optional, default false) marks a mapping that must be
deleted on the gateway (its owner is gone, or it was unmapped) but whose
delete has not been confirmed yet: the next start tries the delete again, until
it succeeds, is refused, or the lease has run out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import attrs

from portbroker.state import (
    STATE_VERSION,
    RecordError,
    StateStore,
    check_lease_record,
    checked_lease_from_record,
    describe_record,
    lease_from_record,
    lease_record,
)
from portbroker.types import MAX_LIFETIME, MIN_LIFETIME, Lease

__all__ = [
    "STATE_VERSION",
    "DaemonRecord",
    "HoldRecord",
    "RecordError",
    "StateStore",
    "daemon_record",
    "describe_record",
    "lease_from_record",
    "lease_record",
    "parse_daemon_record",
]

UID_MAX = 2**32 - 2  # (uid_t)-1 means "no uid"
PID_MAX = 2**22  # the kernel's upper bound for pid_max


class HoldLike(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def persist(self) -> bool: ...


@attrs.frozen
class HoldRecord:
    uid: int
    pid: int
    persist: bool


@attrs.frozen
class DaemonRecord:
    lease: Lease
    owner_uid: int
    holds: tuple[HoldRecord, ...]
    lifetime_requested: int
    pending_delete: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.lease.protocol.value, self.lease.internal_port)


def _uint(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RecordError(f"{name} must be an integer {low}..{high}, not {value!r}")
    return value


def parse_daemon_record(record: Any, *, now: float | None = None) -> DaemonRecord:
    """A daemon record from its JSON; *now* as for :func:`lease_from_record`.

    Raises:
        RecordError: what is wrong with it, in words.
    """
    check_lease_record(record)
    owner = _uint(record.get("owner_uid"), "'owner_uid'", 0, UID_MAX)
    raw_holds = record.get("holds", [])
    if not isinstance(raw_holds, list):
        raise RecordError(f"'holds' must be a list, not {raw_holds!r}")
    holds = []
    for hold in raw_holds:
        if not isinstance(hold, dict) or not isinstance(hold.get("persist"), bool):
            raise RecordError(f"a hold must be {{uid, pid, persist}}, not {hold!r}")
        holds.append(
            HoldRecord(
                _uint(hold.get("uid"), "a hold's 'uid'", 0, UID_MAX),
                _uint(hold.get("pid"), "a hold's 'pid'", 0, PID_MAX),
                hold["persist"],
            )
        )
    lease = checked_lease_from_record(record, now=now)
    requested = record.get("lifetime_requested", min(max(lease.lifetime, 1), MAX_LIFETIME))
    _uint(requested, "'lifetime_requested'", MIN_LIFETIME, MAX_LIFETIME)
    pending = record.get("pending_delete", False)
    if not isinstance(pending, bool):
        raise RecordError(f"'pending_delete' must be true or false, not {pending!r}")
    return DaemonRecord(lease, owner, tuple(holds), requested, pending)


def daemon_record(
    lease: Lease,
    owner_uid: int,
    holds: Iterable[HoldLike],
    lifetime_requested: int,
    *,
    pending_delete: bool = False,
) -> dict[str, Any]:
    """The JSON of a daemon record (inverse of :func:`parse_daemon_record`)."""
    record = lease_record(lease)
    record.update(
        owner_uid=owner_uid,
        holds=[{"uid": h.uid, "pid": h.pid, "persist": h.persist} for h in holds],
        lifetime_requested=lifetime_requested,
    )
    if pending_delete:
        record["pending_delete"] = True
    return record
