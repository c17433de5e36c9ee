"""Deletes that fail are retried, bounded (lifecycle rule 10; issue 8).

The rule with plain numbers (:class:`PendingDelete`), then the broker against
FakeGateway in memory under trio's MockClock: "every mapping we create, we can
delete", and ``release()`` still returns after one attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from portbroker.broker import RELEASE_TIMEOUT, Broker
from portbroker.errors import MappingError, MethodUnavailable, NoAnswer
from portbroker.lifecycle import (
    MAX_DELETE_ATTEMPTS,
    RECOVERY_BACKOFF,
    Delete,
    DeleteState,
    Failure,
    FailureKind,
    LifecycleError,
    MappingLifecycle,
    PendingDelete,
    Released,
    RetryDelete,
    Sleep,
    State,
    Stop,
    Trigger,
    classify,
    event_detail,
    supersedes,
)
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, MappingRequest, TransportProtocol
from portbroker.wire.natpmp import ResultCode as NatPmpCode
from portbroker.wire.pcp import ResultCode
from tests.broker_harness import HOUR, broker_for, wait_for

SILENT = Failure(FailureKind.SILENT, "no answer")


def lease(
    granted_at: float = 0.0,
    lifetime: int = 86400,
    *,
    port: int = 5000,
    external_port: int = 5000,
    permanent: bool = False,
) -> Lease:
    return Lease(
        method="pcp",
        protocol=TransportProtocol.TCP,
        internal_address="192.168.1.100",
        internal_port=port,
        external_address="203.0.113.7",
        external_port=external_port,
        lifetime=lifetime,
        granted_at=granted_at,
        gateway="192.168.1.1",
        nonce=bytes(12),
        permanent=permanent,
    )


# -- the rule, with plain numbers ---------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (NoAnswer("silence"), FailureKind.SILENT),
        (
            MethodUnavailable("pcp", "port 5351 closed (ICMP port unreachable)"),
            FailureKind.UNAVAILABLE,
        ),
        (
            MappingError("pcp", "NETWORK_FAILURE", result_code=7, retry_after=30.0),
            FailureKind.RETRY,
        ),
        (MappingError("pcp", "NOT_AUTHORIZED", result_code=2), FailureKind.REFUSED),
        (RuntimeError("bug"), FailureKind.INTERNAL),
    ],
)
def test_which_delete_failures_are_retried(error: Exception, kind: FailureKind) -> None:
    failure = classify(error)
    assert failure.kind is kind
    pending = PendingDelete(lease())
    step = pending.fire(Trigger.FAILED, 10.0, token=0, failure=failure)
    if kind is FailureKind.REFUSED:
        assert (step.action, pending.state) == (Stop(), DeleteState.GAVE_UP)
        assert "refused" in pending.outcome
    else:
        assert isinstance(step.action, Sleep)
        assert pending.state is DeleteState.WAITING
        wait = step.action.until - 10.0
        assert wait == max(RECOVERY_BACKOFF[0], failure.retry_after or 0.0)


def test_retries_follow_the_recovery_backoff_up_to_the_bound() -> None:
    pending = PendingDelete(lease(permanent=True))
    now, waits = 0.0, []
    step = pending.fire(Trigger.FAILED, now, token=0, failure=SILENT)
    while isinstance(step.action, Sleep):
        waits.append(step.action.until - now)
        now = step.action.until
        attempt = pending.fire(Trigger.TIMER, now, token=step.action.token).action
        assert isinstance(attempt, Delete)
        now += 5.0
        step = pending.fire(Trigger.FAILED, now, token=attempt.token, failure=SILENT)
    assert step.action == Stop()
    assert pending.state is DeleteState.GAVE_UP
    assert pending.attempts == MAX_DELETE_ATTEMPTS
    assert waits[: len(RECOVERY_BACKOFF)] == list(RECOVERY_BACKOFF)
    assert set(waits[len(RECOVERY_BACKOFF) :]) == {RECOVERY_BACKOFF[-1]}
    assert f"{MAX_DELETE_ATTEMPTS} attempts failed" in pending.outcome


def test_a_permanent_lease_is_bounded_by_attempts_not_by_its_expiry() -> None:
    # A permanent UPnP lease's expires_at is long past: it still gets retries.
    pending = PendingDelete(lease(granted_at=0.0, lifetime=60, permanent=True))
    step = pending.fire(Trigger.FAILED, 10_000.0, token=0, failure=SILENT)
    assert isinstance(step.action, Sleep)


def test_no_retry_at_or_after_the_expiry() -> None:
    pending = PendingDelete(lease(granted_at=0.0, lifetime=120))
    # Expired already: nothing left to delete.
    assert (
        PendingDelete(lease(lifetime=120))
        .fire(Trigger.FAILED, 120.0, token=0, failure=SILENT)
        .action
        == Stop()
    )
    # The next attempt would come after the expiry: none.
    step = pending.fire(Trigger.FAILED, 119.0, token=0, failure=SILENT)
    assert step.action == Stop()
    assert "expires before the next attempt" in pending.outcome
    # Expired while waiting: the timer gives up instead of deleting.
    waiting = PendingDelete(lease(granted_at=0.0, lifetime=120))
    sleep = waiting.fire(Trigger.FAILED, 100.0, token=0, failure=SILENT).action
    assert isinstance(sleep, Sleep)
    assert waiting.fire(Trigger.TIMER, 125.0, token=sleep.token).action == Stop()
    assert waiting.state is DeleteState.GAVE_UP


def test_success_ends_it_and_late_or_wrong_triggers_are_refused() -> None:
    pending = PendingDelete(lease())
    sleep = pending.fire(Trigger.FAILED, 0.0, token=0, failure=SILENT).action
    assert isinstance(sleep, Sleep)
    assert pending.fire(Trigger.DELETED, 1.0, token=0).action is None  # late: old token
    with pytest.raises(LifecycleError):
        pending.fire(Trigger.DELETED, 1.0, token=sleep.token)  # nothing in flight
    attempt = pending.fire(Trigger.TIMER, sleep.until, token=sleep.token).action
    assert isinstance(attempt, Delete)
    assert pending.fire(Trigger.DELETED, sleep.until + 1, token=attempt.token).action == Stop()
    assert pending.state is DeleteState.DELETED
    assert pending.outcome == "deleted at attempt 2"


def test_a_release_whose_delete_fails_ends_with_released_retrying() -> None:
    machine = MappingLifecycle()
    granted = lease(0.0)
    machine.fire(Trigger.GRANTED, 0.0, token=0, lease=granted)
    delete = machine.fire(Trigger.RELEASE, 10.0).action
    assert isinstance(delete, Delete)
    step = machine.fire(Trigger.FAILED, 15.0, token=delete.token, failure=SILENT)
    assert step.events == [Released(False, retrying=True)]
    assert machine.state is State.RELEASED
    assert isinstance(step.action, RetryDelete)
    assert step.action.pending.lease == granted
    assert isinstance(step.action.first.action, Sleep)
    assert event_detail(Released(False, retrying=True)) == {"confirmed": False, "retrying": True}
    assert event_detail(Released(True)) == {"confirmed": True}
    # A refusal: the same end, not retried.
    refused = MappingLifecycle()
    refused.fire(Trigger.GRANTED, 0.0, token=0, lease=granted)
    delete = refused.fire(Trigger.RELEASE, 10.0).action
    assert isinstance(delete, Delete)
    failure = classify(MappingError("pcp", "NOT_AUTHORIZED", result_code=2))
    step = refused.fire(Trigger.FAILED, 11.0, token=delete.token, failure=failure)
    assert step.events == [Released(False)]
    assert isinstance(step.action, RetryDelete)
    assert step.action.first.action == Stop()


def test_what_a_new_mapping_supersedes() -> None:
    old = lease(port=5000, external_port=6000)
    assert supersedes(lease(port=5000, external_port=6001), old)  # same internal endpoint
    assert supersedes(lease(port=5001, external_port=6000), old)  # same external port (UPnP)
    assert not supersedes(lease(port=5001, external_port=6001), old)
    # A request about to go out: its internal endpoint (None: this host's address).
    assert supersedes(MappingRequest(5000, "tcp"), old)
    assert supersedes(MappingRequest(5000, "tcp", internal_address="192.168.1.100"), old)
    assert not supersedes(MappingRequest(5000, "tcp", internal_address="192.168.1.101"), old)
    assert not supersedes(MappingRequest(5000, "udp"), old)


# -- the broker executes it ---------------------------------------------------------

DeleteFn = Callable[[Lease], Awaitable[None]]


class Attempts(list[float]):
    """When each delete attempt started (one per call, not per datagram), and of what."""

    def __init__(self) -> None:
        super().__init__()
        self.leases: list[Lease] = []


def count_deletes(
    broker: Broker, method: str = "pcp", *, before: Callable[[int], None] | None = None
) -> Attempts:
    """Count *method*'s delete attempts; *before* gets each one's number (1 = first) as it starts."""
    calls = Attempts()
    target = broker._methods[method]
    original: DeleteFn = target.delete

    async def counting(lease: Lease) -> None:
        calls.append(trio.current_time())
        calls.leases.append(lease)
        if before is not None:
            before(len(calls))
        await original(lease)

    target.delete = counting  # type: ignore[method-assign]
    return calls


async def test_a_gateway_that_drops_the_first_deletes_gets_the_mapping_deleted_in_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:

        def drop_three(attempt: int) -> None:
            gateway.silent_deletes = attempt <= 3  # the gateway is back after 3 lost deletes

        calls = count_deletes(broker, before=drop_three)
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        events = mapping.events()
        await mapping.release()
        # release() came back after one attempt, and said the delete goes on.
        assert len(calls) == 1
        assert [e async for e in events] == [Released(confirmed=False, retrying=True)]
        assert broker.undeleted() == [mapping.lease]
        assert gateway.mapping_for("tcp", 8080) is not None
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mappings == {}
        assert len(calls) == 4


async def test_a_transient_refusal_is_retried_after_its_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        gateway.forced_result = ResultCode.NETWORK_FAILURE  # short-lifetime: 30 s
        await mapping.release()
        assert broker.undeleted() == [mapping.lease]
        await wait_for(lambda: len(calls) == 2)
        assert calls[1] - calls[0] >= 30.0  # RFC 6887 §8.3: not before the error's lifetime
        gateway.forced_result = None
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mappings == {}


async def test_a_natpmp_network_failure_is_retried_and_not_authorized_is_final(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_enabled=False)
    async with broker_for(gateway, methods=("natpmp",)) as broker:
        calls = count_deletes(broker, "natpmp")
        first = await broker.map(8080, "tcp", lifetime=86400)
        gateway.forced_natpmp_result = NatPmpCode.NETWORK_FAILURE
        await first.release()
        await wait_for(lambda: len(calls) == 2)
        gateway.forced_natpmp_result = None
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mapping_for("tcp", 8080) is None
        second = await broker.map(8081, "tcp", lifetime=86400)
        gateway.forced_natpmp_result = NatPmpCode.NOT_AUTHORIZED
        calls.clear()
        await second.release()
        assert broker.undeleted() == []
        await trio.sleep(2 * HOUR)
        assert len(calls) == 1


async def test_a_refused_delete_is_not_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway()
    caplog.set_level(logging.INFO, "portbroker")
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        events = mapping.events()
        gateway.forced_result = ResultCode.NOT_AUTHORIZED  # long-lifetime: final
        await mapping.release()
        assert [e async for e in events] == [Released(confirmed=False)]
        assert broker.undeleted() == []
        await trio.sleep(3 * HOUR)
        assert len(calls) == 1
    assert "delete failed, not retried: refused" in caplog.text


async def test_an_expired_lease_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        mapping = await broker.map(8080, "tcp", lifetime=120)
        assert mapping.lease is not None
        expires_at = mapping.lease.expires_at
        gateway.silent_deletes = True
        await mapping.release()
        assert broker.undeleted() == [mapping.lease]
        await wait_for(lambda: not broker.undeleted())
        await trio.sleep(HOUR)
        assert len(calls) > 1  # retried while there was something to delete
        assert all(when < expires_at for when in calls)
        # The same through the daemon's door: an expired lease gets one try, no retries.
        calls.clear()
        assert not await broker.delete(mapping.lease, retry=True)
        assert broker.undeleted() == []
        await trio.sleep(HOUR)
        assert len(calls) == 1


async def test_the_bound_holds_against_a_gateway_that_never_answers_deletes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway(silent_deletes=True)
    caplog.set_level(logging.INFO, "portbroker")
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        await mapping.release()
        await wait_for(lambda: not broker.undeleted(), limit=6 * HOUR)
        await trio.sleep(6 * HOUR)
        assert len(calls) == MAX_DELETE_ATTEMPTS
        assert gateway.mapping_for("tcp", 8080) is not None  # it lapses on its own now
    assert caplog.text.count("delete failed (attempt") == MAX_DELETE_ATTEMPTS - 1
    assert f"{MAX_DELETE_ATTEMPTS} attempts failed" in caplog.text


async def test_the_daemon_api_lists_a_pending_delete_and_drops_it_once_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        held = broker.detach(mapping)
        gateway.silent_deletes = True
        assert await broker.delete(held, retry=True) is False
        assert broker.undeleted() == [held]
        gateway.silent_deletes = False
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mappings == {}
        # A delete that works at once says so and leaves nothing pending.
        other = broker.detach(await broker.map(8081, "tcp", lifetime=86400))
        assert await broker.delete(other, retry=True) is True
        assert broker.undeleted() == []
        assert gateway.mappings == {}
        # The CLI's one attempt still raises.
        third = broker.detach(await broker.map(8082, "tcp", lifetime=86400))
        gateway.silent_deletes = True
        with pytest.raises(NoAnswer):
            await broker.delete(third)
        assert broker.undeleted() == []


async def test_an_app_that_releases_and_exits_gets_release_back_at_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = FakeGateway()
    caplog.set_level(logging.INFO, "portbroker")
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        first = await broker.map(8080, "tcp", lifetime=86400)
        second = await broker.map(8081, "tcp", lifetime=86400)
        gateway.silent_deletes = True
        await first.release()  # retries pending from now on
        began = trio.current_time()
        await second.release()
        assert trio.current_time() - began <= RELEASE_TIMEOUT
        # One attempt of the second: its release did not wait for a retry.
        assert calls.leases.count(second._lease()) == 1
        leases = [first.lease, second.lease]
        exiting = trio.current_time()
    # Leaving the broker did not wait for the retries either; they ended with
    # it, logged, and undeleted() still names them for the daemon's records.
    assert trio.current_time() - exiting <= RELEASE_TIMEOUT
    assert broker.undeleted() == leases
    assert "broker closing with 2 delete(s) not done" in caplog.text
    made = len(calls)
    await trio.sleep(HOUR)
    assert len(calls) == made  # the retries ended with the broker


async def test_a_new_mapping_of_the_port_ends_its_pending_delete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        gateway.silent_deletes = True
        await mapping.release()
        assert broker.undeleted()
        gateway.silent_deletes = False
        again = await broker.map(8080, "tcp", lifetime=86400)
        assert broker.undeleted() == []
        await trio.sleep(3 * HOUR)
        # The retry did not delete the new mapping (same nonce, same entry).
        assert again.state is State.ACTIVE
        assert gateway.mapping_for("tcp", 8080) is not None


async def test_leaving_the_broker_retries_nothing_once_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Leaving releases; a release that fails on the way out stays listed."""
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        await broker.map(8080, "tcp", lifetime=86400)
        gateway.silent_deletes = True
    assert [lease.internal_port for lease in broker.undeleted()] == [8080]


async def test_a_map_of_the_port_that_fails_leaves_the_old_entry_to_its_delete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the gateway is down, the app maps the port it released again: that
    create fails, and the old mapping's delete is not forgotten."""
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        gateway.pcp_enabled = gateway.natpmp_enabled = False  # down: nothing answers
        await mapping.release()
        assert broker.undeleted() == [mapping.lease]
        with pytest.raises(NoAnswer):
            await broker.map(8080, "tcp", lifetime=86400, via="pcp")
        await wait_for(lambda: broker.undeleted() == [mapping.lease])
        gateway.pcp_enabled = gateway.natpmp_enabled = True
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mappings == {}


async def test_a_retried_delete_that_is_cancelled_or_asked_twice_is_listed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(silent_deletes=True)
    async with broker_for(gateway) as broker:
        held = broker.detach(await broker.map(8080, "tcp", lifetime=86400))
        # A daemon stopping mid-attempt: the lease is still to delete.
        with trio.move_on_after(1.0):
            await broker.delete(held, retry=True)
        assert broker.undeleted() == [held]
        # Asked again: one pending delete, not two series of retries.
        assert not await broker.delete(held, retry=True)
        assert broker.undeleted() == [held]
        gateway.silent_deletes = False
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mappings == {}


async def test_a_pcp_delete_answered_no_resources_is_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """miniupnpd answers a delete of a mapping it does not hold with NO_RESOURCES
    (seen in the lab): a retry whose first answer was lost must end, not go on."""
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        calls = count_deletes(broker)
        mapping = await broker.map(8080, "tcp", lifetime=86400)
        gateway.forced_result = ResultCode.NO_RESOURCES
        events = mapping.events()
        await mapping.release()
        assert [e async for e in events] == [Released(confirmed=True)]
        assert broker.undeleted() == []
        await trio.sleep(HOUR)
        assert len(calls) == 1
