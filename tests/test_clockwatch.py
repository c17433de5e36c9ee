"""The suspend/resume detector: fake clocks, MockClock, and a real stopped process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import trio
import trio.testing

from portbroker.clockwatch import (
    ClockReading,
    ClockWatch,
    ResumeCause,
    Resumed,
    ResumeDetector,
    read_clocks,
)
from tests.lab.helpers import lines_of, stop_read_process


def _summary(resumed: Resumed | None) -> tuple[object, object] | None:
    return None if resumed is None else (resumed.cause, resumed.slept_for)


def _started(threshold: float = 5.0) -> ResumeDetector:
    detector = ResumeDetector(threshold)
    detector.restart(ClockReading(100.0, 1000.0))
    return detector


def test_the_first_reading_only_starts_the_count() -> None:
    assert ResumeDetector().observe(ClockReading(1.0, 9999.0), 2.0) is None


def test_ticks_on_time_are_no_resume() -> None:
    detector = _started()
    assert detector.observe(ClockReading(102.0, 1002.0), 2.0) is None
    assert detector.observe(ClockReading(104.1, 1004.1), 2.0) is None


def test_boottime_running_ahead_of_monotonic_is_a_suspend_of_that_long() -> None:
    # An hour of suspend: CLOCK_MONOTONIC stood still, CLOCK_BOOTTIME did not.
    resumed = _started().observe(ClockReading(102.0, 1002.0 + 3600), 2.0)
    assert _summary(resumed) == (ResumeCause.SUSPEND, pytest.approx(3600.0))


def test_both_clocks_moving_on_past_the_sleep_is_late_timers() -> None:
    # SIGSTOP for 100 s: monotonic time went on, the process was not run.
    resumed = _started().observe(ClockReading(202.0, 1102.0), 2.0)
    assert _summary(resumed) == (ResumeCause.LATE_TIMERS, pytest.approx(100.0))


def test_a_gap_under_the_threshold_is_noise() -> None:
    detector = _started(threshold=5.0)
    assert detector.observe(ClockReading(106.9, 1006.9), 2.0) is None  # 4.9 s late
    assert detector.observe(ClockReading(108.9, 1013.8), 2.0) is None  # 4.9 s suspended


def test_the_wall_clock_stepping_back_is_no_resume() -> None:
    assert _started().observe(ClockReading(102.0, 1002.0 - 3600), 2.0) is None


def test_a_suspend_while_stopped_reports_all_the_time_missed_as_suspend() -> None:
    resumed = _started().observe(ClockReading(132.0, 1032.0 + 600), 2.0)
    assert _summary(resumed) == (ResumeCause.SUSPEND, pytest.approx(630.0))


def test_restart_forgets_the_time_since_the_last_reading() -> None:
    detector = _started()
    detector.restart(ClockReading(500.0, 1400.0))
    assert detector.observe(ClockReading(502.0, 1402.0), 2.0) is None


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_a_threshold_must_be_positive(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold must be a positive"):
        ResumeDetector(threshold)


def test_an_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be a positive"):
        ClockWatch(interval=0)


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
def test_on_linux_the_counting_clock_is_never_behind_the_stopping_one() -> None:
    reading = read_clocks()
    assert reading.counting >= reading.stopping
    assert reading.stopping == pytest.approx(time.clock_gettime(time.CLOCK_MONOTONIC), abs=1)


class FakeClocks:
    """Clocks driven by trio's MockClock, plus the time the test says was slept or stalled."""

    def __init__(self) -> None:
        self.suspended = 0.0  # counted by the counting clock only
        self.stalled = 0.0  # counted by both: the process was not run

    def __call__(self) -> ClockReading:
        now = trio.current_time() + self.stalled
        return ClockReading(now, now + self.suspended)


async def test_the_watch_reports_a_suspend_on_its_next_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clocks = FakeClocks()
    watch = ClockWatch(interval=2.0, threshold=5.0, clocks=clocks)
    start = trio.current_time()

    async def suspend_later() -> None:
        await trio.sleep(7.0)
        clocks.suspended += 3600

    async with trio.open_nursery() as nursery:
        nursery.start_soon(suspend_later)
        resumed = await anext(watch)
    assert _summary(resumed) == (ResumeCause.SUSPEND, pytest.approx(3600.0))
    assert trio.current_time() - start == pytest.approx(8.0)  # the first tick after 7 s


async def test_the_time_a_consumer_spends_is_not_lateness_but_a_suspend_in_it_is_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clocks = FakeClocks()
    watch = ClockWatch(interval=2.0, threshold=5.0, clocks=clocks)

    async def stall_later() -> None:
        await trio.sleep(3.0)
        clocks.stalled += 60  # SIGSTOP for a minute, during the watch's sleep

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stall_later)
        first = await anext(watch)
    assert first.cause is ResumeCause.LATE_TIMERS
    assert first.slept_for == pytest.approx(60.0, abs=2.0)
    await trio.sleep(60)  # the consumer renews everything, slowly
    with trio.move_on_after(10) as nothing:
        await anext(watch)
    assert nothing.cancelled_caught
    await trio.sleep(30)  # busy again, and the host sleeps meanwhile
    clocks.suspended += 900
    second = await anext(watch)
    assert second.cause is ResumeCause.SUSPEND
    assert second.slept_for == pytest.approx(900.0)


async def test_a_stop_before_the_first_tick_is_lateness_not_the_consumers_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`python -m portbroker.clockwatch` prints "watching", then iterates: a SIGSTOP
    landing in between was counted as time the consumer spent (CI hung on it)."""
    clocks = FakeClocks()
    watch = ClockWatch(interval=2.0, threshold=1.0, clocks=clocks)
    clocks.stalled += 2.5  # stopped before the first anext()
    with trio.fail_after(30):  # (mock time) it was never reported
        first = await anext(watch)
    assert first.cause is ResumeCause.LATE_TIMERS
    assert first.slept_for == pytest.approx(2.5, abs=0.1)


def test_a_stopped_process_reports_its_timers_late_after_sigcont() -> None:
    # The issue 11 lab's stand-in for suspend: SIGSTOP does not stop
    # CLOCK_MONOTONIC, so the signal is lateness, not a clock gap.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "portbroker.clockwatch", "--interval", "0.2", "--threshold", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = lines_of(watcher)  # a read with a deadline: a report that never comes fails
    try:
        assert json.loads(lines.next(30) or "null") == {"watching": True}
        watcher.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        watcher.send_signal(signal.SIGCONT)
        text = lines.next(30)
        assert text, f"no report within 30 s of SIGCONT ({text!r})"
        report = json.loads(text)
    finally:
        stop_read_process(watcher, signal.SIGINT, timeout=10)
    assert watcher.returncode == 0  # it took the SIGINT (not killed after ignoring it)
    assert report["cause"] == "late-timers"
    assert report["slept_for"] >= 1.5
