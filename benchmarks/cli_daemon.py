"""Whole-process time of `portbroker map` / `list` / `unmap` through a running daemon.

    .venv/bin/python benchmarks/cli_daemon.py [--runs 30] [--json]

Starts a FakeGateway (UDP, its own process) and `portbroker daemon` (its own
process) on 127.0.0.1 with a socket in a temp directory, then runs, as a
user would, ``portbroker map 8080/tcp``, ``portbroker list`` and
``portbroker unmap 8080/tcp`` (``$PORTBROKER_SOCKET`` names the socket), each
as a new process, interleaved, *runs* times; every map makes a new mapping at
the gateway (the unmap before it deleted the last one). It prints the median
and p90 of each, in ms, against issue 10's target (under 100 ms), beside
``python -c pass``: the interpreter's own start, which no command beats.

The modules are byte-compiled first (a warm-up run with bytecode writing
allowed), as an installed wheel's are: this measures imports, not compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MS = 100.0


def _command() -> list[str]:
    """The installed `portbroker` script beside this interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("portbroker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "portbroker.cli"]


def _accepting(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pbc-"))
    sock = directory / "pb.sock"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PORTBROKER_SOCKET"] = str(sock)
    env.pop("PORTBROKER_GATEWAY", None)  # a --gateway would bypass the daemon
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
            ],
            env=env,
        )
        deadline = time.monotonic() + 20
        while not _accepting(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        command = _command()
        cases = {
            "portbroker map 8080/tcp": [*command, "map", "8080/tcp"],
            "portbroker list": [*command, "list"],
            "portbroker unmap 8080/tcp": [*command, "unmap", "8080/tcp"],
            "python -c pass": [sys.executable, "-c", "pass"],
        }
        for argv in cases.values():  # warm-up: byte-compile, fill the page cache
            _timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                times[name].append(_timed(argv, env))
        machine = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        results = {
            name: {
                "median_ms": round(statistics.median(values), 1),
                "p90_ms": round(_p90(values), 1),
            }
            for name, values in times.items()
        }
        if args.json:
            print(json.dumps({"machine": machine, "runs": args.runs, "results": results}))
            return 0
        print(
            f"machine: {machine['cpus']} CPUs, Python {machine['python']}, "
            f"{machine['platform']}, load average {machine['load_average']}"
        )
        print(f"command: {' '.join(command)}; {args.runs} runs each, interleaved")
        print(f"{'whole process, through the daemon':34} {'median':>8} {'p90':>8}  target")
        for name, figures in results.items():
            if name.startswith("python"):
                verdict = "(the interpreter's start)"
            else:
                verdict = (
                    f"< {TARGET_MS:.0f} ms: "
                    + ("met" if figures["median_ms"] < TARGET_MS else "MISSED")
                    + (" (p90 over)" if figures["p90_ms"] >= TARGET_MS else "")
                )
            print(f"{name:34} {figures['median_ms']:6.1f}ms {figures['p90_ms']:6.1f}ms  {verdict}")
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
