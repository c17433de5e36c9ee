"""Shared test plumbing: the lab fixtures and the CI rule that lab tests never skip."""

from __future__ import annotations

import os
import signal
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from portbroker.testing.lab import Lab, Variant, lab_unavailable_reason, open_lab

IN_CI = os.environ.get("CI") == "true"
LAB_DIR = Path(__file__).parent / "lab"

_skipped_lab_tests: list[str] = []
_ran_lab_tests: list[str] = []


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


# A run stopped with SIGTERM (a CI timeout, `timeout`) still tears its labs
# down: namespaces, miniupnpd and the blackhole route are removed in finally.
signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.lab)


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if item.get_closest_marker("lab") is not None:
        if report.skipped:
            _skipped_lab_tests.append(item.nodeid)
        elif report.when == "call":
            _ran_lab_tests.append(item.nodeid)
    if report.failed:
        # When a lab test fails, miniupnpd's log is the first thing to read.
        for value in getattr(item, "funcargs", {}).values():
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
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Hypothesis's per-example deadline is a wall-clock assertion: on a loaded
# machine (or CI's two cores) it fails tests that behave correctly. Tests
# assert on behaviour only.
settings.register_profile("portbroker", deadline=None)
settings.load_profile("portbroker")
