"""The daemon in the lab's lan namespace, shared by two apps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portbroker.client import BlockingClient
from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from tests.lab.helpers import connect_from_wan, listen_in_lan


def wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            BlockingClient(path).close()
            return
        except Exception as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                assert process.stderr is not None
                raise AssertionError(f"daemon did not start: {process.stderr.read()!r}") from exc
            time.sleep(0.1)


def test_two_apps_share_the_daemon_and_survive_a_gateway_restart(fresh_lab: Lab) -> None:
    directory = Path(tempfile.mkdtemp(prefix="pbl-"))
    sock = directory / "pb.sock"
    daemon = subprocess.Popen(
        fresh_lab.exec_argv(
            fresh_lab.lan_ns,
            [
                sys.executable,
                "-m",
                "portbroker.cli",
                "daemon",
                "--socket",
                str(sock),
                "--state",
                str(directory / "state.json"),
                "--gateway",
                str(GATEWAY_ADDRESS),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, daemon)
        with (
            listen_in_lan(fresh_lab, 22001) as first_listener,
            listen_in_lan(fresh_lab, 22002) as second_listener,
            BlockingClient(sock) as first_app,
            BlockingClient(sock) as second_app,
            BlockingClient(sock) as watcher,
        ):
            first = first_app.map(22001, "tcp", lifetime=600)
            second = second_app.map(22002, "tcp", lifetime=600)
            assert first["method"] == second["method"] == "pcp"
            assert connect_from_wan(fresh_lab, first_listener, first["external_port"])
            assert connect_from_wan(fresh_lab, second_listener, second["external_port"])

            events = watcher.watch()
            time.sleep(3.5)  # let the epoch pass the RFC 6887 §8.5 tolerance
            fresh_lab.restart_miniupnpd()
            restored: set[str] = set()
            deadline = time.monotonic() + 60
            while restored != {"22001/tcp", "22002/tcp"} and time.monotonic() < deadline:
                event = next(events)
                if event["event"] == "Restored":
                    restored.add(event["mapping"]["id"])
            assert restored == {"22001/tcp", "22002/tcp"}, fresh_lab.log_text()
            assert connect_from_wan(fresh_lab, first_listener, first["external_port"])
            assert connect_from_wan(fresh_lab, second_listener, second["external_port"])
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            if daemon.stderr is not None:
                daemon.stderr.close()
            shutil.rmtree(directory, ignore_errors=True)
