""".ci/run's pytest step, run as written with a stand-in pytest: how each session's
end (passed, failed, hung, deaf to SIGTERM, a Ctrl-C) becomes the run's output and
exit status. Only the limits are made short (1,500 s -> 20 s, 60 s -> 5 s: with 3 s and
1 s, and once with 10 s in a fresh-clone run while the lab session and the packaging
test's wheel build shared the two cores, a stand-in still starting was killed by the
SIGTERM before it printed a word or set its handler)."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

CI_RUN = Path(__file__).parents[1] / ".ci" / "run"
LIMIT = 20  # s, for .ci/run's 1,500

# .venv/bin/pytest: which session it is from its -m; what it does from
# $LAB / $OTHERS: pass, fail, hang (SIGTERM or SIGINT stops it, as
# tests/conftest.py makes the real one), deaf (hangs, ignores SIGTERM).
STAND_IN = """\
import os, signal, sys, time
session = "lab" if "lab and not fuzz" in sys.argv else "others"
mode = os.environ[session.upper()]
def stop(signum, _frame):
    print(f"{session} stopped by {signal.Signals(signum).name}", flush=True)
    if mode == "flood":  # as tests/conftest.py's SIGTERM handler, after many failures
        with open(os.environ["PORTBROKER_TEST_DIGEST"], "a") as digest:
            digest.write("SIGTERM during its hung test; every thread:\\n  in stuck_here\\n")
    sys.exit(2)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "deaf" else stop)
print(f"{session} started", flush=True)
open(f"{session}.started", "w").close()
if mode == "pass":
    print(f"{session} passed", flush=True)
    sys.exit(0)
if mode == "fail":
    print(f"{session} failed", flush=True)
    with open(os.environ["PORTBROKER_TEST_DIGEST"], "a") as digest:
        digest.write(
            f"FAILED {session}'s test (call)\\n    error: AssertionError: {session} broke\\n"
            "    at: tests/test_x.py:7\\n" + "    a frame\\n" * 40
        )
    sys.exit(1)
if mode == "flood":
    with open(os.environ["PORTBROKER_TEST_DIGEST"], "a") as digest:
        for n in range(200):
            digest.write(f"FAILED {session}'s test {n} (call)\\n" + "    a frame\\n" * 3)
while True:
    time.sleep(1)
"""


def _script(tmp_path: Path, limit: int) -> Path:
    text = CI_RUN.read_text()
    step = text[text.index("\nlimit=") :]
    step, n = re.subn(r"\nlimit=\d+\n", f"\nlimit={limit}\n", step)
    assert n == 1
    step, n = re.subn(r"--kill-after=\d+", "--kill-after=5", step)
    assert n == 1
    stand_in = tmp_path / ".venv" / "bin" / "pytest"
    stand_in.parent.mkdir(parents=True)
    # -S: no site-packages (the venv's .pth files and import hooks): the
    # stand-in needs the standard library only, and starts sooner under load.
    stand_in.write_text(f"#!{sys.executable} -S\n{STAND_IN}")
    stand_in.chmod(0o755)
    script = tmp_path / "run"
    script.write_text(f"set -euo pipefail\ndocs_site=$(mktemp -d)\n{step}")
    return script


def _run(tmp_path: Path, lab: str, others: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(_script(tmp_path, LIMIT))],
        cwd=tmp_path,
        env={**os.environ, "LAB": lab, "OTHERS": others},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_passing_sessions_pass_the_run(tmp_path: Path) -> None:
    done = _run(tmp_path, "pass", "pass")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lab passed" in done.stdout
    assert "others passed" in done.stdout
    assert "rc=0, the others rc=0" in done.stdout


@pytest.mark.parametrize(("lab", "others"), [("fail", "pass"), ("pass", "fail")])
def test_a_failing_session_fails_the_run(tmp_path: Path, lab: str, others: str) -> None:
    done = _run(tmp_path, lab, others)
    assert done.returncode != 0
    assert "failed" in done.stdout
    # The failed session's digest comes after both logs, at the end.
    failed = "lab" if lab == "fail" else "others"
    tail = done.stdout[done.stdout.index("== pytest: lab tests rc=") :]
    assert f"== what failed in the {failed} session" in tail
    assert f"FAILED {failed}'s test (call)" in tail
    assert "== what failed in the" not in tail.replace(f"in the {failed} session", "")
    # And last of all, past the frames, its name, error and place (CI's
    # output is often read through its last lines only).
    short = tail[tail.index("== in short\n") :].splitlines()
    assert short[1:] == [
        f"FAILED {failed}'s test (call)",
        f"    error: AssertionError: {failed} broke",
        "    at: tests/test_x.py:7",
        short[-1],
    ]
    assert short[-1].startswith("== the whole run took")


@pytest.mark.parametrize("hung", ["lab", "others"])
def test_a_hung_session_is_stopped_and_named_with_its_log(tmp_path: Path, hung: str) -> None:
    done = _run(
        tmp_path, "hang" if hung == "lab" else "pass", "hang" if hung == "others" else "pass"
    )
    assert done.returncode != 0
    assert f"{hung} stopped by SIGTERM" in done.stdout  # its own teardown, in the log
    assert f"the {hung} session did not finish within {LIMIT} s" in done.stdout


@pytest.mark.parametrize("deaf", ["lab", "others"])
def test_a_session_deaf_to_sigterm_is_killed_and_named(tmp_path: Path, deaf: str) -> None:
    done = _run(
        tmp_path, "deaf" if deaf == "lab" else "pass", "deaf" if deaf == "others" else "pass"
    )
    assert done.returncode != 0
    assert f"the {deaf} session was killed" in done.stdout


def test_ctrl_c_in_a_terminal_stops_both_sessions(tmp_path: Path) -> None:
    """`sudo bash .ci/run` in a terminal (README): timeout puts each session in a
    process group of its own, out of the terminal's Ctrl-C; the run passes it on."""
    script = _script(tmp_path, 30)  # far beyond the wait below: only Ctrl-C ends it
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(tmp_path)
        environment = {**os.environ, "LAB": "hang", "OTHERS": "hang"}
        os.execvpe("bash", ["bash", str(script)], environment)  # noqa: S606 - bash is the point
    output = b""
    status = None
    try:
        deadline = time.monotonic() + 20
        interrupted = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                # OSError: the terminal's other end closed, the run is over.
                with contextlib.suppress(OSError):
                    output += os.read(fd, 4096)
            started = all((tmp_path / f"{s}.started").exists() for s in ("lab", "others"))
            if not interrupted and started:
                os.write(fd, b"\x03")  # Ctrl-C
                interrupted = True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            status = None
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert status is not None, f"the run went on after Ctrl-C:\n{text}"
    assert os.waitstatus_to_exitcode(status) != 0
    assert "others stopped by SIGINT" in text
    assert "lab stopped by SIGINT" in text


def test_a_long_digest_keeps_its_end_where_a_sigterm_put_every_stack(tmp_path: Path) -> None:
    """The digest is bounded on screen. It was its first 8,000 bytes: after a
    few long failures, the stacks a SIGTERM appends last (where a hung
    session was stuck: the one trace that matters then) were cut off."""
    done = _run(tmp_path, "flood", "pass")
    assert done.returncode != 0
    tail = done.stdout[done.stdout.index("== what failed in the lab session") :]
    assert "FAILED lab's test 0 (call)" in tail  # its beginning
    assert "SIGTERM during its hung test; every thread:\n  in stuck_here\n" in tail  # and its end
    assert "bytes cut" in tail
    assert len(tail) < 10_000


def test_in_short_names_the_hung_test_and_how_many_failures_it_leaves_out(
    tmp_path: Path,
) -> None:
    """ "In short" was the digests' first 30 such lines: after many failures
    the line saying which test a SIGTERM stopped (the session hung) fell past
    them, and nothing said that failures were left out."""
    done = _run(tmp_path, "flood", "pass")
    assert done.returncode != 0
    short = done.stdout[done.stdout.index("== in short\n") :].splitlines()[1:-1]
    assert short[0] == "FAILED lab's test 0 (call)"
    assert "[... 170 more failures: see the digests above]" in short
    assert short[-1] == "SIGTERM during its hung test; every thread:"
    assert len(short) <= 32
