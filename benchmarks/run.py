"""Every benchmark in one run: the tables of docs/performance.md.

Run as root (the lab builds network namespaces), from the project root:

    sudo .venv/bin/python benchmarks/run.py [--quick] [--out report.md] [--json figures.json]

It runs each section's script as its own process, one after the other (so no
section measures another's load), and prints one markdown report:

1. **against other clients** (benchmarks/peers.py, in the lab): time to a
   working mapping per gateway variant, portbroker beside natpmpc, upnpc, the
   miniupnpc module, NAT-PMP, py-natpmp and async-upnp-client, interleaved;
   then the same tools under 30 % and 60 % loss and after a gateway restart;
2. **the floor** (benchmarks/open_mapping_latency.py, in the lab): ``map()``
   beside one raw PCP MAP / SSDP search round trip;
3. **scale on real sockets** (benchmarks/scale.py): 1,000 to 50,000 mappings
   held by one broker against a fake gateway in another process;
4. **the daemon** (benchmarks/daemon_throughput.py, benchmarks/cli_daemon.py):
   map + unmap round trips per second, and the whole-process time of
   ``portbroker map``/``list``/``unmap`` through a running daemon;

and ends with the targets, each met or missed with its figure. ``--quick``
runs every section small (a few minutes in all) to check that the command
works; figures worth quoting come from a full run on an idle machine (about
25 minutes here). A section that fails is reported as failed, with its error,
and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def machine() -> str:
    """One line naming the machine the figures came from."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    miniupnpd = "miniupnpd not installed"
    if shutil.which("miniupnpd") or Path("/usr/sbin/miniupnpd").exists():
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "miniupnpd-nftables"],
            capture_output=True,
            text=True,
            check=False,
        )
        miniupnpd = f"miniupnpd {done.stdout.strip() or '(version unknown)'}"
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{model}, {os.cpu_count()} CPUs{memory}; {platform.platform()}; "
        f"Python {platform.python_version()}; {miniupnpd}; "
        f"load average before the run {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


# -- sections --------------------------------------------------------------------


class Section:
    """One script: how to run it, and how its figures become markdown and targets."""

    def __init__(
        self,
        title: str,
        script: str,
        full: list[str],
        quick: list[str],
        *,
        json_to: str,
        render: Callable[[Any], str] | None = None,
        root: bool = False,
    ) -> None:
        self.title = title
        self.script = script
        self.full = full
        self.quick = quick
        # "file": the script takes --json PATH and prints markdown itself;
        # "stdout": it prints one JSON object with --json, rendered here.
        self.json_to = json_to
        self.render = render
        self.root = root

    def run(self, quick: bool, workdir: Path) -> tuple[str, Any, float]:
        """Run it: (markdown, figures, seconds). Raises RuntimeError if it failed."""
        argv = [sys.executable, str(HERE / self.script), *(self.quick if quick else self.full)]
        out = workdir / f"{Path(self.script).stem}.json"
        if self.json_to == "file":
            argv += ["--json", str(out)]
        else:
            argv.append("--json")
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
        took = time.monotonic() - started
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise RuntimeError(f"exit status {done.returncode}:\n" + "\n".join(tail))
        if self.json_to == "file":
            figures = json.loads(out.read_text()) if out.exists() else None
            return done.stdout.strip(), figures, took
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert self.render is not None
        return self.render(figures), figures, took


def _floor_table(figures: dict[str, Any]) -> str:
    lines = [
        "| gateway | `map()` median | raw round trip (median) | difference | outcome |",
        "|---|---|---|---|---|",
    ]
    names = {
        "full": "full (PCP + NAT-PMP + UPnP)",
        "upnp-only": "UPnP only",
        "none": "no service (ICMP port unreachable)",
    }
    for variant, row in figures.items():
        raw = row["raw_median_ms"]
        diff = row["difference_ms"]
        lines.append(
            f"| {names.get(variant, variant)} | {row['broker_median_ms']:.2f} ms"
            f" | {'—' if raw is None else f'{raw:.2f} ms'}"
            f" | {'—' if diff is None else f'{diff:+.2f} ms'}"
            f" | {', '.join(sorted(set(row['outcome'])))} |"
        )
    return "\n".join(lines)


def _throughput_table(figures: dict[str, Any]) -> str:
    lines = ["| clients | map + unmap round trips per second |", "|---|---|"]
    for key, value in figures.items():
        if key.endswith("_clients_per_s"):
            lines.append(f"| {key.split('_')[0]} | {value:,.0f} |")
    rss = [
        f"{key.removeprefix('rss_').removesuffix('_mib')}: {v} MiB"
        for key, v in figures.items()
        if key.startswith("rss_")
    ]
    return "\n".join(lines) + "\n\nDaemon RSS — " + "; ".join(rss).replace("_", " ")


def _cli_table(figures: dict[str, Any]) -> str:
    lines = [
        f"{figures['runs']} runs of each, interleaved; target under 100 ms",
        "",
        "| whole process, through the daemon | median | p90 | target |",
        "|---|---|---|---|",
    ]
    for name, row in figures["results"].items():
        verdict = "(the interpreter's own start)" if "python" in name else _verdict(row, 100.0)
        lines.append(
            f"| `{name}` | {row['median_ms']:.1f} ms | {row['p90_ms']:.1f} ms | {verdict} |"
        )
    return "\n".join(lines)


def _verdict(row: dict[str, Any], target_ms: float) -> str:
    if row["median_ms"] < target_ms and row["p90_ms"] < target_ms:
        return f"< {target_ms:.0f} ms: met"
    if row["median_ms"] < target_ms:
        return f"< {target_ms:.0f} ms: met by the median, p90 over"
    return f"< {target_ms:.0f} ms: MISSED"


SECTIONS = [
    Section(
        "Against other clients",
        "peers.py",
        [],
        ["--quick"],
        json_to="file",
        root=True,
    ),
    Section(
        "The floor: `map()` beside the raw round trip",
        "open_mapping_latency.py",
        ["--runs", "20"],
        ["--runs", "3"],
        json_to="stdout",
        render=_floor_table,
        root=True,
    ),
    Section("Scale on real sockets", "scale.py", [], ["--quick"], json_to="file"),
    Section(
        "The daemon: throughput",
        "daemon_throughput.py",
        ["--seconds", "5", "--held", "10000"],
        ["--seconds", "1", "--held", "500"],
        json_to="stdout",
        render=_throughput_table,
    ),
    Section(
        "The daemon: the command through it",
        "cli_daemon.py",
        ["--runs", "30"],
        ["--runs", "5"],
        json_to="stdout",
        render=_cli_table,
    ),
]


def targets(figures: dict[str, Any]) -> str:
    """The issues' targets, each with its figure: met, or missed."""
    rows: list[tuple[str, str, str]] = []
    cli = figures.get("cli_daemon")
    if cli:
        for name, row in cli["results"].items():
            if "python" not in name:
                rows.append(
                    (
                        f"`{name}` through the daemon, whole process",
                        f"median {row['median_ms']:.0f} ms, p90 {row['p90_ms']:.0f} ms",
                        _verdict(row, 100.0),
                    )
                )
    throughput = figures.get("daemon_throughput")
    if throughput and "100_clients_per_s" in throughput:
        value = throughput["100_clients_per_s"]
        rows.append(
            (
                "daemon map + unmap with 100 clients (issue 4)",
                f"{value:,.0f}/s",
                "2,000/s: met"
                if value >= 2000
                else "2,000/s: MISSED (docs/performance.md says why)",
            )
        )
    scale = figures.get("scale")
    if scale and isinstance(scale.get("targets"), list):
        for target in scale["targets"]:
            rows.append((target["name"], target["figure"], target["verdict"]))
    elif scale and isinstance(scale.get("results"), list):
        # benchmarks/scale.py's rows: issue 10's three targets at each size.
        for row in scale["results"]:
            size = f"{row['mappings']:,} mappings"
            for name, key, limit, unit in (
                ("CPU per 1,000 renewals", "cpu_ms_per_1000", 50.0, "ms"),
                ("RSS per mapping", "rss_per_mapping_kib", 4.0, "KiB"),
                ("renewal lateness p99", "lateness_p99_ms", 50.0, "ms"),
            ):
                value = row.get(key)
                if value is None:
                    continue
                verdict = f"< {limit:g} {unit}: " + (
                    "met" if value < limit else "MISSED (docs/performance.md says why)"
                )
                rows.append((f"{name}, {size}", f"{value:g} {unit}", verdict))
    peers = figures.get("peers")
    if peers and isinstance(peers.get("targets"), list):
        for target in peers["targets"]:
            rows.append((target["name"], target["figure"], target["verdict"]))
    if not rows:
        return "(no section produced target figures)"
    lines = ["| target | figure | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {figure} | {verdict} |" for name, figure, verdict in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every section small")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="write every section's figures here")
    parser.add_argument(
        "--only", action="append", metavar="SCRIPT", help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--peers-runs",
        type=int,
        metavar="N",
        help="rounds per gateway variant and per loss level in the peers section"
        " (default: its full mode, 8 and 5; a full run takes about 30 minutes there)",
    )
    args = parser.parse_args()
    sections = [
        s
        for s in SECTIONS
        if not args.only or Path(s.script).stem in args.only or s.script in args.only
    ]
    if any(s.root for s in sections) and os.geteuid() != 0:
        print(
            "benchmarks/run.py: run as root (sudo): the lab sections build network"
            " namespaces; --only scale.py --only daemon_throughput.py --only cli_daemon.py"
            " need no root",
            file=sys.stderr,
        )
        return 2
    report = [
        "# portbroker benchmarks",
        "",
        f"`benchmarks/run.py{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {machine()}",
    ]
    if args.peers_runs is not None:
        if args.peers_runs < 1:
            parser.error("--peers-runs must be at least 1")
        for section in SECTIONS:
            if section.script == "peers.py":
                section.full = ["--runs", str(args.peers_runs), "--loss-runs", str(args.peers_runs)]
    figures: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="pb-bench-") as tmp:
        for section in sections:
            name = Path(section.script).stem
            print(f"== {section.title} ({section.script})", file=sys.stderr, flush=True)
            report += ["", f"## {section.title}", ""]
            try:
                markdown, data, took = section.run(args.quick, Path(tmp))
            except (RuntimeError, OSError, json.JSONDecodeError) as error:
                failed = True
                report.append(f"**FAILED**: `{section.script}` {error}")
                continue
            figures[name] = data
            report += [markdown, "", f"({section.script}: {took:.0f} s)"]
    report += ["", "## Targets", "", targets(figures)]
    text = "\n".join(report) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "sections": figures}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
