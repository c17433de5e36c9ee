"""UpnpMethod against a real miniupnpd: what it reports when the gateway restarts.

The method runs as a separate process in the lab's lan namespace and prints
each gateway signal it reports as a JSON line; the test restarts miniupnpd
between the first mapping and its renewal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from portbroker.testing.lab import GATEWAY_ADDRESS, Variant, open_lab
from tests.lab.helpers import connect_from_wan, listen_in_lan

SCRIPT = """
import json, sys, attrs, trio
from ipaddress import IPv4Address
from portbroker.methods.upnp import UpnpMethod
from portbroker.types import MappingRequest

def show(signal):
    fields = {k: v for k, v in attrs.asdict(signal).items() if k != "at"}
    print(json.dumps({"signal": type(signal).__name__, **fields}), flush=True)

async def main():
    method = UpnpMethod(IPv4Address(sys.argv[1]), report=show)
    request = MappingRequest(int(sys.argv[2]), "tcp", 600)
    lease = await method.create(request, None)
    print(json.dumps({"mapped": lease.external_port}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)  # the test restarts miniupnpd
    lease = await method.create(request, lease)
    method.forget_igd()
    await method.probe()
    print(json.dumps({"renewed": lease.external_port}), flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)  # the test connects from outside
    await method.delete(lease)
    print(json.dumps({"done": True}), flush=True)

trio.run(main)
"""


def _until(process: subprocess.Popen[str], key: str) -> list[dict[str, Any]]:
    """The script's JSON lines up to and including the one with *key*."""
    assert process.stdout is not None
    lines: list[dict[str, Any]] = []
    while not lines or key not in lines[-1]:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(process.stderr.read() if process.stderr else "script ended")
        lines.append(json.loads(line))
    return lines


def _squeezed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """*entries* without repeats of the entry just before (same signal and value)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if not out or out[-1] != entry:
            out.append(entry)
    return out


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_restart_is_reported_as_signals_and_the_renewal_restores_the_entry(
    tmp_path: Path,
) -> None:
    port = 21107
    with (
        open_lab(Variant.UPNP_ONLY, workdir=tmp_path) as lab,
        listen_in_lan(lab, port) as listener,
    ):
        argv = lab.exec_argv(
            lab.lan_ns, [sys.executable, "-c", SCRIPT, str(GATEWAY_ADDRESS), str(port)]
        )
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        try:
            assert process.stdout is not None
            assert process.stdin is not None
            before = _until(process, "mapped")
            assert connect_from_wan(lab, listener, port)
            time.sleep(2.5)  # so that the WAN uptime visibly goes back
            lab.restart_miniupnpd()
            process.stdin.write("restarted\n")
            process.stdin.flush()
            after = _until(process, "renewed")
            restored = connect_from_wan(lab, listener, port)
            process.stdin.write("connected\n")
            process.stdin.flush()
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, err
        assert err == ""  # nothing from any C library, nothing unlogged
        assert {"done": True} in _lines(out)
        assert restored == b"inside says hello"

        # miniupnpd may answer one search more than once (a unicast and a
        # multicast reply): the same signal twice in a row is one observation.
        before = _squeezed(before)
        kinds = [entry.get("signal") for entry in before]
        assert kinds == ["BootIdSeen", "UptimeSeen", None]
        first_boot = before[0]["boot_id"]
        first_uptime = before[1]["uptime"]

        signals = _squeezed([entry for entry in after if "signal" in entry])
        assert [s["signal"] for s in signals] == ["EntryMissing", "UptimeSeen", "BootIdSeen"]
        assert "714" in signals[0]["detail"]
        assert signals[1]["uptime"] < first_uptime + 2.5  # went back at the restart
        assert signals[2]["boot_id"] != first_boot
        assert {"renewed": port} in after
        print(
            f"lab restart: boot id {first_boot} -> {signals[2]['boot_id']}, "
            f"uptime {first_uptime} -> {signals[1]['uptime']} s"
        )
