"""Review 12b: deferred confirmation of hints (portbroker/epoch.py, broker._confirm_later).

Memory links and FakeGateways only (127.0.0.1, 127.0.0.2): nothing is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from portbroker.epoch import CONFIRM_INTERVAL, Confirm, EpochTracker
from portbroker.wire import pcp


@pytest.fixture(autouse=True)
def _no_gateway_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)


def _announces(requests: Sequence[object]) -> int:
    return sum(
        1 for r in requests if isinstance(r, pcp.PcpRequest) and r.opcode is pcp.Opcode.ANNOUNCE
    )


def test_a_deferred_hint_is_taken_once_it_is_due_whatever_the_float_rounding() -> None:
    # A time t at which (t + 2.0) - t < 2.0 in floating point.
    last = next(
        t / 8.0 + 0.1
        for t in range(10**7)
        if (t / 8.0 + 0.1 + CONFIRM_INTERVAL) - (t / 8.0 + 0.1) < CONFIRM_INTERVAL
    )
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    assert isinstance(tracker.epoch("pcp", 0, last, solicited=False), Confirm)
    assert tracker.epoch("pcp", 0, last + 0.5, solicited=False) is None
    due = tracker.deferred_until()
    assert due is not None
    # _confirm_later sleeps until *due* and takes it then: None here would have
    # it sleep until the same moment again, for ever under a MockClock.
    assert isinstance(tracker.take_deferred(due), Confirm)
