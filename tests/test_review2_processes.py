"""Adversarial review 2 (issue 8): daemon processes killed at random moments.

A state file of many records, a gateway that never answers, SIGKILL at random
moments of the restore, SIGTERM too; then a gateway that answers. Nothing may
be lost, nothing recorded twice, nothing left open at the gateway.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from portbroker.client import open_client
from portbroker.testing import FakeGateway
from portbroker.wire import pcp
from tests.test_daemon_processes import _silent_record, short_dir, start_daemon, stop, until

__all__ = ["short_dir"]  # the fixture, re-used

COUNT = 1500


def _records(dead_pid: int) -> list[dict[str, Any]]:
    """A third persisted, a third of an app that is gone, a third pending deletes."""
    records = []
    for n in range(COUNT):
        record = _silent_record(20000 + n)
        if n % 3 == 1:
            record["holds"] = [{"uid": 0, "pid": dead_pid, "persist": False}]
        elif n % 3 == 2:
            record["pending_delete"] = True
        records.append(record)
    return records


def _state(directory: Path) -> list[dict[str, Any]]:
    return list(json.loads((directory / "state.json").read_text())["mappings"])


def _check(directory: Path, persisted: set[int], others: set[int]) -> None:
    state = _state(directory)
    ports = [r["internal_port"] for r in state]
    assert len(ports) == len(set(ports)), "a record written twice"
    assert set(ports) == persisted | others, "a record lost"
    for r in state:
        if r["internal_port"] in persisted:
            assert not r.get("pending_delete"), r
            assert r["holds"] == [{"uid": 0, "pid": 1, "persist": True}]


async def test_sigkill_at_random_moments_of_a_restore_loses_and_doubles_nothing(
    short_dir: Path,
) -> None:
    rng = random.Random(8)
    dead = 2**22  # above pid_max: never alive
    records = _records(dead)
    persisted = {
        r["internal_port"]
        for r in records
        if r["holds"][0]["persist"] and not r.get("pending_delete")
    }
    others = {r["internal_port"] for r in records} - persisted
    (short_dir / "state.json").write_text(json.dumps({"version": 1, "mappings": records}))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read
    silent.bind(("127.0.0.1", 0))
    try:
        for round_ in range(5):
            daemon = start_daemon(short_dir, silent.getsockname()[1])
            try:
                await trio.sleep(rng.uniform(0.0, 4.0))
                if round_ == 4:
                    daemon.send_signal(signal.SIGTERM)
                    assert await trio.to_thread.run_sync(daemon.wait, 60) == 0
                else:
                    daemon.kill()
                    daemon.wait(timeout=10)
            finally:
                stop(daemon)
            _check(short_dir, persisted, others)
    finally:
        silent.close()
    # A gateway that answers: every persisted record adopted, every other deleted.
    gateway = FakeGateway(port=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve_udp)
        daemon = start_daemon(short_dir, gateway.port)
        try:

            def settled() -> bool:
                ports = {r["internal_port"] for r in _state(short_dir)}
                return ports == persisted and not any(
                    r.get("pending_delete") for r in _state(short_dir)
                )

            await until(settled)
            async with open_client(short_dir / "pb.sock") as client:
                with trio.fail_after(120):
                    while True:
                        listed = await client.list()
                        if all(m["state"] == "active" for m in listed):
                            break
                        await trio.sleep(0.2)
            assert {m["internal_port"] for m in listed} == persisted
            deleted = {
                r.data.internal_port
                for r in gateway.requests
                if isinstance(r, pcp.PcpRequest) and r.data is not None and r.lifetime == 0
            }
            assert others <= deleted, sorted(others - deleted)[:10]
            assert all(gateway.mapping_for("tcp", p) is None for p in others)
        finally:
            stop(daemon)
            nursery.cancel_scope.cancel()


def test_a_state_file_that_cannot_be_read_stops_the_daemon_in_one_line(short_dir: Path) -> None:
    # docs/daemon-protocol.md: a state file that cannot be read at all stops
    # the daemon with an error instead of being overwritten. The error came
    # with "the daemon failed: every mapping stays on the gateway" and an
    # ExceptionGroup traceback of forty lines before it.
    (short_dir / "state.json").mkdir()  # reading it: EISDIR, an I/O error
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "portbroker.cli",
            "daemon",
            "--socket",
            str(short_dir / "pb.sock"),
            "--state",
            str(short_dir / "state.json"),
            "--gateway",
            "127.0.0.1",
            "--server-port",
            "9",
            "--methods",
            "pcp,natpmp",
            "--no-announcements",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "ExceptionGroup" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2, done.stderr  # the daemon's log line, and the command's
    assert f"cannot read the state file {short_dir / 'state.json'}" in lines[-1]
    assert not (short_dir / "pb.sock").exists()
