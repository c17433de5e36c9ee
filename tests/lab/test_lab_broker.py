"""The broker and the CLI against a real miniupnpd, proven from the wan side.

Both run as separate processes inside the lab's lan namespace (``ip netns
exec``), exactly as an app on a LAN host would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import EXTERNAL_ADDRESS, GATEWAY_ADDRESS, Lab, Variant, open_lab
from tests.lab.helpers import connect_from_wan, lines_of, listen_in_lan

AGENT = Path(__file__).with_name("agent.py")
PORTBROKER = [sys.executable, "-m", "portbroker.cli"]


def cli(lab: Lab, *args: str, state: Path) -> subprocess.CompletedProcess[str]:
    argv = lab.exec_argv(
        lab.lan_ns,
        [*PORTBROKER, *args, "--gateway", str(GATEWAY_ADDRESS), "--state-file", str(state)],
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("lab_fixture", "selected"),
    [
        ("lab_full", "pcp"),
        ("lab_upnp_only", "upnp"),
        ("lab_pcp_natpmp_only", "pcp"),
        ("lab_no_service", None),
    ],
)
def test_probe_picks_the_best_method(
    lab_fixture: str, selected: str | None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    lab: Lab = request.getfixturevalue(lab_fixture)
    done = cli(lab, "probe", "--json", state=tmp_path / "s")
    assert done.returncode == (0 if selected else 1), done.stderr
    report = json.loads(done.stdout)
    assert report["selected"] == selected
    if selected is not None:
        assert report["methods"][selected]["available"]


@pytest.mark.parametrize(
    ("lab_fixture", "method", "port"),
    [
        ("lab_full", "pcp", 21001),
        ("lab_upnp_only", "upnp", 21002),
        ("lab_pcp_natpmp_only", "pcp", 21003),
    ],
)
def test_cli_map_then_unmap(
    lab_fixture: str, method: str, port: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    lab: Lab = request.getfixturevalue(lab_fixture)
    state = tmp_path / "state.json"
    with listen_in_lan(lab, port) as listener:
        done = cli(lab, "map", f"{port}/tcp", "--json", "--lifetime", "600", state=state)
        assert done.returncode == 0, done.stderr + lab.log_text()
        mapped = json.loads(done.stdout)
        assert mapped["method"] == method
        assert mapped["external_address"] == str(EXTERNAL_ADDRESS)
        assert connect_from_wan(lab, listener, mapped["external_port"]) == b"inside says hello"

        done = cli(lab, "unmap", f"{port}/tcp", state=state)
        assert done.returncode == 0, done.stderr
        with pytest.raises(ConnectionRefusedError):
            connect_from_wan(lab, listener, mapped["external_port"])


def test_cli_with_no_service_fails_clearly(lab_no_service: Lab, tmp_path: Path) -> None:
    done = cli(lab_no_service, "map", "21004/tcp", state=tmp_path / "s")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pcp" in lines[0]
    assert "upnp" in lines[0]


@contextmanager
def agent(
    lab: Lab, port: int, methods: str = "pcp,natpmp,upnp", lifetime: int = 600
) -> Iterator[subprocess.Popen[str]]:
    argv = lab.exec_argv(
        lab.lan_ns,
        [sys.executable, str(AGENT), str(GATEWAY_ADDRESS), str(port), methods, str(lifetime)],
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
        yield process
    finally:
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def next_event(
    process: subprocess.Popen[str], *wanted: str, timeout: float = 90.0
) -> dict[str, Any]:
    """The agent's next event of a *wanted* kind; fails (never hangs) after *timeout*."""
    # lines_of: select() on a buffered text stream misses lines readline()
    # already pulled in (two events in one read).
    lines = lines_of(process)
    deadline = time.monotonic() + timeout
    while True:
        line = lines.next(deadline - time.monotonic())
        if line is None:
            raise AssertionError(f"no {wanted} event from the agent within {timeout:g} s")
        if not line:
            assert process.stderr is not None
            raise AssertionError(f"agent ended before {wanted}: {process.stderr.read()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] in wanted:
            return event


def test_api_mapping_survives_a_gateway_restart(fresh_lab: Lab) -> None:
    port = 21005
    with listen_in_lan(fresh_lab, port) as listener, agent(fresh_lab, port) as process:
        mapped = next_event(process, "Mapped", "Error")
        assert mapped["event"] == "Mapped", mapped
        assert mapped["method"] == "pcp"
        assert connect_from_wan(fresh_lab, listener, mapped["external_port"])

        # A real reboot takes seconds; the epoch rule (RFC 6887 §8.5) cannot
        # tell a restart from jitter within its 2 s tolerance, so let the
        # epoch grow past it before restarting.
        time.sleep(3.5)
        fresh_lab.restart_miniupnpd()  # mappings gone, epoch back to 0, ANNOUNCE sent
        lost = next_event(process, "Lost")
        assert "epoch" in lost["detail"]
        next_event(process, "Restored")
        assert connect_from_wan(fresh_lab, listener, mapped["external_port"]) == (
            b"inside says hello"
        )

        assert process.stdin is not None
        process.stdin.close()
        released = next_event(process, "Released")
        assert "confirmed=True" in released["detail"]
        next_event(process, "Done")
    with pytest.raises(ConnectionRefusedError):
        connect_from_wan(fresh_lab, listener, mapped["external_port"])


def test_api_upnp_mapping_is_restored_at_renewal_after_a_restart(tmp_path: Path) -> None:
    # UPnP has no epoch: the loss shows at the next renewal, when the entry is
    # missing from GetSpecificPortMappingEntry. A 20 s lease renews within ~12 s.
    port = 21006
    with (
        open_lab(Variant.UPNP_ONLY, workdir=tmp_path) as lab,
        listen_in_lan(lab, port) as listener,
        agent(lab, port, "upnp", lifetime=20) as process,
    ):
        mapped = next_event(process, "Mapped", "Error")
        assert mapped["method"] == "upnp", mapped
        assert connect_from_wan(lab, listener, mapped["external_port"])
        lab.restart_miniupnpd()
        with pytest.raises(ConnectionRefusedError):
            connect_from_wan(lab, listener, mapped["external_port"])
        lost = next_event(process, "Lost")
        assert "vanished" in lost["detail"]
        next_event(process, "Restored")
        assert connect_from_wan(lab, listener, mapped["external_port"]) == b"inside says hello"


def test_readme_demo_shows_an_inbound_connection() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "portbroker.testing.lab", "demo", "--port", "21007"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "portbroker map 21007/tcp" in done.stdout
    assert "via pcp: inbound connection OK" in done.stdout
    assert "deleted 192.168.77.2:21007/tcp" in done.stdout
    assert "lab torn down" in done.stdout
