"""Adversarial cases for the network monitor's netlink reader (issue 11 review).

Only netlink sockets of this process are used: one stands in for another
local user's process and forges route messages to the monitor's socket;
the kernel is only asked for a link dump (a read). Nothing reaches the
network.
"""

from __future__ import annotations

import socket
import sys
from ipaddress import IPv4Address

import pytest
import trio
import trio.testing

from portbroker import netmon_wire as wire
from portbroker.netmon import NetlinkSource, open_network_monitor
from tests.test_netmon import HOME, OFFICE, ScriptedSource

linux_only = pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(socket, "AF_NETLINK"), reason="rtnetlink is Linux's"
)


def _netlink() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    sock.bind((0, 0))
    return sock


@linux_only
async def test_a_route_message_forged_by_a_local_process_is_ignored() -> None:
    source = NetlinkSource()
    # Subscribed to no group: only unicasts arrive, the forged ones and the
    # kernel's answer to our own dump request (the control).
    listener = _netlink()
    source._socket = listener
    port = listener.getsockname()[0]
    pokes: list[float] = []
    poked = trio.Event()

    def poke() -> None:
        pokes.append(trio.current_time())
        poked.set()

    forged = wire.encode_route(
        wire.RouteRecord(
            wire.Change.NEW,
            wire.AF_INET,
            0,
            wire.RT_TABLE_MAIN,
            wire.RTN_UNICAST,
            0,
            IPv4Address("192.0.2.66"),
            1,
            0,
        )
    )
    with _netlink() as attacker, _netlink() as witness:
        # The forgery does get through to a netlink socket, with its sender's port id.
        attacker.sendto(forged, (witness.getsockname()[0], 0))
        data, sender = witness.recvfrom(1 << 16)
        assert (data, sender[0]) == (forged, attacker.getsockname()[0])
        async with trio.open_nursery() as nursery:
            await nursery.start(source.watch, poke)
            for _ in range(50):
                attacker.sendto(forged, (port, 0))
            await trio.sleep(0.3)
            assert pokes == []  # 50 forged default routes: not one sign of change
            listener.send(wire.dump_request(wire.RTM_GETLINK, 9))  # the kernel answers
            with trio.fail_after(5):
                await poked.wait()
            nursery.cancel_scope.cancel()
    source.close()


async def test_wifi_chatter_costs_one_dump_per_max_delay_and_a_real_change_still_comes_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(HOME)
    async with open_network_monitor(quiet=1.0, max_delay=5.0, source=source) as monitor:
        batches: list[float] = []

        async def consume() -> None:
            async for _batch in monitor.batches():
                batches.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for _ in range(1200):  # RTM_NEWLINK every 50 ms for a minute, nothing changing
                source.set(HOME)
                await trio.sleep(0.05)
            assert batches == []
            assert source.snapshots_taken <= 1 + 60 / 5.0 + 1
            moved = trio.current_time()
            source.set(OFFICE)  # the chatter goes on; the move must still be seen
            for _ in range(200):
                source.set(OFFICE)
                await trio.sleep(0.05)
            assert len(batches) == 1
            assert moved < batches[0] <= moved + 5.0 + 0.01  # within max_delay
            nursery.cancel_scope.cancel()
