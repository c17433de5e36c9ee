"""Clients of the portbroker daemon: one for trio, one for blocking code.

    async with portbroker.client.open_client() as client:
        mapping = await client.map(8080, "tcp")
        async for event in client.watch(): ...

    with portbroker.client.BlockingClient() as client:
        print(client.map(8080, "tcp", persist=True))

They live with the daemon they talk to, in :mod:`portbroker.daemon.client`;
this module keeps the public names where applications import them.
"""

from __future__ import annotations

from portbroker.daemon.client import (
    ENV_SOCKET,
    BlockingClient,
    Client,
    DaemonAccessDenied,
    DaemonNotRunning,
    DaemonProtocolError,
    DaemonRequestError,
    open_client,
    socket_path,
)

__all__ = [
    "ENV_SOCKET",
    "BlockingClient",
    "Client",
    "DaemonAccessDenied",
    "DaemonNotRunning",
    "DaemonProtocolError",
    "DaemonRequestError",
    "open_client",
    "socket_path",
]
