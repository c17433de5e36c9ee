"""The daemon SIGKILLed in the middle of a restore, then started again: no record lost,
every mapping on the real gateway exactly once, none orphaned."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from portbroker.client import open_client
from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from tests.lab.test_lab_daemon import wait_for_socket

PORTS = range(23000, 23040)
# Most PCP datagrams lost on the way to the gateway: a restore that takes a while.
LOSSY = """
table inet pbloss {
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport 5351 numgen random mod 100 < 80 drop
  }
}
"""


def start(lab: Lab, directory: Path) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        lab.exec_argv(
            lab.lan_ns,
            [
                sys.executable,
                "-m",
                "portbroker.cli",
                "daemon",
                "--socket",
                str(directory / "pb.sock"),
                "--state",
                str(directory / "state.json"),
                "--gateway",
                str(GATEWAY_ADDRESS),
                "--methods",
                "pcp",
                "--no-announcements",
                "-q",
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for_socket(directory / "pb.sock", daemon)
    return daemon


def end(daemon: subprocess.Popen[bytes], how: signal.Signals) -> None:
    if daemon.poll() is None:
        daemon.send_signal(how)
    try:
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()


def dnat_ports(lab: Lab) -> Counter[int]:
    """External ports of miniupnpd's DNAT rules, counted."""
    text = lab.nft_rules()
    chain = re.search(r"chain prerouting_miniupnpd \{(.*?)\n\t\}", text, re.S)
    assert chain is not None, text
    return Counter(int(port) for port in re.findall(r"dport (\d+)", chain.group(1)))


def recorded(directory: Path) -> set[int]:
    data = json.loads((directory / "state.json").read_text())
    return {r["internal_port"] for r in data["mappings"]}


async def _map_all(sock: Path) -> dict[int, int]:
    external: dict[int, int] = {}
    with trio.fail_after(180):  # a guard: miniupnpd adds nftables rules slowly
        async with open_client(sock) as client:

            async def one(port: int) -> None:
                mapping = await client.map(port, "tcp", persist=True, lifetime=3600)
                external[port] = mapping["external_port"]

            async with trio.open_nursery() as nursery:
                for port in PORTS:
                    nursery.start_soon(one, port)
    return external


async def _active(sock: Path) -> dict[int, int]:
    async with open_client(sock) as client:
        return {
            m["internal_port"]: m["external_port"]
            for m in await client.list()
            if m["state"] == "active"
        }


def test_sigkill_during_a_restore_loses_nothing_and_orphans_nothing(fresh_lab: Lab) -> None:
    directory = Path(tempfile.mkdtemp(prefix="pbk-"))
    sock = directory / "pb.sock"
    daemon = start(fresh_lab, directory)
    try:
        external = trio.run(_map_all, sock)
        end(daemon, signal.SIGTERM)  # persisted: left on the gateway, recorded
        assert recorded(directory) == set(PORTS)

        fresh_lab.restart_miniupnpd()  # the gateway forgets them all: restore re-creates them
        fresh_lab.nft(fresh_lab.lan_ns, LOSSY)
        daemon = start(fresh_lab, directory)
        deadline = time.monotonic() + 120
        while not 0 < sum(dnat_ports(fresh_lab).values()) < len(PORTS):
            assert time.monotonic() < deadline, "the restore did not get under way"
            time.sleep(0.05)
        end(daemon, signal.SIGKILL)  # in the middle of the restore
        assert recorded(directory) == set(PORTS)  # every record still there

        fresh_lab.nft(fresh_lab.lan_ns, "delete table inet pbloss")
        daemon = start(fresh_lab, directory)
        deadline = time.monotonic() + 180
        while len(active := trio.run(_active, sock)) < len(PORTS):
            assert time.monotonic() < deadline, (active, fresh_lab.log_text()[-2000:])
            time.sleep(0.5)
        assert set(active) == set(PORTS)
        rules = dnat_ports(fresh_lab)
        assert rules == Counter(set(active.values())), rules  # each once, none orphaned
        assert all(active[p] == external[p] for p in PORTS), (active, external)
    finally:
        end(daemon, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)
