"""portbroker beside the clients people use: time to a working mapping, under loss, after a reboot.

Run as root (it builds the lab: a real miniupnpd + nftables gateway in network
namespaces, portbroker/testing/lab.py):

    .venv/bin/python benchmarks/peers.py [--quick | --smoke] [--json PATH]

Every tool does the same job: find the gateway, map an internal TCP port, and
the mapping counts as working only when a connection from the lab's wan host
to the external endpoint the tool reported reaches a listener on the lan host
(a tool that reports success without that is a *wrong answer*). Then the tool
deletes its own mapping and the gateway's nftables rules are checked for
leftovers. Every tool runs only inside the lab's lan namespace: the peers find
the gateway by multicast or the default route.

Tools, each compared with its own kind:

- commands, timed whole-process (spawn to exit): ``portbroker map`` (no
  ``--gateway``: it finds the default route; ``--no-daemon``), the same
  through a ``portbroker daemon`` running in the lan namespace, Debian's
  ``natpmpc -g GW -a`` and ``upnpc -a``;
- libraries, timed inside one Python process per run (imports left out):
  portbroker (``open_broker`` + ``map``), the ``miniupnpc`` module (discover +
  selectigd + addportmapping), ``NAT-PMP`` and ``py-natpmp`` (``map_port``,
  default route), ``async-upnp-client``'s ``IgdDevice`` (its ``async_search``,
  then AddPortMapping). See ``_peers_child.py``.

Sections, all in one run, round robin across the tools within each (every
round runs each tool once, in a new seeded order, so drift hits all alike):

1. per gateway variant (full = PCP + NAT-PMP + UPnP, UPnP only, NAT-PMP only
   — miniupnpd's NAT-PMP always comes with PCP, so that is the lab's
   PCP + NAT-PMP gateway —, none): n, worked, failed, wrong answers, median
   and p90 of the time to a working mapping, ratio to portbroker;
2. 30 % and 60 % loss on the full gateway: nftables in the gateway namespace
   drops that share of every control packet, each way (UDP 5351 and 1900,
   and the UPnP HTTP port's TCP);
3. a gateway restart (``Lab.restart_miniupnpd``: mappings and rules gone, the
   epoch reset): every tool maps, the gateway restarts, and the wan host
   retries each external port until it works again; a tool that does not get
   its mapping back within twice the lifetime it asked for shows "never".

Each attempt has a bound (30 s; 15 s in --quick, 10 s under loss there); one
that passes it is a failure at the bound. Nothing is dropped: failures, wrong
answers and leftovers are counted in the tables and every attempt is in
--json. Full mode (8 rounds per variant, 5 per loss level, 3 restarts) took
29 minutes on 2 shared cores; --quick (one round of each, 30 % loss only)
4 minutes; --smoke (one round, full gateway) 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from portbroker.testing.lab import (
    EXTERNAL_ADDRESS,
    GATEWAY_ADDRESS,
    HTTP_PORT,
    LAN_ADDRESS,
    Lab,
    Variant,
    open_lab,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = HERE / "_peers_child.py"
PORTBROKER_CLI = str(Path(sys.executable).with_name("portbroker"))

# miniupnpd's PCP floor is 120 s (min_lifetime); the restart section lowers it
# so that lifetimes of seconds (and renewals within them) are possible.
FAULT_CONFIG = ("min_lifetime=4",)
VARIANTS = (Variant.FULL, Variant.UPNP_ONLY, Variant.PCP_NATPMP_ONLY, Variant.NONE)
LIFETIME = 3600  # asked for in sections 1 and 2; section 3 asks for --restart-lifetime


@dataclass(frozen=True)
class Tool:
    name: str
    kind: str  # "command" | "library"
    speaks: str  # what it uses, for the tables
    holds: bool = False  # keeps its mapping alive (renews, restores)

    @property
    def baseline(self) -> str:
        return "portbroker map" if self.kind == "command" else "portbroker"


TOOLS = (
    Tool("portbroker map", "command", "PCP, NAT-PMP, UPnP", holds=True),
    Tool("portbroker map (daemon)", "command", "PCP, NAT-PMP, UPnP", holds=True),
    Tool("natpmpc", "command", "NAT-PMP"),
    Tool("upnpc", "command", "UPnP"),
    Tool("portbroker", "library", "PCP, NAT-PMP, UPnP", holds=True),
    Tool("miniupnpc", "library", "UPnP"),
    Tool("NAT-PMP", "library", "NAT-PMP"),
    Tool("py-natpmp", "library", "NAT-PMP"),
    Tool("async-upnp-client", "library", "UPnP"),
)


@dataclass
class Attempt:
    section: str  # "variant:full", "loss:30", "restart"
    tool: str
    run: int
    port: int
    outcome: str = "failed"  # worked | failed | wrong | timeout | unavailable
    seconds: float | None = None  # the tool's time (to success or to giving up)
    external_port: int | None = None
    error: str = ""
    deleted: bool | None = None
    rules_while_mapped: int = 0  # its DNAT rules before the delete: the leftover check sees them
    left_rules: int = 0
    restored_after: float | None = None  # restart section: seconds, None = never


# -- plumbing ------------------------------------------------------------------


class Lines:
    """A child's stdout, line by line, with a timeout (select on the raw pipe)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buffer = b""

    def next(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(b"\n")
        try:
            parsed: dict[str, Any] = json.loads(text)
        except ValueError:
            return {"event": "garbage", "error": text.decode(errors="replace")[:200]}
        return parsed


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process we started, by its pid: close stdin, then SIGTERM, then SIGKILL."""
    if process.poll() is None and process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(OSError):
            process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None and not pipe.closed:
            pipe.close()


def clean_env() -> dict[str, str]:
    # The tools find the gateway themselves: no PORTBROKER_GATEWAY from the caller.
    return {k: v for k, v in os.environ.items() if not k.startswith("PORTBROKER_")}


def listen(lab: Lab, port: int) -> socket.socket:
    listener = lab.socket(lab.lan_ns, kind=socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(LAN_ADDRESS), port))
    listener.listen(16)
    return listener


def works_from_outside(
    lab: Lab, listener: socket.socket, external_port: int, timeout: float
) -> str:
    """Connect from the wan host to the external endpoint: "" if it reached *listener*, else why."""
    outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(timeout)
        try:
            outside.connect((str(EXTERNAL_ADDRESS), external_port))
        except OSError as exc:
            return f"{type(exc).__name__} connecting to {EXTERNAL_ADDRESS}:{external_port}"
        ready, _, _ = select.select([listener], [], [], timeout)
        if not ready:
            return f"{EXTERNAL_ADDRESS}:{external_port} accepted, but not by the lan listener"
        inside, _ = listener.accept()
        with inside:
            inside.sendall(b"inside")
            try:
                got = outside.recv(16)
            except OSError as exc:
                return f"{type(exc).__name__} reading the lan side's hello"
        return "" if got == b"inside" else f"wrong bytes {got!r}"


_DNAT = re.compile(r"th dport (\d+) dnat ip to 192\.168\.77\.2:(\d+)")


def dnat_left(lab: Lab, internal_port: int) -> int:
    """miniupnpd's DNAT rules for *internal_port* still on the gateway."""
    return sum(1 for m in _DNAT.finditer(lab.nft_rules()) if int(m.group(2)) == internal_port)


def set_loss(lab: Lab, percent: int) -> None:
    """Drop *percent* % of the gateway's control traffic, each way (0: none)."""
    with contextlib.suppress(Exception):
        lab.nft(lab.gw_ns, "delete table inet pbbenchloss\n")
    if not percent:
        return
    rule = f"numgen random mod 100 < {percent} drop"
    lab.nft(
        lab.gw_ns,
        f"""
table inet pbbenchloss {{
  chain input {{
    type filter hook input priority -10; policy accept;
    udp dport {{ 1900, 5351 }} {rule}
    tcp dport {HTTP_PORT} {rule}
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    udp sport {{ 1900, 5351 }} {rule}
    tcp sport {HTTP_PORT} {rule}
  }}
}}
""",
    )


# -- the daemon behind "portbroker map (daemon)" ---------------------------------

DAEMON_SOCKETS: dict[str, Path] = {}  # lan namespace -> its daemon's socket


@contextlib.contextmanager
def daemon_in(lab: Lab, directory: Path) -> Iterator[None]:
    """``portbroker daemon`` in the lab's lan namespace (finding the gateway itself)."""
    sock = directory / f"daemon-{lab.suffix}.sock"
    process = subprocess.Popen(
        lab.exec_argv(
            lab.lan_ns,
            [
                *(PORTBROKER_CLI, "daemon", "-q", "--socket", str(sock)),
                *("--state", str(directory / f"daemon-{lab.suffix}.json")),
            ],
        ),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not _accepting(sock):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("benchmarks/peers.py: portbroker daemon did not start")
            time.sleep(0.05)
        DAEMON_SOCKETS[lab.lan_ns] = sock
        yield
    finally:
        DAEMON_SOCKETS.pop(lab.lan_ns, None)
        stop(process)


def _accepting(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


# -- one tool: map (timed), then delete ------------------------------------------


class Running:
    """A tool's mapping in progress: how to delete it (or stop holding it)."""

    def __init__(self, delete: Callable[[], tuple[bool, str]]) -> None:
        self.delete = delete


def _command_map(
    tool: Tool, lab: Lab, port: int, lifetime: int, bound: float, state: Path, hold: bool
) -> tuple[Attempt, Running | None]:
    attempt = Attempt("", tool.name, 0, port)
    program = PORTBROKER_CLI if tool.name.startswith("portbroker") else tool.name
    if shutil.which(program) is None:
        attempt.outcome = "unavailable"
        attempt.error = f"{program} is not installed (scripts/setup installs it)"
        return attempt, None
    gateway = str(GATEWAY_ADDRESS)
    env = clean_env()
    if tool.name == "portbroker map (daemon)":
        # Through the lab's running daemon (its socket named by the
        # environment, as a user's shell would): the daemon makes the
        # mapping and keeps it until unmap, so it also holds.
        env["PORTBROKER_SOCKET"] = str(DAEMON_SOCKETS[lab.lan_ns])
        argv = [PORTBROKER_CLI, "map", f"{port}/tcp", "--json", "--lifetime", str(lifetime)]
        delete_argv = [PORTBROKER_CLI, "unmap", f"{port}/tcp"]
    elif tool.name == "portbroker map":
        argv = [PORTBROKER_CLI, "map", f"{port}/tcp", "--no-daemon", "--json"]
        argv += ["--state-file", str(state), "--lifetime", str(lifetime)]
        if hold:
            return _hold_cli(tool, lab, [*argv, "--hold"], attempt, bound)
        delete_argv = [PORTBROKER_CLI, "unmap", f"{port}/tcp", "--no-daemon"]
        delete_argv += ["--state-file", str(state)]
    elif tool.name == "natpmpc":
        argv = ["natpmpc", "-g", gateway, "-a", str(port), str(port), "tcp", str(lifetime)]
        delete_argv = ["natpmpc", "-g", gateway, "-a", str(port), str(port), "tcp", "0"]
    else:
        argv = ["upnpc", "-a", str(LAN_ADDRESS), str(port), str(port), "TCP", str(lifetime)]
        delete_argv = ["upnpc", "-d", str(port), "TCP"]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            lab.exec_argv(lab.lan_ns, argv),
            capture_output=True,
            text=True,
            timeout=bound,
            check=False,
            env=env,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        attempt.outcome, attempt.seconds = "timeout", bound
        attempt.error = f"no answer within {bound:g} s"
    else:
        attempt.seconds = time.perf_counter() - started
        attempt.external_port, attempt.error = _parse_command(tool.name, done)

    def delete() -> tuple[bool, str]:
        try:
            gone = subprocess.run(
                lab.exec_argv(lab.lan_ns, delete_argv),
                capture_output=True,
                text=True,
                timeout=max(bound, 30),
                check=False,
                env=env,
                cwd=REPO,
            )
        except subprocess.TimeoutExpired:
            return False, "delete timed out"
        ok = gone.returncode == 0 if tool.name != "upnpc" else "returned : 0" in gone.stdout
        return ok, "" if ok else (gone.stdout + gone.stderr).strip()[-200:]

    # A tool that failed or was stopped at the bound may still have left
    # something: delete all the same.
    return attempt, Running(delete)


def _parse_command(name: str, done: subprocess.CompletedProcess[str]) -> tuple[int | None, str]:
    out = done.stdout
    if name.startswith("portbroker map"):
        if done.returncode == 0:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return int(json.loads(out)["external_port"]), ""
        return None, (done.stderr.strip() or out.strip())[-200:] or f"exit {done.returncode}"
    if name == "natpmpc":
        found = re.search(r"Mapped public port (\d+) protocol TCP", out)
        if done.returncode == 0 and found:
            return int(found.group(1)), ""
        lines = [line for line in (out + done.stderr).splitlines() if line.strip()]
        return None, (lines[-1] if lines else f"exit {done.returncode}")[:200]
    found = re.search(r"external [\d.]+:(\d+) TCP is redirected to internal", out)
    if found:
        return int(found.group(1)), ""
    lines = [line for line in (out + done.stderr).splitlines() if line.strip()]
    return None, (lines[-1] if lines else f"exit {done.returncode}")[:200]


def _hold_cli(
    tool: Tool, lab: Lab, argv: list[str], attempt: Attempt, bound: float
) -> tuple[Attempt, Running | None]:
    started = time.perf_counter()
    process = subprocess.Popen(
        lab.exec_argv(lab.lan_ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=REPO,
    )
    assert process.stdout is not None
    event = Lines(process.stdout).next(bound)
    attempt.seconds = time.perf_counter() - started
    if event is None or event.get("event") != "Acquired":
        stop(process)
        attempt.outcome = "timeout" if event is None else "failed"
        attempt.error = "no Acquired line" if event is None else json.dumps(event)[:200]
        return attempt, None
    attempt.external_port = int(event["external_port"])

    def delete() -> tuple[bool, str]:
        # SIGTERM: the held mapping is deleted as the command ends.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(process)
            return False, "did not end within 30 s of SIGTERM"
        finally:
            stop(process)
        return process.returncode == 0, f"exit {process.returncode}"

    return attempt, Running(delete)


def _library_map(
    tool: Tool, lab: Lab, port: int, lifetime: int, bound: float
) -> tuple[Attempt, Running | None]:
    attempt = Attempt("", tool.name, 0, port)
    process = subprocess.Popen(
        lab.exec_argv(
            lab.lan_ns, [sys.executable, str(CHILD), tool.name, str(port), str(lifetime)]
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=REPO,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    lines = Lines(process.stdout)
    # The child's own timer starts after its imports; the bound covers
    # them too (a Python start and imports take well under a second here).
    event = lines.next(bound + 5)
    if event is None:
        stop(process)
        attempt.outcome, attempt.seconds = "timeout", bound
        attempt.error = f"no answer within {bound:g} s"
        return attempt, None
    if event["event"] == "unavailable":
        stop(process)
        attempt.outcome, attempt.error = "unavailable", event["error"]
        return attempt, None
    attempt.seconds = float(event.get("elapsed", bound))
    if event["event"] != "mapped":
        stop(process)
        # It gave up by itself (perhaps after the bound): a failure, not a time-out.
        attempt.error = str(event.get("error", event))
        return attempt, None
    attempt.external_port = int(event["external_port"])
    stdin = process.stdin

    def delete() -> tuple[bool, str]:
        try:
            stdin.write(b"delete\n")
            stdin.flush()
        except OSError:
            pass
        answer = lines.next(30)
        stop(process)
        if answer is None or answer.get("event") != "deleted":
            return False, "no answer to delete"
        return bool(answer.get("ok")), str(answer.get("error", ""))

    return attempt, Running(delete)


def map_with(
    tool: Tool, lab: Lab, port: int, lifetime: int, bound: float, state_dir: Path, hold: bool
) -> tuple[Attempt, Running | None]:
    if tool.kind == "command":
        state = state_dir / f"state-{port}.json"
        return _command_map(tool, lab, port, lifetime, bound, state, hold)
    return _library_map(tool, lab, port, lifetime, bound)


# A tool may clean up after a failed map in the background (portbroker's
# daemon answers the failure, then deletes what the map may have made, within
# its 5 s release bound): what a failed map left is counted once that time is
# over (or at once, when nothing is left).
CLEANUP_GRACE = 8.0  # s


def finish(lab: Lab, attempt: Attempt, running: Running | None) -> None:
    """Delete the mapping with the tool itself, then count what it left on the gateway."""
    if running is not None:
        ok, why = running.delete()
        attempt.deleted = ok
        if not ok and not attempt.error:
            attempt.error = f"delete: {why}"
    attempt.left_rules = dnat_left(lab, attempt.port)
    deadline = time.monotonic() + CLEANUP_GRACE
    while attempt.left_rules and attempt.external_port is None and time.monotonic() < deadline:
        time.sleep(0.25)
        attempt.left_rules = dnat_left(lab, attempt.port)


# -- the sections ------------------------------------------------------------------


@dataclass
class Plan:
    variants: list[Variant]
    runs: int
    bound: float
    losses: list[int]
    loss_runs: int
    loss_bound: float
    restart_runs: int
    restart_lifetime: int
    gap: float = 0.3
    seed: int = 1
    tools: Sequence[Tool] = TOOLS
    ports: Iterator[int] = field(default_factory=lambda: iter(range(20000, 60000)))


def shuffled(tools: Sequence[Tool], run: int, seed: int) -> list[Tool]:
    """This round's order: every tool once, in a new order each round.

    Not a fixed rotation: that keeps each tool behind the same neighbour, and
    a neighbour that spent the gateway's ICMP budget (Linux allows a burst of
    6 port-unreachable errors per peer, then 1 a second) or left miniupnpd
    busy would always hit the same tool.
    """
    return random.Random(seed * 1000 + run).sample(list(tools), len(tools))


def one_attempt(
    lab: Lab, tool: Tool, section: str, run: int, plan: Plan, bound: float, state: Path, loss: int
) -> Attempt:
    port = next(plan.ports)
    with contextlib.closing(listen(lab, port)) as listener:
        set_loss(lab, loss)
        try:
            attempt, running = map_with(tool, lab, port, LIFETIME, bound, state, hold=False)
        finally:
            set_loss(lab, 0)  # the proof and the clean-up run without loss
        attempt.section, attempt.run = section, run
        if attempt.external_port is not None:
            why = works_from_outside(lab, listener, attempt.external_port, timeout=3)
            attempt.outcome = "worked" if not why else "wrong"
            if why:
                attempt.error = f"reported {EXTERNAL_ADDRESS}:{attempt.external_port} but {why}"
            attempt.rules_while_mapped = dnat_left(lab, port)
        finish(lab, attempt, running)
    return attempt


def variant_section(lab: Lab, variant: Variant, plan: Plan, state: Path, log: Log) -> list[Attempt]:
    attempts = []
    gap = (
        1.1 if variant is Variant.NONE else plan.gap
    )  # ICMP errors are rate-limited per peer (1 s)
    for run in range(plan.runs):
        for tool in shuffled(plan.tools, run, plan.seed):
            attempt = one_attempt(
                lab, tool, f"variant:{variant.value}", run, plan, plan.bound, state, 0
            )
            log(attempt)
            attempts.append(attempt)
            time.sleep(gap)
    return attempts


def loss_section(lab: Lab, percent: int, plan: Plan, state: Path, log: Log) -> list[Attempt]:
    attempts = []
    for run in range(plan.loss_runs):
        for tool in shuffled(plan.tools, run, plan.seed):
            attempt = one_attempt(
                lab, tool, f"loss:{percent}", run, plan, plan.loss_bound, state, percent
            )
            log(attempt)
            attempts.append(attempt)
            time.sleep(plan.gap)
    return attempts


def restart_section(lab: Lab, plan: Plan, state: Path, log: Log) -> list[Attempt]:
    """Every tool maps; the gateway restarts; how long until each mapping works again."""
    attempts: list[Attempt] = []
    lifetime = plan.restart_lifetime
    bound = 2 * lifetime
    for run in range(plan.restart_runs):
        held: list[tuple[Attempt, Running | None, socket.socket]] = []
        try:
            for tool in shuffled(plan.tools, run, plan.seed):
                port = next(plan.ports)
                listener = listen(lab, port)
                attempt, running = map_with(tool, lab, port, lifetime, plan.bound, state, hold=True)
                attempt.section, attempt.run = "restart", run
                if attempt.external_port is not None:
                    why = works_from_outside(lab, listener, attempt.external_port, timeout=3)
                    attempt.outcome = "worked" if not why else "wrong"
                    attempt.error = why
                held.append((attempt, running, listener))
            lab.restart_miniupnpd()
            restarted = time.monotonic()
            waiting = [(a, s) for a, _, s in held if a.outcome == "worked"]
            while waiting and time.monotonic() - restarted < bound:
                for attempt, listener in list(waiting):
                    assert attempt.external_port is not None
                    if not works_from_outside(lab, listener, attempt.external_port, timeout=0.5):
                        attempt.restored_after = time.monotonic() - restarted
                        waiting.remove((attempt, listener))
                time.sleep(0.2)
        finally:
            for attempt, running, listener in held:
                finish(lab, attempt, running)
                listener.close()
                log(attempt)
                attempts.append(attempt)
    return attempts


# -- figures -------------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered) + 0.5) - 1))]


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{1000 * value:.0f} ms" if value < 10 else f"{value:.1f} s"


def summarise(attempts: Sequence[Attempt], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tool in tools:
        mine = [a for a in attempts if a.tool == tool.name]
        worked = [a.seconds for a in mine if a.outcome == "worked" and a.seconds is not None]
        failed = [a for a in mine if a.outcome in ("failed", "timeout")]
        gave_up = [a.seconds for a in failed if a.seconds is not None]
        errors = sorted({a.error for a in mine if a.error and a.outcome != "worked"})
        restored = [a.restored_after for a in mine if a.restored_after is not None]
        rows.append(
            {
                "tool": tool.name,
                "kind": tool.kind,
                "speaks": tool.speaks,
                "n": len(mine),
                "worked": len(worked),
                "failed": len(failed),
                "timed_out": sum(a.outcome == "timeout" for a in mine),
                "wrong": sum(a.outcome == "wrong" for a in mine),
                "unavailable": sum(a.outcome == "unavailable" for a in mine),
                "left_rules": sum(a.left_rules for a in mine),
                "undeleted": sum(a.deleted is False for a in mine),
                "median_s": statistics.median(worked) if worked else None,
                "p90_s": p90(worked) if worked else None,
                "gave_up_median_s": statistics.median(gave_up) if gave_up else None,
                "restored": len(restored),
                "never": sum(a.outcome == "worked" and a.restored_after is None for a in mine),
                "restored_median_s": statistics.median(restored) if restored else None,
                "restored_p90_s": p90(restored) if restored else None,
                "errors": errors[:3],
            }
        )
    by_name = {row["tool"]: row for row in rows}
    for tool, row in zip(tools, rows, strict=True):
        base = by_name.get(tool.baseline)
        for key, ratio_key in (("median_s", "ratio"), ("restored_median_s", "restored_ratio")):
            mine_value, base_value = row[key], base[key] if base else None
            row[ratio_key] = mine_value / base_value if mine_value and base_value else None
    return rows


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def note(row: dict[str, Any]) -> str:
    text = "; ".join(row["errors"])
    return text.replace("|", "/").replace("\n", " ")[:160]


def mapping_table(title: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| tool | kind | n | worked | failed (timed out) | wrong | left | median | p90 "
        "| vs portbroker | gave up after | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        if row["unavailable"] == row["n"] and row["n"]:
            lines.append(
                f"| {row['tool']} | {row['kind']} | {row['n']} | — | — | — | — | — | — | — | — "
                f"| not usable here: {note(row)} |"
            )
            continue
        lines.append(
            f"| {row['tool']} | {row['kind']} | {row['n']} | {row['worked']} "
            f"| {row['failed']} ({row['timed_out']}) | {row['wrong']} "
            f"| {row['left_rules']} | {ms(row['median_s'])} | {ms(row['p90_s'])} "
            f"| {ratio(row['ratio'])} | {ms(row['gave_up_median_s'])} | {note(row)} |"
        )
    return "\n".join(lines)


def restart_table(title: str, rows: Sequence[dict[str, Any]], tools: Sequence[Tool]) -> str:
    holds = {tool.name: tool.holds for tool in tools}
    lines = [
        f"### {title}",
        "",
        "| tool | kind | holds | n | mapped before | works again | never | median | p90 "
        "| vs portbroker | left |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tool']} | {row['kind']} | {'yes' if holds[row['tool']] else 'no'} "
            f"| {row['n']} | {row['worked']} | {row['restored']} | {row['never']} "
            f"| {ms(row['restored_median_s'])} | {ms(row['restored_p90_s'])} "
            f"| {ratio(row['restored_ratio'])} | {row['left_rules']} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def debian(package: str) -> str:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() or "not installed"

    def pypi(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "miniupnpd": debian("miniupnpd-nftables"),
        "natpmpc": debian("natpmpc"),
        "upnpc": debian("miniupnpc"),
        "python_packages": {
            name: pypi(name)
            for name in ("portbroker", "miniupnpc", "NAT-PMP", "py-natpmp", "async-upnp-client")
        },
    }


def machine_line(info: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["python_packages"].items())
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
        f"Python {info['python']}, miniupnpd {info['miniupnpd']}; natpmpc {info['natpmpc']}, "
        f"upnpc {info['upnpc']}; {packages}."
    )


Log = Callable[[Attempt], None]


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one round of everything")
    mode.add_argument("--smoke", action="store_true", help="one round, full gateway only")
    parser.add_argument("--runs", type=int, help="rounds per gateway variant (full mode: 8)")
    parser.add_argument("--loss-runs", type=int, help="rounds per loss level (full mode: 5)")
    parser.add_argument("--restart-runs", type=int, help="gateway restarts (full mode: 3)")
    parser.add_argument("--seed", type=int, default=1, help="seeds each round's tool order")
    parser.add_argument("--json", metavar="PATH", help="write every attempt and figure here")
    parser.add_argument("--verbose", action="store_true", help="print each attempt as it ends")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/peers.py: run as root (it builds the lab)", file=sys.stderr)
        return 2
    if args.smoke:
        plan = Plan([Variant.FULL], 1, 15, [], 0, 10, 0, 10)
    elif args.quick:
        plan = Plan(list(VARIANTS), 1, 15, [30], 1, 10, 1, 6)
    else:
        plan = Plan(list(VARIANTS), 8, 30, [30, 60], 5, 30, 3, 20)
    plan.runs = args.runs if args.runs is not None else plan.runs
    plan.loss_runs = args.loss_runs if args.loss_runs is not None else plan.loss_runs
    plan.restart_runs = args.restart_runs if args.restart_runs is not None else plan.restart_runs
    plan.seed = args.seed

    def log(attempt: Attempt) -> None:
        if args.verbose:
            print(
                f"  {attempt.section:18} {attempt.tool:18} {attempt.outcome:8} "
                f"{ms(attempt.seconds):>9} {attempt.error[:90]}",
                file=sys.stderr,
                flush=True,
            )

    # SIGTERM (and SIGINT, even where a background shell ignored it) end the
    # run through the labs' finally blocks: namespaces, miniupnpd, the daemon
    # and the blackhole route go with it.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    info = machine()
    sections: dict[str, list[Attempt]] = {}
    with tempfile.TemporaryDirectory(prefix="pb-peers-") as directory:
        state = Path(directory)
        for variant in plan.variants:
            with open_lab(variant) as lab, daemon_in(lab, state):
                sections[f"variant:{variant.value}"] = variant_section(
                    lab, variant, plan, state, log
                )
        if plan.losses or plan.restart_runs:
            with open_lab(Variant.FULL, extra_config=FAULT_CONFIG) as lab, daemon_in(lab, state):
                for percent in plan.losses:
                    sections[f"loss:{percent}"] = loss_section(lab, percent, plan, state, log)
                if plan.restart_runs:
                    sections["restart"] = restart_section(lab, plan, state, log)
    elapsed = time.monotonic() - started

    titles = {
        "variant:full": "Time to a working mapping: full gateway (PCP + NAT-PMP + UPnP IGD)",
        "variant:upnp-only": "Time to a working mapping: UPnP IGD only",
        "variant:pcp-natpmp-only": "Time to a working mapping: NAT-PMP only (miniupnpd: PCP + NAT-PMP, no UPnP)",
        "variant:none": "No mapping service (5351 and 1900 answer ICMP port unreachable)",
        "loss:30": "30 % loss of control traffic, full gateway",
        "loss:60": "60 % loss of control traffic, full gateway",
        "restart": f"Gateway restart: time until the mapping works again from outside "
        f"(lifetime {plan.restart_lifetime} s, 'never' = not within {2 * plan.restart_lifetime} s)",
    }
    summaries = {name: summarise(attempts, plan.tools) for name, attempts in sections.items()}
    out = []
    for name, rows in summaries.items():
        if name == "restart":
            out.append(restart_table(titles[name], rows, plan.tools))
        else:
            out.append(mapping_table(titles.get(name, name), rows))
    out.append(machine_line(info))
    out.append(
        f"Run: {plan.runs} round(s) per variant, {plan.loss_runs} per loss level, "
        f"{plan.restart_runs} restart(s); bound {plan.bound:g} s per attempt "
        f"({plan.loss_bound:g} s under loss); took {elapsed:.0f} s. Commands are timed "
        f"whole-process, libraries inside their process; 'vs portbroker' is the "
        f"tool's median over that of portbroker of its own kind (above 1: slower); "
        f"'left' counts DNAT rules still on the gateway after the tool's own delete; "
        f"'gave up after' is the median time of the failures."
    )
    print("\n\n".join(out))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "plan": {
                        "variants": [v.value for v in plan.variants],
                        "runs": plan.runs,
                        "bound_s": plan.bound,
                        "losses": plan.losses,
                        "loss_runs": plan.loss_runs,
                        "loss_bound_s": plan.loss_bound,
                        "restart_runs": plan.restart_runs,
                        "restart_lifetime_s": plan.restart_lifetime,
                    },
                    "elapsed_s": elapsed,
                    "summaries": summaries,
                    "attempts": {k: [asdict(a) for a in v] for k, v in sections.items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("benchmarks/peers.py: interrupted; the labs were torn down", file=sys.stderr)
        sys.exit(130)
