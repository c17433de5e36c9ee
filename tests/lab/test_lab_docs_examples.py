"""The docs' examples marked ``<!-- run: lab -->`` run here, as root, with a lab.

A Python block opens its own lab (docs/lab.md's and docs/testing.md's
``open_lab`` examples) and runs as written, on the real clock. A shell
block's ``portbroker`` commands run in the lan namespace of a lab built for
them (``run: lab ipv6``: with IPv6), with the addresses they name, which are
the lab's (tests/docs_harness.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portbroker.testing.lab import Variant, lab_unavailable_reason, open_lab
from tests.docs_harness import ROOT, Block, blocks, run_python, shell_commands

LAB_BLOCKS = [b for b in blocks() if b.kind == "lab"]
PYTHON_BLOCKS = [b for b in LAB_BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in LAB_BLOCKS if b.lang != "python"]


def _require_lab() -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def test_some_blocks_run_in_the_lab() -> None:
    assert PYTHON_BLOCKS, "no Python block in the docs is marked <!-- run: lab -->"
    assert SHELL_BLOCKS, "no shell block in the docs is marked <!-- run: lab ... -->"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_the_lab_example_runs(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    _require_lab()
    namespace = run_python(block, real_clock=True)
    out = capsys.readouterr().out
    # Each prints what it proved (miniupnpd's log, the connection from outside),
    # and the lab is gone when the block is done.
    assert out.strip(), "the block printed nothing"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert namespace["lab"].lan_ns not in netns.stdout


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_the_lab_commands_run(block: Block, tmp_path: Path) -> None:
    _require_lab()
    options = block.reason.split()[1:]
    commands = shell_commands(block)
    assert commands
    with open_lab(Variant.FULL, ipv6="ipv6" in options, workdir=tmp_path) as lab:
        for command in commands:
            argv = [sys.executable, "-m", "portbroker.cli", *command.argv]
            argv += ["--state-file", str(tmp_path / "state.json")]
            done = subprocess.run(
                lab.exec_argv(lab.lan_ns, argv),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                check=False,
            )
            assert done.returncode == 0, (
                f"{block.where}: {command.line!r} exited {done.returncode}\n"
                f"{done.stdout}{done.stderr}\n{lab.log_text()}"
            )
            assert "Traceback" not in done.stderr, done.stderr
