"""A restart announced just after another hint was confirmed is still seen at once.

Hints (an ANNOUNCE, a NAT-PMP address announcement, a changed BOOTID) are
confirmed at most once per CONFIRM_INTERVAL, so that a flood of spoofed ones
costs a bounded number of requests. A hint inside that interval used to be
dropped: a real restart announced 1 s after a spoofed ANNOUNCE was confirmed
went unseen until the next renewal (half an hour later here). Now the latest
such hint is confirmed once the interval is over.
"""

from __future__ import annotations

import trio
import trio.testing

from portbroker.epoch import CONFIRM_INTERVAL, Confirm, EpochTracker
from portbroker.lifecycle import Restored
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import Recorder, broker_for, wait_for


async def test_a_restart_announced_right_after_a_spoofed_announce_is_restored_within_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway, methods=("pcp",)) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7600, "udp", lifetime=3600)
        await nursery.start(recorder.run, mapping)
        await trio.sleep(60)
        (link,) = gateway.links
        spoof = pcp.encode_response(pcp.PcpResponse(pcp.Opcode.ANNOUNCE, 0, 0, 0))
        link.put(spoof, gateway._source())
        await trio.sleep(1)  # confirmed: no loss
        assert broker.state_losses == 0
        gateway.reset()  # a real reboot, announced at once
        restarted = trio.current_time()
        await gateway.announce()
        await wait_for(lambda: bool(recorder.of(Restored)), limit=600)
        assert broker.state_losses == 1
        # Within the interval and one confirmation, not at the renewal (1,800 s on).
        assert recorder.first(Restored)[0] - restarted < CONFIRM_INTERVAL + 10
        assert gateway.mapping_for("udp", 7600) is not None
        nursery.cancel_scope.cancel()


def test_the_latest_hint_inside_the_interval_is_confirmed_once_it_is_over() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    assert isinstance(tracker.epoch("pcp", 0, 10.0, solicited=False), Confirm)
    assert tracker.epoch("pcp", 0, 10.5, solicited=False) is None
    assert tracker.deferred_until() == 10.0 + CONFIRM_INTERVAL
    assert tracker.take_deferred(11.0) is None  # not yet
    confirm = tracker.take_deferred(10.0 + CONFIRM_INTERVAL)
    assert isinstance(confirm, Confirm)
    assert confirm.families == ("pcp",)
    assert tracker.deferred_until() is None


def test_a_fact_asked_for_after_the_hint_settles_it_with_no_more_requests() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    assert isinstance(tracker.epoch("pcp", 0, 10.0, solicited=False), Confirm)
    assert tracker.epoch("pcp", 0, 10.5, solicited=False) is None  # deferred
    # A renewal sent at 11 s answers with a consistent epoch: nothing to confirm.
    assert tracker.epoch("pcp", 1011, 11.1, solicited=True, asked_at=11.0) is None
    assert tracker.deferred_until() is None
