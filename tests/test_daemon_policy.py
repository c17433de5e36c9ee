"""Who may map what, and limits per user: a root daemon process and real users.

The users and groups are created by the fixture (and removed afterwards); the
clients run as them with setpriv, so SO_PEERCRED, group membership and file
permissions are the system's own, not simulated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import first_line
from tests.test_daemon_processes import ROOT, short_dir, start_daemon, stop

__all__ = ["short_dir"]  # the fixture, re-used

PYTHON = sys.executable
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv to create users and run clients as them",
)


@attrs.frozen
class Users:
    alice: str  # in the socket's group and in the privileged group
    bob: str  # in the socket's group only
    sock_group: str
    priv_group: str


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    tag = f"{os.getpid() % 100000:05d}"
    made = Users(f"pbt-a{tag}", f"pbt-b{tag}", f"pbt-s{tag}", f"pbt-p{tag}")
    groups: list[str] = []
    people: list[str] = []
    try:
        for group in (made.sock_group, made.priv_group):
            _run("groupadd", "--system", group)
            groups.append(group)
        for name, extra in (
            (made.alice, f"{made.sock_group},{made.priv_group}"),
            (made.bob, made.sock_group),
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


CLIENT = textwrap.dedent(
    """
    import json, sys
    from portbroker.client import BlockingClient, DaemonRequestError
    socket_path, script = sys.argv[1], json.loads(sys.argv[2])
    out = []
    with BlockingClient(socket_path, timeout=60) as client:
        for op, params in script:
            try:
                reply = client.request(op, **params)
                out.append({"ok": True, **{k: v for k, v in reply.items() if k != "id"}})
            except DaemonRequestError as exc:
                out.append({"ok": False, "code": exc.code, "message": exc.message})
    print(json.dumps(out))
    """
)


def as_user(name: str, socket_path: Path, *script: tuple[str, dict[str, Any]]) -> list[Any]:
    """Run *script* (ops and parameters) as user *name*; its replies, in order."""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={name}",
            f"--regid={name}",
            "--init-groups",
            PYTHON,
            "-c",
            CLIENT,
            str(socket_path),
            json.dumps(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    replies: list[Any] = json.loads(done.stdout)
    return replies


def test_privileged_ports_are_roots_unless_the_daemon_allows_them(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    # Before issue 8 any user on the socket could map 22/tcp through the root
    # daemon: sshd exposed to the internet by an unprivileged account.
    sock = short_dir / "pb.sock"
    daemon = start_daemon(short_dir, gateway_port, "--group", users.sock_group)
    try:
        bob = as_user(
            users.bob,
            sock,
            ("map", {"port": 22, "protocol": "tcp", "lifetime": 600}),
            ("map", {"port": 53, "protocol": "udp", "lifetime": 600}),
            ("map", {"port": 8022, "protocol": "tcp", "lifetime": 600}),
            ("list", {}),
        )
        assert [r.get("code") for r in bob[:2]] == ["privileged_port", "privileged_port"]
        assert "--allow-privileged-ports" in bob[0]["message"]
        assert bob[2]["ok"]
        assert [m["id"] for m in bob[3]["mappings"]] == ["8022/tcp"]
    finally:
        stop(daemon)
    # Members of a named group may.
    daemon = start_daemon(
        short_dir, gateway_port, "--group", users.sock_group, "--privileged-group", users.priv_group
    )
    try:
        alice = as_user(users.alice, sock, ("map", {"port": 53, "protocol": "udp"}))
        bob = as_user(users.bob, sock, ("map", {"port": 80, "protocol": "tcp"}))
        assert alice[0]["ok"], alice
        assert alice[0]["mapping"]["id"] == "53/udp"
        assert bob[0]["code"] == "privileged_port"
    finally:
        stop(daemon)
    # And everyone may, when the administrator says so.
    daemon = start_daemon(
        short_dir, gateway_port, "--group", users.sock_group, "--allow-privileged-ports"
    )
    try:
        bob = as_user(users.bob, sock, ("map", {"port": 443, "protocol": "tcp"}))
        assert bob[0]["ok"], bob
    finally:
        stop(daemon)


def test_conflicts_name_neither_the_other_user_nor_their_ports(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    sock = short_dir / "pb.sock"
    daemon = start_daemon(short_dir, gateway_port, "--group", users.sock_group)
    try:
        alice_uid = str(int(subprocess.check_output(["id", "-u", users.alice], text=True)))
        alice = as_user(
            users.alice,
            sock,
            ("map", {"port": 7200, "external_port": 9999, "persist": True}),
        )
        assert alice[0]["ok"], alice
        bob = as_user(
            users.bob,
            sock,
            ("map", {"port": 7200}),  # her endpoint
            ("map", {"port": 7300, "external_port": 9999}),  # her external port
            ("unmap", {"port": 7200}),
        )
        assert [r.get("code") for r in bob] == ["conflict", "conflict", "not_found"]
        for reply in bob:
            # Before issue 8: "7200/tcp is mapped by another user (uid 999)" and
            # "external port 9999/tcp already maps to 7200/tcp".
            assert not re.search(rf"\b{alice_uid}\b", reply["message"]), reply
            assert users.alice not in reply["message"], reply
        assert "9999" not in bob[0]["message"]
        assert "7200" not in bob[1]["message"]
    finally:
        stop(daemon)


FLOOD = textwrap.dedent(
    """
    import resource, socket, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(sys.argv[1])
        except OSError:
            s.close()
            continue
        held.append(s)
    print(len(held), flush=True)
    sys.stdin.readline()
    """
)


def test_one_users_connection_flood_costs_nobody_else_a_mapping(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    # The shipped unit set no LimitNOFILE: with the default soft limit of
    # 1,024, about a thousand idle connections from one user made the daemon
    # fail accept() with EMFILE for everyone, and its state file writes too.
    sock = short_dir / "pb.sock"
    prlimit = shutil.which("prlimit")
    assert prlimit is not None
    daemon = start_daemon(
        short_dir,
        gateway_port,
        "--group",
        users.sock_group,
        wrapper=(prlimit, "--nofile=1024:1024"),
    )
    flood = None
    try:
        # Alice's persisted mapping is made before her flood...
        alice = as_user(users.alice, sock, ("map", {"port": 7500, "persist": True}))
        assert alice[0]["ok"], alice
        flood = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={users.alice}",
                f"--regid={users.alice}",
                "--init-groups",
                PYTHON,
                "-c",
                FLOOD,
                str(sock),
                "1100",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert int(first_line(flood, "the flood")) > 0
        # ...and while her 1,100 connections are open, bob is served.
        bob = as_user(
            users.bob,
            sock,
            ("map", {"port": 7600, "persist": True}),
            ("list", {}),
        )
        assert bob[0]["ok"], bob
        assert [m["id"] for m in bob[1]["mappings"]] == ["7600/tcp"]
        # Both acknowledged maps are on disk.
        saved = json.loads((short_dir / "state.json").read_text())
        assert sorted(r["internal_port"] for r in saved["mappings"]) == [7500, 7600]
        # She herself was told why her extra connections were closed.
        over = as_user(users.alice, sock, ("list", {}))
        assert over[0].get("code") == "too_many_connections", over
    finally:
        if flood is not None:
            if flood.poll() is None:
                flood.kill()
            flood.wait(timeout=10)
            for pipe in (flood.stdin, flood.stdout):
                if pipe is not None:
                    pipe.close()
        stop(daemon)


def test_the_daemon_raises_its_open_file_limit(short_dir: Path, gateway_port: int) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None
    daemon = start_daemon(short_dir, gateway_port, wrapper=(prlimit, "--nofile=1024:8192"))
    try:
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert (soft, hard) == ("8192", "8192"), line
    finally:
        stop(daemon)


def _wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30  # a guard, not a measurement
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within 30 s"
        time.sleep(0.05)
