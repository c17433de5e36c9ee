"""map + unmap round trips per second through the daemon, and its memory.

    .venv/bin/python benchmarks/daemon_throughput.py [--seconds 5]

Starts a FakeGateway (UDP, its own process) and `portbroker daemon` (its own
process) on 127.0.0.1, then measures from this process:

- map + unmap pairs per second with 1, 10 and 100 concurrent clients (each
  client maps and unmaps its own port in a loop), and
- the daemon's resident memory (VmRSS) while it holds 10,000 mappings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from portbroker.client import BlockingClient, open_client


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _throughput(sock: Path, clients: int, seconds: float) -> float:
    done = 0
    deadline = trio.current_time() + seconds

    async def client_loop(n: int) -> None:
        nonlocal done
        async with open_client(sock) as client:
            port = 10000 + n
            while trio.current_time() < deadline:
                await client.map(port, "udp", lifetime=600)
                await client.unmap(port, "udp")
                done += 1

    started = trio.current_time()
    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client_loop, n)
    return done / (trio.current_time() - started)


async def _hold_many(sock: Path, count: int) -> int:
    """*count* persistent mappings from 100 concurrent clients; how many the daemon lists."""

    async def client_loop(first: int) -> None:
        async with open_client(sock) as client:
            for n in range(first, count, 100):
                await client.map(1024 + n % 60000, "udp" if n < 60000 else "tcp", persist=True)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for first in range(100):
                nursery.start_soon(client_loop, first)
        async with open_client(sock) as client:
            return len(await client.list())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--held", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pbb-"))
    sock = directory / "pb.sock"
    fake = subprocess.Popen(
        [sys.executable, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemon = None
    try:
        assert fake.stdout is not None
        port = fake.stdout.readline().split()[1]
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portbroker.cli",
                "daemon",
                "-q",
                "--socket",
                str(sock),
                "--state",
                str(directory / "state.json"),
                "--gateway",
                "127.0.0.1",
                "--server-port",
                port,
                "--methods",
                "pcp",
                "--no-announcements",
                "--max-mappings",
                str(args.held + 10),
                # Every client here is one user (this process's): the default
                # per-user limit (64) is for hosts, not for a load test.
                "--max-connections",
                "1000",
            ],
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                BlockingClient(sock).close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results: dict[str, float] = {}
        for clients in (1, 10, 100):
            results[f"{clients}_clients_per_s"] = round(
                trio.run(_throughput, sock, clients, args.seconds), 1
            )
        rss_idle = _rss_kib(daemon.pid)
        with BlockingClient(sock, timeout=600) as client:
            for n in range(args.held):
                client.map(
                    20000 + n % 40000, "udp" if n < 40000 else "tcp", lifetime=7200, persist=True
                )
            rss_held = _rss_kib(daemon.pid)
            held = len(client.list())
        results["rss_idle_mib"] = round(rss_idle / 1024, 1)
        results[f"rss_with_{held}_mappings_mib"] = round(rss_held / 1024, 1)
        if args.json:
            print(json.dumps(results))
        else:
            for name, value in results.items():
                print(f"{name:32} {value}")
        return 0
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
        fake.terminate()
        fake.wait()
        if fake.stdout is not None:
            fake.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
