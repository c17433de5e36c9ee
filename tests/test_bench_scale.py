"""benchmarks/scale.py in a tiny mode, so the benchmark cannot rot.

200 mappings on real UDP sockets (127.0.0.1) against the script's own PCP
server process, one renewal cycle: every mapping must renew and the tables
must print. Figures (CPU, memory, lateness) are never asserted on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_scale_benchmark_renews_every_mapping_and_prints_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            "--sizes",
            "200",
            "--lifetimes",
            "8-8",
            "--window",
            "7",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "### Scale: one broker" in run.stdout
    assert "| 200 | 8-8 |" in run.stdout
    assert "CPU ms / 1,000 renewals" in run.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["mappings"] == 200
    assert result["under_renewed"] == 0  # each renewed at least once in the window
    assert result["renewals"] >= 200
    assert result["unmatched_sends"] == 0  # every send was a scheduled renewal (or its resend)
    assert result["answered_by_gateway"] >= result["renewals"]
    assert set(result["states"]) <= {"active", "renewing"}
    assert sum(result["states"].values()) == 200
