"""Broker._patiently under a server that keeps answering others (Broker._observe).

Each answer from the server moves a waiting request's deadline only once it
has fallen 1/16 of its budget behind (scale: every answer moved every waiting
one). The promise stays: while the server answers others, a request waits, up
to its cap (*until*, a renewal's lease expiry, lifecycle rule 2).
"""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing

from portbroker.broker import Broker
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.transport import pcp_key
from portbroker.wire import pcp
from tests.broker_harness import broker_for

BUDGET = 16.0


async def _chatter(broker: Broker, every: float) -> None:
    """Ask the gateway something every *every* seconds: its answers reach _observe."""
    transport = broker._method_set.transport_of("pcp")
    assert transport is not None
    request = pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, ipaddress.IPv4Address("127.0.0.1"))
    while True:
        await transport.request(pcp.encode_request(request), pcp_key(request), [1.0])
        await trio.sleep(every)


async def _forever() -> None:
    """A request of our own that no answer ever ends."""
    await trio.sleep_forever()


async def _wait_unanswered(broker: Broker, until: float, chatter_every: float) -> float:
    """How long a request that gets no answer of its own waits; the gateway
    answers others every *chatter_every* seconds meanwhile."""
    method = broker._methods["pcp"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_chatter, broker, chatter_every)
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await broker._patiently(method, BUDGET, _forever(), until=until)
        nursery.cancel_scope.cancel()
    return trio.current_time() - started


async def test_a_server_answering_others_keeps_a_request_waiting_up_to_its_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Before: with the cap less than 1/16 of the budget past the first
    deadline, no answer moved the deadline, and the request gave up at the
    budget (16 s) though the server kept answering and the cap was 16.5 s."""
    gateway = FakeGateway()
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(5000, "udp", lifetime=600, via="pcp")  # the method is chosen
        until = trio.current_time() + BUDGET + 0.5
        waited = await _wait_unanswered(broker, until, chatter_every=0.25)
        assert waited == pytest.approx(BUDGET + 0.5, abs=0.01)


async def test_answers_just_inside_the_hysteresis_keep_a_request_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Answers to others every 14/16 of the budget: the deadline is never
    more than 1/16 behind, so the request waits until the cap (MAX_PATIENCE
    bounds it: 120 s)."""
    gateway = FakeGateway()
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(5000, "udp", lifetime=600, via="pcp")
        waited = await _wait_unanswered(broker, trio.current_time() + 200, BUDGET * 14 / 16)
        assert waited == pytest.approx(120.0, abs=0.01)


async def test_silence_for_the_budget_ends_a_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(5000, "udp", lifetime=600, via="pcp")
        waited = await _wait_unanswered(broker, trio.current_time() + 200, 1000.0)
        # The chatter's one answer (at once) moves nothing: the budget.
        assert waited == pytest.approx(BUDGET, abs=0.01)


async def test_a_burst_of_answers_does_not_look_at_every_waiting_request_each_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: each answer read every waiting request's deadline (the 1/16
    rule spared trio the moves, not the loop): WAITING answers to WAITING
    waiting requests read WAITING**2 deadlines (10,000 of each: about 50 s of
    CPU here). Now the requests wait in a heap by when an answer could first
    move them: each is looked at about once per 1/16 of its budget."""
    waiting = 300
    reads = 0
    deadline = trio.CancelScope.deadline

    def counted(scope: trio.CancelScope) -> float:
        nonlocal reads
        reads += 1
        return deadline.fget(scope)  # type: ignore[attr-defined,no-any-return]

    gateway = FakeGateway()
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(5000, "udp", lifetime=600, via="pcp")
        method = broker._methods["pcp"]
        ended: list[float] = []

        async def wait() -> None:
            with pytest.raises(trio.TooSlowError):
                await broker._patiently(method, BUDGET, _forever(), until=trio.current_time() + 60)
            ended.append(trio.current_time())

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(waiting):
                nursery.start_soon(wait)
            await trio.sleep(0.001)
            monkeypatch.setattr(
                trio.CancelScope,
                "deadline",
                property(counted, deadline.fset),  # type: ignore[attr-defined]
            )
            with trio.move_on_after(waiting * 0.01):
                await _chatter(broker, 0.01)  # one answer every 10 ms: `waiting` of them
            monkeypatch.undo()
        # The answers (for 3 s) kept them waiting, and the silence after
        # ended them: no earlier than the budget, no later than the last
        # answer's time plus the budget.
        assert len(ended) == waiting
        assert all(started + BUDGET <= t <= started + 3 + BUDGET + 0.01 for t in ended)
    print(f"{waiting} waiting, {waiting} answers: {reads} deadline reads")
    assert reads < 20 * waiting, reads
