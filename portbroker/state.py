"""The state file of the CLI and of the daemon: leases kept for later, written atomically.

One store for both (``portbroker map`` without ``--hold`` records the lease for
a later ``unmap``; the daemon records every mapping it manages, see
``docs/architecture.md``). The file is JSON with a version::

    {"version": 1, "mappings": [<record>, ...]}

A record is :func:`lease_record`: what renewing or deleting the mapping later
needs, PCP's nonce included (without it a PCP mapping cannot be deleted,
RFC 6887 §15). The daemon adds its own fields (:mod:`portbroker.daemon.state`).

Writes go to a temporary file that is fsynced, renamed over the old one, and
the directory fsynced, so a crash leaves the old file or the new one, never
half. A file that cannot be read is set aside as ``<name>.corrupt-<time>``
with a log line and the store starts empty; records that fail validation are
set aside in ``<name>.rejected-<time>`` (same format) with a log line each:
nothing on a user's disk is ever dropped unseen.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from portbroker._util import atomic_write_json
from portbroker.errors import PortBrokerError
from portbroker.types import IPAddress, Lease, RemoteFilter, TransportProtocol, lease_json

__all__ = [
    "STATE_VERSION",
    "RecordError",
    "StateError",
    "StateStore",
    "check_lease_record",
    "checked_lease_from_record",
    "describe_record",
    "lease_from_record",
    "lease_record",
]

logger = logging.getLogger("portbroker.state")
T = TypeVar("T")

STATE_VERSION: Final = 1
METHODS: Final = ("pcp", "natpmp", "upnp")
PCP_NONCE_BYTES: Final = 12  # RFC 6887 §11.1


class StateError(PortBrokerError):
    """The state file cannot be used (its directory or lock cannot be opened)."""


class RecordError(ValueError):
    """A record that cannot be used; the message says which field and why."""


def lease_record(lease: Lease) -> dict[str, Any]:
    """:func:`lease_json` plus what renewing or deleting it later needs."""
    remaining = max(0.0, lease.expires_at - _monotonic_now())
    return {
        **lease_json(lease),
        "expires_at_unix": round(time.time() + remaining, 3),
        "epoch": lease.epoch,
        "nonce": lease.nonce.hex() if lease.nonce else None,
    }


def _monotonic_now() -> float:
    import trio

    try:
        return trio.current_time()
    except RuntimeError:  # outside trio: leases are on trio's clock, so assume "now"
        return 0.0


def _int(record: dict[str, Any], name: str, low: int, high: int) -> int:
    value = record.get(name)
    # bool is an int to Python, never to a person editing the file.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(f"{name!r} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise RecordError(f"{name!r} must be {low}..{high}, not {value}")
    return value


@functools.lru_cache(maxsize=1024)
def _parse_address(text: str) -> IPAddress:
    # A host's records name a handful of addresses: 100,000 records must not
    # parse them 300,000 times.
    return ipaddress.ip_address(text)


def _address(record: dict[str, Any], name: str) -> IPAddress:
    value = record.get(name)
    if not isinstance(value, str):
        raise RecordError(f"{name!r} must be an IP address, not {value!r}")
    try:
        return _parse_address(value)
    except ValueError:
        raise RecordError(f"{name!r} must be an IP address, not {value!r}") from None


@functools.lru_cache(maxsize=1024)
def _filters(texts: tuple[str, ...]) -> tuple[RemoteFilter, ...]:
    # Remote-peer filters (docs/third-party-and-filter.md), as lease_json writes them.
    return tuple(RemoteFilter.parse(text) for text in texts)


def check_lease_record(record: Any) -> None:
    """Raise :class:`RecordError` unless *record* is a usable :func:`lease_record`."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be an object, not {type(record).__name__}")
    method = record.get("method")
    if method not in METHODS:
        raise RecordError(f"'method' must be one of {', '.join(METHODS)}, not {method!r}")
    if record.get("protocol") not in ("tcp", "udp"):
        raise RecordError(f"'protocol' must be tcp or udp, not {record.get('protocol')!r}")
    for name in ("internal_address", "external_address", "gateway"):
        _address(record, name)
    _int(record, "internal_port", 1, 65535)
    _int(record, "external_port", 1, 65535)
    permanent = record.get("permanent", False)
    if not isinstance(permanent, bool):
        raise RecordError(f"'permanent' must be true or false, not {permanent!r}")
    # A lifetime of 0 is UPnP's "until deleted" (permanent) only.
    _int(record, "lifetime", 0 if permanent else 1, 2**32 - 1)
    expires = record.get("expires_at_unix")
    if (
        not isinstance(expires, int | float)
        or isinstance(expires, bool)
        or not math.isfinite(expires)
    ):
        raise RecordError(f"'expires_at_unix' must be a number, not {expires!r}")
    epoch = record.get("epoch")
    if epoch is not None:
        _int(record, "epoch", 0, 2**32 - 1)
    _check_pinhole_id(record, method)
    if "remote_address" in record or "remote_port" in record:  # a PCP PEER (docs/peer.md)
        _address(record, "remote_address")
        _int(record, "remote_port", 1, 65535)
    filters = record.get("filters", [])
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise RecordError(f"'filters' must be a list of prefixes, not {filters!r}")
    try:
        _filters(tuple(filters))
    except ValueError as exc:
        raise RecordError(f"'filters': {exc}") from None
    nonce = record.get("nonce")
    if nonce is not None or method == "pcp":
        try:
            if not isinstance(nonce, str) or len(bytes.fromhex(nonce)) != PCP_NONCE_BYTES:
                raise ValueError
        except ValueError:
            raise RecordError(
                f"'nonce' must be {PCP_NONCE_BYTES} bytes in hex"
                f"{' (PCP needs it)' if method == 'pcp' else ''}, not {nonce!r}"
            ) from None


def _check_pinhole_id(record: dict[str, Any], method: object) -> None:
    """A UPnP IPv6 lease is a pinhole, named by its UniqueID (docs/ipv6.md)."""
    pinhole = method == "upnp" and _address(record, "internal_address").version == 6
    if record.get("pinhole_id") is not None:
        _int(record, "pinhole_id", 0, 65535)
        if not pinhole:
            # A lease with one is deleted by DeletePinhole, whose "no such
            # pinhole" counts as done: the mapping itself would stay.
            raise RecordError(
                f"'pinhole_id' is only for a UPnP IPv6 pinhole, not a {method} mapping"
                f" of {record.get('internal_address')}"
            )
    elif pinhole:
        raise RecordError("'pinhole_id' must be given for a UPnP IPv6 pinhole (0..65535)")


def lease_from_record(record: dict[str, Any], *, now: float | None = None) -> Lease:
    """Inverse of :func:`lease_record`; the lease's clock starts now.

    *now* is trio's clock (the default: read it; a worker thread passes it).

    Raises:
        RecordError: a damaged record (:func:`check_lease_record`).
    """
    check_lease_record(record)
    return checked_lease_from_record(record, now=now)


def checked_lease_from_record(record: dict[str, Any], *, now: float | None = None) -> Lease:
    """:func:`lease_from_record` of a record :func:`check_lease_record` accepted."""
    remaining = float(record["expires_at_unix"]) - time.time()
    nonce = record.get("nonce")
    lifetime = int(record["lifetime"])
    try:
        return Lease(
            method=str(record["method"]),
            protocol=TransportProtocol.parse(record["protocol"]),
            internal_address=_parse_address(record["internal_address"]),
            internal_port=int(record["internal_port"]),
            external_address=_parse_address(record["external_address"]),
            external_port=int(record["external_port"]),
            lifetime=lifetime,
            granted_at=(_monotonic_now() if now is None else now) - max(0.0, lifetime - remaining),
            gateway=_parse_address(record["gateway"]),
            epoch=record.get("epoch"),
            nonce=bytes.fromhex(nonce) if nonce else None,
            permanent=bool(record.get("permanent")),
            pinhole_id=record.get("pinhole_id"),
            remote=_record_remote(record),
            filters=_filters(tuple(record.get("filters", ()))),
        )
    except (TypeError, ValueError) as exc:  # a rule check_lease_record does not know
        raise RecordError(str(exc)) from exc


def _record_remote(record: dict[str, Any]) -> tuple[IPAddress, int] | None:
    """A PEER record's remote peer (``lease_json``'s remote_address and remote_port)."""
    if "remote_address" not in record:
        return None
    return (_parse_address(record["remote_address"]), int(record["remote_port"]))


def describe_record(record: Any) -> str:
    """A record's name for a log line: ``8080/tcp`` when it has one."""
    if isinstance(record, dict):
        port, protocol = record.get("internal_port"), record.get("protocol")
        if isinstance(port, int) and isinstance(protocol, str):
            return f"{port}/{protocol[:8]}"
    return repr(record)[:60]


class StateStore:
    """One state file. ``load``/``save`` for a single writer (the daemon);
    :meth:`locked` for read-modify-write under an flock (the CLI: several may
    run at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _aside(self, kind: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.{kind}-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.{kind}-{stamp}-{n}")
        return aside

    def load(self) -> list[Any]:
        """The records as stored (not validated); [] if there is no file.

        Raises:
            StateError: the file exists but cannot be read (permissions, I/O):
                starting empty would overwrite it.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                f"cannot read the state file {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} portbroker state file")
            records = data.get("mappings")
            if not isinstance(records, list):
                raise ValueError("'mappings' is not a list")
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            aside = self._aside("corrupt")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            logger.error(
                "state file %s is unreadable (%s): set aside as %s; starting with no mappings",
                self.path,
                exc,
                aside,
            )
            return []
        return records

    def load_checked(self, check: Callable[[Any], T]) -> tuple[list[T], list[tuple[Any, str]]]:
        """What *check* makes of each record it accepts, and the others with the reason.

        The others are written to ``<name>.rejected-<time>`` (same format)
        before this returns, each named in a log line, so that the caller may
        then save the good ones without losing anything.
        """
        good: list[T] = []
        rejected: list[tuple[Any, str]] = []
        for record in self.load():
            try:
                good.append(check(record))
            except (RecordError, KeyError, TypeError, ValueError) as exc:
                rejected.append((record, str(exc)))
        if rejected:
            aside = self._aside("rejected")
            try:
                atomic_write_json(
                    aside, {"version": STATE_VERSION, "mappings": [r for r, _ in rejected]}
                )
            except OSError as exc:
                # Cannot keep a copy: keep the whole file as it is instead.
                raise StateError(
                    f"cannot set rejected records aside in {aside}: {exc.strerror or exc}"
                ) from exc
            for record, reason in rejected:
                logger.error(
                    "state file %s: record %s set aside in %s: %s",
                    self.path,
                    describe_record(record),
                    aside,
                    reason,
                )
        return good, rejected

    def save(self, records: list[Any]) -> None:
        atomic_write_json(self.path, {"version": STATE_VERSION, "mappings": records})

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[Any]]:
        """The records, under an exclusive flock; what the block leaves in the list is saved.

        Raises:
            StateError: the directory or the lock file cannot be opened.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        except OSError as exc:
            raise StateError(
                f"cannot use the state file {self.path}: {exc.strerror or exc}"
            ) from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.load()
            yield records
            self.save(records)
