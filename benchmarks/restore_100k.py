"""A daemon started on a state file of 100,000 records: how soon it loads, answers, restores.

    .venv/bin/python benchmarks/restore_100k.py [--records 100000] [--seconds 10]

Writes a state file of persisted records (tcp and udp ports), then measures:

- the state store alone: reading and validating the file (``load_checked``
  with the daemon's record codec), in this process;
- a ``portbroker daemon`` process on it, with a FakeGateway process on
  127.0.0.1 behind it: the time from its start to the first ``hello``
  answered, then how long ``list`` takes (every record, most still
  ``restoring``), and how many records it has adopted after ``--seconds``
  (RESTORE_CONCURRENCY at once) and its resident memory.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from portbroker.client import open_client
from portbroker.daemon.state import StateStore, parse_daemon_record


def _record(port: int, protocol: str) -> dict[str, Any]:
    return {
        "method": "pcp",
        "protocol": protocol,
        "internal_address": "127.0.0.1",
        "internal_port": port,
        "external_address": "203.0.113.7",
        "external_port": port,
        "lifetime": 7200,
        "gateway": "127.0.0.1",
        "permanent": False,
        "expires_at_unix": round(time.time() + 7000, 3),
        "epoch": None,
        "nonce": os.urandom(12).hex(),
        "owner_uid": os.getuid(),
        "holds": [{"uid": os.getuid(), "pid": 1, "persist": True}],
        "lifetime_requested": 7200,
    }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _accepting(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def _measure(
    sock: Path, daemon: subprocess.Popen[bytes], started: float, seconds: float
) -> None:
    while not _accepting(sock):
        if daemon.poll() is not None:
            raise SystemExit("the daemon exited")
        await trio.sleep(0.01)
    async with open_client(sock) as client:
        await client.hello()
        hello_at = time.monotonic() - started
        before = time.monotonic()
        listed = await client.list()
        list_took = time.monotonic() - before
    print(f"daemon: hello answered {hello_at:.2f} s after its start")
    # The same list read off the socket directly: the daemon's share of the time.
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        before = time.monotonic()
        await stream.send_all(b'{"id": 1, "op": "hello"}\n{"id": 2, "op": "list"}\n')
        chunks: list[bytes] = []
        lines = 0
        while lines < 2:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            lines += chunk.count(b"\n")
        raw_took = time.monotonic() - before
    size = sum(map(len, chunks))
    print(f"daemon: list answered in {raw_took:.2f} s on a raw socket ({size / 2**20:.1f} MiB)")
    states = collections.Counter(m["state"] for m in listed)
    print(f"daemon: list of {len(listed)} mappings took {list_took:.2f} s ({dict(states)})")
    await trio.sleep(seconds)
    async with open_client(sock) as client:
        before = time.monotonic()
        await client.hello()
        hello_again = time.monotonic() - before
        listed = await client.list()
    states = collections.Counter(m["state"] for m in listed)
    print(
        f"daemon: {seconds:g} s later: {dict(states)}; hello took {hello_again * 1000:.0f} ms;"
        f" RSS {_rss_kib(daemon.pid) / 1024:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if not 0 < args.records <= 2 * 65535:
        parser.error("--records must be 1..131070 (one per tcp and udp port)")
    directory = Path(tempfile.mkdtemp(prefix="pbb-"))
    gateway = daemon = None
    try:
        half = (args.records + 1) // 2
        records = [_record(p, "tcp") for p in range(1, half + 1)]
        records += [_record(p, "udp") for p in range(1, args.records - half + 1)]
        state = directory / "state.json"
        state.write_text(json.dumps({"version": 1, "mappings": records}))
        print(f"state file: {len(records)} records, {state.stat().st_size / 2**20:.1f} MiB")

        before = time.monotonic()
        good, rejected = StateStore(state).load_checked(parse_daemon_record)
        took = time.monotonic() - before
        print(
            f"store: read and validated {len(good)} records in {took:.2f} s ({len(rejected)} rejected)"
        )

        gateway = subprocess.Popen(
            [sys.executable, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert gateway.stdout is not None
        port = int(gateway.stdout.readline().split()[1])
        sock = directory / "pb.sock"
        started = time.monotonic()
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portbroker.cli",
                "daemon",
                "--socket",
                str(sock),
                "--state",
                str(state),
                "--gateway",
                "127.0.0.1",
                "--server-port",
                str(port),
                "--methods",
                "pcp",
                "--no-announcements",
                "-q",
            ]
        )
        trio.run(_measure, sock, daemon, started, args.seconds)
    finally:
        for process in (daemon, gateway):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if gateway is not None and gateway.stdout is not None:
            gateway.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
