"""The scheduler's wake-ups (Broker._wake_at, _push) under awkward timings.

It sleeps until the heap's head and is woken only by a push before it
(tests/test_scale_schedule.py). Here: the head's mapping released while the
scheduler sleeps for it, a clock that jumps past several renewals, and many
pushes at one instant. Every renewal that falls due goes out once: never
twice, never not at all.
"""

from __future__ import annotations

import trio
import trio.testing

from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import broker_for


def _renewals(gateway: FakeGateway, first: int, port: int) -> list[float]:
    times = []
    for request, at in zip(gateway.requests[first:], gateway.request_times[first:], strict=True):
        if not isinstance(request, pcp.PcpRequest):
            continue
        data = request.data
        if isinstance(data, pcp.MapData) and data.internal_port == port and request.lifetime > 0:
            times.append(at)
    return times


async def test_releasing_the_heads_mapping_leaves_the_next_renewal_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        soon = await broker.map(5000, "udp", lifetime=120, via="pcp")
        later = await broker.map(5001, "udp", lifetime=600, via="pcp")
        await trio.sleep(1)
        assert broker._wake_at < trio.current_time() + 120  # asleep until soon's renewal
        await soon.release()
        first = len(gateway.requests)
        heads = [entry[0] for entry in broker._heap]
        await trio.sleep(700)
        assert later.state is State.ACTIVE
        renewed = _renewals(gateway, first, 5001)
        assert renewed
        assert renewed[0] in heads  # at a time the heap held
        assert len(renewed) == len(set(renewed))
        assert _renewals(gateway, first, 5000) == []


async def test_a_clock_jump_past_several_renewal_times_renews_each_mapping_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120, max_lifetime=3600)
    async with broker_for(gateway, ("pcp",)) as broker:
        mappings = [
            await broker.map(port, "udp", lifetime=lifetime, via="pcp")
            for port, lifetime in ((6000, 800), (6001, 900), (6002, 1000))
        ]
        first = len(gateway.requests)
        # Past every renewal window (half the lease and then some) but before
        # any expiry: a suspended process, say, or a stalled event loop.
        autojump_clock.jump(630)
        await trio.sleep(1)
        for mapping in mappings:
            assert mapping.state is State.ACTIVE
        for port in (6000, 6001, 6002):
            assert len(_renewals(gateway, first, port)) == 1, port


async def test_many_pushes_at_one_instant_each_fire_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(min_lifetime=120)
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(4999, "udp", lifetime=3600, via="pcp")  # a far head
        await trio.sleep(1)
        ports = range(7000, 7200)
        async with trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(lambda p: broker.map(p, "udp", lifetime=120, via="pcp"), port)
        first = len(gateway.requests)
        await trio.sleep(100)
        for port in ports:
            assert len(_renewals(gateway, first, port)) == 1, port
