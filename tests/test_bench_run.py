"""benchmarks/run.py, the one benchmark command: its report and its failures.

Each section is its own script; here fake sections stand in for them, so this
checks the orchestration (every section runs, a failed one is reported as
failed and the others still run, targets come out of the figures), not the
figures. Each real section has its own smoke test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    return load_script(ROOT / "benchmarks" / "run.py", "bench_run")


CLI_FIGURES = {
    "runs": 5,
    "results": {
        "portbroker map 8080/tcp": {"median_ms": 88.0, "p90_ms": 97.0},
        "portbroker list": {"median_ms": 91.0, "p90_ms": 130.0},
        "python -c pass": {"median_ms": 20.0, "p90_ms": 22.0},
    },
}


def test_every_section_runs_a_failed_one_is_shown_and_targets_come_from_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _load()
    good = tmp_path / "cli_daemon.py"
    good.write_text(f"import json; print(json.dumps({CLI_FIGURES!r}))\n")
    bad = tmp_path / "broken.py"
    bad.write_text("import sys; print('the gateway never came up', file=sys.stderr); sys.exit(3)\n")
    filed = tmp_path / "scale.py"
    filed.write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'targets': [{'name': 'CPU per 1,000 renewals', 'figure': '31 ms',"
        " 'verdict': '< 50 ms: met'}]}, open(path, 'w'))\n"
        "print('| N | CPU |\\n|---|---|\\n| 1000 | 31 ms |')\n"
    )
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(
        run,
        "SECTIONS",
        [
            run.Section("broken", "broken.py", [], [], json_to="stdout", render=str),
            run.Section("scale", "scale.py", [], ["--quick"], json_to="file"),
            run.Section(
                "cli",
                "cli_daemon.py",
                ["--runs", "30"],
                ["--runs", "5"],
                json_to="stdout",
                render=run._cli_table,
            ),
        ],
    )
    out = tmp_path / "report.md"
    monkeypatch.setattr(
        sys,
        "argv",
        ["run.py", "--quick", "--out", str(out), "--json", str(tmp_path / "figures.json")],
    )
    assert run.main() == 1  # one section failed
    report = capsys.readouterr().out
    assert out.read_text() == report
    assert "**FAILED**: `broken.py` exit status 3" in report
    assert "the gateway never came up" in report
    # The sections after the failed one ran.
    assert "| 1000 | 31 ms |" in report
    assert "| `portbroker map 8080/tcp` | 88.0 ms | 97.0 ms | < 100 ms: met |" in report
    targets = report.split("## Targets", 1)[1]
    assert "| CPU per 1,000 renewals | 31 ms | < 50 ms: met |" in targets
    assert "< 100 ms: met by the median, p90 over" in targets  # list's p90 is 130
    assert "Machine: " in report
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures["sections"]) == {"scale", "cli_daemon"}


def test_lab_sections_need_root_and_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _load()
    monkeypatch.setattr(run.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick"])
    assert run.main() == 2
    assert "run as root" in capsys.readouterr().err


def test_scale_rows_become_the_three_targets_at_each_size() -> None:
    run = _load()
    row = {
        "mappings": 10000,
        "cpu_ms_per_1000": 728.6,
        "rss_per_mapping_kib": 1.7,
        "lateness_p99_ms": 9.5,
    }
    text = run.targets({"scale": {"results": [row]}})
    assert "| CPU per 1,000 renewals, 10,000 mappings | 728.6 ms | < 50 ms: MISSED" in text
    assert "| RSS per mapping, 10,000 mappings | 1.7 KiB | < 4 KiB: met |" in text
    assert "| renewal lateness p99, 10,000 mappings | 9.5 ms | < 50 ms: met |" in text
