"""How long from ``broker.map()`` to an ACTIVE mapping, beside the raw round trip.

Run as root (it builds the lab):

    .venv/bin/python benchmarks/open_mapping_latency.py [--runs 20]

For each gateway variant it measures, inside the lab's lan namespace and in
the same run:

- full (PCP + NAT-PMP + UPnP): ``map()`` with nothing cached (the first PCP
  MAP is the probe) against one raw PCP MAP round trip on a plain socket;
- UPnP only: ``map()`` against one raw unicast SSDP search round trip
  (miniupnpd holds every SSDP reply 50-80 ms);
- no service: how long ``map()`` takes to decide that nothing works, when the
  gateway answers ICMP port unreachable on 5351 and 1900.

Figures are medians of --runs attempts; each ``map()`` uses a fresh broker so
nothing is cached, and attempts are 1.1 s apart, as apps start: a gateway
rate-limits its ICMP errors per peer (Linux: net.ipv4.icmp_ratelimit, 1 s),
and back-to-back runs would measure that limit (and miniupnpd still busy with
the previous run's delayed SSDP replies) instead of a decision. It prints a
table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# -- inside the lan namespace --------------------------------------------------


def _raw_pcp_rtt(gateway: str, port: int) -> float:
    from portbroker.wire import pcp

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, 5351))
        sock.settimeout(2)
        me = sock.getsockname()[0]
        nonce = secrets.token_bytes(12)
        request = pcp.PcpRequest(
            pcp.Opcode.MAP, 600, me, pcp.MapData(nonce, 6, port, port, pcp.NO_PREFERENCE_V4)
        )
        started = time.perf_counter()
        sock.send(pcp.encode_request(request))
        pcp.decode_response(sock.recv(1100))
        elapsed = time.perf_counter() - started
        delete = pcp.PcpRequest(
            pcp.Opcode.MAP, 0, me, pcp.MapData(nonce, 6, port, 0, pcp.NO_PREFERENCE_V4)
        )
        sock.send(pcp.encode_request(delete))
        sock.recv(1100)
        return elapsed


def _raw_ssdp_rtt(gateway: str) -> float:
    from portbroker.wire import ssdp

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, 1900))
        sock.settimeout(3)
        started = time.perf_counter()
        sock.send(ssdp.encode_msearch(ssdp.ST_IGD_V2, host=gateway, mx=None))
        ssdp.decode_response(sock.recv(2048))
        return time.perf_counter() - started


async def _broker_map(gateway: str, port: int, expect_failure: bool) -> tuple[float, str]:
    import trio

    import portbroker

    async with portbroker.open_broker(gateway, probe_timeout=2.0) as broker:
        started = trio.current_time()
        try:
            mapping = await broker.map(port, "tcp", lifetime=600)
        except portbroker.PortBrokerError as exc:
            if not expect_failure:
                raise
            return trio.current_time() - started, type(exc).__name__
        elapsed = trio.current_time() - started
        method = mapping.method
        await mapping.release()
        return elapsed, method


GAP = 1.1  # seconds between attempts (see the module docstring)


def child(variant: str, gateway: str, runs: int) -> dict[str, Any]:
    import trio

    out: dict[str, Any] = {"variant": variant, "runs": runs}
    base = 30000
    raw: list[float] = []
    results: list[tuple[float, str]] = []
    for i in range(runs):
        # Interleaved, so both see the same gateway conditions.
        if variant == "full":
            raw.append(1000 * _raw_pcp_rtt(gateway, base + i))
        elif variant == "upnp-only":
            raw.append(1000 * _raw_ssdp_rtt(gateway))
        time.sleep(GAP)
        results.append(trio.run(_broker_map, gateway, base + 100 + i, variant == "none"))
        time.sleep(GAP)
    if raw:
        out["raw_ms"] = raw
    out["broker_ms"] = [1000 * elapsed for elapsed, _ in results]
    out["outcome"] = sorted({what for _, what in results})
    return out


# -- the driver (root namespace) -----------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.gateway, args.runs)))
        return 0

    from portbroker.testing.lab import GATEWAY_ADDRESS, Variant, open_lab

    rows = []
    for variant in (Variant.FULL, Variant.UPNP_ONLY, Variant.NONE):
        with open_lab(variant) as lab:
            done = subprocess.run(
                lab.exec_argv(
                    lab.lan_ns,
                    [
                        sys.executable,
                        str(HERE),
                        "--child",
                        variant.value,
                        "--gateway",
                        str(GATEWAY_ADDRESS),
                        "--runs",
                        str(args.runs),
                    ],
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                print(lab.log_text()[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout))
    summary = {}
    for row in rows:
        broker = statistics.median(row["broker_ms"])
        raw = statistics.median(row["raw_ms"]) if "raw_ms" in row else None
        summary[row["variant"]] = {
            "broker_median_ms": round(broker, 3),
            "raw_median_ms": None if raw is None else round(raw, 3),
            "difference_ms": None if raw is None else round(broker - raw, 3),
            "broker_max_ms": round(max(row["broker_ms"]), 3),
            "outcome": row["outcome"],
            "runs": row["runs"],
        }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{'gateway':12} {'map() median':>13} {'raw RTT median':>15} {'difference':>11}  outcome"
        )
        for variant, figures in summary.items():
            raw = figures["raw_median_ms"]
            diff = figures["difference_ms"]
            print(
                f"{variant:12} {figures['broker_median_ms']:>10.3f} ms "
                f"{'-' if raw is None else f'{raw:.3f} ms':>15} "
                f"{'-' if diff is None else f'{diff:+.3f} ms':>11}  {', '.join(figures['outcome'])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
