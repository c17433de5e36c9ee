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
