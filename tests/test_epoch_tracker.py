"""The per-gateway state-loss tracker, with plain numbers (docs/architecture.md)."""

from __future__ import annotations

from portbroker.epoch import (
    CONFIRM_INTERVAL,
    BootIdSeen,
    Confirm,
    EntryMissing,
    EpochTracker,
    StateLoss,
    UptimeSeen,
)


def test_solicited_epochs_are_facts_and_a_reset_is_one_incident() -> None:
    tracker = EpochTracker()
    assert tracker.epoch("pcp", 1000, 0.0, solicited=True) is None
    assert tracker.epoch("pcp", 1100, 100.0, solicited=True) is None
    verdict = tracker.epoch("pcp", 3, 200.0, solicited=True)
    assert isinstance(verdict, StateLoss)
    assert "pcp epoch" in verdict.reason
    assert tracker.incidents == 1


def test_one_box_one_incident_across_protocols() -> None:
    """miniupnpd restarts PCP, NAT-PMP and UPnP at once: seen thrice, one incident."""
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    tracker.epoch("natpmp", 1000, 0.0, solicited=True)
    tracker.signal(BootIdSeen(7, 0.0))
    assert isinstance(tracker.epoch("pcp", 2, 500.0, solicited=True), StateLoss)
    # The other protocols' first answers after the restart start new baselines.
    assert tracker.epoch("natpmp", 3, 501.0, solicited=True) is None
    assert tracker.signal(BootIdSeen(8, 502.0)) is None  # a new baseline, no hint
    assert tracker.incidents == 1
    # A second, real restart later is a second incident.
    assert isinstance(tracker.epoch("natpmp", 1, 900.0, solicited=True), StateLoss)
    assert tracker.incidents == 2


def test_unsolicited_is_a_hint_to_confirm_and_never_moves_the_baseline() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    hint = tracker.epoch("pcp", 0, 10.0, solicited=False)
    assert isinstance(hint, Confirm)
    assert hint.families == ("pcp",)
    assert tracker.incidents == 0
    # The baseline is still 1000 @ 0: a consistent answer is no loss.
    assert tracker.epoch("pcp", 1011, 11.0, solicited=True) is None


def test_a_consistent_unsolicited_epoch_costs_nothing() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    assert tracker.epoch("pcp", 1050, 50.0, solicited=False) is None


def test_confirmations_are_rate_limited() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 0.0, solicited=True)
    confirms = [
        tracker.epoch("pcp", 0, 10.0 + i * 0.01, solicited=False) for i in range(1000)
    ]  # 1000 spoofed resets in 10 s
    asked = [c for c in confirms if isinstance(c, Confirm)]
    assert 1 <= len(asked) <= 10 / CONFIRM_INTERVAL + 1


def test_an_announcement_without_a_baseline_asks_but_a_stray_reply_does_not() -> None:
    tracker = EpochTracker()
    tracker.epoch("natpmp", 500, 0.0, solicited=True)
    assert tracker.epoch("pcp", 0, 1.0, solicited=False) is None
    confirm = tracker.epoch("pcp", 0, 5.0, solicited=False, announcement=True)
    assert isinstance(confirm, Confirm)
    assert confirm.families == ("natpmp",)  # the family that can tell


def test_address_announcements_are_hints() -> None:
    tracker = EpochTracker()
    confirm = tracker.address_announced("6.6.6.6", 1.0)
    assert isinstance(confirm, Confirm)
    assert "6.6.6.6" in confirm.reason
    assert tracker.incidents == 0


def test_upnp_signals() -> None:
    tracker = EpochTracker()
    assert tracker.signal(BootIdSeen(1, 0.0)) is None
    assert tracker.signal(BootIdSeen(1, 10.0)) is None
    hint = tracker.signal(BootIdSeen(2, 20.0))  # forgeable: a hint to confirm
    assert isinstance(hint, Confirm)
    assert "BOOTID" in hint.reason
    assert tracker.signal(UptimeSeen(1000, 100.0)) is None
    assert tracker.signal(UptimeSeen(1100, 200.0)) is None
    loss = tracker.signal(UptimeSeen(5, 300.0))
    assert isinstance(loss, StateLoss)
    assert "uptime" in loss.reason
    loss = tracker.signal(EntryMissing("8080/TCP: 714 NoSuchEntryInArray", 400.0))
    assert isinstance(loss, StateLoss)
    assert "714" in loss.reason
    assert tracker.incidents == 2


def test_a_busy_server_stamping_a_burst_with_one_epoch_is_not_a_loss() -> None:
    """miniupnpd answers a burst of 50 MAPs over ~10 s, each stamped with the
    epoch it read when the burst began: judged by the arrival time alone, its
    clock stood still (RFC 6887 §8.5: "too slow"). The server read its clock
    between each request's send and its answer; only a reading no moment of
    that interval explains is a loss."""
    tracker = EpochTracker()
    assert tracker.epoch("pcp", 100, 0.1, solicited=True, asked_at=0.0) is None
    for i in range(50):
        arrived = 0.2 * (i + 1)
        assert tracker.epoch("pcp", 100, arrived, solicited=True, asked_at=0.001 * i) is None
    assert tracker.incidents == 0
    # By arrival time alone it would have been a loss.
    naive = EpochTracker()
    naive.epoch("pcp", 100, 0.1, solicited=True)
    assert isinstance(naive.epoch("pcp", 100, 10.0, solicited=True), StateLoss)
    # A request sent after the burst still sees a real restart.
    assert isinstance(tracker.epoch("pcp", 2, 30.0, solicited=True, asked_at=29.9), StateLoss)


def test_too_fast_is_judged_on_the_longest_interval() -> None:
    tracker = EpochTracker()
    tracker.epoch("pcp", 1000, 1.0, solicited=True, asked_at=0.0)
    # Asked at 0, answered at 20: the server may have read its clock at 0 and
    # at 20, so 20 s of epoch is fine; 40 s is not.
    assert tracker.epoch("pcp", 1020, 20.0, solicited=True, asked_at=19.0) is None
    assert isinstance(tracker.epoch("pcp", 1080, 21.0, solicited=True, asked_at=20.5), StateLoss)
