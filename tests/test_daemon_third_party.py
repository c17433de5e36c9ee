"""A root daemon maps for another lan host only for root and a configured group.

Real users and groups (created by the fixture, removed afterwards) run their
clients with setpriv, as in tests/test_daemon_policy.py; the daemon is a
process on a FakeGateway process (PCP on 127.0.0.1), which allows THIRD_PARTY.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.test_daemon_policy import as_user
from tests.test_daemon_processes import short_dir, start_daemon, stop

__all__ = ["short_dir"]  # the fixture, re-used

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv to create users and run clients as them",
)

CAMERA = "192.168.77.3"


@attrs.frozen
class Users:
    carol: str  # in the socket's group and the third-party group
    dave: str  # in the socket's group only
    sock_group: str
    third_group: str


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    tag = f"{os.getpid() % 100000:05d}"
    made = Users(f"pbt-c{tag}", f"pbt-d{tag}", f"pbt-t{tag}", f"pbt-3{tag}")
    groups: list[str] = []
    people: list[str] = []
    try:
        for group in (made.sock_group, made.third_group):
            _run("groupadd", "--system", group)
            groups.append(group)
        for name, extra in (
            (made.carol, f"{made.sock_group},{made.third_group}"),
            (made.dave, made.sock_group),
        ):
            _run(
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--groups",
                extra,
                name,
            )
            people.append(name)
        yield made
    finally:
        for name in people:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        for group in groups:
            subprocess.run(["groupdel", group], check=False, capture_output=True)


def test_third_party_maps_are_for_root_and_the_third_party_group(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    sock = short_dir / "pb.sock"
    camera = {"internal_address": CAMERA, "lifetime": 600}
    # Without --third-party-group: root only.
    daemon = start_daemon(short_dir, gateway_port, "--group", users.sock_group)
    try:
        carol = as_user(
            users.carol,
            sock,
            ("map", {"port": 8554, **camera}),
            ("map", {"port": 8555}),  # her own port still maps
        )
        assert carol[0]["code"] == "third_party_forbidden"
        assert "--third-party-group" in carol[0]["message"]
        assert carol[1]["ok"], carol
        root = as_user(
            "root",
            sock,
            ("map", {"port": 8556, "filters": ["11.0.0.2/32"], **camera}),
            ("list", {}),
            ("unmap", {"port": 8556}),
        )
        assert root[0]["ok"], root
        assert root[0]["mapping"]["internal_address"] == CAMERA
        assert root[0]["mapping"]["filters"] == ["11.0.0.2/32"]
        assert root[2]["ok"], root
    finally:
        stop(daemon)
    # With it: the group's members, and nobody else.
    daemon = start_daemon(
        short_dir,
        gateway_port,
        "--group",
        users.sock_group,
        "--third-party-group",
        users.third_group,
    )
    try:
        # 554 is below 1024: the camera's port, not this host's, so the
        # privileged-port rule (this host's services) does not apply.
        carol = as_user(
            users.carol,
            sock,
            ("map", {"port": 554, **camera}),
            ("map", {"port": 554}),  # the same port for this host: a clash, not a join
            ("list", {}),
            ("unmap", {"port": 554}),
        )
        assert carol[0]["ok"], carol
        assert carol[0]["mapping"]["internal_address"] == CAMERA
        assert carol[1]["code"] == "conflict"
        assert f"already mapped for {CAMERA}" in carol[1]["message"]
        assert [m["internal_address"] for m in carol[2]["mappings"]] == [CAMERA]
        assert carol[3]["ok"]
        dave = as_user(
            users.dave,
            sock,
            ("map", {"port": 8557, **camera}),
            ("map", {"port": 8557, "internal_address": "camera"}),
        )
        assert dave[0]["code"] == "third_party_forbidden"
        assert dave[1]["code"] == "bad_request"
    finally:
        stop(daemon)


def _listed(name: str, sock: Path) -> list[dict[str, object]]:
    """``list`` as *name*, once nothing is being restored any more."""
    deadline = time.monotonic() + 60
    while True:
        (reply,) = as_user(name, sock, ("list", {}))
        mappings: list[dict[str, object]] = reply["mappings"]
        if all(m["state"] != "restoring" for m in mappings) or time.monotonic() > deadline:
            return mappings
        time.sleep(0.2)


def test_a_restart_keeps_whose_host_a_mapping_is_for_and_its_policy(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    sock = short_dir / "pb.sock"
    allowed = ("--group", users.sock_group, "--third-party-group", users.third_group)
    daemon = start_daemon(short_dir, gateway_port, *allowed)
    try:
        carol = as_user(
            users.carol,
            sock,
            ("map", {"port": 554, "internal_address": CAMERA, "persist": True}),
            ("map", {"port": 8600, "persist": True}),
        )
        assert all(r["ok"] for r in carol), carol
    finally:
        stop(daemon)  # SIGKILL: the state file is all the next start has
    record = next(
        r
        for r in json.loads((short_dir / "state.json").read_text())["mappings"]
        if r["internal_port"] == 554
    )
    assert record["third_party"] is True
    daemon = start_daemon(short_dir, gateway_port, *allowed)
    try:
        listed = _listed(users.carol, sock)
        assert {m["id"]: m["internal_address"] for m in listed}["554/tcp"] == CAMERA
        # Still the camera's: this host's own 554 is a clash, not a join.
        (clash,) = as_user(users.carol, sock, ("map", {"port": 554}))
        assert clash["code"] == "conflict"
        assert CAMERA in clash["message"]
        # And this host's own 8600 is still this host's: joining it works.
        (join,) = as_user(users.carol, sock, ("map", {"port": 8600}))
        assert join["ok"], join
    finally:
        stop(daemon)
    # A daemon whose policy no longer lets her map for other hosts deletes it.
    daemon = start_daemon(short_dir, gateway_port, "--group", users.sock_group)
    try:
        assert [m["id"] for m in _listed(users.carol, sock)] == ["8600/tcp"]
    finally:
        stop(daemon)


def test_an_unknown_third_party_group_stops_the_daemon_with_its_name(short_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "portbroker.cli",
            "daemon",
            "--socket",
            str(short_dir / "pb.sock"),
            "--state",
            str(short_dir / "state.json"),
            "--gateway",
            "127.0.0.1",
            "--third-party-group",
            "pbt-no-such-group",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode != 0
    assert "no such group 'pbt-no-such-group' (--third-party-group)" in done.stderr
    assert "Traceback" not in done.stderr
