"""Plumbing for the fault tests: the agent, test servers, packet filters and counters.

Everything the tests start runs under ``ip netns exec`` as a subprocess (a
broker never runs on a thread that joined a namespace) and is stopped by its
pid in ``finally``; nftables rules live in the lab's namespaces and die with
them.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from tests.lab.helpers import connect_from_wan, listen_in_lan

HERE = Path(__file__).parent
REPO = HERE.parents[1]
AGENT = HERE / "fault_agent.py"
SERVERS = HERE / "fault_servers.py"
PORTBROKER = [sys.executable, "-m", "portbroker.cli"]


def stop(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """End a process we started: close its stdin, then SIGTERM, then SIGKILL, by pid."""
    if process.poll() is None and process.stdin is not None and not process.stdin.closed:
        process.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


class Agent:
    """A ``fault_agent.py`` broker in the lan namespace, read line by line."""

    def __init__(self, process: subprocess.Popen[bytes], stderr: Path) -> None:
        self.process = process
        self.stderr = stderr  # a file, not a pipe: a chatty agent never blocks on it
        self.seen: list[dict[str, Any]] = []
        self._buffer = b""

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event line, or None when *timeout* passes first."""
        assert self.process.stdout is not None
        # Our own buffer over the raw pipe: select() cannot see lines that a
        # buffered reader already pulled in.
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.process.wait()
                raise AssertionError(f"the agent ended early; its stderr:\n{self.stderr_text()}")
            self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\n")
        event: dict[str, Any] = json.loads(text)
        self.seen.append(event)
        return event

    def stacks(self) -> str:
        """The agent's thread stacks (faulthandler on SIGUSR1), for a test that waited in vain."""
        if self.process.poll() is not None:
            return "(the agent has ended)"
        before = len(self.stderr_text())
        os.kill(self.process.pid, signal.SIGUSR1)
        time.sleep(0.5)
        return self.stderr_text()[before:]

    def until(self, kind: str, timeout: float) -> dict[str, Any]:
        """Read events up to and including the first of *kind*; fail (never hang) after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(deadline - time.monotonic())
            if event is None:
                raise AssertionError(f"no {kind} from the agent within {timeout:g} s")
            if event["event"] == kind:
                return event

    def collect(
        self, kind: str, ports: set[int], timeout: float, *, since: int = 0
    ) -> dict[int, dict[str, Any]]:
        """The first *kind* event for each of *ports* from ``seen[since:]`` on, within *timeout*."""
        found: dict[int, dict[str, Any]] = {}
        for e in self.seen[since:]:
            if e["event"] == kind and e["port"] in ports:
                found.setdefault(e["port"], e)
        deadline = time.monotonic() + timeout
        while set(found) != ports:
            event = self.next(deadline - time.monotonic())
            if event is None:
                break
            if event["event"] == kind and event["port"] in ports:
                found.setdefault(event["port"], event)
        return found

    def wait_all(self, timeout: float) -> float | None:
        """Wait for AllDone: the agent's time of it, or None if *timeout* passed first."""
        try:
            return float(self.until("AllDone", timeout)["t"])
        except AssertionError:
            if self.process.poll() is not None:
                raise
            missing = [e for e in self.seen if e["event"] not in ("Mapped", "MapError")]
            print(
                f"the agent after {timeout:g} s without AllDone; other events: {missing}\n"
                f"its stacks:\n{self.stacks()}\nits log (tail):\n{self.stderr_text()[-6000:]}"
            )
            return None

    def results(self) -> dict[int, dict[str, Any]]:
        """Each port's Mapped or MapError line."""
        return {e["port"]: e for e in self.seen if e["event"] in ("Mapped", "MapError")}


@contextmanager
def run_agent(
    lab: Lab, maps: Sequence[dict[str, Any]], *, probe_first: bool = False, **broker: Any
) -> Iterator[Agent]:
    """A broker (``open_broker(**broker)``) making *maps* at once, in the lan namespace."""
    options = {"gateway": str(GATEWAY_ADDRESS), "probe_timeout": 2.0, **broker}
    config = json.dumps({"broker": options, "maps": list(maps), "probe_first": probe_first})
    with tempfile.TemporaryDirectory(prefix="pb-agent-") as directory:
        stderr = Path(directory) / "stderr"
        with stderr.open("wb") as handle:
            process = subprocess.Popen(
                lab.exec_argv(lab.lan_ns, [sys.executable, str(AGENT), config]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=handle,
                cwd=REPO,
            )
        try:
            yield Agent(process, stderr)
        finally:
            stop(process)


@contextmanager
def run_server(lab: Lab, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``fault_servers.py`` server in the gateway namespace, started and ready."""
    process = subprocess.Popen(
        lab.exec_argv(lab.gw_ns, [sys.executable, str(SERVERS), *args]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready or process.stdout.readline().strip() != "ready":
            assert process.stderr is not None
            raise AssertionError(f"test server did not start: {process.stderr.read()}")
        yield process
    finally:
        stop(process)


def server_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(text) for text in path.read_text().splitlines() if text]


def cli(
    lab: Lab, *args: str, state: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = lab.exec_argv(
        lab.lan_ns,
        [*PORTBROKER, *args, "--gateway", str(GATEWAY_ADDRESS), "--state-file", str(state)],
    )
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


# -- nftables ------------------------------------------------------------------

_DNAT = re.compile(r"th dport (\d+) dnat ip to 192\.168\.77\.2:(\d+)")


def dnat_pairs(lab: Lab) -> list[tuple[int, int]]:
    """The gateway's DNAT rules as (external port, internal port), as miniupnpd writes them."""
    return [(int(m.group(1)), int(m.group(2))) for m in _DNAT.finditer(lab.nft_rules())]


def dnat_rules(lab: Lab) -> Counter[int]:
    """How many DNAT rules the gateway holds for each internal port."""
    return Counter(internal for _external, internal in dnat_pairs(lab))


def counter(lab: Lab, netns: str, table: str, name: str) -> int:
    """Packets a named nftables counter has seen."""
    text = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "counter", "inet", table, name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"packets (\d+)", text)
    assert found, text
    return int(found.group(1))


def prove_inbound(lab: Lab, mapped: dict[int, int]) -> dict[int, str]:
    """Connect from the wan side to each external port; what failed, by internal port."""
    failures: dict[int, str] = {}
    with ExitStack() as stack:
        listeners = {port: stack.enter_context(listen_in_lan(lab, port)) for port in mapped}
        for port, external_port in mapped.items():
            try:
                if connect_from_wan(lab, listeners[port], external_port) != b"inside says hello":
                    failures[port] = "wrong bytes"
            except (TimeoutError, OSError) as exc:
                failures[port] = f"{type(exc).__name__}: {exc}"
    return failures
