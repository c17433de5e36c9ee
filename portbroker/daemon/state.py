"""The daemon's state file: its mappings, written atomically on every change.

JSON with a version. Each record holds what the next daemon needs to renew or
delete a mapping: method, PCP nonce, internal and external endpoints, expiry,
owner and holds. Writes go to a temporary file that is fsynced and renamed
over the old one, so a crash leaves the old file or the new one, never half.
A file that cannot be read is set aside (renamed) with a log line, and the
daemon starts empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Final

from portbroker._util import atomic_write_json
from portbroker.types import Lease, TransportProtocol, lease_json

__all__ = ["STATE_VERSION", "StateStore", "lease_from_record", "lease_record"]

logger = logging.getLogger("portbroker.daemon")
STATE_VERSION: Final = 1


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


def lease_from_record(record: dict[str, Any]) -> Lease:
    """Inverse of :func:`lease_record`; the lease's clock starts now.

    Raises KeyError, TypeError or ValueError for a damaged record.
    """
    remaining = float(record["expires_at_unix"]) - time.time()
    nonce = record.get("nonce")
    lifetime = int(record["lifetime"])
    return Lease(
        method=str(record["method"]),
        protocol=TransportProtocol.parse(record["protocol"]),
        internal_address=record["internal_address"],
        internal_port=int(record["internal_port"]),
        external_address=record["external_address"],
        external_port=int(record["external_port"]),
        lifetime=lifetime,
        granted_at=_monotonic_now() - max(0.0, lifetime - remaining),
        gateway=record["gateway"],
        epoch=record.get("epoch"),
        nonce=bytes.fromhex(nonce) if nonce else None,
        permanent=bool(record.get("permanent")),
    )


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error("cannot read the state file %s (%s); starting empty", self.path, exc)
            return []
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} portbroker state file")
            records = data["mappings"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("'mappings' is not a list of objects")
        except (ValueError, KeyError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            logger.error(
                "state file %s is corrupt (%s): set aside as %s; starting with no mappings",
                self.path,
                exc,
                aside,
            )
            return []
        return records

    def save(self, records: list[dict[str, Any]]) -> None:
        atomic_write_json(self.path, {"version": STATE_VERSION, "mappings": records})
