"""benchmarks/peers.py still runs: its smoke mode prints a row per tool, and portbroker's work.

The benchmark builds its own lab (one full gateway), so this test takes no
lab fixture; it asserts what the command produced, never how fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portbroker.testing.lab import lab_unavailable_reason

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "benchmarks" / "peers.py"
TOOLS = [
    ("portbroker map", "command"),
    ("portbroker map (daemon)", "command"),
    ("natpmpc", "command"),
    ("upnpc", "command"),
    ("portbroker", "library"),
    ("miniupnpc", "library"),
    ("NAT-PMP", "library"),
    ("py-natpmp", "library"),
    ("async-upnp-client", "library"),
]


def test_peers_benchmark_smoke_has_every_tool_and_portbroker_works(tmp_path: Path) -> None:
    reason = lab_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"lab tests must run in CI, but {reason}")
        pytest.skip(reason)
    figures = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"

    # The printed table: a row per tool, then the machine line.
    table = done.stdout.split("### Time to a working mapping: full gateway", 1)[1]
    table = table.split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ")]
    assert [(name.strip(), kind.strip()) for name, kind in rows[1:]] == TOOLS, table
    assert "Machine: " in done.stdout
    assert "miniupnpd 2.3.1" in done.stdout

    summary = {
        row["tool"]: row for row in json.loads(figures.read_text())["summaries"]["variant:full"]
    }
    assert [(name, summary[name]["kind"]) for name, _ in TOOLS] == TOOLS
    attempts = json.loads(figures.read_text())["attempts"]["variant:full"]
    for name in ("portbroker map", "portbroker map (daemon)", "portbroker"):
        row = summary[name]
        # Worked means a connection from the wan host reached the lan listener;
        # then portbroker deleted its mapping and nothing was left in nftables.
        assert (row["n"], row["worked"], row["wrong"], row["left_rules"]) == (1, 1, 0, 0), row
        assert row["median_s"] is not None
        (attempt,) = [a for a in attempts if a["tool"] == name]
        # The leftover check looks where the mapping was: its rule was seen.
        assert attempt["rules_while_mapped"] >= 1, attempt
        assert attempt["deleted"] is True, attempt
    # scripts/setup and the bench extra install every peer: none may be missing.
    missing = {name: row["errors"] for name, row in summary.items() if row["unavailable"]}
    assert not missing, missing
