"""Adversarial review 2 (issue 8): pending deletes across the state file, the
broker's bounded retries and the next start.

In-process daemons as tests/test_daemon_restore.py (MockClock, FakeGateway in
memory), or the record functions alone.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from portbroker.client import open_client
from portbroker.daemon.server import RESTORE_CONCURRENCY, _pending_delete_record, describe
from portbroker.daemon.state import parse_daemon_record
from portbroker.lifecycle import MAX_DELETE_ATTEMPTS, RECOVERY_BACKOFF
from portbroker.testing import FakeGateway
from portbroker.types import Lease, TransportProtocol
from tests.test_daemon_restore import (
    mock_time,
    record,
    requests_for,
    running,
    short_dir,
    state_records,
    write_state,
)

__all__ = ["mock_time", "short_dir"]  # the fixtures, re-used


@pytest.mark.parametrize(
    ("permanent", "lifetime"),
    [(True, 0), (False, 30 * 86400)],
    ids=["permanent-upnp", "lifetime-over-a-week"],
)
def test_a_pending_delete_the_daemon_records_is_accepted_at_the_next_start(
    permanent: bool, lifetime: int
) -> None:
    # A delete the gateway did not confirm is written as a pending_delete
    # record so that the next start finishes it. For a permanent UPnP lease
    # (lifetime 0), or one the gateway granted for longer than a week, the
    # record carried lifetime_requested = the lease's lifetime, which the next
    # start's validation rejects: set aside, never deleted, the mapping left
    # open on the gateway for good.
    address = ipaddress.ip_address
    lease = Lease(
        method="upnp",
        protocol=TransportProtocol.TCP,
        internal_address=address("192.168.1.100"),
        internal_port=8080,
        external_address=address("203.0.113.7"),
        external_port=8080,
        lifetime=lifetime,
        granted_at=0.0,
        gateway=address("192.168.1.1"),
        epoch=None,
        nonce=None,
        permanent=permanent,
    )
    parsed = parse_daemon_record(_pending_delete_record(lease), now=0.0)
    assert parsed.pending_delete
    assert parsed.lease.permanent is permanent
    assert parsed.key == ("tcp", 8080)


async def test_a_delete_the_broker_gave_up_on_stays_recorded_and_retried_while_its_lease_runs(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # docs/daemon-protocol.md, Persistence: a record goes only when resolved
    # (... a delete confirmed, or its lease run out); until then it stays in
    # the state file and is tried again for as long as the daemon runs. The
    # broker's retries are bounded (20 attempts, about 70 minutes); once they
    # ended, the record left the state file with hours of its lease still to
    # run: the mapping open on the gateway, known to nobody, even after a
    # restart.
    write_state(short_dir, [record(7100, pending_delete=True)])  # 7,000 s left
    gateway = FakeGateway(silent_deletes=True)
    async with running(short_dir, gateway) as daemon:
        start = trio.current_time()
        await daemon.restored.wait()
        # Well past the broker's last attempt (its attempts and their backoff
        # add up to about 72 minutes), well before the lease ends.
        assert MAX_DELETE_ATTEMPTS == 20
        assert sum(RECOVERY_BACKOFF) + 13 * RECOVERY_BACKOFF[-1] < 75 * 60
        await trio.sleep(90 * 60)
        await daemon.synced()
        late = [
            when
            for request, when in zip(gateway.requests, gateway.request_times, strict=True)
            if request in requests_for(gateway, 7100) and request.lifetime == 0
            if when - start > 80 * 60
        ]
        assert late, "not tried again once the broker gave up"
        assert 7100 in state_records(short_dir), "the record left the state file"
        assert state_records(short_dir)[7100]["pending_delete"] is True
    assert 7100 in state_records(short_dir)  # and a clean stop keeps it for the next start


async def test_a_queued_delete_of_a_record_does_not_delete_a_new_mapping_of_its_port(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # A restart with many records: the first RESTORE_CONCURRENCY keep every
    # worker busy (a silent PCP: 8 s each), so a pending_delete record of
    # 7200/tcp (NAT-PMP, which deletes by internal port) waits its turn.
    # Meanwhile its owner maps 7200/tcp again and is told it is mapped. Then
    # the old record's delete went out and deleted the new mapping at the
    # gateway: the app believes it is reachable and is not.
    blockers = [record(7300 + n) for n in range(RESTORE_CONCURRENCY)]
    stale = record(7200, method="natpmp", nonce=None, pending_delete=True)
    write_state(short_dir, [*blockers, stale])
    gateway = FakeGateway(pcp_enabled=False)  # PCP silent, NAT-PMP answers
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            mapping = await client.map(7200, "tcp", via="natpmp", persist=True)
            assert mapping["state"] == "active"
            assert gateway.mapping_for("tcp", 7200) is not None
        await daemon.restored.wait()  # every record had its first attempt
        await trio.sleep(30)
        assert gateway.mapping_for("tcp", 7200) is not None, "the new mapping was deleted"
        async with open_client(short_dir / "pb.sock") as client:
            (listed,) = [m for m in await client.list() if m["id"] == "7200/tcp"]
            assert listed["state"] == "active"
        await daemon.synced()
        records = [r for r in _all_records(short_dir) if r["internal_port"] == 7200]
        assert [r.get("pending_delete", False) for r in records] == [False]


def _all_records(directory: Path) -> list[dict[str, Any]]:
    return list(json.loads((directory / "state.json").read_text())["mappings"])


async def test_unmapping_a_mapping_being_restored_leaves_nothing_in_the_event_index(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # _drop keeps a mapping in the event index until its Released event, so
    # that watchers hear it ended; a stand-in of a record not adopted yet
    # publishes no event, so it stayed there (with its entry and record) for
    # as long as the daemon ran: one leak per unmap during a restore.
    write_state(short_dir, [record(7600 + n) for n in range(20)])
    gateway = FakeGateway(drop_rate=1.0)
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            for n in range(20):
                await client.unmap(7600 + n, "tcp")
        await trio.sleep(60)
        assert daemon.shared == {}
        assert daemon._by_mapping == {}


async def test_deletes_a_silent_gateway_never_confirms_do_not_flood_the_log(
    short_dir: Path, mock_time: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Every failed attempt of every pending delete was a WARNING line: 20 per
    # record per round of retries, so a host whose state file holds thousands
    # of deletes wrote a hundred thousand warnings an hour while its gateway
    # was down. A record's first failure and its giving up are warnings; the
    # attempts between are INFO.
    count = 30
    write_state(short_dir, [record(7700 + n, pending_delete=True) for n in range(count)])
    gateway = FakeGateway(silent_deletes=True)
    caplog.set_level(logging.INFO, "portbroker")
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await trio.sleep(90 * 60)  # past a round of the broker's 20 attempts
        attempts = sum("delete failed (attempt" in r.getMessage() for r in caplog.records)
        assert attempts >= count * (MAX_DELETE_ATTEMPTS - 1)  # they were made, and logged
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 3 * count, f"{len(warnings)} warnings for {count} deletes"


async def test_a_write_cut_short_by_sigkill_leaves_no_temporary_file_for_good(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # Each state-file write goes to a new temporary file (then renamed). A
    # SIGKILL during one left that file behind, and every crash of a daemon
    # killed while writing (an OOM killer, a crash loop) added another: with
    # 100,000 records, 40 MB each, for good. The daemon, the file's only
    # writer, clears them at start.
    write_state(short_dir, [record(7800)])
    stale = short_dir / ".state.json.k2j4x9_a"  # as tempfile.mkstemp names them
    stale.write_text('{"version": 1, "mappings": [')
    other = short_dir / ".other.json.k2j4x9_a"  # not ours
    other.write_text("{}")
    async with running(short_dir, FakeGateway()) as daemon:
        await daemon.restored.wait()
        assert not stale.exists()
        assert other.exists()
        assert 7800 in state_records(short_dir)


async def test_an_unmap_the_moment_an_adoption_succeeds_leaves_nothing_open(
    short_dir: Path, mock_time: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The owner unmaps a record being restored just as the gateway's answer
    # to its adoption arrives (the adoption is past its last checkpoint, so
    # cancelling it changes nothing): the adopted mapping must be deleted
    # too, and nothing recorded or kept.
    write_state(short_dir, [record(7810)])
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        real_adopt = daemon.broker.adopt
        unmapped = trio.Event()
        granted = trio.Event()

        async def adopt_then_wait(request: Any, lease: Any) -> Any:
            mapping = await real_adopt(request, lease)
            granted.set()
            with trio.CancelScope(shield=True):  # the answer is in: the unmap comes now
                await unmapped.wait()
            return mapping

        # In place before the restore's workers first run (serve() has just
        # returned): the record's first attempt goes through it.
        daemon.broker.adopt = adopt_then_wait  # type: ignore[method-assign]
        with trio.fail_after(60):
            await granted.wait()
        assert gateway.mapping_for("tcp", 7810) is not None
        assert describe(daemon.shared[("tcp", 7810)])["state"] == "restoring"
        async with open_client(short_dir / "pb.sock") as client:
            assert await client.unmap(7810, "tcp") == "7810/tcp"
        unmapped.set()
        await trio.sleep(30)
        await daemon.synced()
        assert daemon.shared == {}
        assert gateway.mapping_for("tcp", 7810) is None
        assert 7810 not in state_records(short_dir)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
