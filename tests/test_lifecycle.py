"""The mapping state machine, with plain numbers (no event loop)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.errors import MappingError, MethodUnavailable, NoAnswer
from portbroker.lifecycle import (
    MAX_RECOVERY_ATTEMPTS,
    MIN_RENEWAL_GAP,
    RECOVERY_BACKOFF,
    TRANSITIONS,
    Delete,
    ExternalAddressChanged,
    Failed,
    Failure,
    FailureKind,
    LifecycleError,
    Lost,
    MappingLifecycle,
    Recreate,
    Released,
    Renew,
    Renewed,
    Restored,
    RetryDelete,
    Sleep,
    State,
    Step,
    Stop,
    Trigger,
    classify,
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


def state_of(machine: MappingLifecycle) -> State:
    # Through a function: mypy narrows attributes across fire() calls otherwise.
    return machine.state


SILENT = Failure(FailureKind.SILENT, "no answer")
REFUSED = Failure(FailureKind.REFUSED, "NOT_AUTHORIZED")
UNAVAILABLE = Failure(FailureKind.UNAVAILABLE, "port closed")


def active(seed: int = 1, recovery_delay: float = 5.0) -> tuple[MappingLifecycle, Sleep]:
    machine = MappingLifecycle(random.Random(seed), recovery_delay)
    step = machine.fire(Trigger.GRANTED, 0.0, token=0, lease=lease())
    assert isinstance(step.action, Sleep)
    return machine, step.action


def test_first_grant_is_acquired_and_sleeps_until_the_first_window() -> None:
    machine, sleep = active()
    assert state_of(machine) is State.ACTIVE
    assert 500 <= sleep.until <= 625
    assert sleep.token == machine.token


def test_timer_starts_a_renewal_and_its_grant_is_renewed_with_port_change() -> None:
    machine, sleep = active()
    step = machine.fire(Trigger.TIMER, sleep.until, token=sleep.token)
    assert state_of(machine) is State.RENEWING
    assert isinstance(step.action, Renew)
    assert step.action.lease == lease()
    # Rule 2: max(4 s, remaining / 4), at most 60 s.
    assert step.action.budget == pytest.approx(min(60.0, (1000 - sleep.until) / 4))
    new = lease(sleep.until + 1, port=6000)
    done = machine.fire(Trigger.GRANTED, sleep.until + 1, token=step.action.token, lease=new)
    assert done.events == [
        Renewed(new),
        ExternalAddressChanged(lease().external_address, 5000, new),
    ]
    assert state_of(machine) is State.ACTIVE
    assert isinstance(done.action, Sleep)


def test_silent_renewals_walk_the_windows_then_the_mapping_is_lost_at_expiry() -> None:
    machine, sleep = active(seed=2)
    now, action = sleep.until, machine.fire(Trigger.TIMER, sleep.until, token=sleep.token).action
    attempts = [now]
    while True:
        assert isinstance(action, Renew)
        step = machine.fire(Trigger.FAILED, now + 1, token=action.token, failure=SILENT)
        assert isinstance(step.action, Sleep)
        now = step.action.until
        step = machine.fire(Trigger.TIMER, now, token=step.action.token)
        if state_of(machine) is State.LOST:
            break
        attempts.append(now)
        action = step.action
    assert now == 1000.0  # woke at expiry
    assert step.events == [Lost("lease expired unrenewed (no answer)")]
    assert all(b - a >= MIN_RENEWAL_GAP for a, b in itertools.pairwise(attempts))
    assert len(attempts) >= 4
    assert all(t < 1000.0 for t in attempts)


def test_retry_after_pushes_the_next_renewal() -> None:
    machine, sleep = active()
    renew = machine.fire(Trigger.TIMER, 550.0, token=sleep.token).action
    assert isinstance(renew, Renew)
    retry = Failure(FailureKind.RETRY, "NO_RESOURCES", retry_after=250.0)
    step = machine.fire(Trigger.FAILED, 551.0, token=renew.token, failure=retry)
    assert isinstance(step.action, Sleep)
    assert step.action.until >= 801.0
    assert state_of(machine) is State.RENEWING


@pytest.mark.parametrize("failure", [REFUSED, UNAVAILABLE])
def test_a_refused_renewal_is_lost_at_once_and_recreated_afresh(failure: Failure) -> None:
    machine, sleep = active(recovery_delay=5.0)
    renew = machine.fire(Trigger.TIMER, 550.0, token=sleep.token).action
    assert isinstance(renew, Renew)
    step = machine.fire(Trigger.FAILED, 551.0, token=renew.token, failure=failure)
    assert state_of(machine) is State.LOST
    assert step.events == [Lost(f"renewal refused: {failure.reason}")]
    assert isinstance(step.action, Sleep)
    assert 551.0 <= step.action.until <= 556.0
    again = machine.fire(Trigger.TIMER, step.action.until, token=step.action.token)
    assert isinstance(again.action, Recreate)
    assert again.action.previous is None  # rule 6: after a refusal, afresh


def test_state_loss_recreates_with_the_previous_lease_then_restores() -> None:
    machine, sleep = active(recovery_delay=5.0)
    step = machine.fire(Trigger.STATE_LOST, 100.0, reason="pcp epoch too-slow")
    assert step.events == [Lost("pcp epoch too-slow")]
    assert isinstance(step.action, Sleep)
    assert 100.0 <= step.action.until <= 105.0
    # The old renewal timer is superseded.
    assert machine.fire(Trigger.TIMER, sleep.until, token=sleep.token) == Step([], None)
    recreate = machine.fire(Trigger.TIMER, step.action.until, token=step.action.token).action
    assert isinstance(recreate, Recreate)
    assert recreate.previous == lease()  # rule 6: same nonce first
    new = lease(106.0)
    done = machine.fire(Trigger.GRANTED, 106.0, token=recreate.token, lease=new)
    assert done.events == [Restored(new)]
    assert state_of(machine) is State.ACTIVE


def test_recovery_backs_off_then_fails_past_the_bound() -> None:
    machine, _sleep = active(recovery_delay=0.0)
    step = machine.fire(Trigger.STATE_LOST, 100.0, reason="reboot")
    now = 100.0
    waits: list[float] = []
    previous: list[object] = []
    for attempt in range(MAX_RECOVERY_ATTEMPTS):
        assert isinstance(step.action, Sleep)
        now = step.action.until
        step = machine.fire(Trigger.TIMER, now, token=step.action.token)
        assert isinstance(step.action, Recreate)
        previous.append(step.action.previous)
        step = machine.fire(Trigger.FAILED, now, token=step.action.token, failure=SILENT)
        if attempt < MAX_RECOVERY_ATTEMPTS - 1:
            assert isinstance(step.action, Sleep)
            waits.append(step.action.until - now)
    assert state_of(machine) is State.FAILED
    assert step == Step(
        [Failed(f"gave up after {MAX_RECOVERY_ATTEMPTS} failed re-creations: no answer")], Stop()
    )
    assert waits[: len(RECOVERY_BACKOFF)] == list(RECOVERY_BACKOFF)
    assert set(waits[len(RECOVERY_BACKOFF) :]) == {RECOVERY_BACKOFF[-1]}
    # The previous lease (nonce) first, then afresh.
    assert previous[0] == lease()
    assert set(previous[1:]) == {None}


def test_a_recreation_refused_for_good_fails_at_once() -> None:
    machine, _sleep = active(recovery_delay=0.0)
    step = machine.fire(Trigger.STATE_LOST, 10.0, reason="reboot")
    assert isinstance(step.action, Sleep)
    step = machine.fire(Trigger.TIMER, 10.0, token=step.action.token)
    assert isinstance(step.action, Recreate)
    step = machine.fire(Trigger.FAILED, 11.0, token=step.action.token, failure=REFUSED)
    assert step == Step([Failed("re-creation refused: NOT_AUTHORIZED")], Stop())
    assert state_of(machine) is State.FAILED


def test_unavailable_method_on_recreation_chooses_afresh_at_once() -> None:
    machine, _sleep = active(recovery_delay=0.0)
    step = machine.fire(Trigger.STATE_LOST, 10.0, reason="reboot")
    assert isinstance(step.action, Sleep)
    step = machine.fire(Trigger.TIMER, 10.0, token=step.action.token)
    assert isinstance(step.action, Recreate)
    step = machine.fire(Trigger.FAILED, 11.0, token=step.action.token, failure=UNAVAILABLE)
    assert isinstance(step.action, Sleep)
    assert step.action.until == 11.0
    step = machine.fire(Trigger.TIMER, 11.0, token=step.action.token)
    assert isinstance(step.action, Recreate)
    assert step.action.previous is None


def test_release_deletes_then_released() -> None:
    machine, _sleep = active()
    step = machine.fire(Trigger.RELEASE, 10.0)
    assert state_of(machine) is State.RELEASING
    assert isinstance(step.action, Delete)
    assert not step.action.quiet
    done = machine.fire(Trigger.DELETED, 11.0, token=step.action.token, confirmed=True)
    assert done == Step([Released(True)], Stop())
    assert state_of(machine) is State.RELEASED
    # Idempotent, and late triggers change nothing.
    assert machine.fire(Trigger.RELEASE, 12.0) == Step([], None)
    assert machine.fire(Trigger.STATE_LOST, 12.0, reason="x") == Step([], None)


def test_detach_ends_the_stream_with_a_detached_released() -> None:
    machine, _sleep = active()
    assert machine.fire(Trigger.DETACH, 10.0) == Step([Released(False, detached=True)], Stop())
    assert state_of(machine) is State.RELEASED


def test_a_grant_that_arrives_after_release_is_deleted_quietly() -> None:
    machine, _sleep = active(recovery_delay=0.0)
    step = machine.fire(Trigger.STATE_LOST, 10.0, reason="reboot")
    assert isinstance(step.action, Sleep)
    recreate = machine.fire(Trigger.TIMER, 10.0, token=step.action.token).action
    assert isinstance(recreate, Recreate)
    release = machine.fire(Trigger.RELEASE, 11.0).action
    assert isinstance(release, Delete)
    machine.fire(Trigger.DELETED, 12.0, token=release.token, confirmed=True)
    late = lease(13.0, port=7000)
    step = machine.fire(Trigger.GRANTED, 13.0, token=recreate.token, lease=late)
    assert step.events == []
    assert step.action == Delete(late, machine.token, quiet=True)


def test_a_grant_after_detach_is_left_alone() -> None:
    machine, sleep = active()
    renew = machine.fire(Trigger.TIMER, sleep.until, token=sleep.token).action
    assert isinstance(renew, Renew)
    machine.fire(Trigger.DETACH, sleep.until + 1)
    assert machine.fire(
        Trigger.GRANTED, sleep.until + 2, token=renew.token, lease=lease(sleep.until + 2)
    ) == Step([], None)


def test_recheck_renews_at_once_when_active_and_is_ignored_otherwise() -> None:
    machine, _sleep = active()
    step = machine.fire(Trigger.RECHECK, 10.0)
    assert isinstance(step.action, Renew)
    assert machine.fire(Trigger.RECHECK, 11.0) == Step([], None)  # already renewing


def test_pairs_outside_the_table_raise() -> None:
    machine, sleep = active()
    with pytest.raises(LifecycleError, match="no rule for deleted in state active"):
        machine.fire(Trigger.DELETED, 1.0, token=sleep.token, confirmed=True)
    with pytest.raises(LifecycleError, match="needs the token"):
        machine.fire(Trigger.TIMER, 1.0)
    renew = machine.fire(Trigger.TIMER, sleep.until, token=sleep.token).action
    assert isinstance(renew, Renew)
    with pytest.raises(LifecycleError, match="no rule for timer in state renewing"):
        # A timer with the current token while an operation is in flight: a broker bug.
        machine.fire(Trigger.TIMER, sleep.until, token=renew.token)


def test_every_state_but_the_final_ones_can_be_released() -> None:
    for state in State:
        if state in (State.RELEASED, State.FAILED, State.RELEASING):
            continue
        assert (state, Trigger.RELEASE) in TRANSITIONS


@pytest.mark.parametrize(
    ("error", "expires_in", "kind"),
    [
        (MappingError("pcp", "NO_RESOURCES", retry_after=30.0), 100.0, FailureKind.RETRY),
        (MappingError("pcp", "NO_RESOURCES", retry_after=300.0), 100.0, FailureKind.REFUSED),
        (MappingError("pcp", "NOT_AUTHORIZED"), 100.0, FailureKind.REFUSED),
        (MethodUnavailable("pcp", "closed"), 100.0, FailureKind.UNAVAILABLE),
        (NoAnswer("silence"), 100.0, FailureKind.SILENT),
        (RuntimeError("bug"), 100.0, FailureKind.INTERNAL),
    ],
)
def test_classify_separates_refused_from_retry(
    error: Exception, expires_in: float, kind: FailureKind
) -> None:
    assert classify(error, expires_in=expires_in).kind is kind


@given(st.integers(0, 2**32), st.lists(st.sampled_from(list(Trigger)), max_size=40))
def test_random_trigger_sequences_never_corrupt_the_machine(
    seed: int, triggers: list[Trigger]
) -> None:
    """Whatever the broker feeds it (current tokens), it raises LifecycleError or stays sane."""
    machine, _sleep = active(seed)
    now = 1.0
    for trigger in triggers:
        now += 1.0
        kwargs: dict[str, object] = {"token": machine.token}
        if trigger is Trigger.GRANTED:
            kwargs["lease"] = lease(now)
        elif trigger is Trigger.FAILED:
            kwargs["failure"] = SILENT
        try:
            step = machine.fire(trigger, now, **kwargs)  # type: ignore[arg-type]
        except LifecycleError:
            continue
        if machine.state in (State.RELEASED, State.FAILED):
            assert (
                step.action in (None, Stop())
                or (isinstance(step.action, Delete) and step.action.quiet)
                or isinstance(step.action, RetryDelete)  # a failed release's delete goes on
            )
        if state_of(machine) is State.ACTIVE:
            assert machine.lease is not None
