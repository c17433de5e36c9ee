"""Where the daemon's socket is (docs/daemon-protocol.md), without the daemon.

Clients need these paths too, and must not import :mod:`portbroker.daemon.server`
for them: it imports the broker and trio, most of the time of a short
``portbroker list`` (benchmarks/cli_daemon.py). The server re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from portbroker.errors import PortBrokerError

__all__ = [
    "ENV_SOCKET",
    "SYSTEM_SOCKET_PATH",
    "NoSocketPath",
    "connect_socket_path",
    "default_socket_path",
    "user_socket_path",
]

ENV_SOCKET: Final = "PORTBROKER_SOCKET"  # the socket path, for clients and the daemon
SYSTEM_SOCKET_PATH: Final = Path("/run/portbroker/portbroker.sock")


class NoSocketPath(PortBrokerError):
    """There is nowhere to look for (or put) a user's daemon socket."""


def user_socket_path() -> Path:
    """A user's own daemon: ``$XDG_RUNTIME_DIR/portbroker.sock``, else under ~/.cache.

    ``$XDG_RUNTIME_DIR`` counts only when it is absolute and, if it exists,
    the user's own and writable by nobody else (the XDG Base Directory
    specification's rules for it): in /tmp, say, another user could have put
    a socket there first, and every command would tell that user's program
    which ports to map and believe its answers. The daemon binds where clients
    look, so both skip it alike.

    Raises:
        NoSocketPath: no usable $XDG_RUNTIME_DIR and no home directory.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if _private_directory(runtime):
        return Path(runtime) / "portbroker.sock"
    # No per-user runtime directory (no systemd login session): a private one.
    return _home() / ".cache" / "portbroker" / "portbroker.sock"


def _private_directory(text: str) -> bool:
    if not os.path.isabs(text):
        return False  # unset, or relative: a socket that moves with the cwd
    try:
        info = os.stat(text)
    except FileNotFoundError:
        return True  # the daemon makes it (its own, then)
    except OSError:
        return False
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _home() -> Path:
    """$HOME when it is absolute, else the password database's home."""
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        import pwd

        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:
            home = ""
    if not os.path.isabs(home):
        raise NoSocketPath(
            "no socket path for a user's daemon: $XDG_RUNTIME_DIR is not set (or not a"
            " private directory of yours) and there is no home directory; give one with"
            f" --socket PATH or ${ENV_SOCKET}"
        )
    return Path(home)


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
