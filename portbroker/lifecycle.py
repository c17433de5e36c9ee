"""The life of one mapping, as a sans-IO state machine.

Rules (everything that changes a mapping's state lives in this file):

1. A mapping starts REQUESTING. The first grant makes it ACTIVE; a refusal
   that retrying cannot fix makes it FAILED.
2. An ACTIVE mapping is renewed on the RFC 6887 §11.2.1 schedule, whatever the
   method: the first renewal at a uniformly random point between 1/2 and 5/8 of
   the granted lifetime; after a failure, in [3/4, 3/4 + 1/16], then
   [7/8, 7/8 + 1/32], each window half as far from expiry and half as wide;
   attempts at least 4 s apart; none at or after expiry.
3. A renewal that succeeds returns the mapping to ACTIVE with the new lease. One
   that fails leaves it RENEWING until the next window; when no window is left
   before expiry the mapping is LOST.
4. A mapping is also LOST the moment its gateway is known to have lost state
   (an epoch check failed, BOOTID changed, the entry vanished). A LOST mapping
   is re-created (REQUESTING) after a random delay that spreads the burst of
   re-creations from every host on the link (RFC 6887 §14.1, RFC 6886 §3.7:
   0-5 s).
5. Release is possible from every state but RELEASED and FAILED, and ends in
   RELEASED whether or not the gateway confirmed the delete (a failed delete is
   reported, and the lease runs out on its own).

Theory of operation: the broker owns the clock and the network. It feeds this
machine triggers (``GRANTED`` with the lease, ``REFUSED``, ``RENEW_FAILED``,
``STATE_LOST``, ``RELEASE``...) together with "now", and the machine answers
with the new state, the events to publish, and when it next wants to be woken
(:attr:`MappingLifecycle.deadline`). Nothing here sleeps, sends or reads a
clock, so every rule is tested with plain numbers.
"""

from __future__ import annotations

import enum
import random
from typing import Any, Final

import attrs

from portbroker.types import IPAddress, Lease

__all__ = [
    "MIN_RENEWAL_GAP",
    "TRANSITIONS",
    "Acquired",
    "ExternalAddressChanged",
    "Failed",
    "Lost",
    "MappingEvent",
    "MappingLifecycle",
    "Released",
    "Renewed",
    "Restored",
    "State",
    "Trigger",
    "event_detail",
    "renewal_time",
]

MIN_RENEWAL_GAP: Final = 4.0  # RFC 6887 §11.2.1: renewals at least 4 s apart


class State(enum.Enum):
    REQUESTING = "requesting"
    ACTIVE = "active"
    RENEWING = "renewing"
    LOST = "lost"
    RELEASED = "released"
    FAILED = "failed"


class Trigger(enum.Enum):
    GRANTED = "granted"  # the gateway granted (create, renew or re-create)
    REFUSED = "refused"  # the gateway refused, and retrying will not help
    RENEW_DUE = "renew-due"  # a renewal window opened
    RENEW_FAILED = "renew-failed"  # a renewal got no grant (error or silence)
    EXPIRED = "expired"  # no renewal window left before expiry
    STATE_LOST = "state-lost"  # the gateway forgot its mappings
    RECREATE_DUE = "recreate-due"  # the random recovery delay is over
    RECREATE_FAILED = "recreate-failed"  # re-creating a lost mapping did not work (yet)
    RELEASE = "release"  # the app is done


# (state, trigger) -> new state. Pairs not listed are ignored: a trigger that
# arrives late (a grant after release, a renewal timer after loss) changes
# nothing.
TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (State.REQUESTING, Trigger.GRANTED): State.ACTIVE,
    (State.REQUESTING, Trigger.REFUSED): State.FAILED,
    (State.REQUESTING, Trigger.STATE_LOST): State.REQUESTING,
    (State.REQUESTING, Trigger.RELEASE): State.RELEASED,
    (State.REQUESTING, Trigger.RECREATE_FAILED): State.LOST,
    (State.ACTIVE, Trigger.RENEW_DUE): State.RENEWING,
    (State.ACTIVE, Trigger.GRANTED): State.ACTIVE,
    (State.ACTIVE, Trigger.STATE_LOST): State.LOST,
    (State.ACTIVE, Trigger.EXPIRED): State.LOST,
    (State.ACTIVE, Trigger.RELEASE): State.RELEASED,
    (State.RENEWING, Trigger.GRANTED): State.ACTIVE,
    (State.RENEWING, Trigger.RENEW_FAILED): State.RENEWING,
    (State.RENEWING, Trigger.RENEW_DUE): State.RENEWING,
    (State.RENEWING, Trigger.REFUSED): State.LOST,
    (State.RENEWING, Trigger.EXPIRED): State.LOST,
    (State.RENEWING, Trigger.STATE_LOST): State.LOST,
    (State.RENEWING, Trigger.RELEASE): State.RELEASED,
    (State.LOST, Trigger.RECREATE_DUE): State.REQUESTING,
    (State.LOST, Trigger.GRANTED): State.ACTIVE,
    (State.LOST, Trigger.STATE_LOST): State.LOST,
    (State.LOST, Trigger.RELEASE): State.RELEASED,
}


# -- events -------------------------------------------------------------------


@attrs.frozen
class Acquired:
    """The first grant: the mapping works."""

    lease: Lease


@attrs.frozen
class Renewed:
    lease: Lease


@attrs.frozen
class ExternalAddressChanged:
    """The gateway now maps us behind another address or port."""

    old_address: IPAddress
    old_port: int
    lease: Lease


@attrs.frozen
class Lost:
    """The mapping stopped working; portbroker is restoring it."""

    reason: str


@attrs.frozen
class Restored:
    """A lost mapping works again."""

    lease: Lease


@attrs.frozen
class Released:
    confirmed: bool  # the gateway acknowledged the delete


@attrs.frozen
class Failed:
    """The mapping could not be created; ``reason`` says why."""

    reason: str


MappingEvent = Acquired | Renewed | ExternalAddressChanged | Lost | Restored | Released | Failed


def event_detail(event: MappingEvent) -> dict[str, Any]:
    """An event's fields other than its lease, as JSON values."""
    detail: dict[str, Any] = {}
    for name in ("reason", "confirmed", "old_address", "old_port"):
        if hasattr(event, name):
            value = getattr(event, name)
            detail[name] = value if isinstance(value, bool | int | None) else str(value)
    return detail


def renewal_time(
    granted_at: float,
    lifetime: float,
    attempt: int,
    rng: random.Random,
    *,
    not_before: float | None = None,
) -> float | None:
    """When renewal attempt *attempt* (0 = first) should go out, or None if too late.

    RFC 6887 §11.2.1: window k starts at (1 - 2**-(k+1)) of the lifetime and is
    2**-(k+3) of it wide; the time is uniform in the window, and never earlier
    than *not_before* (the previous attempt + 4 s).
    """
    start = 1 - 2.0 ** -(attempt + 1)
    width = 2.0 ** -(attempt + 3)
    when = granted_at + lifetime * (start + rng.random() * width)
    if not_before is not None:
        when = max(when, not_before)
    if when >= granted_at + lifetime:
        return None
    return when


@attrs.define
class MappingLifecycle:
    """One mapping's state, lease and next deadline. Drive it with :meth:`fire`."""

    rng: random.Random = attrs.field(factory=random.Random)
    recovery_delay: float = 5.0
    state: State = State.REQUESTING
    lease: Lease | None = None
    deadline: float | None = None  # when the broker should act on :attr:`timer_trigger`
    renew_attempt: int = 0
    last_attempt_at: float | None = None
    ever_granted: bool = False

    @property
    def timer_trigger(self) -> Trigger | None:
        """What the broker fires when :attr:`deadline` comes."""
        if self.state in (State.ACTIVE, State.RENEWING):
            return Trigger.EXPIRED if self.expired else Trigger.RENEW_DUE
        if self.state is State.LOST:
            return Trigger.RECREATE_DUE
        return None

    @property
    def expired(self) -> bool:
        """True when the renewal schedule has run out and the deadline is the expiry."""
        return (
            self.lease is not None
            and self.deadline is not None
            and self.deadline >= self.lease.expires_at
        )

    def fire(
        self,
        trigger: Trigger,
        now: float,
        *,
        lease: Lease | None = None,
        reason: str = "",
        retry_in: float = 30.0,
    ) -> list[MappingEvent]:
        """Apply *trigger* at time *now*; return the events to publish.

        *lease* goes with GRANTED; *reason* with REFUSED, STATE_LOST and
        EXPIRED; *retry_in* with RECREATE_FAILED (seconds until the next try).
        """
        new_state = TRANSITIONS.get((self.state, trigger))
        if new_state is None:
            return []
        old_state, self.state = self.state, new_state
        if trigger is Trigger.GRANTED:
            assert lease is not None, "GRANTED needs the lease"
            return self._granted(old_state, lease, now)
        if trigger is Trigger.RENEW_DUE:
            self.last_attempt_at = now
            self.deadline = None  # the broker reports the outcome
        elif trigger is Trigger.RENEW_FAILED:
            self._schedule_retry(now)
        elif trigger is Trigger.RECREATE_DUE:
            self.deadline = None
        elif trigger is Trigger.RECREATE_FAILED:
            self.deadline = now + retry_in
        elif new_state is State.FAILED:
            self.deadline = None
            return [Failed(reason or "refused")]
        elif new_state is State.LOST:
            if old_state is State.LOST:
                return []  # already recovering; keep the pending deadline
            self.deadline = now + self.rng.uniform(0.0, self.recovery_delay)
            return [Lost(reason or trigger.value)]
        elif new_state is State.RELEASED:
            self.deadline = None
        return []

    def _granted(self, old_state: State, lease: Lease, now: float) -> list[MappingEvent]:
        previous, self.lease = self.lease, lease
        self.renew_attempt = 0
        self.last_attempt_at = None
        self.deadline = renewal_time(
            lease.granted_at, lease.lifetime, 0, self.rng, not_before=now + MIN_RENEWAL_GAP
        )
        if self.deadline is None:
            # A lifetime too short for the 4 s gap: renew at half-life rather
            # than let it lapse.
            self.deadline = lease.granted_at + lease.lifetime / 2
        events: list[MappingEvent] = []
        if not self.ever_granted:
            self.ever_granted = True
            events.append(Acquired(lease))
        elif old_state in (State.LOST, State.REQUESTING):
            events.append(Restored(lease))
        else:
            events.append(Renewed(lease))
        if previous is not None and (
            previous.external_address != lease.external_address
            or previous.external_port != lease.external_port
        ):
            events.append(
                ExternalAddressChanged(previous.external_address, previous.external_port, lease)
            )
        return events

    def _schedule_retry(self, now: float) -> None:
        assert self.lease is not None
        self.renew_attempt += 1
        not_before = max((self.last_attempt_at or now) + MIN_RENEWAL_GAP, now)
        self.deadline = renewal_time(
            self.lease.granted_at,
            self.lease.lifetime,
            self.renew_attempt,
            self.rng,
            not_before=not_before,
        )
        if self.deadline is None:
            # No window left before expiry: wake at expiry to declare it LOST.
            self.deadline = self.lease.expires_at
