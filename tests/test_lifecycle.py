"""The mapping state machine, with plain numbers (no event loop)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.lifecycle import (
    MIN_RENEWAL_GAP,
    TRANSITIONS,
    Acquired,
    ExternalAddressChanged,
    Failed,
    Lost,
    MappingLifecycle,
    Renewed,
    Restored,
    State,
    Trigger,
    renewal_time,
)
from portbroker.types import Lease, TransportProtocol


def lease(granted_at: float = 0.0, lifetime: int = 1000, port: int = 5000) -> Lease:
    return Lease(
        method="pcp",
        protocol=TransportProtocol.UDP,
        internal_address="192.168.1.100",
        internal_port=5000,
        external_address="203.0.113.7",
        external_port=port,
        lifetime=lifetime,
        granted_at=granted_at,
        gateway="192.168.1.1",
        nonce=bytes(12),
    )


@given(st.floats(0, 1e6), st.integers(20, 10**6), st.integers(0, 5), st.integers(0, 2**32))
def test_renewal_windows_follow_rfc_6887(
    granted: float, lifetime: int, attempt: int, seed: int
) -> None:
    when = renewal_time(granted, lifetime, attempt, random.Random(seed))
    start = 1 - 2.0 ** -(attempt + 1)
    width = 2.0 ** -(attempt + 3)
    assert when is not None
    assert granted + lifetime * start <= when <= granted + lifetime * (start + width) + 1e-6
    assert when < granted + lifetime


def test_first_windows() -> None:
    low = renewal_time(0, 1000, 0, random.Random(), not_before=None)
    assert low is not None
    assert 500 <= low <= 625
    second = renewal_time(0, 1000, 1, random.Random())
    assert second is not None
    assert 750 <= second <= 812.5
    third = renewal_time(0, 1000, 2, random.Random())
    assert third is not None
    assert 875 <= third <= 906.25


def test_not_before_pushes_an_attempt_and_none_means_too_late() -> None:
    assert renewal_time(0, 1000, 0, random.Random(), not_before=700) == 700
    assert renewal_time(0, 1000, 0, random.Random(), not_before=1000) is None


def test_first_grant_is_acquired_and_schedules_the_first_window() -> None:
    machine = MappingLifecycle(random.Random(1))
    events = machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    assert events == [Acquired(lease())]
    assert machine.state is State.ACTIVE
    assert machine.deadline is not None
    assert 500 <= machine.deadline <= 625
    assert machine.timer_trigger is Trigger.RENEW_DUE


def test_renewal_success_and_port_change() -> None:
    machine = MappingLifecycle(random.Random(1))
    machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    machine.fire(Trigger.RENEW_DUE, 550.0)
    assert machine.state is State.RENEWING
    events = machine.fire(Trigger.GRANTED, 551.0, lease=lease(551.0, port=6000))
    assert events == [
        Renewed(lease(551.0, port=6000)),
        ExternalAddressChanged(lease().external_address, 5000, lease(551.0, port=6000)),
    ]


def test_failed_renewals_walk_the_windows_then_expire() -> None:
    machine = MappingLifecycle(random.Random(2))
    machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    attempts = []
    now = 0.0
    while machine.timer_trigger is Trigger.RENEW_DUE:
        assert machine.deadline is not None
        now = machine.deadline
        attempts.append(now)
        machine.fire(Trigger.RENEW_DUE, now)
        machine.fire(Trigger.RENEW_FAILED, now + 1)
    assert machine.timer_trigger is Trigger.EXPIRED
    assert machine.deadline == 1000
    assert len(attempts) >= 5
    assert all(b - a >= MIN_RENEWAL_GAP for a, b in itertools.pairwise(attempts))
    events = machine.fire(Trigger.EXPIRED, 1000.0, reason="lease expired")
    assert events == [Lost("lease expired")]
    assert machine.state is State.LOST
    assert timer_trigger(machine) is Trigger.RECREATE_DUE


def timer_trigger(machine: MappingLifecycle) -> Trigger | None:
    # A call, not the property, so the type checker does not carry the
    # narrowing of an earlier assert across fire().
    return machine.timer_trigger


def test_state_loss_waits_a_random_recovery_delay() -> None:
    machine = MappingLifecycle(random.Random(3), recovery_delay=5.0)
    machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    events = machine.fire(Trigger.STATE_LOST, 100.0, reason="epoch")
    assert events == [Lost("epoch")]
    assert machine.deadline is not None
    assert 100.0 <= machine.deadline <= 105.0
    # A second loss report while recovering changes nothing.
    deadline = machine.deadline
    assert machine.fire(Trigger.STATE_LOST, 101.0) == []
    assert machine.deadline == deadline
    machine.fire(Trigger.RECREATE_DUE, deadline)
    assert machine.state is State.REQUESTING
    restored = machine.fire(Trigger.GRANTED, deadline + 0.01, lease=lease(deadline))
    assert restored == [Restored(lease(deadline))]


def test_recreate_failure_retries_later() -> None:
    machine = MappingLifecycle(random.Random(3))
    machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    machine.fire(Trigger.STATE_LOST, 10.0)
    machine.fire(Trigger.RECREATE_DUE, 12.0)
    assert machine.fire(Trigger.RECREATE_FAILED, 13.0, retry_in=30.0) == []
    assert (machine.state, machine.deadline) == (State.LOST, 43.0)


def test_refused_first_request_fails() -> None:
    machine = MappingLifecycle()
    assert machine.fire(Trigger.REFUSED, 0.0, reason="NOT_AUTHORIZED") == [Failed("NOT_AUTHORIZED")]
    assert machine.state is State.FAILED
    assert machine.fire(Trigger.RELEASE, 1.0) == []  # FAILED is final


@pytest.mark.parametrize("state", [s for s in State if s not in (State.RELEASED, State.FAILED)])
def test_release_works_from_every_live_state(state: State) -> None:
    assert TRANSITIONS[(state, Trigger.RELEASE)] is State.RELEASED


def test_late_triggers_after_release_are_ignored() -> None:
    machine = MappingLifecycle()
    machine.fire(Trigger.GRANTED, 0.0, lease=lease())
    machine.fire(Trigger.RELEASE, 1.0)
    assert machine.fire(Trigger.GRANTED, 2.0, lease=lease(2.0)) == []
    assert machine.state is State.RELEASED
    assert machine.timer_trigger is None


def test_a_short_lifetime_keeps_the_four_second_gap_when_it_can() -> None:
    machine = MappingLifecycle(random.Random(1))
    machine.fire(Trigger.GRANTED, 0.0, lease=lease(lifetime=6))
    assert machine.deadline == 4.0  # the window [3, 3.75] would be under 4 s


def test_a_very_short_lifetime_renews_at_half_life() -> None:
    machine = MappingLifecycle(random.Random(1))
    machine.fire(Trigger.GRANTED, 0.0, lease=lease(lifetime=3))
    assert machine.deadline == 1.5
