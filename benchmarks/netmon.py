"""The network monitor's costs: parsing rtnetlink, building snapshots, importing.

    .venv/bin/python benchmarks/netmon.py [--quick] [--json]

Sans-IO, nothing sent anywhere: it times

- ``parse_messages`` on kernel-shaped messages (encoded by
  ``portbroker.netmon_wire``'s encoders: a link, an address, a default
  route, 30 per datagram as a dump packs them), in messages per second;
- ``snapshot_from_records`` + ``changes_between`` for a host with 50
  interfaces and 200 addresses (what each settled burst costs beyond the
  dump itself);
- ``python -c "import portbroker.netmon"`` (and the parser alone, and
  ``portbroker.clockwatch``) as new processes, median of *runs*, beside
  ``python -c pass`` and ``import trio`` (which the broker and the daemon
  import anyway).

``--quick`` (under a minute, CI-sized) parses fewer datagrams and starts
fewer processes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address

from portbroker import netmon
from portbroker import netmon_wire as wire


def _datagram(per: int = 30) -> bytes:
    chunks: list[bytes] = []
    for i in range(per):
        kind = i % 3
        if kind == 0:
            link = wire.LinkRecord(
                wire.Change.NEW, i + 2, f"eth{i}", wire.IFF_UP | wire.IFF_RUNNING
            )
            chunks.append(wire.encode_link(link))
        elif kind == 1:
            address = IPv4Address(0x0A000000 + i)
            chunks.append(
                wire.encode_address(
                    wire.AddressRecord(wire.Change.NEW, i, address, 24, 0x80, "eth0")
                )
            )
        else:
            route = wire.RouteRecord(
                wire.Change.NEW, wire.AF_INET, 0, 254, 1, 0, IPv4Address("10.0.0.1"), 2, i
            )
            chunks.append(wire.encode_route(route))
    return b"".join(chunks)


def parse_rate(datagrams: int) -> tuple[float, int]:
    """Messages parsed per second, over *datagrams* datagrams of 30; and bytes per datagram."""
    data = _datagram()
    count = len(wire.parse_messages(data))
    start = time.perf_counter()
    for _ in range(datagrams):
        wire.parse_messages(data)
    elapsed = time.perf_counter() - start
    return count * datagrams / elapsed, len(data)


def snapshot_cost(repeats: int) -> float:
    """Milliseconds per snapshot-and-difference for 50 links and 200 addresses."""
    records: list[wire.Record] = []
    for i in range(50):
        records.append(wire.LinkRecord(wire.Change.NEW, i + 1, f"if{i}", 0x41))
    for i in range(200):
        records.append(
            wire.AddressRecord(wire.Change.NEW, i % 50 + 1, IPv4Address(0x0A000000 + i), 24, 0x80)
        )
    records.append(
        wire.RouteRecord(wire.Change.NEW, wire.AF_INET, 0, 254, 1, 0, IPv4Address("10.0.0.1"), 1, 0)
    )
    before = netmon.snapshot_from_records(records[:-5])
    start = time.perf_counter()
    for _ in range(repeats):
        after = netmon.snapshot_from_records(records)
        netmon.changes_between(before, after)
    return (time.perf_counter() - start) / repeats * 1000


def import_ms(statement: str, runs: int) -> float:
    """Median wall time of ``python -c statement`` in ms (bytecode already compiled)."""
    argv = [sys.executable, "-c", statement]
    subprocess.run(argv, check=True)  # warm-up: compile, fill the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized run, under a minute")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    args = parser.parse_args(argv)
    datagrams, repeats, runs = (2_000, 200, 5) if args.quick else (20_000, 2_000, 20)
    rate, size = parse_rate(datagrams)
    snapshot = snapshot_cost(repeats)
    base = import_ms("pass", runs)
    imports = {
        module: import_ms(f"import {module}", runs)
        for module in (
            "trio",
            "portbroker.netmon_wire",
            "portbroker.netmon",
            "portbroker.clockwatch",
        )
    }
    figures = {
        "python": platform.python_version(),
        "messages_per_second": round(rate),
        "datagram_bytes": size,
        "snapshot_and_difference_ms": round(snapshot, 3),
        "python_c_pass_ms": round(base, 1),
        "import_ms": {module: round(ms, 1) for module, ms in imports.items()},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"Network monitor, Python {figures['python']} ({'quick' if args.quick else 'full'} run)\n"
    )
    print("| what | figure |")
    print("|---|---|")
    print(f"| rtnetlink messages parsed per second (30 per {size}-byte datagram) | {rate:,.0f} |")
    print(f"| snapshot + difference, 50 links / 200 addresses | {snapshot:.3f} ms |")
    print(f"| `python -c pass` | {base:.1f} ms |")
    for module, ms in imports.items():
        print(f"| `python -c 'import {module}'` | {ms:.1f} ms (+{ms - base:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
