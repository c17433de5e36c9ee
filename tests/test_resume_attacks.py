"""Adversarial cases for resume handling (issue 11 review): clock steps, many mappings, a move."""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import trio
import trio.testing

from portbroker.clockwatch import ResumeCause, Resumed, ResumeDetector, read_clocks
from portbroker.lifecycle import State
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_network import FakeNetwork
from portbroker.wire.pcp import MapData, PcpRequest
from tests.broker_harness import wait_for
from tests.test_resume import GW, resuming
from tests.test_roaming import A, B, following, gateways, on


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's clock pair")
def test_the_wall_clock_being_set_is_not_a_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    # An NTP step or `date -s` moves CLOCK_REALTIME only; the detector reads
    # MONOTONIC and BOOTTIME, which no one can set.
    detector = ResumeDetector(threshold=5.0)
    detector.restart(read_clocks())
    real_time, real_gettime = time.time, time.clock_gettime

    def stepped(clock: int) -> float:
        return real_gettime(clock) + (3600.0 if clock == time.CLOCK_REALTIME else 0.0)

    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)
    monkeypatch.setattr(time, "clock_gettime", stepped)
    assert detector.observe(read_clocks(), expected=0.0) is None
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600.0)
    assert detector.observe(read_clocks(), expected=0.0) is None


def _maps(fake: FakeGateway, since: float) -> Counter[int]:
    return Counter(
        request.data.internal_port
        for request, at in zip(fake.requests, fake.request_times, strict=True)
        if at >= since and isinstance(request, PcpRequest) and isinstance(request.data, MapData)
    )


async def test_a_thousand_mappings_resumed_are_each_renewed_once_spread_over_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGateway(address=GW)
    ports = range(20000, 21000)
    async with resuming(fake) as (broker, resumes):
        mappings = [await broker.map(port, "udp", lifetime=7200) for port in ports]
        await trio.sleep(60)
        fake.mappings.clear()  # lapsed during a two-hour suspend
        woke = trio.current_time()
        resumes.send_nowait(Resumed(7200.0, ResumeCause.SUSPEND))
        await trio.sleep(5.01)
        times = [
            at
            for request, at in zip(fake.requests, fake.request_times, strict=True)
            if at >= woke and isinstance(request, PcpRequest)
        ]
        assert _maps(fake, woke) == Counter(dict.fromkeys(ports, 1))
        assert woke <= min(times)
        assert max(times) <= woke + 5.0
        # Spread, not a burst: no tenth of the window holds more than a fifth.
        tenths = Counter(int((at - woke) / 0.5) for at in times)
        assert max(tenths.values()) < 200
        assert all(m.state is State.ACTIVE for m in mappings)
        assert len(fake.mappings) == 1000


async def test_a_resume_during_a_move_leaves_every_mapping_on_the_new_gateway_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw_a, gw_b = gateways()
    network = FakeNetwork.routed_via(A)
    send, receive = trio.open_memory_channel[Resumed](math.inf)
    async with following(network, gw_a, gw_b, resume_watch=receive) as broker:
        mappings = [await broker.map(8080 + i, "tcp") for i in range(5)]
        gw_a.delay = 0.5
        gw_b.delay = 0.5
        network.route_via(B)
        await wait_for(lambda: broker.gateway == B)
        send.send_nowait(Resumed(7200.0, ResumeCause.SUSPEND))  # mid-move
        await trio.sleep(60)
        for mapping in mappings:
            assert mapping.state is State.ACTIVE
            assert mapping.lease is not None
            assert mapping.lease.gateway == B
        assert gw_a.mappings == {}
        assert len(gw_b.mappings) == 5
        assert on(gw_b)
    assert gw_b.mappings == {}
