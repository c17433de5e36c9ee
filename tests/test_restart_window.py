"""A renewal that lands while the gateway's daemon restarts (its port closed
for a moment: one ICMP port unreachable) and the broker's memory of it.

A lab run under load caught it (tests/lab/test_lab_p2p_candidates.py): a
PCP-only mapping's renewal reached miniupnpd in the second it was restarting.
The ICMP ruled PCP out for UNAVAILABLE_TTL (30 s), every re-creation in that
time failed from memory ("ruled out") without asking, and the backoff (2, 5,
15, 30 s) put the next real attempt 52 s after the loss, though miniupnpd
was back within a second. A rule-out steers the choice to another method;
where there is none left, the methods are asked again.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from portbroker.broker import UNAVAILABLE_TTL
from portbroker.errors import PortBrokerError
from portbroker.lifecycle import RECOVERY_BACKOFF, Lost, Restored, State
from portbroker.testing.fake_gateway import FakeGateway
from tests.broker_harness import Recorder, broker_for, wait_for


async def _lost_in_a_restart(methods: tuple[str, ...]) -> tuple[float, float]:
    """(when the loss was heard, when the mapping was restored), mock time."""
    gateway = FakeGateway()
    recorder = Recorder()
    async with (
        broker_for(gateway, methods, recovery_delay=0.5) as broker,
        trio.open_nursery() as nursery,
    ):
        mapping = await broker.map(7010, "udp", lifetime=20)
        await nursery.start(recorder.run, mapping)
        gateway.closed = True  # restarting: the renewal at ~10 s meets a closed port
        await wait_for(lambda: bool(recorder.of(Lost)))
        # Closed past recovery_delay (0.5 s): the first re-creation meets
        # it still closed, and every method is ruled out.
        await trio.sleep(1.5)
        gateway.reset()  # back, its table empty
        gateway.closed = False
        await wait_for(lambda: bool(recorder.of(Restored)))
        assert mapping.state is State.ACTIVE
        assert gateway.mapping_for("udp", 7010) is not None
        nursery.cancel_scope.cancel()
    return recorder.first(Lost)[0], recorder.first(Restored)[0]


async def test_a_mapping_lost_to_a_restarting_gateway_is_back_at_the_first_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lost, restored = await _lost_in_a_restart(("pcp",))
    # The first re-creation (within recovery_delay) met the port still
    # closed; the next, after the first backoff step, finds it back. Not
    # after the rule-out has run out (30 s) plus the backoff after it.
    assert restored - lost <= 0.5 + RECOVERY_BACKOFF[0] + 0.5
    assert restored - lost < UNAVAILABLE_TTL


async def test_with_a_second_method_the_restart_costs_one_backoff_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # PCP and NAT-PMP share the port: the ICMP ruled PCP out, the first
    # re-creation found NAT-PMP's port closed too, the next (NAT-PMP, not
    # ruled out by a race's refusal) finds it back. A guard: asking every
    # method again where all are ruled out must not make this one slower.
    lost, restored = await _lost_in_a_restart(("pcp", "natpmp"))
    assert restored - lost <= 0.5 + RECOVERY_BACKOFF[0] + 0.5


REMOTE = ("198.51.100.7", 3478)


async def test_a_peer_after_a_restart_asks_pcp_again_when_it_is_the_only_method(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The same memory in peer(): PCP ruled out by one ICMP (a map while
    # miniupnpd restarted) made every peer() for 30 s give up on PEER
    # without asking: fallback=None failed ("does not speak PCP"), and the
    # default fallback made an inbound MAP open to anyone (through PCP, the
    # only method, which it asked and found back) instead of the PEER.
    gateway = FakeGateway()
    async with broker_for(gateway, ("pcp",)) as broker:
        await broker.map(7040, "udp", lifetime=600)  # PCP is the choice
        gateway.closed = True
        with pytest.raises(PortBrokerError):
            await broker.map(7041, "udp", lifetime=600)  # the ICMP rules PCP out
        gateway.closed = False  # back a moment later
        await trio.sleep(1)
        strict = await broker.peer(7042, "udp", remote=REMOTE, lifetime=600, fallback=None)
        assert strict.remote is not None
        assert gateway.peer_for("udp", 7042, REMOTE) is not None
        fallen = await broker.peer(7043, "udp", remote=REMOTE, lifetime=600)
        assert fallen.remote is not None  # a PEER, not an inbound MAP
        assert gateway.peer_for("udp", 7043, REMOTE) is not None
        assert gateway.mapping_for("udp", 7043) is None
