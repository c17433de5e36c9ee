"""The daemon follows the network for all its clients (issue 11 §4, docs/roaming.md).

In-process daemon on a real Unix socket; its one broker follows a FakeNetwork
and reaches two FakeGateways (a at 127.0.0.1, b at 127.0.0.2) in memory.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from portbroker.client import open_client
from portbroker.clockwatch import ResumeCause, Resumed
from portbroker.daemon.server import DaemonConfig, serve
from portbroker.testing import FakeGateway
from portbroker.testing.fake_gateway import MemoryLink
from portbroker.testing.fake_network import FakeNetwork
from portbroker.types import IPAddress

A = IPv4Address("127.0.0.1")
B = IPv4Address("127.0.0.2")


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbr-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def links_to(*fakes: FakeGateway) -> Callable[[IPAddress, int], Awaitable[MemoryLink]]:
    by_address = {fake.address: fake for fake in fakes}

    async def factory(address: IPAddress, _port: int) -> MemoryLink:
        await trio.lowlevel.checkpoint()
        return by_address[address].memory_link("192.168.1.100")

    return factory


def config(
    directory: Path, network: FakeNetwork, *fakes: FakeGateway, **extra: Any
) -> DaemonConfig:
    options: dict[str, Any] = {
        "link_factory": links_to(*fakes),
        "announce_port": None,
        "seed": 1,
        "dhcp_leases": (),
        "network_monitor": network,
        "follow_settle": 0.0,
        **extra,
    }
    return DaemonConfig(
        socket_path=directory / "pb.sock",
        state_path=directory / "state.json",
        gateway=None,
        methods=("pcp", "natpmp"),
        grace=0.3,
        broker_options=options,
    )


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - in-memory gateways: a short poll
            await trio.sleep(0.02)


def records(directory: Path) -> dict[str, dict[str, Any]]:
    saved = json.loads((directory / "state.json").read_text())
    return {f"{r['internal_port']}/{r['protocol']}": r for r in saved["mappings"]}


async def test_a_route_change_moves_every_clients_mappings_and_the_watch_says_so(
    short_dir: Path,
) -> None:
    gw_a = FakeGateway(address=A, external_address="203.0.113.1")
    gw_b = FakeGateway(address=B, external_address="198.51.100.2")
    network = FakeNetwork.routed_via(A)
    seen: list[dict[str, Any]] = []
    async with (
        serve(config(short_dir, network, gw_a, gw_b)) as daemon,
        open_client(short_dir / "pb.sock") as app,
        open_client(short_dir / "pb.sock") as other_app,
        open_client(short_dir / "pb.sock") as watcher,
        trio.open_nursery() as nursery,
    ):

        async def watch(*, task_status: trio.TaskStatus[None]) -> None:
            stream = cast(AsyncGenerator[dict[str, Any], None], watcher.watch())
            async with aclosing(stream) as events:
                task_status.started()
                async for event in events:
                    seen.append(event)

        await nursery.start(watch)
        assert (await app.hello())["gateway"] == "127.0.0.1"
        first = await app.map(8080, "tcp", lifetime=3600, persist=True)
        second = await other_app.map(9000, "udp", lifetime=3600)
        assert first["gateway"] == second["gateway"] == "127.0.0.1"
        assert records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.1"

        network.route_via(B)
        await until(
            lambda: (
                gw_b.mapping_for("tcp", 8080) is not None
                and gw_b.mapping_for("udp", 9000) is not None
                and not gw_a.mappings
            )
        )
        await until(lambda: all(m["state"] == "active" for m in daemon_list(daemon)))
        listed = {m["id"]: m for m in await app.list()}
        assert listed["8080/tcp"]["gateway"] == "127.0.0.2"
        assert listed["8080/tcp"]["external_address"] == "198.51.100.2"
        assert listed["8080/tcp"]["persist"] is True
        assert (await app.hello())["gateway"] == "127.0.0.2"
        # The state file records where each one lives now.
        await until(lambda: records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.2")
        assert records(short_dir)["9000/udp"]["gateway"] == "127.0.0.2"
        await until(lambda: sum(e["event"] == "Restored" for e in seen) >= 2)
        moved = [e for e in seen if e["event"] == "GatewayChanged"]
        assert {e["mapping"]["id"] for e in moved} == {"8080/tcp", "9000/udp"}
        assert all(
            e["detail"] == {"old_gateway": "127.0.0.1", "new_gateway": "127.0.0.2"} for e in moved
        )
        nursery.cancel_scope.cancel()
    # The persisted mapping stays, on b, recorded for the next start.
    assert gw_b.mapping_for("tcp", 8080) is not None
    assert records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.2"


def daemon_list(daemon: Any) -> list[dict[str, Any]]:
    from portbroker.daemon.server import describe

    return [describe(entry) for entry in daemon.shared.values()]


async def test_a_persisted_mapping_moved_to_b_is_adopted_there_on_the_next_start(
    short_dir: Path,
) -> None:
    gw_a = FakeGateway(address=A, external_address="203.0.113.1")
    gw_b = FakeGateway(address=B, external_address="198.51.100.2")
    network = FakeNetwork.routed_via(A)
    async with (
        serve(config(short_dir, network, gw_a, gw_b)),
        open_client(short_dir / "pb.sock") as app,
    ):
        await app.map(8080, "tcp", lifetime=3600, persist=True)
        network.route_via(B)
        await until(lambda: gw_b.mapping_for("tcp", 8080) is not None and not gw_a.mappings)
        await until(lambda: records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.2")
    asked = len(gw_b.requests)
    async with (
        serve(config(short_dir, FakeNetwork.routed_via(B), gw_a, gw_b)) as daemon,
        open_client(short_dir / "pb.sock") as app,
    ):
        await trio.lowlevel.checkpoint()
        with trio.fail_after(10):
            await daemon.restored.wait()
        listed = await app.list()
        assert [(m["id"], m["gateway"], m["state"]) for m in listed] == [
            ("8080/tcp", "127.0.0.2", "active")
        ]
        assert len(gw_b.requests) > asked
        assert gw_a.requests
        assert not gw_a.mappings


async def test_a_pinned_daemon_stays_but_renews_everything_on_resume(short_dir: Path) -> None:
    gw_a = FakeGateway(address=A, external_address="203.0.113.1")
    gw_b = FakeGateway(address=B, external_address="198.51.100.2")
    network = FakeNetwork.routed_via(A)
    send, receive = trio.open_memory_channel[Resumed](math.inf)
    settings = config(short_dir, network, gw_a, gw_b, resume_watch=receive)
    pinned = DaemonConfig(
        socket_path=settings.socket_path,
        state_path=settings.state_path,
        gateway="127.0.0.1",
        methods=settings.methods,
        broker_options=settings.broker_options,
    )
    async with serve(pinned), open_client(short_dir / "pb.sock") as app:
        await app.map(8080, "tcp", lifetime=3600)
        network.route_via(B)
        await trio.sleep(0.5)
        assert gw_a.mapping_for("tcp", 8080) is not None
        assert gw_b.requests == []
        gw_a.mappings.clear()  # lapsed while the host slept
        send.send_nowait(Resumed(7200.0, ResumeCause.SUSPEND))
        await until(lambda: gw_a.mapping_for("tcp", 8080) is not None, limit=10)
        assert gw_b.requests == []
        assert [m["gateway"] for m in await app.list()] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("changes", "follow"),
    [
        ({}, True),
        ({"gateway": "127.0.0.1"}, False),  # pinned: never moves
        ({"follow": False}, False),  # portbroker daemon --no-follow
    ],
)
async def test_the_daemon_follows_the_host_unless_pinned_and_always_watches_resume(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], follow: bool
) -> None:
    import portbroker.daemon.server as server

    asked: dict[str, Any] = {}

    class Stop(Exception):
        pass

    class FakeOpenBroker:
        def __init__(self, *_args: Any, **kwargs: Any) -> None:
            asked.update(kwargs)

        async def __aenter__(self) -> None:
            raise Stop

        async def __aexit__(self, *_exc: object) -> None:
            pass

    monkeypatch.setattr(server, "open_broker", FakeOpenBroker)
    settings = {"socket_path": short_dir / "pb.sock", "state_path": short_dir / "s.json"}
    with pytest.raises(Stop):
        async with serve(DaemonConfig(**{**settings, **changes})):
            pass
    assert asked["follow"] is follow
    assert asked["watch_resume"] is True


def test_the_daemon_command_takes_no_follow_and_list_shows_the_gateway() -> None:
    from portbroker import cli

    assert cli._parser().parse_args(["daemon", "--no-follow"]).no_follow is True
    assert cli._parser().parse_args(["daemon"]).no_follow is False
    shown = cli._describe_daemon_mapping(
        {
            "id": "8080/tcp",
            "external_address": "198.51.100.2",
            "external_port": 8080,
            "method": "pcp",
            "gateway": "127.0.0.2",
            "owner_uid": 0,
            "holders": 1,
        }
    )
    assert (
        shown == "8080/tcp -> 198.51.100.2:8080 via pcp at gateway 127.0.0.2 (uid 0, 1 holder(s))"
    )


async def test_a_mapping_persisted_on_a_is_made_on_b_when_the_daemon_starts_on_bs_network(
    short_dir: Path,
) -> None:
    # Shut down at home, started at the office: the record names gateway a,
    # the default route now leads to b.
    gw_a = FakeGateway(address=A, external_address="203.0.113.1")
    gw_b = FakeGateway(address=B, external_address="198.51.100.2")
    async with (
        serve(config(short_dir, FakeNetwork.routed_via(A), gw_a, gw_b)),
        open_client(short_dir / "pb.sock") as app,
    ):
        await app.map(8080, "tcp", lifetime=3600, persist=True)
    assert records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.1"
    asked_a = len(gw_a.requests)
    async with (
        serve(config(short_dir, FakeNetwork.routed_via(B), gw_a, gw_b)) as daemon,
        open_client(short_dir / "pb.sock") as app,
    ):
        with trio.fail_after(10):
            await daemon.restored.wait()
        listed = await app.list()
        assert [(m["id"], m["gateway"], m["state"]) for m in listed] == [
            ("8080/tcp", "127.0.0.2", "active")
        ]
        assert gw_b.mapping_for("tcp", 8080) is not None
        assert len(gw_a.requests) == asked_a  # nothing sent to the gateway left behind
        await until(lambda: records(short_dir)["8080/tcp"]["gateway"] == "127.0.0.2")
