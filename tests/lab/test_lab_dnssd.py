"""DNS-SD publication across the lab's lan bridge, through a real miniupnpd.

Two processes, each under ``ip netns exec`` as an app on a LAN host would run:
``portbroker map --hold --publish`` on the first lan host (zeroconf bound to
its lan address) and ``portbroker browse --json`` on a second one. The
browser sees the mapping's external endpoint; the gateway's wan address
changes, the broker learns it (at the PCP renewal, or through the state loss
miniupnpd's announcement can look like), the TXT record is updated, and the
browser sees the new address; the publisher stops and the browser sees the
goodbye (RFC 6762 §10.1). All mDNS stays inside the lab's namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any

import pytest

from portbroker.testing.lab import EXTERNAL_ADDRESS, GATEWAY_ADDRESS, Lab, LanHost, open_lab
from tests.conftest import _require_lab
from tests.lab.helpers import lines_of, stop_read_process

PORTBROKER = [sys.executable, "-m", "portbroker.cli"]
SERVICE = "_pbtest._tcp"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_lab()
    # min_lifetime=10: PCP renewals within seconds (miniupnpd's floor is 120 s).
    with open_lab(
        workdir=tmp_path_factory.mktemp("dnssd"), extra_config=["min_lifetime=10"]
    ) as built:
        yield built


@pytest.fixture(scope="module")
def seer(lab: Lab) -> LanHost:
    """The second lan host, where the browser runs."""
    return lab.add_lan_host("seer")


class Lines:
    """A child's stdout, read line by line with a deadline (JSON lines)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.seen: list[dict[str, Any]] = []
        self.raw: list[str] = []

    def until(self, want: Callable[[dict[str, Any]], bool], limit: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        out: IO[str] | None = self.process.stdout
        assert out is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not seen within {limit} s; got {self.raw}")
            line = lines_of(self.process).next(left)
            if line is None:
                continue
            if not line:
                raise AssertionError(f"the process ended; got {self.raw}")
            self.raw.append(line.rstrip())
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict):
                continue
            self.seen.append(item)
            if want(item):
                return item


def spawn(lab: Lab, ns: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        lab.exec_argv(ns, [*PORTBROKER, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM (the CLI's clean stop), then its stderr; SIGKILL if it hangs."""
    return stop_read_process(process, signal.SIGTERM, timeout=15)


def test_a_browser_on_another_lan_host_sees_the_external_endpoint_move(
    lab: Lab, seer: LanHost, tmp_path: Path
) -> None:
    publisher_host = lab.lan_hosts[0]
    browser_host = seer
    port = 24080
    browser = spawn(
        lab, browser_host.ns, "browse", SERVICE, "--interface", str(browser_host.address), "--json"
    )
    publisher = spawn(
        lab,
        publisher_host.ns,
        "map",
        f"{port}/tcp",
        "--hold",
        "--publish",
        f"{SERVICE}:lab-web",
        "--txt",
        "path=/",
        # A PCP lease learns a new external address at its next renewal (or
        # after a state loss): 16 s puts that within 8-10 s.
        "--lifetime",
        "16",
        "--json",
        "--gateway",
        str(GATEWAY_ADDRESS),
        "--state-file",
        str(tmp_path / "state.json"),
    )
    try:
        out = Lines(publisher)
        acquired = out.until(lambda e: e.get("event") == "Acquired")
        external_port = acquired["external_port"]
        published = out.until(lambda e: e.get("event") == "Published")
        assert published["txt"]["ext_addr"] == str(EXTERNAL_ADDRESS)
        assert published["txt"]["public"] == "1"  # 11.0.0.1 is globally routable

        seen = Lines(browser)
        first = seen.until(lambda e: e.get("name") == "lab-web" and bool(e.get("external")))
        started = time.monotonic()
        assert first["change"] == "added"
        assert first["internal"] == [f"{publisher_host.address}:{port}"]
        assert first["external"] == f"{EXTERNAL_ADDRESS}:{external_port}"
        assert (first["method"], first["state"], first["txt"]["path"]) == ("pcp", "up", "/")
        print(f"browser saw the external endpoint {first['external']}")

        new = IPv4Address("11.0.0.5")
        changed_at = time.monotonic()
        lab.set_external_address(new)
        # The broker hears ExternalAddressChanged at the renewal, or (miniupnpd
        # 2.3.1's announcement of the change can carry an epoch behind the one
        # last seen: "pcp epoch too-slow") a state loss, then Restored on the
        # new address. The record follows either (docs/dnssd.md).
        out.until(
            lambda e: (
                e.get("event") in ("ExternalAddressChanged", "Restored")
                and e.get("external_address") == str(new)
            ),
            limit=25,
        )
        path = [e["event"] for e in out.seen if e["event"] not in ("Acquired", "Published")]
        moved = seen.until(
            lambda e: e.get("name") == "lab-web" and e.get("external") == f"{new}:{external_port}",
            limit=10,
        )
        assert moved["change"] == "updated"
        assert moved["state"] == "up"
        print(
            f"browser saw {moved['external']} {time.monotonic() - changed_at:.2f} s after"
            f" the gateway's address changed ({time.monotonic() - started:.2f} s after the"
            f" first); the broker heard {' then '.join(path)}"
        )

        err = stop(publisher)
        assert publisher.returncode == 0, err
        gone = seen.until(lambda e: e.get("name") == "lab-web" and e.get("change") == "removed")
        assert gone["change"] == "removed"
    finally:
        for process in (publisher, browser):
            stop(process)


def test_the_daemon_publishes_for_its_client_and_withdraws_on_unmap(
    lab: Lab, seer: LanHost, tmp_path: Path
) -> None:
    """``portbroker map --publish`` through a daemon on the first lan host: the
    daemon publishes on the interface of the mapping's internal address; the
    unmap withdraws it."""
    directory = Path(tempfile.mkdtemp(prefix="pbl-"))  # a short path for the socket
    sock = directory / "pb.sock"
    port = 24081
    daemon = spawn(
        lab,
        lab.lan_ns,
        "daemon",
        "--socket",
        str(sock),
        "--state",
        str(directory / "state.json"),
        "--gateway",
        str(GATEWAY_ADDRESS),
        "--grace",
        "1",
    )
    browser = spawn(lab, seer.ns, "browse", SERVICE, "--interface", str(seer.address), "--json")
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert daemon.poll() is None, stop(daemon)
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)

        def client(*args: str) -> list[dict[str, Any]]:
            argv = lab.exec_argv(lab.lan_ns, [*PORTBROKER, *args, "--socket", str(sock), "--json"])
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            return [json.loads(line) for line in done.stdout.splitlines()]

        mapped, published = client(
            "map", f"{port}/tcp", "--publish", f"{SERVICE}:lab-daemon", "--txt", "via=daemon"
        )
        assert published["event"] == "Published"
        assert published["mapping"] == f"{port}/tcp"
        seen = Lines(browser)
        peer = seen.until(lambda e: e.get("name") == "lab-daemon")
        assert peer["internal"] == [f"{lab.lan_hosts[0].address}:{port}"]
        assert peer["external"] == f"{mapped['external_address']}:{mapped['external_port']}"
        assert peer["txt"]["via"] == "daemon"
        print(f"browser saw the daemon's publication {peer['external']} via {peer['method']}")

        client("unmap", f"{port}/tcp")
        gone = seen.until(lambda e: e.get("name") == "lab-daemon" and e.get("change") == "removed")
        assert gone["change"] == "removed"
        err = stop(daemon)
        assert daemon.returncode == 0, err
    finally:
        for process in (daemon, browser):
            stop(process)
        shutil.rmtree(directory, ignore_errors=True)
