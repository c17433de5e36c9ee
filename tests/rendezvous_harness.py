"""What the zeroconf tests share: a network namespace of their own, and waiting.

No test sends mDNS on this machine's interfaces: every test that starts
zeroconf runs its whole trio run on a thread that joined a namespace that has
only ``lo`` (threads it starts, zeroconf's among them, are in it too), with
zeroconf bound to 127.0.0.1 in it. Binding to 127.0.0.1 alone would not be
enough in the root namespace: zeroconf's shared listening socket is bound to
0.0.0.0:5353, and a unicast query is answered through the socket it came in on
(zeroconf/_handlers/query_handler.py), so a query from the LAN to this host
would be answered on the LAN. In a namespace of its own there is no LAN.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from portbroker.testing.lab import in_netns

LOOPBACK = ["127.0.0.1"]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: zeroconf runs in a network namespace of its own")
    name = f"pbdnssd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_isolated(netns: str, main: Callable[[], Awaitable[None]]) -> None:
    """The whole trio run (and every thread it starts: zeroconf's) in *netns*."""
    in_netns(netns, lambda: trio.run(main))


async def until(predicate: Callable[[], bool], limit: float = 15.0) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - zeroconf's thread changes what we read
            await trio.sleep(0.05)
