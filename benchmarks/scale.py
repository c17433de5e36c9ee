"""Scale on real sockets: one broker holding thousands of PCP mappings, renewing them.

    .venv/bin/python benchmarks/scale.py [--quick] [--sizes 1000,10000,50000]
        [--lifetimes 20-60] [--window 120] [--json PATH] [--profile PATH]

For each size N (each in a process of its own when there are several), one
:func:`portbroker.open_broker` in the measuring process (pinned
to 127.0.0.1:<port>, PCP only, no announcement listener) maps N ports
(``tcp`` then ``udp``, 1024 upwards) against a lean PCP server in **another
process** (its CPU is not counted): it answers every MAP at once with a
lifetime drawn per mapping from ``--lifetimes`` (miniupnpd-like short leases,
so renewals come fast) and its epoch in whole seconds since it started.
Then it measures the steady state for ``--window`` seconds (several renewal
cycles), excluding the setup:

- **CPU per 1,000 renewals**: ``time.process_time()`` (user + system, from
  ``getrusage``) of this process over the window, divided by the renewals
  sent in it. The broker is all that runs here, with the two recorders below.
- **RSS per mapping**: VmRSS (``/proc/self/status``) after every mapping is
  ACTIVE minus VmRSS before the first was asked for, divided by N (the
  process keeps what it allocated: this is what N mappings cost to hold).
- **Renewal lateness**: for every renewal sent in the window, the time it
  went out minus the time the lifecycle scheduled it for. The scheduled time
  is the ``Sleep.until`` the broker put on its timer heap (read from the heap
  at the window's start, and recorded at each push after it); the send time
  is ``trio.current_time()`` when the datagram is handed to the socket (a
  wrapping link records ``(time, payload)``; payloads are decoded only after
  the window). Retransmissions are counted apart, not as renewals.

Afterwards every mapping is checked: renewed at least once in the window
(``--min-renewals``), still ACTIVE or RENEWING, no retransmission. The
mappings are then detached (no delete burst at the end: the server is
thrown away).

``--quick`` is 1,000 mappings, lifetimes 8-12 s, a 30 s window (under a
minute). The default (full) runs 1,000 and 10,000 with 20-60 s lifetimes
and a 120 s window each, and 50,000 with 160-320 s lifetimes and a 210 s
window (``FULL_PLAN``: 50,000 leases of 20-60 s want more renewals a second
than one core does here; ``--sizes 50000 --lifetimes 20-60`` shows it).
Each size runs in a process of its own; a setup that does not finish in
``SETUP_LIMIT`` is reported as overloaded. Markdown tables on stdout;
``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from portbroker import open_broker
from portbroker.broker import Broker, Mapping
from portbroker.errors import PortBrokerError
from portbroker.lifecycle import State
from portbroker.transport import UdpLink, open_udp_link
from portbroker.types import IPAddress
from portbroker.wire import pcp
from portbroker.wire._fields import to_address

TARGET_CPU_MS = 50.0  # per 1,000 renewals
TARGET_RSS_KIB = 4.0  # per mapping
TARGET_P99_MS = 50.0
CONCURRENCY = 200  # creates in flight during setup
SETUP_LIMIT = 600.0  # seconds: a setup that takes longer is overloaded
EXTERNAL = "203.0.113.7"
STATS = b"stats?"


# -- the PCP server (its own process) -------------------------------------------


def _lifetime_for(protocol: int, port: int, low: int, high: int) -> int:
    # Spread over [low, high] but fixed per mapping, so every renewal of one
    # mapping sees the same lease (as from miniupnpd's max_lifetime clamp).
    return low + (port * 7919 + protocol) % (high - low + 1)


def serve_gateway(low: int, high: int) -> None:
    """Answer PCP MAP and ANNOUNCE on 127.0.0.1 until stdin closes.

    Prints ``port <n>``; a datagram ``stats?`` gets the counts as JSON.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    print(f"port {sock.getsockname()[1]}", flush=True)
    origin = time.monotonic()
    counts: dict[str, int] = defaultdict(int)
    external = to_address(EXTERNAL)
    sock.settimeout(0.5)
    while True:
        try:
            data, client = sock.recvfrom(2048)
        except TimeoutError:
            if sys.stdin.closed or _stdin_closed():
                return
            continue
        if data == STATS:
            sock.sendto(json.dumps(counts).encode(), client)
            continue
        try:
            request = pcp.decode_request(data)
        except Exception:  # noqa: BLE001 - a benchmark server: count and go on
            counts["malformed"] += 1
            continue
        epoch = int(time.monotonic() - origin)
        if request.opcode == pcp.Opcode.ANNOUNCE:
            counts["announce"] += 1
            reply = pcp.PcpResponse(pcp.Opcode.ANNOUNCE, pcp.ResultCode.SUCCESS, 0, epoch)
        else:
            data_in = request.data
            assert isinstance(data_in, pcp.MapData)
            if request.lifetime == 0:
                counts["delete"] += 1
                lifetime = 0
            else:
                counts["map"] += 1
                lifetime = _lifetime_for(data_in.protocol, data_in.internal_port, low, high)
            reply = pcp.PcpResponse(
                pcp.Opcode.MAP,
                pcp.ResultCode.SUCCESS,
                lifetime,
                epoch,
                pcp.MapData(
                    data_in.nonce,
                    data_in.protocol,
                    data_in.internal_port,
                    data_in.internal_port,
                    external,
                ),
            )
        sock.sendto(pcp.encode_response(reply), client)


def _stdin_closed() -> bool:
    import select

    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable) and not os.read(sys.stdin.fileno(), 1)


def _gateway_stats(port: int) -> dict[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(STATS, ("127.0.0.1", port))
        data, _ = sock.recvfrom(65536)
    counts: dict[str, int] = json.loads(data)
    return counts


# -- instrumentation (in the broker's process) ------------------------------------


class RecordingLink:
    """A real UDP link whose sends can be recorded as ``(trio time, payload)``."""

    def __init__(self, link: UdpLink) -> None:
        self._link = link
        self.receive = link.receive
        self.close = link.close
        self.log: list[tuple[float, bytes]] | None = None

    @property
    def local_address(self) -> IPAddress:
        return self._link.local_address

    @property
    def remote(self) -> tuple[IPAddress, int]:
        return self._link.remote

    async def send(self, data: bytes) -> None:
        log = self.log
        if log is not None:
            log.append((trio.current_time(), data))
        await self._link.send(data)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _ports(count: int) -> list[tuple[int, str]]:
    span = 65535 - 1024 + 1
    if count > 2 * span:
        raise SystemExit(f"at most {2 * span} mappings (one per tcp and udp port from 1024)")
    return [(1024 + n % span, "tcp" if n < span else "udp") for n in range(count)]


async def _map_all(broker: Broker, count: int, lifetime: int) -> tuple[list[Mapping], list[str]]:
    """Every mapping (CONCURRENCY at a time), and why each one that failed did."""
    mappings: list[Mapping] = []
    failures: list[str] = []
    todo = iter(_ports(count))

    async def worker() -> None:
        for port, protocol in todo:
            try:
                mappings.append(await broker.map(port, protocol, lifetime=lifetime, via="pcp"))
            except PortBrokerError as exc:  # counted and shown: a broker too busy to create
                failures.append(f"{port}/{protocol}: {exc}")

    async with trio.open_nursery() as nursery:
        for _ in range(min(CONCURRENCY, count)):
            nursery.start_soon(worker)
    return mappings, failures


async def run_size(
    count: int,
    gateway_port: int,
    window: float,
    low: int,
    high: int,
    min_renewals: int,
    profile: Path | None,
) -> dict[str, Any]:
    links: list[RecordingLink] = []

    async def factory(address: IPAddress, port: int) -> RecordingLink:
        link = RecordingLink(await open_udp_link(address, port))
        links.append(link)
        return link

    async with open_broker(
        "127.0.0.1",
        methods=["pcp"],
        port=gateway_port,
        announce_port=None,
        link_factory=factory,
        dhcp_leases=(),
        seed=1,
    ) as broker:
        (link,) = links
        rss_before = _rss_kib()
        began = time.monotonic()
        with trio.move_on_after(SETUP_LIMIT) as setup_scope:
            mappings, create_failures = await _map_all(broker, count, high)
        if setup_scope.cancelled_caught:
            # Renewals of the first mappings fall due while the last are
            # created, and more than the broker can do: it never catches up.
            raise SystemExit(
                f"{count:,} mappings with {low}-{high} s leases were not all created within"
                f" {SETUP_LIMIT:g} s: the broker cannot keep up; try longer --lifetimes"
            )
        setup_s = time.monotonic() - began
        rss_after = _rss_kib()
        not_active = sum(m.state is not State.ACTIVE for m in mappings)

        # The schedule: every Sleep on the heap now, then every one pushed.
        key_of = {m: (m.request.protocol.number, m.request.internal_port) for m in mappings}
        pushes: list[tuple[float, Mapping]] = [
            (until, target)
            for until, _seq, token, target in broker._heap
            if isinstance(target, Mapping) and target.lifecycle.token == token
        ]
        original_push = broker._push

        def recording_push(sleep: Any, target: Any) -> None:
            pushes.append((sleep.until, target))
            original_push(sleep, target)

        broker._push = recording_push  # type: ignore[method-assign]
        sends: list[tuple[float, bytes]] = []
        link.log = sends
        gateway_before = _gateway_stats(gateway_port)
        stats_before = broker.transport.stats.sent if broker.transport else 0
        profiler = None
        if profile is not None:
            import cProfile

            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
        cpu0, usage0, wall0 = (
            time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF),
            trio.current_time(),
        )
        await trio.sleep(window)
        cpu1, usage1, wall1 = (
            time.process_time(),
            resource.getrusage(resource.RUSAGE_SELF),
            trio.current_time(),
        )
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        link.log = None
        broker._push = original_push  # type: ignore[method-assign]
        gateway_after = _gateway_stats(gateway_port)
        states: dict[str, int] = defaultdict(int)
        for m in mappings:
            states[m.state.value] += 1
        for m in mappings:
            broker.detach(m)

    # Match each send to the Sleep that woke its mapping: the latest pushed
    # until at or before the send. A second send for one Sleep is a retransmission.
    schedule: dict[tuple[int, int], list[float]] = defaultdict(list)
    for until, target in pushes:
        key = key_of.get(target)
        if key is not None:
            schedule[key].append(until)
    for times in schedule.values():
        times.sort()
    lateness: list[float] = []
    renewed: dict[tuple[int, int], int] = defaultdict(int)
    used: set[tuple[tuple[int, int], float]] = set()
    retransmissions = unmatched = 0
    for sent_at, payload in sends:
        request = pcp.decode_request(payload)
        assert isinstance(request.data, pcp.MapData)
        key = (request.data.protocol, request.data.internal_port)
        candidates = [u for u in schedule.get(key, ()) if u <= sent_at + 1e-9]
        if not candidates:
            unmatched += 1
            continue
        until = candidates[-1]
        if (key, until) in used:
            retransmissions += 1
            continue
        used.add((key, until))
        renewed[key] += 1
        lateness.append(sent_at - until)
    renewals = len(lateness)
    cpu = cpu1 - cpu0
    user = usage1.ru_utime - usage0.ru_utime
    system = usage1.ru_stime - usage0.ru_stime
    short = [k for k in key_of.values() if renewed[k] < min_renewals]
    answered = gateway_after.get("map", 0) - gateway_before.get("map", 0)
    return {
        "mappings": count,
        "lifetimes": f"{low}-{high}",
        "setup_s": round(setup_s, 2),
        "window_s": round(wall1 - wall0, 2),
        "renewals": renewals,
        "renewals_per_s": round(renewals / (wall1 - wall0), 1),
        "answered_by_gateway": answered,
        "sent": (broker.transport.stats.sent if broker.transport else 0) - stats_before,
        "retransmissions": retransmissions,
        "unmatched_sends": unmatched,
        "cpu_s": round(cpu, 3),
        "cpu_user_s": round(user, 3),
        "cpu_sys_s": round(system, 3),
        "cpu_ms_per_1000": round(cpu / renewals * 1000 * 1000, 1) if renewals else None,
        "cpu_share": round(cpu / (wall1 - wall0), 3),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_mapping_kib": round((rss_after - rss_before) / count, 2),
        "lateness_p50_ms": round(_percentile(lateness, 0.5) * 1000, 2),
        "lateness_p99_ms": round(_percentile(lateness, 0.99) * 1000, 2),
        "lateness_max_ms": round(max(lateness, default=float("nan")) * 1000, 2),
        "lateness_mean_ms": round(statistics.fmean(lateness) * 1000, 2) if lateness else None,
        "states": dict(states),
        "under_renewed": len(short) + len(create_failures),
        "create_failures": len(create_failures),
        "create_failure_sample": create_failures[:3],
        "not_active_after_setup": not_active,
        "min_renewals": min_renewals,
    }


def _mark(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:g} ({'met' if value < target else 'MISSED'})"


def print_tables(results: list[dict[str, Any]]) -> None:
    print("\n### Scale: one broker, PCP over UDP on 127.0.0.1, server in another process\n")
    print(
        "| mappings | lifetimes (s) | window (s) | renewals | renewals/s"
        f" | CPU ms / 1,000 renewals (< {TARGET_CPU_MS:g})"
        f" | RSS KiB / mapping (< {TARGET_RSS_KIB:g})"
        " | lateness p50 (ms)"
        f" | lateness p99 (ms) (< {TARGET_P99_MS:g}) | max (ms) |"
    )
    print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mappings']:,} | {r['lifetimes']} | {r['window_s']:g} | {r['renewals']:,}"
            f" | {r['renewals_per_s']:g} | {_mark(r['cpu_ms_per_1000'], TARGET_CPU_MS)}"
            f" | {_mark(r['rss_per_mapping_kib'], TARGET_RSS_KIB)}"
            f" | {r['lateness_p50_ms']:g} | {_mark(r['lateness_p99_ms'], TARGET_P99_MS)}"
            f" | {r['lateness_max_ms']:g} |"
        )
    print("\n### Scale: checks and the rest\n")
    print(
        "| mappings | setup (s) | CPU user / sys (s) | CPU share of a core | RSS before → after (MiB)"
        " | answered by server | retransmissions | mappings renewed < min | states at end |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for r in results:
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(r["states"].items()))
        print(
            f"| {r['mappings']:,} | {r['setup_s']:g} | {r['cpu_user_s']:g} / {r['cpu_sys_s']:g}"
            f" | {r['cpu_share']:.1%} | {r['rss_before_kib'] / 1024:.1f} → {r['rss_after_kib'] / 1024:.1f}"
            f" | {r['answered_by_gateway']:,} | {r['retransmissions']}"
            f" | {r['under_renewed']} (min {r['min_renewals']}) | {states} |"
        )


def _start_gateway(low: int, high: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-gateway", f"{low}-{high}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("port "):
        process.kill()
        raise SystemExit(f"the PCP server did not start (it printed {line!r})")
    return process, int(line.split()[1])


def _stop_gateway(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


def _run_apart(
    size: int, low: int, high: int, window: float, min_renewals: int
) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="pb-scale-") as directory:
        out = Path(directory) / "size.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--sizes",
                str(size),
                "--lifetimes",
                f"{low}-{high}",
                "--window",
                str(window),
                "--min-renewals",
                str(min_renewals),
                "--json",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            check=False,
        )
        if not out.exists():
            return None
        result: dict[str, Any] = json.loads(out.read_text())["results"][0]
        return result


def _lifetimes(text: str) -> tuple[int, int]:
    try:
        low_text, _, high_text = text.partition("-")
        low, high = int(low_text), int(high_text or low_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want LOW-HIGH seconds, like 20-60; got {text!r}"
        ) from None
    if not 8 <= low <= high:
        # Below 8 s the 4 s minimum gap between renewals (RFC 6887 §11.2.1)
        # pushes the renewal past half-life: not the schedule being measured.
        raise argparse.ArgumentTypeError(f"want 8 <= LOW <= HIGH; got {text!r}")
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 mappings, 8-12 s leases, 30 s")
    parser.add_argument("--sizes", help="comma-separated mapping counts (default 1000,10000,50000)")
    parser.add_argument("--lifetimes", type=_lifetimes, help="granted lifetimes LOW-HIGH (s)")
    parser.add_argument("--window", type=float, help="steady-state seconds measured per size")
    parser.add_argument(
        "--min-renewals",
        type=int,
        default=1,
        help="each mapping must renew this often in the window",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--profile", type=Path, help="cProfile the window into PATH (one size only)"
    )
    parser.add_argument("--serve-gateway", type=_lifetimes, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_gateway is not None:
        serve_gateway(*args.serve_gateway)
        return 0
    sizes_text = args.sizes or ("1000" if args.quick else "1000,10000,50000")
    try:
        sizes = [int(s.replace("_", "")) for s in sizes_text.split(",")]
    except ValueError:
        parser.error(f"--sizes wants comma-separated counts, got {sizes_text!r}")
    if any(s < 1 for s in sizes):
        parser.error("--sizes must be positive")
    if args.profile is not None and len(sizes) > 1:
        parser.error("--profile takes one size (--sizes N)")
    results = []
    missing = []
    for size in sizes:
        low, high, window = _plan(size, args)
        if window < high * 5 / 8 + 1 and args.min_renewals > 0:
            print(
                f"note: a {window:g} s window may end before a {high} s lease's first renewal"
                f" (at up to 5/8 of it): --window {high * 5 / 8 + 2:g} or more",
                file=sys.stderr,
            )
        if len(sizes) > 1:
            # Each size in a process of its own: memory a larger run freed
            # stays in this one and would hide what the next one allocates.
            result = _run_apart(size, low, high, window, args.min_renewals)
            if result is None:
                missing.append(size)
            else:
                results.append(result)
            continue
        process, port = _start_gateway(low, high)
        try:
            result = trio.run(
                run_size, size, port, window, low, high, args.min_renewals, args.profile
            )
            results.append(result)
            print(f"{size:,} mappings: {json.dumps(result)}", file=sys.stderr, flush=True)
        finally:
            _stop_gateway(process)
    print_tables(results)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
    for size in missing:
        print(f"\n{size:,} mappings: no figures (see the error above)")
    failed = [r for r in results if r["under_renewed"]]
    return 1 if failed or missing else 0


# The full run: 20-60 s leases where one core keeps up with the renewals;
# 50,000 such leases would want about 2,200 renewals a second, more than this
# broker does on a 2-core machine (docs/performance.md), so they get leases
# that renew about 300 times a second, and a window long enough for each to
# renew once.
FULL_PLAN = {1000: (20, 60, 120.0), 10000: (20, 60, 120.0), 50000: (160, 320, 210.0)}


def _plan(size: int, args: argparse.Namespace) -> tuple[int, int, float]:
    """(low, high, window) for *size*: the options given, else the mode's defaults."""
    if args.quick:
        low, high, window = 8, 12, 30.0
    else:
        low, high, window = FULL_PLAN.get(size, (20, 60, 120.0))
    if args.lifetimes is not None:
        low, high = args.lifetimes
    return low, high, args.window or window


if __name__ == "__main__":
    raise SystemExit(main())
