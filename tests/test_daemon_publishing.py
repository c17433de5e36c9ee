"""The daemon's publications against its mappings' lives (portbroker/daemon/publishing.py).

No zeroconf here: :class:`Publishing` gets a stand-in rendezvous (its
``opener`` seam) whose probe waits for the test, so a mapping's event can
land while a publish is probing. tests/test_daemon_publish.py runs the real
thing in a network namespace.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import trio
import trio.testing

from portbroker.client import open_client
from portbroker.daemon.ownership import Entry
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.publishing import Publishing
from portbroker.lifecycle import Acquired, Failed, Lost, State
from portbroker.rendezvous import Advert
from portbroker.testing import FakeGateway
from portbroker.types import Lease, TransportProtocol
from tests.test_daemon_restore import ROOT_UID, eventually, record, running, write_state
from tests.test_daemon_restore import mock_time as mock_time  # the fixtures
from tests.test_daemon_restore import short_dir as short_dir

TYPE = "_pbtest._tcp"


def lease(port: int = 9000) -> Lease:
    return Lease(
        method="pcp",
        protocol=TransportProtocol.parse("tcp"),
        internal_address="192.168.1.100",
        internal_port=8080,
        external_address="11.0.0.1",
        external_port=port,
        lifetime=7200,
        granted_at=0.0,
        gateway="192.168.1.1",
    )


@attrs.define
class Handle:
    """What Publishing reads of a broker Mapping."""

    lease: Lease | None
    state: State = State.ACTIVE


class FakePublication:
    def __init__(self, rv: FakeRendezvous, advert: Advert) -> None:
        self._rv = rv
        self.advert = advert
        self.withdrawn = False

    async def withdraw(self) -> None:
        self.withdrawn = True
        self._rv.live.pop(self.advert.key, None)

    async def update_lease(self, lease: Lease, *, state: Literal["up", "lost"] = "up") -> None:
        self.advert = attrs.evolve(
            self.advert,
            external_address=lease.external_address,
            external_port=lease.external_port,
            state=state,
        )

    async def mark_lost(self) -> None:
        self.advert = attrs.evolve(self.advert, state="lost")


class FakeRendezvous:
    def __init__(self) -> None:
        self.live: dict[str, FakePublication] = {}
        self.probing = trio.Event()  # set when a publish reached the probe
        self.probed = trio.Event()  # the test sets it: the probe ends

    async def publish_advert(self, advert: Advert) -> FakePublication:
        self.probing.set()
        await self.probed.wait()
        publication = FakePublication(self, advert)
        self.live[advert.key] = publication
        return publication


def request(**fields: Any) -> Request:
    return Request("publish", 1, {"port": 8080, "type": TYPE, "name": "web", **fields})


async def with_publishing(body: Any) -> None:
    rv = FakeRendezvous()

    @contextlib.asynccontextmanager
    async def opener(_interfaces: list[str]) -> AsyncIterator[Any]:
        yield rv

    async with trio.open_nursery() as nursery:
        publishing = Publishing(nursery, interfaces=("127.0.0.1",), opener=opener)
        await body(publishing, rv)
        nursery.cancel_scope.cancel()


async def test_a_failed_mapping_is_not_published() -> None:
    # A Failed mapping keeps its last lease and stays listed until unmapped:
    # published, it would advertise state=up and an external endpoint the
    # gateway no longer holds.
    async def body(publishing: Publishing, rv: FakeRendezvous) -> None:
        rv.probed.set()
        entry = Entry(("tcp", 8080), 0)
        for state in (State.FAILED, State.RELEASING, State.RELEASED):
            with pytest.raises(ProtocolError) as refused:
                await publishing.publish(0, entry, Handle(lease(), state), request())
            assert refused.value.code is ErrorCode.NOT_FOUND
            assert "map it again" in refused.value.message
        assert rv.live == {}
        assert publishing.count(0) == 0

    await with_publishing(body)


async def test_a_mapping_that_fails_while_its_publish_probes_is_not_left_published() -> None:
    async def body(publishing: Publishing, rv: FakeRendezvous) -> None:
        entry = Entry(("tcp", 8080), 0)
        handle = Handle(lease())
        outcome: list[BaseException] = []

        async def publish() -> None:
            try:
                await publishing.publish(0, entry, handle, request())
            except ProtocolError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await rv.probing.wait()
            handle.state = State.FAILED
            publishing.changed(entry.key, Failed("gone for good"), handle.lease)
            rv.probed.set()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ProtocolError)
        assert outcome[0].code is ErrorCode.NOT_FOUND
        await trio.testing.wait_all_tasks_blocked()
        assert rv.live == {}  # withdrawn: nothing advertises the dead mapping
        assert publishing.count(0) == 0

    await with_publishing(body)


async def test_a_mapping_lost_or_moved_while_its_publish_probes_is_published_as_it_is() -> None:
    async def body(publishing: Publishing, rv: FakeRendezvous) -> None:
        entry = Entry(("tcp", 8080), 0)
        handle = Handle(lease(9000))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publishing.publish, 0, entry, handle, request())
            await rv.probing.wait()
            handle.state, handle.lease = State.LOST, lease(9001)
            publishing.changed(entry.key, Lost("state loss"), handle.lease)
            rv.probed.set()
        await trio.testing.wait_all_tasks_blocked()
        (publication,) = rv.live.values()
        assert publication.advert.state == "lost"
        assert publication.advert.external_port == 9001

    await with_publishing(body)


async def test_a_restored_mapping_the_gateway_refuses_takes_its_publication_with_it(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # After a restart an app publishes its mapping while the daemon is still
    # taking it over from the state file; the gateway then refuses it for
    # good and the daemon forgets it. Its publication must go too, not stay
    # on the LAN (and in the user's count) for a mapping nobody has.
    write_state(short_dir, [record(8080, expires_at_unix=round(time.time() + 600, 3))])
    gateway = FakeGateway(drop_rate=1.0)  # silent: the record stays "restoring"
    rv = FakeRendezvous()
    rv.probed.set()

    @contextlib.asynccontextmanager
    async def opener(_interfaces: list[str]) -> AsyncIterator[Any]:
        yield rv

    async with running(short_dir, gateway) as daemon:
        daemon.publishing._open = opener
        async with open_client(short_dir / "pb.sock") as client:
            await client.publish(8080, "tcp", service_type=TYPE, name="web")
        assert len(rv.live) == 1
        gateway.drop_rate = 0.0
        gateway.forced_result = 2  # NOT_AUTHORIZED, for 1800 s: a refusal for good
        await eventually(lambda: ("tcp", 8080) not in daemon.shared)
        await trio.testing.wait_all_tasks_blocked()
        assert rv.live == {}
        assert daemon.publishing.count(ROOT_UID) == 0


async def test_a_restored_mapping_granted_another_port_is_republished_with_it() -> None:
    # Published while restoring (the state file's lease, port 9000); the
    # gateway then grants the take-over port 9001 (an Acquired event).
    async def body(publishing: Publishing, rv: FakeRendezvous) -> None:
        rv.probed.set()
        entry = Entry(("tcp", 8080), 0)
        await publishing.publish(0, entry, Handle(lease(9000)), request())
        publishing.changed(entry.key, Acquired(lease(9001)), lease(9001))
        await trio.testing.wait_all_tasks_blocked()
        (publication,) = rv.live.values()
        assert publication.advert.external_port == 9001

    await with_publishing(body)
