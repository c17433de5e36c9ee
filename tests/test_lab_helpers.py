"""The lab tests' line reader: two lines written together are both seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.lab.helpers import lines_of, stop_read_process

# Two JSON events in one write, then silence: what a broker agent does when a
# Lost and a Restored come within one moment (seen in CI: select() plus a
# buffered readline() left the second line unseen, and the test timed out).
SCRIPT = "import sys, time; sys.stdout.write('one\\ntwo\\n'); sys.stdout.flush(); time.sleep(30)"


def test_two_lines_written_together_are_both_read() -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        reader = lines_of(process)
        assert reader.next(20) == "one\n"
        assert reader.next(20) == "two\n"
        assert reader.next(0.2) is None  # nothing more, and no hang
        process.kill()
        assert lines_of(process) is reader
        assert reader.next(20) == ""  # the end, and every later call sees it
        assert reader.next(0) == ""
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


# Ignores SIGINT and SIGTERM; on each one prints a burst of lines, as the
# netmon monitor printed a last change while a test stopped it.
STUBBORN = """
import signal, sys, time
def burst(*_):
    sys.stdout.write("".join(f"late {i}\\n" for i in range(200)))
    sys.stdout.flush()
signal.signal(signal.SIGINT, burst)
signal.signal(signal.SIGTERM, burst)
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stderr.write("said on stderr\\n"); sys.stderr.flush()
while True:
    time.sleep(1)
"""


def test_stopping_a_read_process_leaves_every_line_to_its_reader_and_returns() -> None:
    """The stop used to be communicate(): it read stdout beside the reader and
    could block in a read no timeout bounds (CI hung 80 minutes in test_lab_netmon)."""
    process = subprocess.Popen(
        [sys.executable, "-c", STUBBORN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        reader = lines_of(process)
        assert reader.next(20) == "ready\n"
        stopped: list[str] = []
        stopper = threading.Thread(
            target=lambda: stopped.append(stop_read_process(process, signal.SIGINT, timeout=2)),
            daemon=True,
        )
        stopper.start()
        stopper.join(60)
        assert stopped, "the stop hung"
        [err] = stopped
        assert process.returncode == -signal.SIGKILL  # ignored SIGINT: killed
        assert err == "said on stderr\n"
        late = []
        while (line := reader.next(20)) not in ("", None):
            late.append(line)
        assert late == [f"late {i}\n" for i in range(200)]  # none taken by the stop
        assert process.stdout is not None  # given back
    finally:
        process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_children_of_a_session_started_in_a_background_shell_take_sigint() -> None:
    """`.ci/run` starts the lab session with `&`: SIGINT ignored, and inherited by
    every child unless tests/conftest.py undoes it (CI: a stop by SIGINT hung)."""
    probe = (
        "import subprocess, sys\n"
        "import tests.conftest\n"
        "status = subprocess.run(['cat', '/proc/self/status'], capture_output=True, text=True)\n"
        "print(next(l for l in status.stdout.splitlines() if l.startswith('SigIgn:')))\n"
    )
    done = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "$0" & wait', probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    ignored = int(done.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGINT - 1)), done.stdout


# Exits on SIGTERM, leaving a child of its own that holds its stdout open.
LEAVES_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
print("ready", child.pid, flush=True)
time.sleep(100)
"""


def test_stopping_a_process_whose_child_holds_its_stdout_returns() -> None:
    """The stdout pipe stays open while any process holds it: closing it under a
    reader thread blocked in read() waits for that read, as long as the child lives."""
    process = subprocess.Popen(
        [sys.executable, "-c", LEAVES_A_CHILD], stdout=subprocess.PIPE, text=True
    )
    try:
        reader = lines_of(process)
        ready = reader.next(20)
        assert ready is not None
        assert ready.startswith("ready ")
        child = int(ready.split()[1])
        stopped: list[str] = []
        stopper = threading.Thread(
            target=lambda: stopped.append(stop_read_process(process, timeout=10)), daemon=True
        )
        stopper.start()
        stopper.join(12)  # the child lives 20 s: a stop bound to it would not be back
        assert stopped == [""], "the stop waited for the child's end"
        assert process.returncode == -signal.SIGTERM
        os.kill(child, signal.SIGKILL)
        assert reader.next(20) == ""  # the pipe's end, once its last holder is gone
    finally:
        process.kill()
        process.wait()
