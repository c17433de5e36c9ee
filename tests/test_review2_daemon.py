"""Adversarial review 2 (issue 8): the daemon's parts together, in-process.

A real Unix socket and FakeGateway in memory, as tests/test_daemon.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio
import trio.testing

from portbroker.client import open_client
from portbroker.daemon import framing, server
from portbroker.daemon.client import ClientCore, access_denied
from portbroker.daemon.protocol import MAX_LINE
from portbroker.testing import FakeGateway
from portbroker.wire import pcp
from tests.test_daemon import _wait_for, running, short_dir
from tests.test_daemon_restore import mock_time, record, write_state
from tests.test_daemon_restore import running as restore_running

__all__ = ["mock_time", "short_dir"]  # the fixtures, re-used


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


async def test_root_lists_more_mappings_than_fit_in_a_request_line(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # Requests are bounded at 64 KiB a line, and the clients applied the same
    # bound to the daemon's replies: a `list` of a few hundred mappings (root
    # sees every user's: 4 users at the default 64 each) is one longer line,
    # and `portbroker list` said "the daemon sent a line over 65536 bytes; is
    # this a portbroker daemon?" instead of listing them.
    count = 400
    write_state(short_dir, [record(20000 + n) for n in range(count)])
    async with restore_running(short_dir, FakeGateway(drop_rate=1.0)) as daemon:
        assert len(daemon.shared) == count
        async with open_client(short_dir / "pb.sock") as client:
            listed = await client.list()
        assert len(listed) == count
        assert len(json.dumps({"mappings": listed})) > MAX_LINE
    # The blocking client reads with the same core.
    core = ClientCore()
    request_id, _line = core.request("list", {})
    reply = framing.encode({"id": request_id, "ok": True, "mappings": listed})
    (answer,) = core.receive(reply)
    assert answer.message["mappings"] == listed


def test_access_denied_advises_a_group_only_where_the_group_has_access(short_dir: Path) -> None:
    # A daemon started without --group has a 0600 socket: the error told a
    # user who may not use it to "ask the administrator to add you to group
    # 'root'", which would not help (the group has no access) and would hand
    # them root's group.
    path = short_dir / "owner-only.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
        error = access_denied(path)
        assert error.group is None
        assert "add you to group" not in str(error)
        assert "only its owner" in str(error)
        path.chmod(0o660)  # with --group: joining it is the way
        assert access_denied(path).group is not None
        assert "add you to group" in str(access_denied(path))
    finally:
        sock.close()


async def test_a_watcher_that_never_reads_is_cut_off_and_harms_no_one(short_dir: Path) -> None:
    # A `watch` connection that never reads while another app's mappings churn:
    # its queue fills (OUTBOX), it is disconnected, and the churning app is
    # served throughout.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        stuck = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        stuck.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stuck.send_all(b'{"id": 1, "op": "watch"}\n')
        await _wait_for(lambda: any(c.watching for c in daemon.clients), "the watch")
        (watcher,) = [c for c in daemon.clients if c.watching]
        async with open_client(short_dir / "pb.sock") as client:
            for n in range(1200):
                await client.map(32000 + n % 50, "tcp")
                await client.unmap(32000 + n % 50, "tcp")
                if watcher.cut_off:
                    break
            assert watcher.cut_off
            await _wait_for(lambda: watcher not in daemon.clients, "the watcher to be gone")
            assert await client.list() == []
        await stuck.aclose()
