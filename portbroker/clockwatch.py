"""Noticing that the host slept, or that this process was not run (docs/roaming.md).

After a suspend longer than a mapping's lifetime the gateway has dropped the
mapping while the broker's timers say it has minutes left: every timer in
trio runs on the monotonic clock, and on Linux ``CLOCK_MONOTONIC`` *stops*
during suspend, so nothing fires early to tell us. ``CLOCK_BOOTTIME`` is the
same clock but keeps counting through suspend (``clock_gettime(2)``): the
growth of ``BOOTTIME - MONOTONIC`` between two looks is exactly the time the
machine was suspended — precise, and immune to NTP or a user setting the
wall clock. macOS has the pair the other way round: ``CLOCK_MONOTONIC``
counts sleep, ``CLOCK_UPTIME_RAW`` does not. Elsewhere the wall clock
(``CLOCK_REALTIME``) stands in for the counting clock: a forward jump is
then either a suspend or the clock being set, and either way one extra
check of the mappings is cheap.

A process that is stopped (SIGSTOP, a debugger, a paused container or VM,
a starved machine) sees no clock gap at all — monotonic time went on — but
its timers fire late. That is the second signal, the lateness watchdog:
a tick that should have come after *interval* seconds came much later.
For the broker both mean the same thing — its idea of the gateway's state
is stale by *slept_for* seconds — so both yield one :class:`Resumed`, with
:attr:`Resumed.cause` saying which.

The detector (:class:`ResumeDetector`) is pure: it is fed clock readings
and says whether one means a resume. :class:`ClockWatch` is the trio loop
around it.
"""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable
from typing import Final

import attrs
import trio

__all__ = [
    "ClockReading",
    "ClockWatch",
    "ResumeCause",
    "ResumeDetector",
    "Resumed",
    "read_clocks",
]

DEFAULT_INTERVAL: Final = 2.0
DEFAULT_THRESHOLD: Final = 5.0


def _clock_pair() -> tuple[int, int | None]:
    """(a clock that stops in suspend, one that does not — or None: use the wall clock)."""
    if sys.platform == "linux" and hasattr(time, "CLOCK_BOOTTIME"):
        return time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME
    if sys.platform == "darwin" and hasattr(time, "CLOCK_UPTIME_RAW"):
        return time.CLOCK_UPTIME_RAW, time.CLOCK_MONOTONIC
    return time.CLOCK_MONOTONIC, None


_STOPPING, _COUNTING = _clock_pair()


class ResumeCause(enum.Enum):
    """Why the detector thinks time passed that the process did not see."""

    SUSPEND = "suspend"  # the clock that counts suspend ran ahead of the one that does not
    LATE_TIMERS = "late-timers"  # no clock gap, but the process was not run (SIGSTOP, VM pause)


@attrs.frozen
class ClockReading:
    """Both clocks read at one moment, in seconds.

    *stopping* stops during suspend (Linux: CLOCK_MONOTONIC); *counting*
    keeps going (Linux: CLOCK_BOOTTIME; the wall clock where there is no
    better one).
    """

    stopping: float
    counting: float


def read_clocks() -> ClockReading:
    """The host's clocks now (see the module docstring for which ones, per OS)."""
    if _COUNTING is None:
        return ClockReading(time.clock_gettime(_STOPPING), time.time())
    return ClockReading(time.clock_gettime(_STOPPING), time.clock_gettime(_COUNTING))


@attrs.frozen
class Resumed:
    """The host or the process was away for *slept_for* seconds beyond what was expected.

    Every mapping may have expired in that time (issue 11 §3): check or
    renew them all now.
    """

    slept_for: float
    cause: ResumeCause


@attrs.define
class ResumeDetector:
    """Pure: feed it a reading after each sleep; it says when one means a resume.

    *threshold* seconds of unexplained time count as a resume; less is
    scheduling noise. The first reading only starts the count.
    """

    threshold: float = attrs.field(default=DEFAULT_THRESHOLD)
    _last: ClockReading | None = attrs.field(default=None, init=False)

    @threshold.validator
    def _check_threshold(self, _attribute: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"threshold must be a positive number of seconds, not {value!r}")

    def restart(self, reading: ClockReading) -> None:
        """Count from *reading*, forgetting the time since the last one (the caller was busy)."""
        self._last = reading

    def elapsed(self, reading: ClockReading) -> float:
        """Seconds on the stopping clock from the last reading to *reading* (0 before the first)."""
        return 0.0 if self._last is None else max(0.0, reading.stopping - self._last.stopping)

    def observe(self, reading: ClockReading, expected: float) -> Resumed | None:
        """*reading* taken when a sleep of *expected* seconds (since the last reading) returned."""
        last, self._last = self._last, reading
        if last is None:
            return None
        ran = reading.stopping - last.stopping  # time this process's timers saw pass
        passed = reading.counting - last.counting  # time that passed, suspend included
        suspended = passed - ran
        late = ran - expected
        if suspended > self.threshold and suspended >= late:
            return Resumed(max(passed - expected, suspended), ResumeCause.SUSPEND)
        if late > self.threshold:
            return Resumed(max(passed - expected, late), ResumeCause.LATE_TIMERS)
        return None


@attrs.define(eq=False)
class ClockWatch:
    """``async for resumed in ClockWatch(): ...`` — a :class:`Resumed` per sleep or stall.

    Looks every *interval* seconds (one wake-up each time: 2 s is cheap, and
    a longer interval delays nothing that matters — the check runs on the
    first tick after the resume). Iterating forever is the point: run it in
    a task of its own and cancel that task to stop. *clocks* is for tests
    (fake readings under trio's MockClock). Not cancellation-sensitive:
    cancelling a wait loses nothing but that tick. It counts from its
    creation: create it where it is iterated (time before the first
    iteration is lateness, a stop there a resume).
    """

    interval: float = attrs.field(default=DEFAULT_INTERVAL)
    threshold: float = DEFAULT_THRESHOLD
    clocks: Callable[[], ClockReading] = read_clocks
    _detector: ResumeDetector = attrs.field(init=False)
    _handed_out: bool = attrs.field(init=False, default=False)

    @interval.validator
    def _check_interval(self, _attribute: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {value!r}")

    def __attrs_post_init__(self) -> None:
        self._detector = ResumeDetector(self.threshold)
        self._detector.restart(self.clocks())

    def __aiter__(self) -> ClockWatch:
        return self

    async def __anext__(self) -> Resumed:
        """The next resume.

        The time the consumer spent since the last one counts as expected,
        not as lateness (renewing every mapping may take a while); a
        suspend in that time is still seen, as the clocks' gap. Before the
        first one there is no consumer's time: a stop between the watch's
        creation and its first tick is lateness (CI hung on a stop that
        landed there and was counted as the consumer's).
        """
        while True:
            busy = self._detector.elapsed(self.clocks()) if self._handed_out else 0.0
            await trio.sleep(self.interval)
            resumed = self._detector.observe(self.clocks(), busy + self.interval)
            if resumed is not None:
                self._handed_out = True
                return resumed


def main(argv: list[str] | None = None) -> int:
    """``python -m portbroker.clockwatch [--interval S] [--threshold S]``: print each resume."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m portbroker.clockwatch",
        description="Print a JSON line whenever this host resumes from suspend or this "
        "process was held up (docs/roaming.md).",
    )
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args(argv)
    if not (args.interval > 0 and args.threshold > 0):
        parser.error("--interval and --threshold must be positive numbers of seconds")

    async def run() -> None:
        # "watching" once the watch counts: a stop right after it is seen.
        watch = ClockWatch(args.interval, args.threshold)
        print(json.dumps({"watching": True}), flush=True)
        async for resumed in watch:
            line = {"slept_for": round(resumed.slept_for, 3), "cause": resumed.cause.value}
            print(json.dumps(line), flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
