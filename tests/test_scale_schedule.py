"""The broker's timer heap at scale: every renewal goes out once, on time, in order.

The scheduler sleeps until the heap's head and is woken only by a push that
comes before it (Broker._push, benchmarks/scale.py); these tests hold it to
that under trio's MockClock with FakeGateway's memory links.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import trio
import trio.testing

from portbroker.broker import Broker, Mapping
from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import broker_for

COUNT = 1000


def _record_pushes(broker: Broker) -> list[tuple[float, int, Any]]:
    """Every Sleep the broker puts on its heap from now on: (until, token, target)."""
    pushes: list[tuple[float, int, Any]] = []
    original = broker._push

    def push(sleep: Any, target: Any) -> None:
        pushes.append((sleep.until, sleep.token, target))
        original(sleep, target)

    broker._push = push  # type: ignore[method-assign]
    return pushes


def _renewal_times(gateway: FakeGateway, first: int) -> dict[tuple[int, int], list[float]]:
    """When the gateway got each mapping's requests, from its request number *first* on."""
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    for request, at in zip(gateway.requests[first:], gateway.request_times[first:], strict=True):
        if not isinstance(request, pcp.PcpRequest):
            continue
        data = request.data
        assert isinstance(data, pcp.MapData)
        assert request.lifetime > 0  # no delete while they are held
        times[(data.protocol, data.internal_port)].append(at)
    return times


async def test_every_renewal_of_a_thousand_mappings_goes_out_once_at_its_time_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120, max_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        pushes = _record_pushes(broker)
        mappings: list[Mapping] = []

        async def make(first: int) -> None:
            for port in range(first, 1024 + COUNT, 50):
                mappings.append(await broker.map(port, "udp", lifetime=120, via="pcp"))

        async with trio.open_nursery() as nursery:
            for first in range(1024, 1074):
                nursery.start_soon(make, first)
        created = len(gateway.requests)
        assert len(mappings) == COUNT
        # Three lifetimes: every mapping renews at least twice more.
        await trio.sleep(3 * 120)
        end = trio.current_time()
        assert all(m.state is State.ACTIVE for m in mappings)
        key_of = {m: (m.request.protocol.number, m.request.internal_port) for m in mappings}
        # The renewals that were due: every Sleep pushed while ACTIVE whose
        # time came, each its own (until, token).
        due: dict[tuple[int, int], list[float]] = defaultdict(list)
        for until, _token, target in pushes:
            if until <= end:
                due[key_of[target]].append(until)
        sent = _renewal_times(gateway, created)
        assert set(sent) == set(due)
        for key, times in due.items():
            # Once each, none lost, none twice, at exactly the scheduled time
            # (the mock clock jumps to the heap's head; nothing else runs).
            assert sent[key] == sorted(times), key
            assert len(times) >= 2
        total = sum(len(t) for t in due.values())
        assert total >= 2 * COUNT
        # In order across mappings too: the gateway saw them sorted by schedule.
        arrivals = gateway.request_times[created:]
        assert arrivals == sorted(arrivals)
        assert len(arrivals) == total


async def test_a_sooner_renewal_wakes_a_scheduler_asleep_until_a_later_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        long = await broker.map(5000, "tcp", lifetime=7200, via="pcp")
        await trio.sleep(1)  # the scheduler is asleep until the long lease's renewal
        assert broker._wake_at >= long.lifecycle.lease.granted_at + 3600  # type: ignore[union-attr]
        pushes = _record_pushes(broker)
        short = await broker.map(5001, "tcp", lifetime=120, via="pcp")
        (until, _token, target) = pushes[-1]
        assert target is short
        assert until < broker._wake_at or broker._wake.is_set()
        granted, first = short.lease, len(gateway.requests)
        await trio.sleep(80)  # past the short lease's renewal window (60-75 s)
        assert short.lease is not granted  # renewed, on time
        assert _renewal_times(gateway, first)[(6, 5001)] == [until]


async def test_a_later_push_does_not_wake_the_scheduler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(5000, "tcp", lifetime=120, via="pcp")
        await trio.sleep(1)
        head = broker._wake_at
        assert head < trio.current_time() + 120
        await broker.map(5001, "tcp", lifetime=7200, via="pcp")
        # Its renewal is an hour away, after the head: nothing to wake for.
        assert not broker._wake.is_set()
        assert broker._wake_at == head
