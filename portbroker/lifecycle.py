"""The life of one mapping, as a sans-IO state machine that owns every rule.

The broker owns the clock and the network; this module owns every decision.
The broker feeds a :class:`MappingLifecycle` a :class:`Trigger` with "now" (and
the lease or the :class:`Failure` that an operation ended with), and
:meth:`MappingLifecycle.fire` answers with a :class:`Step`: the events to
publish and the **one next action** — sleep until a time, renew, re-create,
delete, or stop. The broker executes actions and reports their outcome; it
decides nothing (h11's rule: everything that changes state lives in the state
module). Nothing here sleeps, sends or reads a clock, so every rule below is
tested with plain numbers (``tests/test_lifecycle.py``).

Rules:

1. **Renewal schedule** (RFC 6887 §11.2.1, used for every method): the first
   renewal at a uniformly random point in [1/2, 5/8] of the granted lifetime;
   after a failure in [3/4, 3/4 + 1/16], then [7/8, 7/8 + 1/32]..., each window
   half as far from expiry and half as wide; attempts at least 4 s apart; none
   at or after expiry. A "not now" refusal (``retry_after``, RFC 6887 §8.3)
   moves the next attempt to at least ``retry_after`` later.
2. **Attempt budget**: one renewal may take ``max(4 s, remaining / 4)``, at most
   60 s and never past the expiry (a renewal in flight must not hold back the
   ``Lost`` event). A re-creation gets :attr:`MappingLifecycle.request_budget`.
3. **Refused vs retry** (:func:`classify`): a :class:`~portbroker.errors.MappingError`
   whose ``retry_after`` falls before the lease expires is "not now" (RETRY);
   one without, or beyond the expiry, is REFUSED. MethodUnavailable is
   UNAVAILABLE, NoAnswer and timeouts SILENT, anything else INTERNAL (a bug,
   logged by the broker with its traceback).
4. **Renewal failures**: SILENT and RETRY keep the mapping RENEWING until the
   next window; with no window left it is LOST at expiry. REFUSED,
   UNAVAILABLE and INTERNAL make it LOST at once (the app hears of it in a
   ``Lost`` event, and the re-creation starts afresh).
5. **State loss**: the gateway forgot its mappings (one incident from the
   :class:`~portbroker.epoch.EpochTracker`): ACTIVE and RENEWING become LOST. A
   LOST mapping is re-created after a random delay in [0, recovery_delay]
   (RFC 6887 §14.1, RFC 6886 §3.7: 0-5 s) that spreads the burst from every
   host on the link.
6. **Nonce reuse on re-creation**: the first re-creation after a state loss or
   an unanswered renewal asks the same method with the previous lease (PCP:
   same nonce, previous address and port suggested, RFC 6887 §11.2.1, §8.5;
   NAT-PMP and UPnP: the previous external port). Once that has failed, or
   after a refusal, the broker chooses the method afresh (a PCP server that
   answers again still gets the nonce it last saw for that internal port:
   the PCP method remembers it); after UNAVAILABLE of the previous method the
   next try (afresh) is at once, but a try afresh that is UNAVAILABLE (no
   method works now: a gateway restarting, switched off) waits the backoff
   like any other failure, or the give-up bound would be spent in an instant.
7. **Recovery backoff and its bound**: failed re-creations are retried after
   :data:`RECOVERY_BACKOFF` (2 s, 5 s, 15 s, 30 s, 60 s, 120 s, then every
   300 s), or ``retry_after`` if longer. A re-creation REFUSED for good ends in
   FAILED at once; :data:`MAX_RECOVERY_ATTEMPTS` (20, about 75 minutes) failed
   re-creations in a row end in FAILED too, with ``Failed(reason)``.
8. **Release** deletes the lease (RELEASING) and ends in RELEASED after that
   one attempt, whatever its outcome, so ``release()`` never waits for a
   gateway that is down: ``Released(confirmed=True)`` when the gateway
   confirmed; otherwise ``Released(confirmed=False, retrying=...)`` and the
   lease goes on to a :class:`PendingDelete` (rule 10), which retries it
   unless the failure is final. **Detach** stops managing without deleting
   and ends in RELEASED with ``Released(confirmed=False, detached=True)``.
   RELEASED and FAILED are final: the event streams end.
9. **Late triggers** (the documented exceptions to "a pair not in the table
   raises"): an operation's outcome or a timer that carries a token other than
   the current one was superseded (a state loss or a release overtook it) and is
   ignored — except a grant that arrives after RELEASE or FAILED, whose lease is
   deleted quietly (:class:`Delete` with ``quiet=True``) so that nothing we
   created is left behind. Also ignored: STATE_LOST while a re-creation is in
   flight or already pending (REQUESTING, LOST) or after the end (RELEASING,
   RELEASED, FAILED); RELEASE and DETACH after the end; RECHECK outside ACTIVE;
   MOVED after the end, NETWORK_CHANGED and RESUMED in REQUESTING and after
   the end (rules 12, 13, 14).
   Every other (state, trigger) pair outside :data:`TRANSITIONS` raises
   :class:`LifecycleError`.
10. **Deletes that fail are retried, bounded** ("every mapping we create, we
    can delete"): a :class:`PendingDelete` owns one lease whose delete failed
    (a release's, a late grant's, or one handed to ``Broker.delete(lease,
    retry=True)``). The failure is classified like any other
    (:func:`classify`): silence (NoAnswer, a timeout), UNAVAILABLE (ICMP port
    unreachable while the gateway restarts, a host firewall: a link error),
    a bug, and a refusal that says when to ask again (``retry_after``: PCP's
    short-lifetime errors NETWORK_FAILURE, USER_EX_QUOTA, RFC 6887 §7.4;
    NAT-PMP's NETWORK_FAILURE, OUT_OF_RESOURCES, RFC 6886 §3.5) are retried
    after :data:`RECOVERY_BACKOFF` (or ``retry_after`` if longer). A refusal
    without ``retry_after`` (NOT_AUTHORIZED: a static mapping, or another
    client's; a long-lifetime error) is final. "No such entry" is not a
    failure: the methods report it as success (UPnP 714; NAT-PMP's SUCCESS;
    miniupnpd's PCP NO_RESOURCES, its answer to a delete of a mapping it does
    not hold, which a retry whose first answer was lost gets). It stops when the
    lease has expired, or would before the next attempt (the gateway drops
    it then: nothing left to delete), and after :data:`MAX_DELETE_ATTEMPTS`
    attempts in all (the only bound for a permanent UPnP lease). A new
    mapping that the pending delete would remove (:func:`supersedes`) ends
    it: deleting it then would delete the new one.
11. **Reachability** (docs/double-nat.md): a grant whose external address is
    not global (:func:`portbroker.reachability.classify`: private, shared
    100.64.0.0/10, ULA...) is published with a :class:`ReachabilityChanged`
    after its Acquired; a later grant (renewal, restoration, a new address)
    publishes one whenever the address moves between public and not public.
12. **Gateway moves** (docs/architecture.md, "Following the default route"):
    MOVED says the default route now leads to another gateway (a broker that
    follows it, never a pinned one). Whatever the mapping was doing (ACTIVE,
    RENEWING, LOST, or a create in flight) it publishes
    ``GatewayChanged(old, new)`` and is re-created afresh at once on the new
    gateway (REQUESTING; no 0-5 s spread: only this host moved, rule 5's
    burst is not there). Its grant publishes ``Restored``, then
    ``ExternalAddressChanged`` when the endpoint differs (it nearly always
    does); its first failure there ``Lost`` (then rule 7 as for any
    re-creation; a refusal for good ``Failed``). An operation that started before the move and grants late was
    made on the old gateway: its lease is deleted quietly (rule 9). The old
    gateway's lease is the broker's to delete (one bounded attempt, or
    forgotten). RELEASING, RELEASED and FAILED ignore MOVED.
13. **Network changes on the same gateway**: NETWORK_CHANGED (a link went
    down and up, an address changed, the route stayed) does what is pending
    now instead of at its time: an ACTIVE mapping renews (not sooner than 4 s
    after its grant, RFC 6887 §11.2.1), a RENEWING one waiting for its next
    window retries (4 s after the last attempt at the earliest), a LOST one
    waiting to be re-created is re-created. An operation in flight, and
    REQUESTING, RELEASING, RELEASED and FAILED, ignore it. With a *spread*
    (the broker gives one when it holds many mappings: a daemon's thousands
    would otherwise renew in one burst) each does so after its own random
    delay in [0, spread] instead of at once.
14. **Resume** (docs/roaming.md, "Suspend and resume"): RESUMED says the host
    slept or the process was stopped (:mod:`portbroker.clockwatch`), so any
    lease may have expired on the gateway whatever our timers say. Every
    mapping checks at once, each after its own random delay in
    [0, :attr:`MappingLifecycle.recovery_delay`] (0-5 s: thousands of
    mappings, or every host waking on one link, do not burst). An ACTIVE
    mapping renews then — the 4 s gap of RFC 6887 §11.2.1 does not hold it
    back: it paces renewals of a live lease, and this one may be gone — or,
    past its expiry by our own clock, is LOST at once (``Lost``) and
    re-created after the delay with the previous lease (rule 6). A RENEWING
    one waiting for its next window retries after the delay (LOST at its
    expiry, as ever); a LOST one is re-created after the delay. An operation
    in flight, and REQUESTING, RELEASING, RELEASED and FAILED, ignore it, and
    so does an ACTIVE mapping granted at or after *awake_since* (renewed since
    the wake: a process stopped past a renewal's time renews on its own at
    SIGCONT, before the resume is noticed; the check would only repeat it).
"""

from __future__ import annotations

import enum
import random
from typing import Any, Final

import attrs

from portbroker.errors import MappingError, MethodUnavailable, NoAnswer, PortBrokerError
from portbroker.reachability import Reachability
from portbroker.types import IPAddress, Lease, MappingRequest

__all__ = [
    "DELETE_TRANSITIONS",
    "MAX_DELETE_ATTEMPTS",
    "MAX_RECOVERY_ATTEMPTS",
    "MIN_RENEWAL_GAP",
    "RECOVERY_BACKOFF",
    "TRANSITIONS",
    "Acquired",
    "Action",
    "Delete",
    "DeleteState",
    "DeleteStep",
    "ExternalAddressChanged",
    "Failed",
    "Failure",
    "FailureKind",
    "GatewayChanged",
    "LifecycleError",
    "Lost",
    "MappingEvent",
    "MappingLifecycle",
    "PendingDelete",
    "ReachabilityChanged",
    "Recreate",
    "Released",
    "Renew",
    "Renewed",
    "Restored",
    "RetryDelete",
    "Sleep",
    "State",
    "Step",
    "Stop",
    "Trigger",
    "classify",
    "event_detail",
    "renewal_time",
    "supersedes",
]

MIN_RENEWAL_GAP: Final = 4.0  # RFC 6887 §11.2.1: renewals at least 4 s apart
RECOVERY_BACKOFF: Final = (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
MAX_RECOVERY_ATTEMPTS: Final = 20
MAX_RENEWAL_BUDGET: Final = 60.0
# Rule 10: delete attempts in all, the first included. With RECOVERY_BACKOFF
# between them that is about 70 minutes: a gateway rebooting or a link down
# for an hour still gets the delete; a permanent UPnP lease has no other bound.
MAX_DELETE_ATTEMPTS: Final = 20


class LifecycleError(PortBrokerError):
    """A trigger the current state has no rule for: a bug in the caller (h11's LocalProtocolError)."""


class State(enum.Enum):
    REQUESTING = "requesting"  # a create or re-create is in flight
    ACTIVE = "active"
    RENEWING = "renewing"  # a renewal is in flight, or the next attempt is pending
    LOST = "lost"  # waiting to re-create
    RELEASING = "releasing"  # the delete is in flight
    RELEASED = "released"
    FAILED = "failed"


class Trigger(enum.Enum):
    GRANTED = "granted"  # an operation got a lease (create, renew, re-create)
    FAILED = "failed"  # an operation failed; the Failure says how
    TIMER = "timer"  # the current Sleep ended
    STATE_LOST = "state-lost"  # the gateway forgot its mappings (one incident)
    RECHECK = "recheck"  # the lease may be stale (external address announced): renew now
    RELEASE = "release"  # the app is done: delete it
    DETACH = "detach"  # stop managing it, leave it on the gateway
    DELETED = "deleted"  # the delete finished (``confirmed`` says whether it worked)
    MOVED = "moved"  # the default route leads to another gateway: re-create there (rule 12)
    NETWORK_CHANGED = "network-changed"  # a link or address changed, same gateway (rule 13)
    RESUMED = "resumed"  # the host slept or the process was stopped: check all, spread (rule 14)


# (state, trigger) -> new state, for the triggers of the current token. What a
# handler may refine (a failure's kind picks between two of these) is noted.
TRANSITIONS: Final[dict[tuple[State, Trigger], State | tuple[State, ...]]] = {
    (State.REQUESTING, Trigger.GRANTED): State.ACTIVE,
    (State.REQUESTING, Trigger.FAILED): (State.LOST, State.FAILED),
    (State.REQUESTING, Trigger.RELEASE): State.RELEASING,
    (State.REQUESTING, Trigger.DETACH): State.RELEASED,
    (State.ACTIVE, Trigger.TIMER): State.RENEWING,
    (State.ACTIVE, Trigger.RECHECK): State.RENEWING,
    (State.ACTIVE, Trigger.STATE_LOST): State.LOST,
    (State.ACTIVE, Trigger.RELEASE): State.RELEASING,
    (State.ACTIVE, Trigger.DETACH): State.RELEASED,
    (State.RENEWING, Trigger.GRANTED): State.ACTIVE,
    (State.RENEWING, Trigger.FAILED): (State.RENEWING, State.LOST),
    (State.RENEWING, Trigger.TIMER): (State.RENEWING, State.LOST),
    (State.RENEWING, Trigger.STATE_LOST): State.LOST,
    (State.RENEWING, Trigger.RELEASE): State.RELEASING,
    (State.RENEWING, Trigger.DETACH): State.RELEASED,
    (State.LOST, Trigger.TIMER): State.REQUESTING,
    (State.LOST, Trigger.RELEASE): (State.RELEASING, State.RELEASED),
    (State.LOST, Trigger.DETACH): State.RELEASED,
    (State.RELEASING, Trigger.DELETED): State.RELEASED,
    (State.RELEASING, Trigger.FAILED): State.RELEASED,
    (State.REQUESTING, Trigger.MOVED): State.REQUESTING,
    (State.ACTIVE, Trigger.MOVED): State.REQUESTING,
    (State.RENEWING, Trigger.MOVED): State.REQUESTING,
    (State.LOST, Trigger.MOVED): State.REQUESTING,
    (State.ACTIVE, Trigger.NETWORK_CHANGED): (State.ACTIVE, State.RENEWING),
    (State.RENEWING, Trigger.NETWORK_CHANGED): State.RENEWING,
    (State.LOST, Trigger.NETWORK_CHANGED): State.LOST,
    (State.ACTIVE, Trigger.RESUMED): (State.ACTIVE, State.LOST),
    (State.RENEWING, Trigger.RESUMED): State.RENEWING,
    (State.LOST, Trigger.RESUMED): State.LOST,
}

# Pairs that are ignored on purpose (rule 9), whatever the token.
_IGNORED: Final = frozenset(
    {
        (State.REQUESTING, Trigger.STATE_LOST),
        (State.LOST, Trigger.STATE_LOST),
        (State.RELEASING, Trigger.STATE_LOST),
        (State.RELEASED, Trigger.STATE_LOST),
        (State.FAILED, Trigger.STATE_LOST),
        (State.RELEASING, Trigger.RELEASE),
        (State.RELEASED, Trigger.RELEASE),
        (State.FAILED, Trigger.RELEASE),
        (State.RELEASING, Trigger.DETACH),
        (State.RELEASED, Trigger.DETACH),
        (State.FAILED, Trigger.DETACH),
        *((s, Trigger.RECHECK) for s in State if s is not State.ACTIVE),
        (State.RELEASING, Trigger.MOVED),
        (State.RELEASED, Trigger.MOVED),
        (State.FAILED, Trigger.MOVED),
        (State.REQUESTING, Trigger.NETWORK_CHANGED),
        (State.RELEASING, Trigger.NETWORK_CHANGED),
        (State.RELEASED, Trigger.NETWORK_CHANGED),
        (State.FAILED, Trigger.NETWORK_CHANGED),
        (State.REQUESTING, Trigger.RESUMED),
        (State.RELEASING, Trigger.RESUMED),
        (State.RELEASED, Trigger.RESUMED),
        (State.FAILED, Trigger.RESUMED),
    }
)
_OUTCOMES: Final = frozenset({Trigger.GRANTED, Trigger.FAILED, Trigger.DELETED, Trigger.TIMER})


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
class ReachabilityChanged:
    """The external address is not publicly reachable, or no longer / again is.

    Published right after the first grant when its external address is not
    global (a private, shared or other special-purpose address: there is
    another NAT beyond the gateway, docs/double-nat.md), and after any later
    grant whose address moved between public and not public (rule 11).
    ``public`` and ``reason`` are ``lease.reachability``'s.
    """

    lease: Lease
    public: bool
    reason: str | None

    @property
    def reachability(self) -> Reachability:
        return self.lease.reachability


@attrs.frozen
class Lost:
    """The mapping stopped working; portbroker is restoring it."""

    reason: str


@attrs.frozen
class Restored:
    """A lost mapping works again."""

    lease: Lease


@attrs.frozen
class GatewayChanged:
    """The default route leads to another gateway; the mapping is being re-created there.

    ``Restored`` (and ``ExternalAddressChanged``: the new gateway's address)
    follows once it works, ``Lost`` / ``Failed`` if it does not (rule 12).
    """

    old_gateway: IPAddress
    new_gateway: IPAddress


@attrs.frozen
class Released:
    """The end of a mapping the app released (or detached): the last event."""

    confirmed: bool  # the gateway acknowledged the delete
    detached: bool = False  # left on the gateway on purpose (Broker.detach)
    # The delete failed and the broker keeps trying in the background (rule
    # 10): Broker.undeleted() lists the lease until it is deleted or given up.
    retrying: bool = False


@attrs.frozen
class Failed:
    """The mapping could not be kept; ``reason`` says why. The last event."""

    reason: str


MappingEvent = (
    Acquired
    | Renewed
    | ExternalAddressChanged
    | ReachabilityChanged
    | Lost
    | Restored
    | GatewayChanged
    | Released
    | Failed
)


def event_detail(event: MappingEvent) -> dict[str, Any]:
    """An event's fields other than its lease, as JSON values."""
    detail: dict[str, Any] = {}
    for name in (
        "reason",
        "confirmed",
        "detached",
        "retrying",
        "old_address",
        "old_port",
        "public",
        "old_gateway",
        "new_gateway",
    ):
        if hasattr(event, name):
            value = getattr(event, name)
            if name in ("detached", "retrying") and not value:
                continue  # only said when true: a plain release reads as before
            detail[name] = value if isinstance(value, bool | int | None) else str(value)
    return detail


# -- failures -------------------------------------------------------------------


class FailureKind(enum.Enum):
    REFUSED = "refused"  # the gateway said no; the same request will get no again
    RETRY = "retry"  # the gateway said "not now" (retry_after)
    UNAVAILABLE = "unavailable"  # this method is no use with this gateway now
    SILENT = "silent"  # no answer within the budget
    INTERNAL = "internal"  # an unexpected exception: a bug, treated like silence


@attrs.frozen
class Failure:
    """How an operation failed, in the terms the rules need."""

    kind: FailureKind
    reason: str
    retry_after: float | None = None


def classify(error: BaseException, *, expires_in: float | None = None) -> Failure:
    """Rule 3: what an exception from a method means for the mapping.

    *expires_in* is how long the current lease has left (None when there is
    none): a ``retry_after`` beyond it cannot save this lease, so it is a
    refusal.
    """
    if isinstance(error, MappingError):
        retry = error.retry_after
        if retry is not None and (expires_in is None or retry < expires_in):
            return Failure(FailureKind.RETRY, str(error), retry)
        return Failure(FailureKind.REFUSED, str(error), retry)
    if isinstance(error, MethodUnavailable):
        return Failure(FailureKind.UNAVAILABLE, str(error))
    if isinstance(error, NoAnswer):
        return Failure(FailureKind.SILENT, str(error))
    if isinstance(error, PortBrokerError):
        return Failure(FailureKind.SILENT, str(error))
    return Failure(FailureKind.INTERNAL, f"internal error: {type(error).__name__}: {error}")


# -- actions --------------------------------------------------------------------


@attrs.frozen
class Sleep:
    """Fire TIMER (with this token) at *until*."""

    until: float
    token: int


@attrs.frozen
class Renew:
    """Send a renewal of *lease* now (create with the lease as the previous one)."""

    lease: Lease
    budget: float
    token: int


@attrs.frozen
class Recreate:
    """Create the mapping again now.

    With *previous*, ask *previous.method* with it (same nonce and port);
    without, let the broker choose the method afresh.
    """

    previous: Lease | None
    budget: float
    token: int


@attrs.frozen
class Delete:
    """Delete *lease* now. Report DELETED unless *quiet* (an orphan's cleanup)."""

    lease: Lease
    token: int
    quiet: bool = False


@attrs.frozen
class Stop:
    """Nothing more to do: the mapping ended (RELEASED or FAILED)."""


@attrs.frozen
class RetryDelete:
    """The mapping ended (RELEASED) but its delete failed: hand *pending* over.

    *first* is the pending delete's first step: a Sleep until the next
    attempt, or Stop when the failure is final (rule 10). Either way the
    mapping itself is done, as after :class:`Stop`.
    """

    pending: PendingDelete
    first: DeleteStep


Action = Sleep | Renew | Recreate | Delete | Stop | RetryDelete


@attrs.frozen
class Step:
    """What :meth:`MappingLifecycle.fire` answers: publish *events*, then do *action*.

    *action* is None when the trigger changed nothing (a late trigger).
    """

    events: list[MappingEvent]
    action: Action | None


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


def renewal_budget(lease: Lease, now: float) -> float:
    """Rule 2: how long one renewal attempt may take."""
    remaining = lease.expires_at - now
    return max(0.1, min(MAX_RENEWAL_BUDGET, max(4.0, remaining / 4), remaining))


@attrs.define
class MappingLifecycle:
    """One mapping's state, lease and rules. Drive it with :meth:`fire`.

    It starts REQUESTING with token 0: the broker's first create is that
    operation, and its GRANTED (token 0) makes the mapping ACTIVE.
    """

    rng: random.Random = attrs.field(factory=random.Random)
    recovery_delay: float = 5.0
    request_budget: float = 8.0
    state: State = State.REQUESTING
    lease: Lease | None = None
    token: int = 0
    renew_attempt: int = 0
    last_attempt_at: float | None = None
    recovery_failures: int = 0
    last_failure: Failure | None = None
    ever_granted: bool = False
    detached: bool = False
    recreating_previous: bool = False  # the re-creation in flight reuses the previous lease
    sleeping: bool = False  # the current token is a Sleep's (else an operation's)
    # Rule 12: the last token issued before the latest move; a grant of an
    # operation at or before it was made on the old gateway.
    moved_after_token: int = -1
    moving: bool = False  # re-creating on a new gateway, nothing granted there yet

    def fire(
        self,
        trigger: Trigger,
        now: float,
        *,
        token: int | None = None,
        lease: Lease | None = None,
        failure: Failure | None = None,
        reason: str = "",
        confirmed: bool = False,
        old_gateway: IPAddress | None = None,
        new_gateway: IPAddress | None = None,
        awake_since: float | None = None,
        spread: float = 0.0,
    ) -> Step:
        """Apply *trigger* at time *now*.

        Outcome triggers (GRANTED, FAILED, DELETED, TIMER) carry the *token* of
        the action they answer; GRANTED carries the *lease*, FAILED the
        *failure*, STATE_LOST the *reason*, DELETED *confirmed*, MOVED
        *old_gateway* and *new_gateway*, RESUMED *awake_since* (optional: a
        lease granted at or after it was granted after the wake, rule 14),
        NETWORK_CHANGED *spread* (optional: seconds over which to spread the
        re-checks of many mappings, rule 13).

        Raises:
            LifecycleError: a (state, trigger) pair with no rule (rule 9).
        """
        if trigger in _OUTCOMES:
            if token is None:
                raise LifecycleError(f"{trigger.value} needs the token of its action")
            if token != self.token:
                return self._late(trigger, lease, token)
            if (trigger is Trigger.TIMER) != self.sleeping:
                # A timer while an operation is in flight, or an operation's
                # outcome while sleeping: the token names the other kind.
                raise LifecycleError(f"no rule for {trigger.value} in state {self.state.value}")
        if (self.state, trigger) in _IGNORED:
            return Step([], None)
        if (self.state, trigger) not in TRANSITIONS:
            raise LifecycleError(f"no rule for {trigger.value} in state {self.state.value}")
        handler = getattr(self, f"_on_{trigger.name.lower()}")
        step: Step = handler(
            now,
            lease=lease,
            failure=failure,
            reason=reason,
            confirmed=confirmed,
            old_gateway=old_gateway,
            new_gateway=new_gateway,
            awake_since=awake_since,
            spread=spread,
        )
        return step

    # -- helpers --------------------------------------------------------------

    def _next_token(self) -> int:
        self.token += 1
        return self.token

    def _sleep(self, until: float) -> Sleep:
        self.sleeping = True
        return Sleep(until, self._next_token())

    def _busy(self) -> int:
        self.sleeping = False
        return self._next_token()

    def _late(self, trigger: Trigger, lease: Lease | None, token: int) -> Step:
        # Rule 9: a superseded outcome. Only a grant after the end needs work:
        # it may have created a mapping nobody holds; so may a grant from the
        # gateway the mapping moved away from (rule 12).
        if (
            trigger is Trigger.GRANTED
            and lease is not None
            and not self.detached
            and (
                self.state in (State.RELEASING, State.RELEASED, State.FAILED)
                or token <= self.moved_after_token
            )
        ):
            return Step([], Delete(lease, self.token, quiet=True))
        return Step([], None)

    def _schedule_renewal(self, now: float) -> Sleep:
        assert self.lease is not None
        lease = self.lease
        when = renewal_time(
            lease.granted_at, lease.lifetime, 0, self.rng, not_before=now + MIN_RENEWAL_GAP
        )
        if when is None:
            # A lifetime too short for the 4 s gap (a server granting 1 s):
            # renewals stay 4 s apart (RFC 6887 §11.2.1 "MUST"), even if the
            # lease lapses in between; at half-life they cost the gateway two
            # requests a second, for ever.
            when = max(now + MIN_RENEWAL_GAP, lease.granted_at + lease.lifetime / 2)
        return self._sleep(when)

    def _lost(self, now: float, reason: str) -> Step:
        self.state = State.LOST
        self.recovery_failures = 0
        return Step([Lost(reason)], self._sleep(now + self.rng.uniform(0.0, self.recovery_delay)))

    def _final(self, state: State, events: list[MappingEvent]) -> Step:
        self.state = state
        self._busy()
        return Step(events, Stop())

    # -- handlers, one per trigger ----------------------------------------------

    def _on_granted(self, now: float, *, lease: Lease | None, **_: Any) -> Step:
        if lease is None:
            raise LifecycleError("GRANTED needs the lease")
        old_state, previous = self.state, self.lease
        self.state, self.lease = State.ACTIVE, lease
        self.moving = False
        self.renew_attempt = 0
        self.last_attempt_at = None
        self.recovery_failures = 0
        self.last_failure = None
        events: list[MappingEvent] = []
        if not self.ever_granted:
            self.ever_granted = True
            events.append(Acquired(lease))
        elif old_state is State.REQUESTING:
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
        # Rule 11: say when the Internet cannot reach it, and when that changes.
        # Reachability is a function of the address alone, so a renewal on
        # the same address (nearly every grant) need not classify it again.
        if previous is None or previous.external_address != lease.external_address:
            reachable = lease.reachability
            was_public = True if previous is None else previous.reachability.public
            if reachable.public != was_public:
                events.append(ReachabilityChanged(lease, reachable.public, reachable.reason))
        return Step(events, self._schedule_renewal(now))

    def _on_timer(self, now: float, **_: Any) -> Step:
        if self.state is State.ACTIVE:
            return self._start_renewal(now)
        if self.state is State.RENEWING:
            assert self.lease is not None
            if now >= self.lease.expires_at:
                why = self.last_failure.reason if self.last_failure else "no answer"
                return self._lost(now, f"lease expired unrenewed ({why})")
            return self._start_renewal(now)
        # LOST: the recovery delay is over (rule 6).
        self.state = State.REQUESTING
        failure = self.last_failure
        reuse = self.lease is not None and (
            failure is None or (failure.kind is FailureKind.SILENT and self.recovery_failures == 0)
        )
        self.recreating_previous = reuse
        return Step([], Recreate(self.lease if reuse else None, self.request_budget, self._busy()))

    def _start_renewal(self, now: float) -> Step:
        assert self.lease is not None
        self.state = State.RENEWING
        self.last_attempt_at = now
        return Step([], Renew(self.lease, renewal_budget(self.lease, now), self._busy()))

    def _on_recheck(self, now: float, **_: Any) -> Step:
        return self._start_renewal(now)

    def _on_failed(self, now: float, *, failure: Failure | None, **_: Any) -> Step:
        if failure is None:
            raise LifecycleError("FAILED needs the failure")
        if self.state is State.RELEASING:
            return self._delete_failed(now, failure)
        self.last_failure = failure
        if self.state is State.RENEWING:
            if failure.kind in (FailureKind.REFUSED, FailureKind.UNAVAILABLE):
                return self._lost(now, f"renewal refused: {failure.reason}")
            if failure.kind is FailureKind.INTERNAL:
                # We cannot know what the gateway holds: say so now, re-create.
                return self._lost(now, f"renewal failed: {failure.reason}")
            return self._retry_renewal(now, failure)
        # REQUESTING: a re-creation failed (rule 7).
        if failure.kind is FailureKind.REFUSED:
            self.moving = False
            return self._final(State.FAILED, [Failed(f"re-creation refused: {failure.reason}")])
        self.recovery_failures += 1
        if self.recovery_failures >= MAX_RECOVERY_ATTEMPTS:
            return self._final(
                State.FAILED,
                [
                    Failed(
                        f"gave up after {self.recovery_failures} failed re-creations:"
                        f" {failure.reason}"
                    )
                ],
            )
        self.state = State.LOST
        events: list[MappingEvent] = []
        if self.moving:
            # Rule 12: the app hears that the new gateway does not have it (yet).
            self.moving = False
            events.append(Lost(f"re-creation on the new gateway failed: {failure.reason}"))
        if failure.kind is FailureKind.UNAVAILABLE and self.recreating_previous:
            # The previous method is gone: choose afresh, at once. (Once the
            # choice afresh is unavailable too, at once would burn every
            # attempt in a moment: the broker rules methods out for 30 s.)
            return Step(events, self._sleep(now))
        index = min(self.recovery_failures, len(RECOVERY_BACKOFF)) - 1
        return Step(
            events, self._sleep(now + max(RECOVERY_BACKOFF[index], failure.retry_after or 0.0))
        )

    def _retry_renewal(self, now: float, failure: Failure) -> Step:
        assert self.lease is not None
        self.renew_attempt += 1
        not_before = max((self.last_attempt_at or now) + MIN_RENEWAL_GAP, now)
        if failure.retry_after is not None:
            not_before = max(not_before, now + failure.retry_after)
        when = renewal_time(
            self.lease.granted_at,
            self.lease.lifetime,
            self.renew_attempt,
            self.rng,
            not_before=not_before,
        )
        # No window left before expiry: wake at expiry to declare it LOST.
        return Step([], self._sleep(when if when is not None else self.lease.expires_at))

    def _on_state_lost(self, now: float, *, reason: str, **_: Any) -> Step:
        self.last_failure = None
        return self._lost(now, reason or "the gateway lost its mappings")

    def _on_moved(
        self,
        now: float,
        *,
        old_gateway: IPAddress | None,
        new_gateway: IPAddress | None,
        **_: Any,
    ) -> Step:
        # Rule 12: re-create afresh on the new gateway, at once.
        if old_gateway is None or new_gateway is None:
            raise LifecycleError("MOVED needs old_gateway and new_gateway")
        self.moved_after_token = self.token
        self.moving = True
        self.state = State.REQUESTING
        self.recovery_failures = 0
        self.last_failure = None
        self.recreating_previous = False
        return Step(
            [GatewayChanged(old_gateway, new_gateway)],
            Recreate(None, self.request_budget, self._busy()),
        )

    def _on_network_changed(self, now: float, *, spread: float, **_: Any) -> Step:
        # Rule 13: what is pending, now (or after this mapping's share of
        # *spread*). An operation in flight will answer.
        if not self.sleeping:
            return Step([], None)
        now_or_later = now + self.rng.uniform(0.0, spread) if spread > 0 else now
        if self.state is State.ACTIVE:
            assert self.lease is not None
            earliest = self.lease.granted_at + MIN_RENEWAL_GAP
            if now_or_later < earliest:
                return Step([], self._sleep(earliest))
            if now_or_later > now:
                return Step([], self._sleep(now_or_later))
            return self._start_renewal(now)
        if self.state is State.RENEWING:
            assert self.lease is not None
            earliest = (self.last_attempt_at or now) + MIN_RENEWAL_GAP
            # Past the expiry the TIMER declares it LOST, as it would have.
            return Step([], self._sleep(min(max(now_or_later, earliest), self.lease.expires_at)))
        # LOST: the recovery delay or backoff is cut short.
        return Step([], self._sleep(now_or_later))

    def _on_resumed(self, now: float, *, awake_since: float | None, **_: Any) -> Step:
        # Rule 14: check everything, each after its own share of the spread.
        if not self.sleeping:
            return Step([], None)  # an operation in flight will answer
        if self.state is State.ACTIVE:
            assert self.lease is not None
            if awake_since is not None and self.lease.granted_at >= awake_since:
                # Renewed since the wake (a timer overdue in the stop fired
                # first): it is as fresh as a check could make it.
                return Step([], None)
        spread = now + self.rng.uniform(0.0, self.recovery_delay)
        if self.state is State.ACTIVE:
            assert self.lease is not None
            if now >= self.lease.expires_at:
                return self._lost(now, "lease expired while the host slept or was stopped")
            return Step([], self._sleep(spread))
        if self.state is State.RENEWING:
            assert self.lease is not None
            return Step([], self._sleep(min(spread, self.lease.expires_at)))
        return Step([], self._sleep(spread))

    def _on_release(self, now: float, **_: Any) -> Step:
        if self.lease is None:
            return self._final(State.RELEASED, [Released(False)])
        self.state = State.RELEASING
        return Step([], Delete(self.lease, self._busy()))

    def _on_detach(self, now: float, **_: Any) -> Step:
        self.detached = True
        return self._final(State.RELEASED, [Released(False, detached=True)])

    def _on_deleted(self, now: float, *, confirmed: bool, **_: Any) -> Step:
        return self._final(State.RELEASED, [Released(confirmed)])

    def _delete_failed(self, now: float, failure: Failure) -> Step:
        # Rule 8: the release is over after one attempt; rule 10 goes on.
        assert self.lease is not None
        pending = PendingDelete(self.lease)
        first = pending.fire(Trigger.FAILED, now, token=pending.token, failure=failure)
        retrying = pending.state is DeleteState.WAITING
        step = self._final(State.RELEASED, [Released(False, retrying=retrying)])
        return Step(step.events, RetryDelete(pending, first))


# -- deletes that failed (rule 10) --------------------------------------------------


class DeleteState(enum.Enum):
    DELETING = "deleting"  # an attempt is in flight
    WAITING = "waiting"  # the next attempt is pending
    DELETED = "deleted"  # the gateway confirmed (or said it had no such entry)
    GAVE_UP = "gave-up"  # refused for good, the lease expired, or the attempt bound


DELETE_TRANSITIONS: Final[
    dict[tuple[DeleteState, Trigger], DeleteState | tuple[DeleteState, ...]]
] = {
    (DeleteState.DELETING, Trigger.DELETED): DeleteState.DELETED,
    (DeleteState.DELETING, Trigger.FAILED): (DeleteState.WAITING, DeleteState.GAVE_UP),
    (DeleteState.WAITING, Trigger.TIMER): (DeleteState.DELETING, DeleteState.GAVE_UP),
}


@attrs.frozen
class DeleteStep:
    """What :meth:`PendingDelete.fire` answers: the one next action.

    Sleep (fire TIMER then), Delete (try now, report DELETED or FAILED),
    Stop (it ended: :attr:`PendingDelete.outcome` says how), or None (a
    late trigger).
    """

    action: Sleep | Delete | Stop | None


def supersedes(new: Lease | MappingRequest, pending: Lease) -> bool:
    """Would deleting *pending* remove the gateway's entry for *new*? (rule 10)

    *new* is a granted lease, or a request about to be sent. Conservatively
    yes when they share the protocol (and, for a lease, the gateway) and
    either the internal endpoint (PCP with a remembered nonce and NAT-PMP
    name a mapping by it, RFC 6887 §11.1, RFC 6886 §3.3; a request naming no
    internal address means this host) or, for a lease, the external port
    (UPnP deletes by it). A PEER (RFC 6887 §12) is its own gateway entry,
    named by its remote peer too: it supersedes, and is superseded by, only
    a PEER of the same flow, never a MAP of its port.
    """
    if new.protocol != pending.protocol or new.remote != pending.remote:
        return False
    if isinstance(new, MappingRequest):
        return new.internal_port == pending.internal_port and new.internal_address in (
            None,
            pending.internal_address,
        )
    if new.gateway != pending.gateway:
        return False
    same_internal = (
        new.internal_address == pending.internal_address
        and new.internal_port == pending.internal_port
    )
    return same_internal or new.external_port == pending.external_port


@attrs.define(eq=False)
class PendingDelete:
    """One lease whose delete failed, and the rule for trying again (rule 10).

    Created with the first attempt in flight (DELETING, token 0); feed it
    that attempt's outcome, DELETED or FAILED (with the :class:`Failure`),
    then TIMER when its Sleep ends, and the outcome of each Delete it asks
    for, each with the action's token.
    """

    lease: Lease
    state: DeleteState = DeleteState.DELETING
    attempts: int = 1  # made so far, the one in flight included
    token: int = 0
    last_failure: Failure | None = None
    outcome: str = ""  # how it ended (DELETED, GAVE_UP), in words

    def fire(
        self, trigger: Trigger, now: float, *, token: int, failure: Failure | None = None
    ) -> DeleteStep:
        """Apply *trigger* (DELETED, FAILED or TIMER, with its action's token) at *now*.

        Raises:
            LifecycleError: a (state, trigger) pair outside DELETE_TRANSITIONS.
        """
        if token != self.token:
            return DeleteStep(None)  # superseded: not this attempt's outcome
        if (self.state, trigger) not in DELETE_TRANSITIONS:
            raise LifecycleError(f"no rule for {trigger.value} in delete state {self.state.value}")
        if trigger is Trigger.DELETED:
            self.state = DeleteState.DELETED
            self.outcome = f"deleted at attempt {self.attempts}"
            return self._stop()
        if trigger is Trigger.TIMER:
            if self._expired(now):
                return self._give_up("the lease expired: the gateway has dropped it")
            self.state = DeleteState.DELETING
            self.attempts += 1
            return DeleteStep(Delete(self.lease, self._next_token()))
        if failure is None:
            raise LifecycleError("FAILED needs the failure")
        self.last_failure = failure
        if failure.kind is FailureKind.REFUSED:
            return self._give_up(f"refused: {failure.reason}")
        if self.attempts >= MAX_DELETE_ATTEMPTS:
            return self._give_up(f"{self.attempts} attempts failed, the last: {failure.reason}")
        index = min(self.attempts, len(RECOVERY_BACKOFF)) - 1
        until = now + max(RECOVERY_BACKOFF[index], failure.retry_after or 0.0)
        if self._expired(until):
            return self._give_up(
                f"{failure.reason}; the lease expires before the next attempt"
                " (the gateway drops it then)"
            )
        self.state = DeleteState.WAITING
        return DeleteStep(Sleep(until, self._next_token()))

    def _expired(self, when: float) -> bool:
        # A permanent UPnP lease never lapses: only the attempt bound ends it.
        return not self.lease.permanent and when >= self.lease.expires_at

    def _next_token(self) -> int:
        self.token += 1
        return self.token

    def _give_up(self, why: str) -> DeleteStep:
        self.state = DeleteState.GAVE_UP
        self.outcome = why
        return self._stop()

    def _stop(self) -> DeleteStep:
        self._next_token()  # whatever was outstanding is late now
        return DeleteStep(Stop())
