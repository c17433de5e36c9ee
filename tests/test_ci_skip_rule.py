"""Under CI=true a lab test that skips fails the run (tests/conftest.py), and
the digest `.ci/run` prints last says so: "the lab tests must run there, not
skip". Elsewhere (a laptop without root) the same skip is a skip."""

from __future__ import annotations

from pathlib import Path

from tests.test_hung_tests import session_of

SKIPPING_LAB_TEST = """
import pytest


@pytest.mark.lab
def test_needs_the_lab():
    pytest.skip("no miniupnpd here")


@pytest.mark.lab
@pytest.mark.xfail(reason="ran, and failed as documented")
def test_an_expected_failure_ran():
    raise AssertionError


def test_not_a_lab_test():
    pytest.skip("not the lab's business")
"""


def test_a_skipped_lab_test_fails_the_session_under_ci(tmp_path: Path) -> None:
    session = session_of(tmp_path, SKIPPING_LAB_TEST, env={"CI": "true"})
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 1, output
    message = "CI=true but 1 lab test(s) skipped: test_hanging.py::test_needs_the_lab"
    assert message in output
    assert (tmp_path / "digest").read_text() == message + "\n"


def test_outside_ci_a_skipped_lab_test_is_a_skip(tmp_path: Path) -> None:
    session = session_of(tmp_path, SKIPPING_LAB_TEST, env={"CI": "false"})
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 0, output
    assert "2 skipped, 1 xfailed" in output
    assert not (tmp_path / "digest").exists()
