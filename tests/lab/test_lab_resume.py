"""A SIGSTOP longer than the lifetime stands in for suspend (issue 11 §5, docs/roaming.md).

``portbroker map --hold`` in the lan namespace holds a PCP mapping with a
12 s lifetime (miniupnpd's floor lowered to 10 s); it is stopped for longer
than that, miniupnpd lets the mapping lapse and removes its rule, and after
SIGCONT the mapping works from the wan host again within seconds.

What this stands in for, and what it does not: a stop is seen by
CLOCK_MONOTONIC (trio's clock), so the broker's overdue renewal timer fires at
SIGCONT by itself, and ClockWatch's LATE_TIMERS check (lifecycle rule 14)
leaves what was renewed since alone. A real suspend stops CLOCK_MONOTONIC:
no timer is overdue, and only the resume check renews — that path is proved
under MockClock (tests/test_resume.py), the detector on the real clocks in
tests/test_clockwatch.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import EXTERNAL_ADDRESS, Lab, open_lab
from tests.conftest import _require_lab
from tests.lab.helpers import connect_from_wan, lines_of, listen_in_lan

pytestmark = pytest.mark.lab

PORTBROKER = [sys.executable, "-m", "portbroker.cli"]
ROOT = Path(__file__).parents[2]
LIFETIME = 12
STOPPED_FOR = LIFETIME + 8.0  # at most: the stop ends a second after the rule is gone


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_lab()
    with open_lab(
        workdir=tmp_path_factory.mktemp("resume"), extra_config=["min_lifetime=10"]
    ) as built:
        yield built


def _next_line(process: subprocess.Popen[str], wanted: str, timeout: float) -> dict[str, Any]:
    lines = lines_of(process)
    deadline = time.monotonic() + timeout
    while True:
        line = lines.next(deadline - time.monotonic())
        if line is None:
            raise AssertionError(f"no {wanted} line within {timeout:g} s")
        if not line:
            assert process.stderr is not None
            raise AssertionError(f"map --hold ended before {wanted}: {process.stderr.read()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == wanted:
            return event


def _works(lab: Lab, listener: Any, port: int) -> bool:
    try:
        return connect_from_wan(lab, listener, port) == b"inside says hello"
    except OSError:
        return False


def _works_soon(lab: Lab, listener: socket.socket, port: int) -> bool:
    """As :func:`_works`, with a short connect timeout: a SYN the gateway drops (no
    rule yet) would otherwise cost TCP's 1 s retransmission, and the figure measure that."""
    outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(0.2)
        try:
            outside.connect((str(EXTERNAL_ADDRESS), port))
            outside.settimeout(5)
            inside, _peer = listener.accept()
            with inside:
                inside.sendall(b"inside says hello")
                return outside.recv(100) == b"inside says hello"
        except OSError:
            return False


def test_a_stop_longer_than_the_lifetime_is_mapped_again_within_seconds_of_sigcont(
    lab: Lab, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    port = 28301
    leases = tmp_path / "no-leases"
    leases.mkdir()
    argv = lab.exec_argv(
        lab.lan_ns,
        [
            *PORTBROKER,
            "map",
            f"{port}/tcp",
            "--hold",
            "--json",
            "--no-daemon",
            "--methods",
            "pcp",
            "--lifetime",
            str(LIFETIME),
            "--dhcp-leases",
            str(leases),
            "--state-file",
            str(tmp_path / "state.json"),
        ],
    )
    env = {k: v for k, v in os.environ.items() if k != "PORTBROKER_GATEWAY"}
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    stopped = False
    try:
        with listen_in_lan(lab, port) as listener:
            acquired = _next_line(process, "Acquired", 30)
            external = acquired["external_port"]
            assert acquired["lifetime"] <= LIFETIME, acquired
            assert _works(lab, listener, external)
            assert f"dport {external}" in lab.nft_rules()

            process.send_signal(signal.SIGSTOP)
            stopped = True
            paused = time.monotonic()
            # miniupnpd removes a lapsed PCP mapping on its own schedule (at
            # its expiry, in 2.3.1); stopped on for a second after that.
            expired_after: float | None = None
            while time.monotonic() - paused < STOPPED_FOR:
                if f"dport {external}" not in lab.nft_rules():
                    expired_after = time.monotonic() - paused
                    break
                time.sleep(0.1)
            assert expired_after is not None, "miniupnpd kept the lapsed rule:\n" + lab.log_text()
            assert not _works(lab, listener, external)
            time.sleep(max(1.0, LIFETIME + 1 - (time.monotonic() - paused)))
            stopped_for = time.monotonic() - paused
            assert stopped_for > LIFETIME

            process.send_signal(signal.SIGCONT)
            stopped = False
            resumed = time.monotonic()
            deadline = resumed + 10
            while not _works_soon(lab, listener, external) and time.monotonic() < deadline:
                time.sleep(0.02)
            took = time.monotonic() - resumed
            assert took < 10, lab.log_text()
            assert f"dport {external}" in lab.nft_rules()

            process.send_signal(signal.SIGTERM)
            assert _next_line(process, "Released", 30)["confirmed"] is True
            assert process.wait(timeout=30) == 0
            assert process.stderr is not None
            log = process.stderr.read()
            # ClockWatch saw the stop (lifecycle rule 14), whoever renewed first.
            assert "resumed (late-timers" in log, log
    finally:
        if stopped:
            process.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    figure(
        f"resume (pcp, lifetime {acquired['lifetime']} s): stopped {stopped_for:.1f} s, rule"
        f" gone after {expired_after:.1f} s; SIGCONT to working inbound connection through"
        f" {EXTERNAL_ADDRESS}:{external}: {took:.2f} s"
    )
