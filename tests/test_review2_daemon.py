"""Adversarial review 2 (issue 8): the daemon's parts together, in-process.

A real Unix socket and FakeGateway in memory, as tests/test_daemon.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

from portbroker.client import open_client
from portbroker.daemon import server
from portbroker.testing import FakeGateway
from portbroker.wire import pcp
from tests.test_daemon import _wait_for, running, short_dir

__all__ = ["short_dir"]  # the fixture, re-used


async def test_a_client_that_hung_up_while_its_maps_waited_for_anothers_is_rolled_back(
    short_dir: Path,
) -> None:
    # Maps of a port someone else is creating wait for that creation, then
    # join it. A client whose pipeline is full (IN_FLIGHT requests running:
    # its reader waits for a slot and reads nothing, so never sees a hang-up)
    # hangs up meanwhile: its maps were checked for a hang-up only before the
    # wait, so each then joined with a persisted hold, for nobody, for good.
    gateway = FakeGateway()
    key = ("tcp", 30500)
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.probe()  # a warm broker: the maps are the only requests
        gateway.delay = 1.0
        async with open_client(short_dir / "pb.sock") as first, trio.open_nursery() as nursery:
            nursery.start_soon(first.map, 30500, "tcp")

            def asked() -> bool:
                return any(
                    isinstance(r, pcp.PcpRequest) and isinstance(r.data, pcp.MapData)
                    for r in gateway.requests
                )

            await _wait_for(asked, "the first MAP to reach the gateway")
            lines = b"".join(
                b'{"id": %d, "op": "map", "port": 30500, "persist": true}\n' % n
                for n in range(server.IN_FLIGHT + 6)
            )
            stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
            await stream.send_all(lines)
            await _wait_for(lambda: daemon.owners.connections(0) == 2, "the second client")
            await trio.testing.wait_all_tasks_blocked()  # its maps wait for the first's
            await stream.aclose()  # gone before any answer
        # The first map is done; the hung-up client's maps must have left nothing.
        await _wait_for(lambda: daemon.owners.connections(0) == 0, "both to be gone")
        await trio.testing.wait_all_tasks_blocked()
        entry = daemon.shared.get(key)
        assert entry is None or not any(h.persist for h in entry.holds), entry
        await daemon.synced()
        records = json.loads((short_dir / "state.json").read_text())["mappings"]
        assert not any(h["persist"] for r in records for h in r["holds"]), records
