"""Where the daemon's socket is (docs/daemon-protocol.md), without the daemon.

Clients need these paths too, and must not import :mod:`portbroker.daemon.server`
for them: it imports the broker and trio, most of the time of a short
``portbroker list`` (benchmarks/cli_daemon.py). The server re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = [
    "ENV_SOCKET",
    "SYSTEM_SOCKET_PATH",
    "connect_socket_path",
    "default_socket_path",
    "user_socket_path",
]

ENV_SOCKET: Final = "PORTBROKER_SOCKET"  # the socket path, for clients and the daemon
SYSTEM_SOCKET_PATH: Final = Path("/run/portbroker/portbroker.sock")


def user_socket_path() -> Path:
    """A user's own daemon: ``$XDG_RUNTIME_DIR/portbroker.sock``, else under ~/.cache."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "portbroker.sock"
    # No per-user runtime directory (no systemd login session): a private one.
    return Path.home() / ".cache" / "portbroker" / "portbroker.sock"


def default_socket_path() -> Path:
    """Where a daemon started without ``--socket`` binds: :data:`SYSTEM_SOCKET_PATH`
    for root, :func:`user_socket_path` otherwise (a user's daemon never tries
    the system path, even when the system daemon runs).

    Clients look elsewhere first: :func:`connect_socket_path`.
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET_PATH
    return user_socket_path()


def connect_socket_path() -> Path:
    """Where a client connects by default: the system daemon's socket whenever it
    exists, for every user (the daemon the host shares); otherwise the user's
    own (:func:`user_socket_path`), or the system one for root.
    """
    try:
        SYSTEM_SOCKET_PATH.stat()
    except PermissionError:
        # Its directory is closed to us: the system daemon is there, and
        # connecting will say who may use it (DaemonAccessDenied).
        return SYSTEM_SOCKET_PATH
    except OSError:
        return default_socket_path()
    return SYSTEM_SOCKET_PATH
