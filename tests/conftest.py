"""Shared test plumbing: the lab fixtures and the CI rule that lab tests never skip."""

from __future__ import annotations

import contextlib
import faulthandler
import inspect
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
import types
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_timeout  # type: ignore[import-untyped]
import pytest_trio  # type: ignore[import-untyped]
import trio
from hypothesis import settings

from portbroker.testing.lab import Lab, Variant, lab_unavailable_reason, open_lab

IN_CI = os.environ.get("CI") == "true"
LAB_DIR = Path(__file__).parent / "lab"

_skipped_lab_tests: list[str] = []
_ran_lab_tests: list[str] = []
_figures: list[str] = []
_factory_labs: dict[str, list[Lab]] = {}


# $PORTBROKER_TEST_DIGEST names a file that gets, for each failed test, its
# name and the end of its report (for a hung test, pytest-timeout's: where it
# was stuck), and for a session stopped by SIGTERM every thread's stack.
# `.ci/run` prints it last, where a reader of CI's output (often only its
# tail) sees it: a hang in CI once cost a run whose only trace lay in the
# middle of a 2,000-line log.
DIGEST = os.environ.get("PORTBROKER_TEST_DIGEST")
DIGEST_LINES = 30  # of each failure's report: its innermost frames and the error
CRASH_CHARS = 400  # of the error's message, on one line
_running: list[str] = []  # the test being run, for the SIGTERM digest


def _digest(text: str, *, stacks: bool = False) -> None:
    """Append *text* to the digest (then every thread's stack, with *stacks*)."""
    if DIGEST:
        # backslashreplace: a report may hold lone surrogates (a file name or
        # a child's output decoded with surrogateescape), which strict UTF-8
        # refuses, and an error here is pytest's INTERNALERROR: the session ends.
        with open(DIGEST, "a", encoding="utf-8", errors="backslashreplace") as file:
            file.write(text)
            if stacks:
                file.flush()  # faulthandler writes to the descriptor itself
                faulthandler.dump_traceback(file, all_threads=True)


def _crash(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The error and where it was raised, two lines right under the name.

    CI's output is read through a window that shows its last few lines: a
    lab test's report there once ended in 30 lines of source and the
    gateway's log, and the assertion that failed fell out of view. `.ci/run`
    prints these lines once more, last ("in short")."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None:
        # No traceback (a collection error, a strict xfail that passed): its
        # last line says what went wrong; where is not known.
        lines = [line for line in report.longreprtext.splitlines() if line.strip()]
        return f"    error: {_one_line(lines[-1].removeprefix('E '))}\n" if lines else ""
    message = _one_line(str(crash.message))
    # An error inside a nursery: pytest places the group where trio raised it.
    place = getattr(report, "crash_place", None) or (str(crash.path), crash.lineno)
    path = Path(place[0])
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path(__file__).resolve().parent.parent)
    return f"    error: {message}\n    at: {path}:{place[1]}\n"


def _one_line(message: str) -> str:
    message = " ".join(message.split())
    if len(message) > CRASH_CHARS:
        message = message[:CRASH_CHARS] + " [...]"
    return message


def _first_leaf(error: BaseException) -> BaseException:
    """The first error of an ExceptionGroup (nested too); *error* itself if none."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _raised_at(error: BaseException) -> tuple[str, int] | None:
    """Where the first error of an ExceptionGroup (nested too) was raised."""
    error = _first_leaf(error)
    place = None
    frames = error.__traceback__
    while frames is not None:  # the innermost frame not hidden (as pytest's own)
        frame = frames.tb_frame
        if not _hidden(frame):
            place = frame.f_code.co_filename, frames.tb_lineno
        frames = frames.tb_next
    return place


def _hidden(frame: types.FrameType) -> bool:
    """Whether *frame* sets ``__tracebackhide__`` (its locals first, then its globals).

    As pytest reads it, an error reading it is no answer: a frame's locals
    need not be a dict (exec's, a class body's ``__prepare__``), and an error
    here, in the report hook, was pytest's INTERNALERROR: the session ended.
    """
    for names in (frame.f_locals, frame.f_globals):
        try:
            return bool(names["__tracebackhide__"])
        except Exception:  # noqa: BLE001, S112 - KeyError, or a mapping's own error
            continue
    return False


def _indented(lines: list[str]) -> str:
    return "".join(f"    {line}\n" for line in lines)


def _interrupt(_signum: int, _frame: object) -> None:
    running = _running[-1] if _running else "no test"
    _digest(f"SIGTERM during {running}; every thread:\n", stacks=True)
    raise KeyboardInterrupt("SIGTERM")


# A run stopped with SIGTERM (a CI timeout, `timeout`) still tears its labs
# down: namespaces, miniupnpd and the blackhole route are removed in finally.
signal.signal(signal.SIGTERM, _interrupt)

# A shell without job control starts its background jobs with SIGINT ignored
# (POSIX; `.ci/run` starts the lab session that way), and exec() passes an
# ignored signal on: every CLI and daemon a test starts would shrug off the
# SIGINT (Ctrl-C) the test sends it. Seen in CI: the netmon monitor ignored
# its stop and the test hung. A handler of our own is reset to the default in
# each child by exec(), so children get Ctrl-C as a user's would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.lab)
        # A million inputs take longer than pyproject's per-test timeout.
        if item.get_closest_marker("fuzz") is not None:
            item.add_marker(pytest.mark.timeout(FUZZ_TIMEOUT))
        # Before trio_mode's trio(run=trio.run): the first runner named counts.
        test = getattr(item, "obj", None)
        test = getattr(getattr(test, "hypothesis", None), "inner_test", test)
        if inspect.iscoroutinefunction(test):
            item.add_marker(pytest.mark.trio(run=_trio_run), append=False)


FUZZ_TIMEOUT = 4 * 3600  # s


# pytest-timeout's SIGALRM raises wherever the main thread is: in a trio test
# that is trio's run loop (its epoll wait), outside every task. The test
# failed, but its run stayed set up (the next trio test failed: "Attempted to
# call run() from inside a run()"), its async fixtures were never torn down,
# and the report showed trio's loop, not the await the test was stuck in. So a
# trio test's timeout cancels it inside trio, noting where each task waits; if
# it is not over TRIO_GRACE s later (the loop itself blocked, say), SIGALRM
# raises after all, as for any other test.
TRIO_GRACE = 30  # s
_trio_test: dict[str, Any] = {}  # the running trio test's token and scope; "where" once expired


def _trio_run(async_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """trio.run for the suite's async tests: its timeout cancels it (above)."""
    scope = trio.CancelScope()

    async def guarded() -> Any:
        _trio_test.update(token=trio.lowlevel.current_trio_token(), scope=scope)
        try:
            with scope:
                return await async_fn(*args)
        finally:
            _trio_test.pop("token", None)

    try:
        result = trio.run(guarded, **kwargs)
    except BaseException as exc:
        if isinstance(exc, BaseExceptionGroup):
            # SIGTERM's KeyboardInterrupt (_interrupt) raised in a task of a
            # nursery comes out in a group, which pytest takes for the test's
            # failure, and the session went on past the stop it was asked
            # for. Raised bare, it ends the session. (A new one: raising the
            # leaf from its own group would make a cycle of causes.)
            interrupts, _rest = exc.split(KeyboardInterrupt)
            if interrupts is not None:
                _trio_test.clear()
                raise KeyboardInterrupt(*_first_leaf(interrupts).args) from exc
        where = _trio_test.pop("where", None)
        raised = _trio_test.pop("raised", False)
        _trio_test.clear()
        if where is None or raised:  # SIGALRM raised after all: its stack is where
            raise
        pytest.fail(where, pytrace=False)
    where = _trio_test.pop("where", None)
    _trio_test.clear()
    if where is not None:
        pytest.fail(where, pytrace=False)
    return result


def _cancel_trio_test(limit: float) -> None:
    """In the expired test's trio run: note where its tasks wait, then cancel it."""
    where = ""
    try:
        for task in _all_tasks():
            # The frames of the test's code (and the library's): trio's and
            # pytest-trio's own would fill the digest's lines.
            frames = traceback.StackSummary.extract(
                (frame, line)
                for frame, line in task.iter_await_frames()
                if not frame.f_code.co_filename.startswith(_TRIO_DIRS)
                and frame.f_code.co_filename != __file__
            )
            if frames:
                where += f"trio task {task.name}, at its await:\n" + "".join(frames.format())
    except Exception as exc:  # noqa: BLE001 - an exception here would crash trio's run
        where += f"(its tasks' stacks: {exc!r})\n"
    _trio_test["where"] = where + pytest_timeout.PYTEST_FAILURE_MESSAGE % limit
    # As pytest-trio does when a fixture crashes: cancel what is being set up
    # or run (its test context's active scopes: the test, or a fixture stuck
    # in its setup), so the fixtures set up are torn down as usual, not
    # cancelled too. The context is a local of its test task's frame
    # ("<test 'name'>"). Failing that (a fixture's teardown stuck), all of it.
    scopes: list[trio.CancelScope] = []
    for task in _all_tasks():
        frame = getattr(task.coro, "cr_frame", None)
        context: Any = None if frame is None else frame.f_locals.get("test_ctx")
        if task.name.startswith("<test ") and hasattr(context, "active_cancel_scopes"):
            context.crashed = True
            scopes += list(context.active_cancel_scopes)
    for scope in scopes or [_trio_test["scope"]]:
        scope.cancel()


_TRIO_DIRS = tuple(
    str(Path(module.__file__).parent) + os.sep
    for module in (trio, pytest_trio)
    if module.__file__ is not None
)


def _all_tasks() -> list[trio.lowlevel.Task]:
    """Every task of the current trio run, parents first."""
    root = trio.lowlevel.current_root_task()
    tasks = [] if root is None else [root]
    for task in tasks:  # grows as it goes
        tasks += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return tasks


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """A trio test's SIGALRM (pytest-timeout's "signal" method): see TRIO_GRACE."""
    if (
        settings.method != "signal"
        or item.get_closest_marker("trio") is None
        or threading.current_thread() is not threading.main_thread()
    ):
        return None  # pytest-timeout's own

    def fail(_signum: int, _frame: object) -> None:
        __tracebackhide__ = True
        pytest_timeout.timeout_sigalrm(item, settings)

    def fail_in_trio(signum: int, frame: object) -> None:
        __tracebackhide__ = True
        _trio_test["raised"] = True
        fail(signum, frame)

    def expired(signum: int, frame: object) -> None:
        __tracebackhide__ = True
        token = _trio_test.get("token")
        if token is None:  # in its setup or teardown, not its trio run
            fail(signum, frame)
            return
        signal.signal(signal.SIGALRM, fail_in_trio)
        signal.setitimer(signal.ITIMER_REAL, TRIO_GRACE)
        try:
            token.run_sync_soon(_cancel_trio_test, settings.timeout)
        except trio.RunFinishedError:
            fail(signum, frame)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined] # pytest-timeout's cancel hook calls it
    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _running.append(item.nodeid)
    try:
        return (yield)
    finally:
        _running.pop()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed:
        return
    lines = report.longreprtext.splitlines()[-DIGEST_LINES:]
    text = f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
    text += _crash(report)
    text += _indented(lines)
    for title, content in report.sections:
        if title.startswith("miniupnpd log"):
            text += f"  {title}, its end:\n"
            text += _indented(content.splitlines()[-10:])
    _digest(text)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module that fails to import: no test runs, and no test report says why.
    if report.failed:
        lines = str(report.longrepr).splitlines()[-DIGEST_LINES:]
        _digest(f"ERROR collecting {report.nodeid}\n" + _crash(report) + _indented(lines))


def _require_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"lab tests must run in CI, but {reason}")
    pytest.skip(reason)


def _lab(variant: Variant, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_lab()
    with open_lab(variant, workdir=tmp_path_factory.mktemp(f"lab-{variant.value}")) as lab:
        yield lab


@pytest.fixture(scope="session")
def lab_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A gateway with PCP, NAT-PMP and UPnP, shared by the session: use distinct ports."""
    yield from _lab(Variant.FULL, tmp_path_factory)


@pytest.fixture(scope="session")
def lab_upnp_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(Variant.UPNP_ONLY, tmp_path_factory)


@pytest.fixture(scope="session")
def lab_pcp_natpmp_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(Variant.PCP_NATPMP_ONLY, tmp_path_factory)


@pytest.fixture(scope="session")
def lab_no_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(Variant.NONE, tmp_path_factory)


@pytest.fixture
def fresh_lab(tmp_path: Path) -> Iterator[Lab]:
    """A full gateway of this test's own, for tests that restart or break it."""
    _require_lab()
    with open_lab(Variant.FULL, workdir=tmp_path) as lab:
        yield lab


@pytest.fixture
def lab_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Build labs of this test's own (``lab_factory(Variant.FULL, extra_config=[...])``).

    Each is torn down when the test ends, whatever happened.
    """
    _require_lab()
    with contextlib.ExitStack() as stack:
        count = 0

        def build(variant: Variant = Variant.FULL, *, extra_config: Sequence[str] = ()) -> Lab:
            nonlocal count
            count += 1
            workdir = tmp_path / f"lab{count}"
            workdir.mkdir()
            lab = stack.enter_context(open_lab(variant, workdir=workdir, extra_config=extra_config))
            _factory_labs.setdefault(request.node.nodeid, []).append(lab)
            return lab

        try:
            yield build
        finally:
            _factory_labs.pop(request.node.nodeid, None)


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Report a test's figure: printed (``-rA`` shows it) and listed in the run's summary.

    The summary section ("figures") appears in every run's output, ``.ci/run``
    included, whether the test passed or failed.
    """

    def report(text: str) -> None:
        print(text)
        _figures.append(f"{text}  [{request.node.nodeid}]")

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _figures:
        terminalreporter.section("figures")
        for text in _figures:
            terminalreporter.write_line(text)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    error = call.excinfo.value if call.excinfo is not None else None
    if report.failed and isinstance(error, BaseExceptionGroup):
        report.crash_place = _raised_at(error)  # type: ignore[attr-defined]
    if item.get_closest_marker("lab") is not None:
        # An xfail is reported as skipped, but it ran: only real skips count.
        if report.skipped and not hasattr(report, "wasxfail"):
            _skipped_lab_tests.append(item.nodeid)
        elif report.when == "call":
            _ran_lab_tests.append(item.nodeid)
    if report.failed:
        # When a lab test fails, miniupnpd's log is the first thing to read.
        labs = [*getattr(item, "funcargs", {}).values(), *_factory_labs.get(item.nodeid, [])]
        # A Sites or Series fixture holds several labs (its .labs).
        labs = [lab for value in labs for lab in getattr(value, "labs", (value,))]
        for value in labs:
            if isinstance(value, Lab):
                report.sections.append(
                    (f"miniupnpd log ({value.variant.value}, {value.gw_ns})", value.log_text())
                )
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_lab_tests:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"CI=true but {len(_skipped_lab_tests)} lab test(s) skipped: " + ", ".join(
            _skipped_lab_tests[:5]
        )
        if reporter is not None:
            reporter.write_line(message, red=True)
        _digest(message + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Hypothesis's per-example deadline is a wall-clock assertion: on a loaded
# machine (or CI's two cores) it fails tests that behave correctly. Tests
# assert on behaviour only.
settings.register_profile("portbroker", deadline=None)
settings.load_profile("portbroker")


# s for a helper process to be ready: generous (CI's loaded machine once took
# over 3 s to start a bare Python), but not for ever.
STARTUP_LIMIT = 60


def first_line(process: subprocess.Popen[Any], what: str, limit: float = STARTUP_LIMIT) -> Any:
    """The first line a helper *process* prints (its "ready" line), within *limit* s.

    A bare ``readline()`` on a helper that never prints (stuck, or still
    starting on a loaded machine) waits for ever: AssertionError naming
    *what* instead. For the first line only (select() does not see what the
    pipe's buffer already holds); ``""`` (or ``b""``) if it ended first.
    """
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], limit)
    assert ready, f"{what} printed nothing within {limit:g} s"
    return process.stdout.readline()


@pytest.fixture
def gateway_port() -> Iterator[int]:
    """A FakeGateway process on 127.0.0.1 (UDP); its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "portbroker.testing.fake_gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = first_line(process, "the FakeGateway")
        assert line.startswith("port "), line
        yield int(line.split()[1])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
