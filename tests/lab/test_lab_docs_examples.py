"""The docs' examples marked ``<!-- run: lab -->`` run here, as root, with a lab.

Such a block opens its own lab (docs/lab.md's ``open_lab`` example); it runs
as written, with the real clock, since nothing in it talks to this machine's
gateway (tests/docs_harness.py).
"""

from __future__ import annotations

import subprocess

import pytest

from portbroker.testing.lab import lab_unavailable_reason
from tests.docs_harness import Block, blocks, run_python

LAB_BLOCKS = [b for b in blocks() if b.kind == "lab"]


def test_some_blocks_run_in_the_lab() -> None:
    assert LAB_BLOCKS, "no docs block is marked <!-- run: lab -->"


@pytest.mark.parametrize("block", LAB_BLOCKS, ids=[b.where for b in LAB_BLOCKS])
def test_the_lab_example_runs(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    namespace = run_python(block, real_clock=True)
    out = capsys.readouterr().out
    if "open_lab" in block.source:
        # docs/lab.md: a socket in the lan namespace, a restart, miniupnpd's
        # log printed; and the lab is gone when the block is done.
        assert out.strip(), "the block printed no log"
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        assert namespace["lab"].lan_ns not in netns.stdout
