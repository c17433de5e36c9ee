"""A hung test costs one failed test with its stack, not its session, and the
digest `.ci/run` prints last names it (tests/conftest.py, pyproject's timeout).

Seen in CI: a test of the non-lab session hung for 23 minutes until the
session's own limit ended it; its 1,500 other tests never ran and the only
trace of where it was stuck lay in the middle of a long log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import first_line
from tests.test_daemon_processes import wait_accepting

ROOT = Path(__file__).resolve().parents[1]

HANGING = """
import subprocess
import trio


def test_a_readline_that_never_returns():
    child = subprocess.Popen(["sleep", "1000"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


async def test_a_trio_test_that_never_ends():
    await trio.sleep_forever()


def test_the_session_goes_on():
    pass
"""


def _session(tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    return session_of(tmp_path, HANGING, *options)


def session_of(
    tmp_path: Path, source: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A pytest session with this suite's conftest and pyproject over one test
    file of *source* (test_hanging.py in *tmp_path*); its digest is
    ``tmp_path / "digest"``."""
    (tmp_path / "test_hanging.py").write_text(source)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "tests.conftest",
            *options,
            str(tmp_path / "test_hanging.py"),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            **(env or {}),
            "PORTBROKER_TEST_DIGEST": str(tmp_path / "digest"),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # pytest writes a lone surrogate out as the byte it stood for
    )


def test_a_hung_test_fails_where_it_is_stuck_and_the_session_goes_on(tmp_path: Path) -> None:
    session = _session(tmp_path, "-o", "timeout=3")
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    assert "2 failed, 1 passed" in output, output
    digest = (tmp_path / "digest").read_text()
    readline, trio_test = digest.split("FAILED ")[1:]
    assert readline.startswith("test_hanging.py::test_a_readline_that_never_returns (call, ")
    assert "child.stdout.readline()" in readline  # where it was stuck
    assert "Timeout (>3.0s) from pytest-timeout" in readline
    # A trio test is stuck in its run loop (the task's own frame is not on
    # the thread's stack); it fails all the same.
    assert trio_test.startswith("test_hanging.py::test_a_trio_test_that_never_ends (call, ")
    assert "Timeout (>3.0s) from pytest-timeout" in trio_test


def test_a_session_ended_by_sigterm_leaves_every_stack_in_the_digest(tmp_path: Path) -> None:
    session = _session(tmp_path, "-o", "timeout=0", "-k", "readline")
    digest = tmp_path / "digest"
    # Once the test is in its readline: the child it waits on is running.
    output = _sigterm_once_started(
        session,
        lambda: any(
            Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
            for pid in _children(session.pid)
        ),
        "the hanging test",
    )
    assert "KeyboardInterrupt: SIGTERM" in output, output
    text = digest.read_text()
    assert text.startswith(
        "SIGTERM during test_hanging.py::test_a_readline_that_never_returns; every thread:\n"
    )
    assert "in test_a_readline_that_never_returns" in text  # faulthandler's frame line


def _sigterm_once_started(
    session: subprocess.Popen[str], started: Callable[[], bool], what: str
) -> str:
    """SIGTERM *session* once *started* holds (60 s at most); its output.
    Killed if it is still running after all (60 s more)."""
    try:
        deadline = time.monotonic() + 60
        while not started():
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.1)
        session.send_signal(signal.SIGTERM)
        output, _ = session.communicate(timeout=60)
        return output
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()]


# -- the start-up helpers: each wait has an end ----------------------------------------


def test_a_helper_that_never_prints_fails_first_line_naming_it() -> None:
    """A FakeGateway (or holder, or IGD) that never says it is ready: a bare
    readline() on its stdout waited for ever."""
    child = subprocess.Popen(["sleep", "1000"], stdout=subprocess.PIPE)
    try:
        with pytest.raises(AssertionError, match=r"the sleeper printed nothing within 0\.5 s"):
            first_line(child, "the sleeper", limit=0.5)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_a_daemon_still_starting_at_the_limit_is_stopped_and_its_stderr_told(
    tmp_path: Path,
) -> None:
    """CI's hung session: a daemon not yet listening when start_daemon's limit
    ran out had its stderr read while it went on starting, then serving, for
    ever (a daemon on a loaded machine, but for its speed a healthy one)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", STILL_STARTING],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert first_line(daemon, "the stand-in") == b"importing\n"
        with pytest.raises(AssertionError, match="daemon did not start: still importing"):
            wait_accepting(daemon, tmp_path / "pb.sock", limit=0.5)
        assert daemon.poll() is not None  # stopped, not left running
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()


STILL_STARTING = """
import sys, time
print("still importing", file=sys.stderr, flush=True)
print("importing", flush=True)
time.sleep(1000)
"""


def test_a_daemon_whose_stderr_a_child_holds_still_fails_start_up(tmp_path: Path) -> None:
    """start_daemon's *wrapper* (prlimit, say) with a child of its own: the
    stderr pipe stays open after the daemon is killed, so reading it to its
    end waited for that child."""
    wrapper = subprocess.Popen(
        ["sh", "-c", "echo starting >&2; sleep 1000 & echo $!; wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child = int(first_line(wrapper, "the wrapper"))
    try:
        with pytest.raises(AssertionError, match=r"(?s)daemon did not start: starting.*held open"):
            wait_accepting(wrapper, tmp_path / "pb.sock", limit=0.5)
    finally:
        os.kill(child, signal.SIGKILL)
        if wrapper.poll() is None:
            wrapper.kill()
        wrapper.wait()
        for pipe in (wrapper.stdout, wrapper.stderr):
            if pipe is not None:
                pipe.close()


NOT_UTF_8 = """
import os


def test_a_name_that_is_not_utf_8():
    name = os.fsdecode(b"caf\\xe9")  # a lone surrogate, as surrogateescape decodes
    assert name == "cafe"


def test_the_session_goes_on():
    pass
"""


def test_a_failure_whose_report_is_not_utf_8_is_digested_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    """A failure's report holding a lone surrogate (a file name, or a child's
    output decoded with surrogateescape): the digest's strict UTF-8 write
    raised in pytest_runtest_logreport, pytest's INTERNALERROR, and the
    session ended there, the rest of its tests never run."""
    session = session_of(tmp_path, NOT_UTF_8)
    output, _ = session.communicate(timeout=120)
    assert "INTERNALERROR" not in output, output
    assert "1 failed, 1 passed" in output, output
    digest = (tmp_path / "digest").read_text(encoding="utf-8")
    assert digest.startswith("FAILED test_hanging.py::test_a_name_that_is_not_utf_8 (call, ")
    assert "caf\\udce9" in digest


TRIO_HANGING = """
import os
from pathlib import Path

import pytest
import trio


@pytest.fixture
async def torn_down():
    yield
    await trio.sleep(0)
    Path(os.environ["TORN_DOWN"]).write_text("yes")


async def test_a_trio_test_that_never_ends(torn_down):
    await trio.sleep_forever()


@pytest.fixture
async def never_set_up():
    await trio.sleep_forever()
    yield


async def test_a_trio_fixture_that_never_ends_its_setup(never_set_up):
    pass


async def test_the_next_trio_test_runs():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
"""


def test_a_hung_trio_test_is_cancelled_in_trio_and_leaves_no_run_behind(tmp_path: Path) -> None:
    """pytest-timeout's SIGALRM raised where the main thread was: for a trio
    test, in trio's run loop (its epoll wait), outside every task. The test
    failed, but its trio run stayed set up (the next trio test failed:
    "Attempted to call run() from inside a run()"), its async fixtures were
    never torn down and nothing said where it waited. Now it is cancelled
    inside trio and its tasks' awaits are the report."""
    session = session_of(
        tmp_path, TRIO_HANGING, "-o", "timeout=3", env={"TORN_DOWN": str(tmp_path / "torn")}
    )
    output, _ = session.communicate(timeout=120)
    assert "2 failed, 1 passed" in output, output
    assert (tmp_path / "torn").read_text() == "yes"  # its async fixture's teardown ran
    hung, stuck_fixture = (tmp_path / "digest").read_text().split("FAILED ")[1:]
    assert hung.startswith("test_hanging.py::test_a_trio_test_that_never_ends (call, ")
    assert "Timeout (>3.0s) from pytest-timeout" in hung
    assert "in test_a_trio_test_that_never_ends\n        await trio.sleep_forever()" in hung
    # A fixture stuck in its setup is cancelled too (as pytest-trio cancels
    # one when another crashes), not left running until SIGALRM raises.
    assert stuck_fixture.startswith(
        "test_hanging.py::test_a_trio_fixture_that_never_ends_its_setup (call, "
    )
    assert "in never_set_up\n        await trio.sleep_forever()" in stuck_fixture
    assert "Timeout (>3.0s) from pytest-timeout" in stuck_fixture


def test_a_module_that_fails_to_import_is_in_the_digest(tmp_path: Path) -> None:
    """A collection error is no test's report: the session ran nothing, and
    the digest .ci/run prints last was empty, so its tail showed only "rc=2"."""
    session = session_of(tmp_path, "import no_such_module_here\n")
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 2, output
    digest = (tmp_path / "digest").read_text()
    assert digest.startswith("ERROR collecting test_hanging.py\n"), digest
    assert "No module named 'no_such_module_here'" in digest


LONG_FAILURE = (
    '''
def test_a_long_test_whose_last_line_fails():
    """Its report is its whole source (pytest shows the failing function),
    which pushes the error far from the report's end."""
'''
    + "".join(f"    x{n} = {n}\n" for n in range(60))
    + """
    assert x59 == 0, "the agent said nothing within 30 s; so far: [1, 2]"
"""
)


def test_a_failures_error_and_place_come_right_under_its_name_in_the_digest(
    tmp_path: Path,
) -> None:
    """CI's output is read through its last lines: a lab test's digest there
    showed 30 lines of its source and the gateway's log, and the assertion
    itself fell out of view. The error (on one line) and where it was raised
    now come first."""
    session = session_of(tmp_path, LONG_FAILURE)
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    name, error, place = (tmp_path / "digest").read_text().splitlines()[:3]
    assert name.startswith("FAILED test_hanging.py::test_a_long_test_whose_last_line_fails (call, ")
    assert error == (
        "    error: AssertionError: the agent said nothing within 30 s; so far: [1, 2]"
        " assert 59 == 0"
    )
    assert place == f"    at: {tmp_path / 'test_hanging.py'}:66"


NURSERY_FAILURE = """
import trio


async def test_a_task_of_a_nursery_fails():
    async def agent():
        await trio.sleep(0)
        assert 1 + 1 == 3, "the agent broke"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent)
"""


def test_the_place_of_an_error_raised_in_a_nursery_is_where_it_was_raised(
    tmp_path: Path,
) -> None:
    """Most failures of this suite's trio tests reach pytest inside a
    nursery's ExceptionGroup, which pytest's crash line places where trio
    raised the group (trio/_core/_run.py): the digest's `at:` named no line
    of the test. It names where the (first) error was raised."""
    session = session_of(tmp_path, NURSERY_FAILURE)
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    name, error, place = (tmp_path / "digest").read_text().splitlines()[:3]
    assert name.startswith("FAILED test_hanging.py::test_a_task_of_a_nursery_fails (call, ")
    assert error.startswith("    error: ")
    assert "the agent broke" in error
    assert place == f"    at: {tmp_path / 'test_hanging.py'}:8"


def test_a_module_that_fails_to_import_has_its_error_right_under_its_name(
    tmp_path: Path,
) -> None:
    """A collection error's report has no crash line of pytest's: the digest
    (and .ci/run's "in short", which keeps only the lines right under a
    name) showed its name alone. Its last line is the error."""
    session = session_of(tmp_path, "import no_such_module_here\n")
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 2, output
    name, error = (tmp_path / "digest").read_text().splitlines()[:2]
    assert name == "ERROR collecting test_hanging.py"
    assert error == "    error: ModuleNotFoundError: No module named 'no_such_module_here'"


STRICT_XPASS = """
import pytest


@pytest.mark.xfail(strict=True, reason="the gateway is known to refuse it")
def test_a_strict_xfail_that_passes():
    pass
"""


def test_a_failure_with_no_traceback_has_its_error_right_under_its_name(
    tmp_path: Path,
) -> None:
    """A strict xfail that passed fails with a bare line, no traceback: as
    with a collection error, nothing came under its name."""
    session = session_of(tmp_path, STRICT_XPASS)
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    name, error = (tmp_path / "digest").read_text().splitlines()[:2]
    assert name.startswith("FAILED test_hanging.py::test_a_strict_xfail_that_passes (call, ")
    assert error == "    error: [XPASS(strict)] the gateway is known to refuse it"


PICKY_LOCALS_FAILURE = '''
from collections.abc import Mapping

import trio


class Picky(Mapping):
    """A frame's locals (exec's) that raise when asked for a name they lack."""

    def __getitem__(self, name):
        if name == "__tracebackhide__":
            raise RuntimeError("no such local, and I say so loudly")
        raise KeyError(name)

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


async def test_a_task_fails_in_a_frame_with_picky_locals():
    async def agent():
        await trio.sleep(0)
        exec("assert 1 + 1 == 3, 'the agent broke'", {}, Picky())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent)


def test_the_session_goes_on():
    pass
'''


def test_a_failure_raised_in_a_frame_whose_locals_raise_is_digested_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    """The digest's place reads each frame's ``__tracebackhide__`` from its
    locals, which need not be a dict (exec's, a class body's __prepare__): one
    whose lookup raised made the report hook fail, pytest's INTERNALERROR, and
    the session ended there. pytest's own check of the name suppresses it."""
    session = session_of(tmp_path, PICKY_LOCALS_FAILURE)
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    assert "INTERNALERROR" not in output
    assert "1 failed, 1 passed" in output, output
    name, error, place = (tmp_path / "digest").read_text().splitlines()[:3]
    assert name.startswith("FAILED test_hanging.py::test_a_task_fails_in_a_frame_with_picky_locals")
    assert "the agent broke" in error
    assert place == "    at: <string>:1"  # the innermost frame: exec's code, the picky one


SIGTERM_IN_A_TASK = """
import os

import trio


async def test_a_task_busy_when_sigterm_comes():
    async def agent():
        await trio.sleep(0)
        open(os.environ["STARTED"], "w").close()
        while True:  # no checkpoint: SIGTERM's KeyboardInterrupt is raised here
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent)


def test_the_session_goes_on():
    pass
"""


def test_a_sigterm_that_lands_in_a_nursery_task_ends_the_session(tmp_path: Path) -> None:
    """SIGTERM raises KeyboardInterrupt wherever the main thread is; in a task
    of a nursery, trio hands it on inside an ExceptionGroup, which pytest took
    for the test's failure: the session went on past the stop it was asked
    for (a CI timeout: its labs left for the SIGKILL that follows)."""
    started = tmp_path / "started"
    session = session_of(
        tmp_path, SIGTERM_IN_A_TASK, "-o", "timeout=0", env={"STARTED": str(started)}
    )
    output = _sigterm_once_started(session, started.exists, "the busy test")
    assert session.returncode == 2, output  # pytest's "interrupted"
    assert "KeyboardInterrupt: SIGTERM !!!" in output, output  # its banner for a stopped session
    assert "no tests ran" in output, output  # the next test did not run
