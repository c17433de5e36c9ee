"""The lab tests' line reader: two lines written together are both seen."""

from __future__ import annotations

import subprocess
import sys

from tests.lab.helpers import lines_of

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
