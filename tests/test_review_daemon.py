"""Adversarial review of the daemon's connection handling (issue 8), in-process.

A real Unix socket and FakeGateway in memory (as tests/test_daemon.py), or the
:class:`Daemon` alone where only its bookkeeping matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from portbroker.broker import Mapping
from portbroker.client import BlockingClient, DaemonRequestError, open_client
from portbroker.daemon import server
from portbroker.daemon.ownership import Peer
from portbroker.daemon.server import Client, Daemon, DaemonConfig
from portbroker.lifecycle import State
from portbroker.testing import FakeGateway
from portbroker.wire import pcp
from tests.test_daemon import _wait_for, map_asked, mock_time, running, short_dir

__all__ = ["mock_time", "short_dir"]  # the fixtures, re-used


async def test_a_hang_up_mid_map_and_a_short_grace_do_not_stop_the_daemon(
    short_dir: Path,
) -> None:
    # A client asks for a map through a slow gateway and hangs up: the broker
    # spends up to its RELEASE_TIMEOUT undoing the request. With a grace
    # period shorter than that, any grace-timer wake-up meanwhile (here:
    # another client leaving) found the reservation's hold expired and handed
    # the mapping-less entry to _drop, whose assertion stopped the daemon.
    gateway = FakeGateway()
    async with running(short_dir, gateway, grace=0.2) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.probe()  # a warm broker: the map is the only request
        gateway.delay = 1.5  # every answer, the undo's too, takes 1.5 s
        stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        await stream.send_all(b'{"id": 1, "op": "map", "port": 7402}\n')
        await _wait_for(map_asked(gateway, 7402), "the MAP to reach the gateway")
        await stream.aclose()  # gone before the answer
        await _wait_for(lambda: daemon.owners.connections(0) == 0, "the hang-up")
        await trio.sleep(0.4)  # past the grace period, the undo still in flight
        async with open_client(short_dir / "pb.sock") as other:
            await other.hello()
        # The daemon still serves, and the reservation ends with the undo.
        await _wait_for(lambda: ("tcp", 7402) not in daemon.shared, "the reservation to end")
        gateway.delay = 0.0
        async with open_client(short_dir / "pb.sock") as client:
            mapping = await client.map(7403, "tcp")
            assert mapping["id"] == "7403/tcp"
        assert gateway.mapping_for("tcp", 7402) is None


class _Stream:
    """Stands in for a client's socket: the bookkeeping under test never uses it."""


def _client(daemon: Daemon, peer: Peer, channels: list[Any]) -> Client:
    """A connection as serve_client admits it (after the limit checks)."""
    send, receive = trio.open_memory_channel[bytes](10)
    channels.append(receive)  # kept open: the shedding notice must not fail
    conn = daemon.owners.connect(peer)
    client = Client(peer.uid, peer.pid, _Stream(), send, trio.CancelScope(), conn)  # type: ignore[arg-type]
    daemon.clients.add(client)
    return client


async def test_a_burst_of_newcomers_sheds_the_busiest_user_each_time(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the connection limit a newcomer costs the user with the most
    # connections one of them. The victims' tasks end later (they must be
    # scheduled to unwind), so a burst of newcomers handled before that must
    # still see the counts as they are after each shedding, not shed the same
    # user again and again below another user's count.
    monkeypatch.setattr(server, "_fd_limit", lambda: server.FD_RESERVE + 16)
    config = DaemonConfig(socket_path=short_dir / "pb.sock", state_path=short_dir / "s.json")
    daemon = Daemon(config, broker=None, nursery=None)  # type: ignore[arg-type]
    assert daemon.max_clients == 16
    alice, bob, carol = Peer(1000, 100), Peer(1001, 200), Peer(1002, 300)
    channels: list[Any] = []
    for _ in range(10):
        _client(daemon, alice, channels)
    for _ in range(6):
        _client(daemon, bob, channels)
    shed: list[int] = []
    for _ in range(6):
        # serve_client for a newcomer, with no checkpoint between newcomers:
        # none of the victims has run its finally (disconnected) yet.
        before = set(daemon.clients)
        conn = daemon.owners.connect(carol)
        assert len(daemon.clients) >= daemon.max_clients
        assert daemon._shed(carol.uid), "a newcomer of a user with few connections was refused"
        (victim,) = before - daemon.clients
        # It is told why (its writer gets SHED_FLUSH to deliver it), then ends.
        assert victim.cancel.deadline <= trio.current_time() + server.SHED_FLUSH
        shed.append(victim.uid)
        send, receive = trio.open_memory_channel[bytes](10)
        channels.append(receive)
        daemon.clients.add(Client(carol.uid, carol.pid, _Stream(), send, trio.CancelScope(), conn))  # type: ignore[arg-type]
    served = {uid: sum(1 for c in daemon.clients if c.uid == uid) for uid in (1000, 1001, 1002)}
    # alice had 10, bob 6: alice gives up 4, then they take turns.
    assert abs(served[alice.uid] - served[bob.uid]) <= 1, (shed, served)
    for uid, count in served.items():
        assert daemon.owners.connections(uid) == count, (uid, shed, served)


async def test_a_client_refused_at_connect_is_told_why_in_reply_to_its_request(
    short_dir: Path,
) -> None:
    # Over its connection limit, a client was sent an error line without an
    # id and the connection closed at once: the blocking client's write then
    # failed (EPIPE) or its read was reset (ECONNRESET), a traceback for the
    # user, and a client that got the line could not match it to its request.
    gateway = FakeGateway()
    async with (
        running(short_dir, gateway, max_connections=1),
        open_client(short_dir / "pb.sock") as first,
    ):
        await first.hello()
        stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        async with stream:
            await stream.send_all(b'{"id": 7, "op": "list"}\n')
            buffer = b""
            with trio.fail_after(30):
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    buffer += chunk
        (line,) = buffer.splitlines()
        reply = json.loads(line)
        assert reply["id"] == 7
        assert reply["error"]["code"] == "too_many_connections"

        def blocking() -> str:
            with BlockingClient(str(short_dir / "pb.sock"), timeout=30) as client:
                try:
                    client.request("list")
                except DaemonRequestError as exc:
                    return exc.code
                return "served"

        assert await trio.to_thread.run_sync(blocking) == "too_many_connections"
        # Even after a flood of refused connections that never send a thing
        # (more than the daemon waits on at once), the next one is told.
        flood = [
            await trio.open_unix_socket(str(short_dir / "pb.sock"))
            for _ in range(server.MAX_REFUSING + 20)
        ]
        assert await trio.to_thread.run_sync(blocking) == "too_many_connections"
        for stream in flood:
            await stream.aclose()
        assert (await first.hello())["version"] == 1  # the first one is still served


async def test_a_mapping_the_gateway_refused_for_good_is_made_afresh_when_asked_again(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # The gateway refused to renew and then to re-create a mapping: it ended
    # in FAILED (the app heard a Failed event) but stayed in the registry, so
    # the app's next map of the same port "joined" the dead mapping and was
    # told ok, state "failed", with nothing on the gateway, for as long as
    # the daemon ran.
    gateway = FakeGateway()
    async with (
        running(short_dir, gateway) as daemon,
        open_client(short_dir / "pb.sock") as client,
    ):
        await client.map(7700, "tcp", lifetime=60)
        gateway.forced_result = int(pcp.ResultCode.NOT_AUTHORIZED)
        gateway.forced_natpmp_result = 2  # NAT-PMP's "not authorized" (RFC 6886 §3.5)
        mapping = cast(Mapping, daemon.shared[("tcp", 7700)].handle)
        with trio.fail_after(7200):  # virtual time: renewals, then re-creations
            while mapping.state is not State.FAILED:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(1)
        gateway.forced_result = gateway.forced_natpmp_result = None
        again = await client.map(7700, "tcp", lifetime=60)
        assert again["state"] == "active", again
        assert gateway.mapping_for("tcp", 7700) is not None
        assert len(daemon.shared[("tcp", 7700)].holds) == 1


async def test_connections_that_come_and_go_do_not_rewrite_the_state_file(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every disconnect woke the grace timer, and every wake-up noted a change:
    # a user running `portbroker list` in a loop kept the daemon serializing
    # and fsyncing the whole state file (every user's mappings), back to back.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.map(7800, "tcp", persist=True)
        await trio.testing.wait_all_tasks_blocked()
        await daemon.synced()
        writes: list[int] = []
        save = daemon.store.save

        def counted(records: list[dict[str, Any]]) -> None:
            writes.append(len(records))
            save(records)

        monkeypatch.setattr(daemon.store, "save", counted)
        for _ in range(20):
            async with open_client(short_dir / "pb.sock") as client:
                await client.list()
        await _wait_for(lambda: daemon.owners.connections(0) == 0, "the clients to leave")
        await trio.testing.wait_all_tasks_blocked()
        await daemon.synced()
        assert writes == []
        # A change is still written: the persisted mapping's unmap.
        async with open_client(short_dir / "pb.sock") as client:
            await client.unmap(7800, "tcp")
        assert writes
        assert writes[-1] == 0


async def test_a_hold_that_ends_in_grace_leaves_the_state_file(short_dir: Path) -> None:
    # An app's hold ended with its grace period while a persisted hold kept
    # the mapping: the state file went on listing the app's hold (the record
    # cached from before), so the next start gave a dead app a grace period,
    # or a process that reused its pid the hold.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as app:
            await app.map(7900, "tcp")
            async with open_client(short_dir / "pb.sock") as cli:
                await cli.map(7900, "tcp", persist=True)
        entry = daemon.shared[("tcp", 7900)]
        await _wait_for(lambda: len(entry.holds) == 1, "the app's grace to end")
        await trio.testing.wait_all_tasks_blocked()
        await daemon.synced()
        (record,) = json.loads((short_dir / "state.json").read_text())["mappings"]
        assert [h["persist"] for h in record["holds"]] == [True]


async def test_shedding_spares_a_connection_that_holds_mappings(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The victim was the least recently active connection of the busiest
    # user, holds or not: an app that mapped a port and then sat quiet (as
    # apps do) lost its connection, and with it, after the grace period, its
    # mappings, while that user's idle connections that held nothing stayed.
    monkeypatch.setattr(server, "_fd_limit", lambda: server.FD_RESERVE + 16)
    config = DaemonConfig(socket_path=short_dir / "pb.sock", state_path=short_dir / "s.json")
    daemon = Daemon(config, broker=None, nursery=None)  # type: ignore[arg-type]
    alice, bob, carol = Peer(1000, 100), Peer(1001, 200), Peer(1002, 300)
    channels: list[Any] = []
    holder = _client(daemon, alice, channels)
    holder.last_active = -100.0  # mapped long ago, quiet since
    daemon.owners.claim(holder.conn, ("tcp", 8080), persist=False, external_port=None, now=0)
    daemon.owners.created(("tcp", 8080), object(), 8080)
    for _ in range(9):
        _client(daemon, alice, channels)
    for _ in range(6):
        _client(daemon, bob, channels)
    daemon.owners.connect(carol)
    assert daemon._shed(carol.uid)
    assert holder in daemon.clients
    assert not holder.cancel.cancel_called
    assert daemon.owners.connections(alice.uid) == 9


async def test_a_port_whose_mapping_is_being_deleted_can_be_mapped_again(
    short_dir: Path,
) -> None:
    # The registry lets go of a mapping before its delete (at the gateway)
    # is done; an app mapping the port meanwhile (restarted just after the
    # grace period, a slow gateway) reached the broker while it still held
    # the old one and got an `internal` error: "already mapped by this
    # broker (releasing)".
    gateway = FakeGateway()
    async with running(short_dir, gateway, grace=0.2) as daemon:
        async with open_client(short_dir / "pb.sock") as app:
            await app.map(7950, "tcp")
            old = cast(Mapping, daemon.shared[("tcp", 7950)].handle)
        gateway.delay = 3.0  # the delete's answer takes 3 s
        # Both: the registry lets go first, and the delete starts in a task
        # of its own (one scheduler batch later, in either order with this
        # poll: a CI run saw the mapping still ACTIVE here).
        await _wait_for(
            lambda: ("tcp", 7950) not in daemon.shared and old.state is State.RELEASING,
            "the grace period to end and the delete to start",
        )
        async with open_client(short_dir / "pb.sock") as app:
            again = await app.map(7950, "tcp")
            assert again["state"] == "active"
            assert gateway.mapping_for("tcp", 7950) is not None
            assert ("tcp", 7950) in daemon.shared


async def test_the_instant_the_grace_period_ends_a_map_of_the_port_waits_for_its_delete(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grace timer took the entry out of the registry and left the rest
    # (marking its delete as in flight) to a task started for it. Trio runs
    # the tasks of one batch in either order, so a map of the port could run
    # in between: neither held nor releasing, it went to the broker, which
    # still held the old (ACTIVE) mapping, and the app got an `internal`
    # error. The check runs where no other task can: when the grace timer,
    # having expired the entry, asks for its next deadline.
    gateway = FakeGateway()
    key = ("tcp", 7960)
    seen: list[object] = []
    async with running(short_dir, gateway, grace=0.2) as daemon:
        expire, next_deadline = daemon.owners.expire, daemon.owners.next_deadline
        expired: list[tuple[str, int]] = []

        def expiring(now: float, shrunk: list[Any] | None = None) -> list[Any]:
            released = expire(now, shrunk)
            expired.extend(entry.key for entry in released)
            return released

        def asked() -> float | None:
            while expired:
                seen.append(daemon._busy(expired.pop()))
            return next_deadline()

        monkeypatch.setattr(daemon.owners, "expire", expiring)
        monkeypatch.setattr(daemon.owners, "next_deadline", asked)
        async with open_client(short_dir / "pb.sock") as app:
            await app.map(7960, "tcp")
        await _wait_for(lambda: seen, "the grace period to end")
        await _wait_for(lambda: gateway.mapping_for(*key) is None, "the delete")
    assert len(seen) == 1
    assert isinstance(seen[0], trio.Event)  # a map of the port would have waited


@pytest.mark.parametrize(("groups", "lookups"), [((), 0), (("root",), 1)])
async def test_connections_do_not_each_ask_the_group_database(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, groups: tuple[str, ...], lookups: int
) -> None:
    # Every connection looked the user's groups up (NSS: files, or LDAP and
    # sssd over the network), in the event loop, before any limit applied:
    # one user opening connections in a loop stalled the daemon for everyone
    # while a slow directory answered. Groups matter only for
    # --privileged-group, and they do not change from one connection to the
    # next.
    calls: list[int] = []
    real = server._groups_of

    def counted(uid: int, gid: int) -> frozenset[int]:
        calls.append(uid)
        return real(uid, gid)

    monkeypatch.setattr(server, "_groups_of", counted)
    async with running(short_dir, FakeGateway(), privileged_groups=groups):
        for _ in range(10):
            async with open_client(short_dir / "pb.sock") as client:
                await client.hello()
    assert len(calls) == lookups


async def test_watchers_hear_that_a_mapping_was_released(short_dir: Path) -> None:
    # The protocol promises Released events (docs/daemon-protocol.md,
    # "Operations"), but the daemon let go of its index of a mapping before
    # deleting it, so the Released event found no entry and no watcher heard
    # that a mapping ended, by unmap or by the end of its grace period.
    gateway = FakeGateway()
    async with (
        running(short_dir, gateway, grace=0.2),
        await trio.open_unix_socket(str(short_dir / "pb.sock")) as watcher,
        open_client(short_dir / "pb.sock") as app,
    ):
        buffer = b""

        async def line() -> dict[str, Any]:
            nonlocal buffer
            with trio.fail_after(30):
                while b"\n" not in buffer:
                    chunk = await watcher.receive_some(65536)
                    assert chunk, "the daemon closed the watching connection"
                    buffer += chunk
            first, buffer = buffer.split(b"\n", 1)
            message: dict[str, Any] = json.loads(first)
            if message.get("event") == "ReachabilityChanged":
                # FakeGateway's 203.0.113.7 is a documentation address (RFC
                # 5737): each Acquired is followed by this. Not this test's.
                return await line()
            return message

        await watcher.send_all(b'{"id": 1, "op": "watch"}\n')
        assert (await line())["ok"] is True
        await app.map(7960, "tcp")
        assert (await line())["event"] == "Acquired"
        await app.unmap(7960, "tcp")
        ended = await line()
        assert (ended["event"], ended["mapping"]["id"]) == ("Released", "7960/tcp")
        # And one whose app left, at the end of the grace period.
        async with open_client(short_dir / "pb.sock") as other:
            await other.map(7961, "tcp")
        assert (await line())["event"] == "Acquired"
        ended = await line()
        assert (ended["event"], ended["mapping"]["id"]) == ("Released", "7961/tcp")


async def test_unmapping_a_failed_mapping_leaves_nothing_behind(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # A mapping that FAILED publishes no Released when unmapped: the index
    # kept for its Released event must not keep it for ever.
    gateway = FakeGateway()
    async with (
        running(short_dir, gateway) as daemon,
        open_client(short_dir / "pb.sock") as client,
    ):
        await client.map(7710, "tcp", lifetime=60)
        gateway.forced_result = int(pcp.ResultCode.NOT_AUTHORIZED)
        gateway.forced_natpmp_result = 2
        mapping = cast(Mapping, daemon.shared[("tcp", 7710)].handle)
        with trio.fail_after(7200):  # virtual time
            while mapping.state is not State.FAILED:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(1)
        assert await client.unmap(7710, "tcp") == "7710/tcp"
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.shared == {}
        assert daemon._by_mapping == {}


async def test_a_client_that_hung_up_behind_a_full_pipeline_is_rolled_back(
    short_dir: Path,
) -> None:
    # More requests than a connection may have running at once (IN_FLIGHT):
    # the reader waits for a slot instead of reading, so it never saw the
    # client hang up, and every queued persisted map was carried out (and
    # kept) for a client that had given up on them.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        async with open_client(short_dir / "pb.sock") as client:
            await client.probe()  # a warm broker: the maps are the only requests
        gateway.delay = 1.0
        count = server.IN_FLIGHT + 6
        lines = b"".join(
            b'{"id": %d, "op": "map", "port": %d, "persist": true}\n' % (n, 30000 + n)
            for n in range(count)
        )
        stream = await trio.open_unix_socket(str(short_dir / "pb.sock"))
        await stream.send_all(lines)

        def asked() -> bool:
            return any(
                isinstance(r, pcp.PcpRequest) and isinstance(r.data, pcp.MapData)
                for r in gateway.requests
            )

        await _wait_for(asked, "the first MAP to reach the gateway")
        await stream.aclose()  # gone before any answer
        await _wait_for(lambda: daemon.owners.connections(0) == 0, "the hang-up to be seen")
        await _wait_for(lambda: daemon.shared == {}, "every reservation to end")
        await trio.testing.wait_all_tasks_blocked()
        await daemon.synced()
        assert json.loads((short_dir / "state.json").read_text())["mappings"] == []
        assert all(gateway.mapping_for("tcp", 30000 + n) is None for n in range(count))


async def test_a_map_nobody_owns_any_more_is_waited_for_while_it_is_deleted(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A map whose requester left while the gateway granted it is deleted
    # again at once (created() -> None): the registry lets go of the port,
    # and the broker holds the mapping until the delete is answered. Another
    # app's map of the port, waiting for that creation, went ahead at the
    # delete's first checkpoint, neither created nor releasing, and the
    # broker refused it: "already mapped by this broker (releasing)".
    gateway = FakeGateway()
    key = ("tcp", 7970)
    async with running(short_dir, gateway) as daemon:
        created, broker_map = daemon.owners.created, daemon.broker.map
        gate = trio.Event()

        def requester_gone(key: tuple[str, int], handle: Any, port: int | None) -> Any:
            # The first map's app hangs up as its mapping is granted.
            monkeypatch.setattr(daemon.owners, "created", created)
            requester = daemon.owners.entries[key].requester
            assert requester is not None
            daemon.owners.disconnect(requester, trio.current_time())
            return created(key, handle, port)

        async def gated(*args: Any, **kwargs: Any) -> Mapping:
            await gate.wait()
            mapping = await broker_map(*args, **kwargs)
            gateway.delay = 2.0  # its delete is answered 2 s later
            return mapping

        monkeypatch.setattr(daemon.owners, "created", requester_gone)
        monkeypatch.setattr(daemon.broker, "map", gated)
        results: dict[str, Any] = {}

        async def map_as(name: str) -> None:
            async with open_client(short_dir / "pb.sock") as app:
                try:
                    results[name] = await app.map(7970, "tcp")
                except DaemonRequestError as exc:
                    results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(map_as, "first")
            await _wait_for(lambda: daemon.owners.creating(key), "the first map to start")
            nursery.start_soon(map_as, "second")
            await _wait_for(
                lambda: daemon._pending[key].statistics().tasks_waiting == 1,
                "the second map to wait for the first",
            )
            gate.set()
        assert isinstance(results["first"], DaemonRequestError)
        assert results["first"].code == "gone"
        assert not isinstance(results["second"], DaemonRequestError), results["second"]
        assert results["second"]["state"] == "active"
        assert gateway.mapping_for(*key) is not None
