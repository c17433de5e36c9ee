"""systemd socket activation: the daemon serves a socket passed as fd 3 (LISTEN_FDS)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from portbroker.client import BlockingClient

WRAPPER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "portbroker.cli", "daemon", *sys.argv[2:]])
"""


def test_socket_activation() -> None:
    directory = Path(tempfile.mkdtemp(prefix="pba-"))
    path = directory / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRAPPER,
            str(listener.fileno()),
            "--socket",
            str(directory / "unused.sock"),
            "--state",
            str(directory / "state.json"),
            "--gateway",
            "127.0.0.1",
            "--server-port",
            "9",
            "--methods",
            "pcp",
            "--no-announcements",
            "-q",
        ],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
    )
    listener.close()  # the daemon has its own copy
    try:
        with BlockingClient(path, timeout=30) as client:
            hello = client.hello()
        assert hello["version"] == 1
        assert not (directory / "unused.sock").exists()
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
