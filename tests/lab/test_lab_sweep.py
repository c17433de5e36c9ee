"""A lab whose process was killed before its teardown (SIGKILL; a CI limit's
kill-after) left its namespaces, its miniupnpd and its blackhole routes on the
machine for good. The next lab opened removes them, and leaves the lab of a
process that is still running alone (portbroker/testing/lab.py,
sweep_stale_labs)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from portbroker.testing.lab import (
    OWNERS_DIR,
    Lab,
    Variant,
    _delete_namespaces,
    _disown,
    _metric,
    _namespaces,
    _process_identity,
    _remove_blackholes,
    blackhole_routes,
    sweep_stale_labs,
)
from tests.conftest import _require_lab

HOLD_A_LAB = """
import json, sys, time
from pathlib import Path
from portbroker.testing.lab import Variant, open_lab

with open_lab(Variant.FULL, workdir=Path(sys.argv[1])) as lab:
    print(json.dumps({"suffix": lab.suffix, "namespaces": [lab.gw_ns, lab.lan_ns, lab.wan_ns],
                      "miniupnpd": lab.miniupnpd_pid}), flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lab_process(
    workdir: Path, *, wrapper: tuple[str, ...] = (), source: str = HOLD_A_LAB
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A process holding a full lab (run through *wrapper* when given); what it built."""
    workdir.mkdir()
    process = subprocess.Popen(
        [*wrapper, sys.executable, "-c", source, str(workdir)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "the lab process built nothing within 60 s"
        yield process, json.loads(process.stdout.readline())
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def blackhole_metrics() -> set[int]:
    return {metric for _family, _prefix, metric in blackhole_routes()}


def ended(pid: int) -> bool:
    """*pid* has ended (allowing a moment for init to reap it)."""
    deadline = time.monotonic() + 10
    while _process_identity(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_killed_lab_is_removed_by_the_next_one_and_a_running_one_is_not(
    tmp_path: Path, lab_factory: Callable[..., Lab]
) -> None:
    try:
        with (
            lab_process(tmp_path / "running") as (running, kept),
            lab_process(tmp_path / "killed") as (killed, left),
        ):
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait(timeout=30)
            # What a killed lab leaves: the fault this test is about.
            assert set(left["namespaces"]) <= set(_namespaces())
            assert _process_identity(left["miniupnpd"]) is not None
            assert _metric(left["suffix"]) in blackhole_metrics()
            assert (OWNERS_DIR / left["suffix"]).exists()

            fresh = lab_factory(Variant.NONE)  # its open sweeps first

            namespaces = set(_namespaces())
            assert not set(left["namespaces"]) & namespaces
            assert ended(left["miniupnpd"])
            assert _metric(left["suffix"]) not in blackhole_metrics()
            assert not (OWNERS_DIR / left["suffix"]).exists()
            # The running process's lab, and the new one, are untouched.
            assert set(kept["namespaces"]) <= namespaces
            assert _process_identity(kept["miniupnpd"]) is not None
            assert _metric(kept["suffix"]) in blackhole_metrics()
            assert {fresh.gw_ns, fresh.lan_ns, fresh.wan_ns} <= namespaces
            assert sweep_stale_labs() == []  # nothing more to remove

            # A lab torn down as usual leaves no owner file to sweep.
            running.send_signal(signal.SIGINT)
            assert running.wait(timeout=60) != 0
            assert not set(kept["namespaces"]) & set(_namespaces())
            assert not (OWNERS_DIR / kept["suffix"]).exists()
            assert _metric(kept["suffix"]) not in blackhole_metrics()
    finally:
        sweep_stale_labs()  # whatever a failure above left


def test_a_process_identity_is_none_once_it_ended_and_names_its_start(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        identity = _process_identity(child.pid)
        assert identity is not None
        assert identity.split()[0] == str(child.pid)
        child.kill()
        # Ended but not reaped (a zombie): ended all the same.
        deadline = time.monotonic() + 10
        while _process_identity(child.pid) is not None:
            assert time.monotonic() < deadline, "the killed child still counts as running"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert _process_identity(child.pid) is None


# HOLD_A_LAB that sweeps nothing itself: the sweep under test is the one
# outside its pid namespace (in it, every other lab's pid is unknown).
HOLD_A_LAB_NO_SWEEP = HOLD_A_LAB.replace(
    "from portbroker.testing.lab import Variant, open_lab",
    "from portbroker.testing import lab as lab_module\n"
    "from portbroker.testing.lab import Variant, open_lab\n"
    "lab_module.sweep_stale_labs = lambda: []",
)


def test_a_lab_of_a_process_in_another_pid_namespace_is_left_alone(tmp_path: Path) -> None:
    """A session in a pid namespace of its own (a container sharing /run and
    the network namespaces) named its process by a pid of that namespace,
    which here is another process or none: its live lab was swept."""
    _require_lab()
    unshare = ("unshare", "--pid", "--fork", "--mount-proc", "--propagation", "slave")
    with lab_process(tmp_path / "other", wrapper=unshare, source=HOLD_A_LAB_NO_SWEEP) as (
        process,
        other,
    ):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        (holder,) = [int(pid) for pid in children.split()]
        try:
            assert not set(other["namespaces"]) & set(sweep_stale_labs())
            assert set(other["namespaces"]) <= set(_namespaces())
            assert _metric(other["suffix"]) in blackhole_metrics()
            owner = (OWNERS_DIR / other["suffix"]).read_text().split()
            assert owner[-1] == os.readlink(f"/proc/{holder}/ns/pid")
        finally:
            os.kill(holder, signal.SIGINT)  # its own teardown, in its namespaces
            process.wait(timeout=60)
            left = (OWNERS_DIR / other["suffix"]).exists()
            if left:  # its teardown failed: ours to clean up
                _delete_namespaces([ns for ns in other["namespaces"] if ns in _namespaces()])
                _remove_blackholes(_metric(other["suffix"]))
                _disown(other["suffix"])
    assert not left  # its own teardown removed everything, its owner file last
    assert not set(other["namespaces"]) & set(_namespaces())
    assert _metric(other["suffix"]) not in blackhole_metrics()
