"""Restore after a restart: every record kept until resolved, in the background, 16 at once.

In-process daemons on a real Unix socket, FakeGateway in memory behind them,
trio's MockClock (the state writer run inline, as in tests/test_daemon.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from portbroker.client import open_client
from portbroker.daemon.server import RESTORE_CONCURRENCY, Daemon, DaemonConfig, describe, serve
from portbroker.testing import FakeGateway
from portbroker.wire import pcp

ROOT_UID = os.getuid()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbr-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mock_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> trio.testing.MockClock:
    """MockClock, with worker threads (the state file's reads and writes) run inline."""

    async def inline(fn: Any, *args: Any, **_options: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    return autojump_clock


@asynccontextmanager
async def running(directory: Path, gateway: FakeGateway, **changes: Any) -> AsyncIterator[Daemon]:
    config = DaemonConfig(
        **changes,
        gateway="127.0.0.1",
        methods=("pcp", "natpmp"),
        socket_path=directory / "pb.sock",
        state_path=directory / "state.json",
        grace=5.0,
        broker_options={"link_factory": gateway.link_factory(), "announce_port": None, "seed": 1},
    )
    async with serve(config) as daemon:
        yield daemon


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def record(
    port: int, *, persist: bool = True, pid: int | None = None, **extra: Any
) -> dict[str, Any]:
    """A daemon record as the daemon writes it (portbroker/daemon/state.py)."""
    return {
        "method": "pcp",
        "protocol": "tcp",
        "internal_address": "192.168.1.100",
        "internal_port": port,
        "external_address": "203.0.113.7",
        "external_port": port,
        "lifetime": 7200,
        "gateway": "127.0.0.1",
        "permanent": False,
        "expires_at_unix": round(time.time() + 7000, 3),
        "epoch": None,
        "nonce": (port.to_bytes(2, "big") * 6).hex(),
        "owner_uid": ROOT_UID,
        "holds": [
            {"uid": ROOT_UID, "pid": os.getpid() if pid is None else pid, "persist": persist}
        ],
        "lifetime_requested": 7200,
        **extra,
    }


def write_state(directory: Path, records: list[dict[str, Any]]) -> None:
    (directory / "state.json").write_text(json.dumps({"version": 1, "mappings": records}))


def state_records(directory: Path) -> dict[int, dict[str, Any]]:
    data = json.loads((directory / "state.json").read_text())
    return {r["internal_port"]: r for r in data["mappings"]}


def requests_for(gateway: FakeGateway, port: int) -> list[pcp.PcpRequest]:
    return [
        r
        for r in gateway.requests
        if isinstance(r, pcp.PcpRequest) and r.data is not None and r.data.internal_port == port
    ]


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait for *condition*: on the mock clock, checked every second, up to 10 minutes."""
    with trio.fail_after(600):
        while not condition():  # noqa: ASYNC110 - the daemon's and gateway's doing
            await trio.sleep(1)


async def listed(directory: Path) -> dict[str, dict[str, Any]]:
    async with open_client(directory / "pb.sock") as client:
        return {m["id"]: m for m in await client.list()}


async def test_a_silent_gateway_keeps_every_record_until_it_answers(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    write_state(short_dir, [record(7000), record(7001)])
    gateway = FakeGateway(drop_rate=1.0)  # down: not a word
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()  # every record tried once, every try failed
        await daemon.synced()
        assert set(state_records(short_dir)) == {7000, 7001}
        mappings = await listed(short_dir)
        assert {m["state"] for m in mappings.values()} == {"restoring"}
        await trio.sleep(120)  # a few retries, still silent
        assert set(state_records(short_dir)) == {7000, 7001}
        assert len(requests_for(gateway, 7000)) > 1  # tried again
        gateway.drop_rate = 0.0  # back
        await eventually(
            lambda: all(describe(e)["state"] == "active" for e in daemon.shared.values())
        )
        assert {m["state"] for m in (await listed(short_dir)).values()} == {"active"}
        for port in (7000, 7001):
            live = gateway.mapping_for("tcp", port)
            assert live is not None
            assert live.nonce == bytes.fromhex(record(port)["nonce"])  # the same mapping
        await daemon.synced()
        assert set(state_records(short_dir)) == {7000, 7001}


async def test_only_an_explicit_refusal_forgets_a_record(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # Its lease has 10 minutes left: a "not authorized, retry in 30 minutes" is final.
    write_state(short_dir, [record(7010, expires_at_unix=round(time.time() + 600, 3))])
    gateway = FakeGateway(drop_rate=1.0)
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await trio.sleep(30)
        await daemon.synced()
        assert set(state_records(short_dir)) == {7010}  # silence is not a refusal
        gateway.drop_rate = 0.0
        gateway.forced_result = 2  # NOT_AUTHORIZED, for 1800 s (RFC 6887 §7.4)
        await eventually(lambda: ("tcp", 7010) not in daemon.shared)
        await daemon.synced()
        assert state_records(short_dir) == {}


async def test_the_state_file_holds_every_record_while_restoring(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    ports = list(range(7100, 7140))
    write_state(short_dir, [record(p) for p in ports])
    gateway = FakeGateway(delay=1.0)  # slow: the restore takes a while
    snapshots = []
    async with running(short_dir, gateway) as daemon:
        while not daemon.restored.is_set():
            snapshots.append(set(state_records(short_dir)))
            await trio.sleep(0.25)
        await daemon.synced()
        snapshots.append(set(state_records(short_dir)))
        assert all(describe(daemon.shared[("tcp", p)])["state"] == "active" for p in ports)
    assert len(snapshots) > 2
    assert all(s == set(ports) for s in snapshots)


async def test_restore_runs_concurrently_within_a_bound(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    ports = list(range(7200, 7240))
    write_state(short_dir, [record(p) for p in ports])
    gateway = FakeGateway(delay=5.0)  # every answer takes 5 s
    async with running(short_dir, gateway) as daemon:
        await trio.sleep(1)  # no answer yet
        asked = {
            r.data.internal_port
            for r in gateway.requests
            if isinstance(r, pcp.PcpRequest) and r.data is not None
        }
        assert len(asked) == RESTORE_CONCURRENCY
        await daemon.restored.wait()


async def test_the_socket_is_served_while_restoring(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    write_state(short_dir, [record(p) for p in range(7300, 7340)])
    gateway = FakeGateway(drop_rate=1.0)
    started = trio.current_time()
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            assert (await client.hello())["uid"] == ROOT_UID
            mappings = await client.list()
        assert trio.current_time() - started < 1  # on the mock clock: before any budget ran out
        assert not daemon.restored.is_set()
        assert len(mappings) == 40
        assert {m["state"] for m in mappings} == {"restoring"}
        assert {m["external_port"] for m in mappings} == set(range(7300, 7340))


async def test_map_joins_and_unmap_deletes_a_mapping_being_restored(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    write_state(short_dir, [record(7400), record(7401)])
    gateway = FakeGateway(drop_rate=1.0)
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            joined = await client.map(7400, "tcp", persist=True)
            assert joined["state"] == "restoring"
            assert joined["holders"] == 2  # its owner's map joins it
            assert await client.unmap(7401, "tcp") == "7401/tcp"
            assert "7401/tcp" not in {m["id"] for m in await client.list()}
        await daemon.synced()
        pending = state_records(short_dir)[7401]
        assert pending["pending_delete"] is True  # the gateway has not confirmed the delete yet
        gateway.drop_rate = 0.0
        with trio.fail_after(600):
            while 7401 in state_records(short_dir):
                await trio.sleep(1)
                await daemon.synced()
        deletes = [r for r in requests_for(gateway, 7401) if r.lifetime == 0]
        assert deletes
        assert gateway.mapping_for("tcp", 7401) is None
        await eventually(lambda: describe(daemon.shared[("tcp", 7400)])["state"] == "active")
        assert len(daemon.shared[("tcp", 7400)].holds) == 2


async def test_deletes_of_records_nobody_owns_are_retried_until_done(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    gone = dead_pid()
    write_state(
        short_dir,
        [
            record(7500, persist=False, pid=gone),  # its app is gone
            record(7501, pending_delete=True),  # a delete that failed before the last stop
            record(7502, persist=False, pid=gone, expires_at_unix=time.time() - 60),  # lapsed
        ],
    )
    gateway = FakeGateway(drop_rate=1.0)
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        assert daemon.shared == {}
        pending = state_records(short_dir)
        assert set(pending) == {7500, 7501}  # kept, for this start and the next
        assert all(r["pending_delete"] is True for r in pending.values())
        assert requests_for(gateway, 7502) == []  # nothing left to delete
    # The next start takes them up again.
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        assert set(state_records(short_dir)) == {7500, 7501}
        gateway.drop_rate = 0.0
        with trio.fail_after(600):
            while state_records(short_dir):
                await trio.sleep(1)
                await daemon.synced()
        for port in (7500, 7501):
            assert [r.lifetime for r in requests_for(gateway, port)][-1] == 0
            assert gateway.mapping_for("tcp", port) is None
        assert daemon.shared == {}  # never adopted


async def test_a_clean_stop_before_adoption_marks_connection_bound_records_for_deletion(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # Its app (this process) is alive: the record waits for it, grace period and all.
    write_state(short_dir, [record(7900, persist=False), record(7901)])
    gateway = FakeGateway(drop_rate=1.0)
    async with running(short_dir, gateway) as daemon:
        assert describe(daemon.shared[("tcp", 7900)])["state"] == "restoring"
    # A clean stop ends connection-bound holds; not adopted, it is left to the next start.
    state = state_records(short_dir)
    assert set(state) == {7900, 7901}
    assert state[7900]["pending_delete"] is True
    assert "pending_delete" not in state[7901]
    gateway.drop_rate = 0.0
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        assert set(daemon.shared) == {("tcp", 7901)}
        assert set(state_records(short_dir)) == {7901}
        assert [r.lifetime for r in requests_for(gateway, 7900)] == [0]  # deleted, not adopted


async def test_a_restored_privileged_port_obeys_this_daemons_policy(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # Mapped by uid 65534 under --allow-privileged-ports, then the daemon is
    # restarted without it: the mapping is not renewed for ever, it is deleted.
    nobody = 65534
    low = record(22, owner_uid=nobody, holds=[{"uid": nobody, "pid": 1, "persist": True}])
    high = record(8022, owner_uid=nobody, holds=[{"uid": nobody, "pid": 1, "persist": True}])
    write_state(short_dir, [low, high])
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        assert set(daemon.shared) == {("tcp", 8022)}
        assert set(state_records(short_dir)) == {8022}
        assert [r.lifetime for r in requests_for(gateway, 22)] == [0]  # a delete, no renewal
    write_state(short_dir, [low])
    async with running(short_dir, FakeGateway(), allow_privileged_ports=True) as daemon:
        await daemon.restored.wait()
        assert set(daemon.shared) == {("tcp", 22)}
