"""Suspend and resume: every mapping checked within 0-5 s of a Resumed (lifecycle rule 14).

The lifecycle's rule with plain numbers, then a broker against a FakeGateway
under MockClock, fed its resumes from a channel (the host's ClockWatch in
real use, tests/test_clockwatch.py). A suspend is the gateway's time going
on while ours stood still (CLOCK_MONOTONIC stops in suspend): the gateway
drops the mappings, our timers still say they have time. A stop (SIGSTOP, a
paused VM) is both clocks going on: ``MockClock.jump``.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
import trio
import trio.testing

from portbroker.broker import Broker, open_broker
from portbroker.clockwatch import ResumeCause, Resumed
from portbroker.lifecycle import (
    Failure,
    FailureKind,
    Lost,
    MappingLifecycle,
    Recreate,
    Renew,
    Renewed,
    Restored,
    Sleep,
    State,
    Step,
    Trigger,
)
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_network import FakeNetwork
from portbroker.types import Lease, TransportProtocol
from portbroker.wire.pcp import MapData, PcpRequest
from tests.broker_harness import Recorder, wait_for

GW = IPv4Address("127.0.0.1")
PORTS = (8080, 8081, 8082, 9000)


def lease(at: float = 0.0, lifetime: int = 3600) -> Lease:
    return Lease(
        "pcp",
        TransportProtocol.TCP,
        IPv4Address("192.168.1.100"),
        8080,
        IPv4Address("203.0.113.1"),
        8080,
        lifetime,
        at,
        GW,
    )


def active(seed: int = 1) -> MappingLifecycle:
    machine = MappingLifecycle(random.Random(seed))
    machine.fire(Trigger.GRANTED, 0.0, token=0, lease=lease())
    return machine


# -- the rule, in plain numbers ------------------------------------------------------


def test_resumed_renews_an_active_mapping_within_the_spread_even_inside_the_4_s_gap() -> None:
    for seed in range(50):
        machine = active(seed)
        # 1 s after the grant: NETWORK_CHANGED would wait for 4 s (rule 13).
        step = machine.fire(Trigger.RESUMED, 1.0)
        assert isinstance(step.action, Sleep)
        assert 1.0 <= step.action.until <= 1.0 + machine.recovery_delay
        assert machine.state is State.ACTIVE
        renew = machine.fire(Trigger.TIMER, step.action.until, token=step.action.token)
        assert isinstance(renew.action, Renew)


def test_the_spread_is_a_different_delay_per_mapping() -> None:
    delays = set()
    rng = random.Random(3)  # one broker's rng, shared by its mappings
    for _ in range(20):
        machine = MappingLifecycle(rng)
        machine.fire(Trigger.GRANTED, 0.0, token=0, lease=lease())
        step = machine.fire(Trigger.RESUMED, 100.0)
        assert isinstance(step.action, Sleep)
        delays.add(step.action.until - 100.0)
    assert len(delays) == 20
    assert all(0.0 <= d <= 5.0 for d in delays)


def test_resumed_past_the_expiry_is_lost_at_once_and_re_created_with_the_previous_lease() -> None:
    machine = active()
    step = machine.fire(Trigger.RESUMED, 4000.0)
    assert len(step.events) == 1
    assert isinstance(step.events[0], Lost)
    assert machine.state is State.LOST
    assert isinstance(step.action, Sleep)
    assert 4000.0 <= step.action.until <= 4005.0
    again = machine.fire(Trigger.TIMER, step.action.until, token=step.action.token)
    assert isinstance(again.action, Recreate)
    assert again.action.previous == lease()  # same nonce, same port (rule 6)


def test_a_mapping_renewed_since_the_wake_is_left_alone() -> None:
    machine = active()
    machine.fire(Trigger.TIMER, 4000.0, token=machine.token)  # the overdue renewal
    assert machine.state is State.RENEWING
    assert machine.fire(Trigger.RESUMED, 4000.0, awake_since=3999.0) == Step([], None)
    renewed = lease(at=4000.0)
    machine.fire(Trigger.GRANTED, 4000.1, token=machine.token, lease=renewed)
    assert machine.fire(Trigger.RESUMED, 4000.2, awake_since=3999.0) == Step([], None)
    # Granted before the wake: checked.
    assert isinstance(machine.fire(Trigger.RESUMED, 4000.3, awake_since=4000.05).action, Sleep)


def test_resumed_cuts_a_renewing_or_lost_mappings_wait_short() -> None:
    machine = active()
    first = machine.fire(Trigger.TIMER, 1800.0, token=machine.token)
    assert isinstance(first.action, Renew)
    waiting = machine.fire(
        Trigger.FAILED, 1801.0, token=machine.token, failure=Failure(FailureKind.SILENT, "x")
    )
    assert isinstance(waiting.action, Sleep)
    assert waiting.action.until > 2600.0
    soon = machine.fire(Trigger.RESUMED, 1802.0)
    assert isinstance(soon.action, Sleep)
    assert 1802.0 <= soon.action.until <= 1807.0
    assert machine.state is State.RENEWING
    # LOST with a long backoff ahead of it.
    machine = active()
    lost = machine.fire(Trigger.STATE_LOST, 100.0, reason="reboot")
    assert isinstance(lost.action, Sleep)
    retry = machine.fire(Trigger.TIMER, lost.action.until, token=lost.action.token)
    assert isinstance(retry.action, Recreate)
    failed = machine.fire(
        Trigger.FAILED, 110.0, token=retry.action.token, failure=Failure(FailureKind.SILENT, "x")
    )
    assert isinstance(failed.action, Sleep)
    soon = machine.fire(Trigger.RESUMED, 111.0)
    assert isinstance(soon.action, Sleep)
    assert 111.0 <= soon.action.until <= 116.0


def test_resumed_is_ignored_with_an_operation_in_flight_and_after_the_end() -> None:
    machine = MappingLifecycle(random.Random(1))
    assert machine.fire(Trigger.RESUMED, 1.0) == Step([], None)  # REQUESTING
    machine = active()
    machine.fire(Trigger.TIMER, 1800.0, token=machine.token)  # RENEWING, in flight
    assert machine.fire(Trigger.RESUMED, 1801.0) == Step([], None)
    machine.fire(Trigger.DETACH, 1802.0)
    assert machine.fire(Trigger.RESUMED, 1803.0) == Step([], None)


# -- a broker ----------------------------------------------------------------------


@asynccontextmanager
async def resuming(
    fake: FakeGateway, **kwargs: object
) -> AsyncIterator[tuple[Broker, trio.MemorySendChannel[Resumed]]]:
    send, receive = trio.open_memory_channel[Resumed](math.inf)
    async with open_broker(
        str(GW),
        ("pcp",),
        link_factory=fake.link_factory(),
        announce_port=None,
        seed=5,
        dhcp_leases=(),
        resume_watch=receive,
        **kwargs,  # type: ignore[arg-type]
    ) as broker:
        yield broker, send


def maps_of(fake: FakeGateway, port: int) -> list[float]:
    """When *fake* got a MAP request for internal *port*."""
    return [
        at
        for request, at in zip(fake.requests, fake.request_times, strict=True)
        if isinstance(request, PcpRequest)
        and isinstance(request.data, MapData)
        and request.data.internal_port == port
    ]


async def test_after_a_suspend_every_mapping_is_renewed_within_5_s_once_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGateway(address=GW)
    async with resuming(fake) as (broker, resumes), trio.open_nursery() as nursery:
        mappings = [await broker.map(port, "tcp", lifetime=3600) for port in PORTS]
        recorders = [Recorder() for _ in mappings]
        for recorder, mapping in zip(recorders, mappings, strict=True):
            await nursery.start(recorder.run, mapping)
        await trio.sleep(60)
        # Suspended for two hours: the gateway's time went on, ours did not
        # (CLOCK_MONOTONIC stops in suspend). It let every mapping lapse.
        fake.mappings.clear()
        woke = trio.current_time()
        resumes.send_nowait(Resumed(7200.0, ResumeCause.SUSPEND))
        await trio.sleep(5.01)
        for mapping, recorder in zip(mappings, recorders, strict=True):
            port = mapping.internal_port
            after = [at for at in maps_of(fake, port) if at >= woke]
            assert len(after) == 1, (port, after)
            assert woke <= after[0] <= woke + 5.0
            assert mapping.state is State.ACTIVE
            assert fake.mapping_for("tcp", port) is not None
            assert [type(e) for _, e in recorder.events] == [Renewed]
        assert len({maps_of(fake, m.internal_port)[-1] for m in mappings}) == len(mappings)
        assert broker.resumes == 1
        nursery.cancel_scope.cancel()


async def test_a_gateway_that_rebooted_during_the_suspend_has_every_mapping_restored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGateway(address=GW)
    async with resuming(fake) as (broker, resumes), trio.open_nursery() as nursery:
        mappings = [await broker.map(port, "tcp", lifetime=3600) for port in PORTS]
        recorders = [Recorder() for _ in mappings]
        for recorder, mapping in zip(recorders, mappings, strict=True):
            await nursery.start(recorder.run, mapping)
        await trio.sleep(60)
        fake.reset()  # lost everything, epoch restarted (RFC 6887 §8.5)
        woke = trio.current_time()
        resumes.send_nowait(Resumed(7200.0, ResumeCause.SUSPEND))
        # The first renewal's epoch shows the loss; every mapping is re-created
        # after its own 0-5 s delay (rule 5): all back within 10 s of the wake.
        await wait_for(lambda: all(fake.mapping_for("tcp", p) for p in PORTS), limit=10.0)
        await trio.sleep(0.5)
        for mapping, recorder in zip(mappings, recorders, strict=True):
            assert mapping.state is State.ACTIVE
            kinds = [type(e) for _, e in recorder.events]
            assert Lost in kinds, kinds
            assert kinds[-1] is Restored, kinds
            assert recorder.first(Restored)[0] <= woke + 10.0
        nursery.cancel_scope.cancel()


async def test_after_a_stop_longer_than_the_lifetime_each_mapping_is_back_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGateway(address=GW)
    async with resuming(fake) as (broker, resumes), trio.open_nursery() as nursery:
        mappings = [await broker.map(port, "tcp", lifetime=600) for port in PORTS]
        recorders = [Recorder() for _ in mappings]
        for recorder, mapping in zip(recorders, mappings, strict=True):
            await nursery.start(recorder.run, mapping)
        await trio.sleep(10)
        stopped = trio.current_time()
        # SIGSTOP for 1000 s: both clocks went on; the gateway expired them
        # and our overdue timers fire the moment we run again.
        autojump_clock.jump(1000)
        resumes.send_nowait(Resumed(1000.0, ResumeCause.LATE_TIMERS))
        await trio.sleep(5.01)
        woke = stopped + 1000
        for mapping, recorder in zip(mappings, recorders, strict=True):
            port = mapping.internal_port
            after = [at for at in maps_of(fake, port) if at >= woke]
            assert len(after) == 1, (port, after)  # once: the overdue timer or the check
            assert after[0] <= woke + 5.0
            assert mapping.state is State.ACTIVE
            assert fake.mapping_for("tcp", port) is not None
            assert recorder.events, port
        nursery.cancel_scope.cancel()


async def test_a_pinned_broker_that_does_not_follow_checks_on_resume_when_asked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGateway(address=GW)
    async with resuming(fake) as (broker, resumes):
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        await trio.sleep(60)
        before = len(maps_of(fake, 8080))
        resumes.send_nowait(Resumed(30.0, ResumeCause.SUSPEND))
        await trio.sleep(5.01)
        assert len(maps_of(fake, 8080)) == before + 1
        assert mapping.state is State.ACTIVE


@pytest.mark.parametrize(
    ("kwargs", "watches"),
    [
        ({}, False),
        ({"watch_resume": True}, True),
        ({"network_monitor": FakeNetwork.routed_via(GW)}, True),  # following: on by default
        ({"network_monitor": FakeNetwork.routed_via(GW), "watch_resume": False}, False),
    ],
)
async def test_who_watches_for_resume(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], watches: bool
) -> None:
    started: list[object] = []

    class Watch:
        def __init__(self) -> None:
            started.append(self)

        def __aiter__(self) -> Watch:
            return self

        async def __anext__(self) -> Resumed:
            await trio.sleep_forever()
            raise AssertionError

    monkeypatch.setattr("portbroker.broker.ClockWatch", Watch)
    fake = FakeGateway(address=GW)
    async with open_broker(
        None if "network_monitor" in kwargs else str(GW),
        ("pcp",),
        link_factory=fake.link_factory(),
        announce_port=None,
        dhcp_leases=(),
        **kwargs,  # type: ignore[arg-type]
    ):
        pass
    assert bool(started) is watches


@pytest.mark.parametrize(
    ("argv", "watches"),
    [
        (["map", "8080/tcp", "--hold"], True),
        (["map", "8080/tcp", "--hold", "--gateway", "127.0.0.1"], True),  # pinned: still
        (["map", "8080/tcp", "--hold", "--no-follow"], True),
        (["peer", "5000/udp", "--remote", "192.0.2.9:7000", "--hold"], True),
        (["map", "8080/tcp"], False),  # exits at once
        (["probe"], False),
    ],
)
def test_which_commands_watch_for_resume(argv: list[str], watches: bool) -> None:
    from portbroker import cli

    assert cli._watches_resume(cli._parser().parse_args(argv)) is watches


# -- rule 13's spread, for many mappings -------------------------------------------------


def test_network_changed_with_a_spread_re_checks_each_after_its_own_delay() -> None:
    rng = random.Random(9)
    wakes = []
    for _ in range(20):
        machine = MappingLifecycle(rng)
        machine.fire(Trigger.GRANTED, 0.0, token=0, lease=lease())
        step = machine.fire(Trigger.NETWORK_CHANGED, 100.0, spread=5.0)
        assert isinstance(step.action, Sleep)
        assert machine.state is State.ACTIVE
        wakes.append(step.action.until)
        renew = machine.fire(Trigger.TIMER, step.action.until, token=step.action.token)
        assert isinstance(renew.action, Renew)
    assert len(set(wakes)) == 20
    assert all(100.0 <= w <= 105.0 for w in wakes)
    # Still never within 4 s of the grant (RFC 6887 §11.2.1).
    machine = active()
    step = machine.fire(Trigger.NETWORK_CHANGED, 1.0, spread=0.5)
    assert isinstance(step.action, Sleep)
    assert step.action.until == 4.0


async def test_a_link_bounce_under_many_mappings_renews_each_once_spread_over_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from portbroker.broker import NETWORK_BURST

    fake = FakeGateway(address=GW)
    network = FakeNetwork.routed_via(GW)
    ports = range(20000, 20000 + NETWORK_BURST + 4)
    async with open_broker(
        None,
        ("pcp",),
        link_factory=fake.link_factory(),
        announce_port=None,
        seed=5,
        dhcp_leases=(),
        network_monitor=network,
        watch_resume=False,
    ) as broker:
        mappings = [await broker.map(port, "tcp", lifetime=7200) for port in ports]
        await trio.sleep(600)
        network.link("eth0", False)
        await trio.sleep(1)
        network.link("eth0", True)
        came_up = trio.current_time()
        await trio.sleep(10)
        times = []
        for mapping in mappings:
            after = [at for at in maps_of(fake, mapping.internal_port) if at >= came_up]
            assert len(after) == 1, (mapping.internal_port, after)
            assert mapping.state is State.ACTIVE
            times.append(after[0])
        # Spread: neither one burst nor later than the settling plus 5 s.
        assert max(times) - min(times) > 1.0
        assert max(times) <= came_up + 1.0 + 5.0
