"""Did the gateway lose its mapping state? Epoch rules and the per-gateway tracker.

Every PCP and NAT-PMP response carries the server's epoch: seconds since its
mapping state was created. It restarts from 0 when the state is lost (reboot,
daemon restart, and for PCP an external address change). A client compares
each new epoch with what the previous one and its own clock predict; a
mismatch means the server forgot our mappings and they must be re-created.

The two protocols use different rules, and C clients have got both wrong
(protocols.md §1.13, §3.6, §6):

- PCP, RFC 6887 §8.5: symmetric, 1/16 of the elapsed time plus 2 s in *both*
  directions, and a step back of up to one second tolerated so that reordered
  packets do not look like a reboot. That tolerance only works with *signed*
  deltas; unsigned 32-bit arithmetic (libplum, libpcpnatpmp) turns a 1 s step
  back into a reset.
- NAT-PMP, RFC 6886 §3.6: one-sided, 7/8 of the elapsed time plus 2 s, and
  computed from the *previous* epoch (libplum adds to the current one and so
  flags a reset on any reply 3 s after the last).

All arithmetic is on whole seconds, as the RFCs specify. Callers pass their
monotonic clock; fractions are floored.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import NamedTuple

import attrs

from portbroker.wire import natpmp, pcp
from portbroker.wire._fields import uint

__all__ = [
    "CONFIRM_INTERVAL",
    "BootIdSeen",
    "Confirm",
    "EntryMissing",
    "EpochCheck",
    "EpochObservation",
    "EpochTracker",
    "GatewaySignal",
    "SignalSink",
    "StateLoss",
    "UptimeSeen",
    "check_natpmp_epoch",
    "check_pcp_epoch",
]


@attrs.frozen
class EpochObservation:
    """One response's epoch and the local time it arrived (seconds)."""

    server_epoch: int = attrs.field(validator=uint(32))
    client_time: float


class EpochCheck(enum.Enum):
    """The verdict on a new epoch. Only ``FIRST`` and ``VALID`` keep state."""

    FIRST = "first"  # nothing to compare with yet
    VALID = "valid"
    WENT_BACKWARDS = "went-backwards"  # PCP: back by more than 1 s
    TOO_SLOW = "too-slow"  # advanced less than the clock allows
    TOO_FAST = "too-fast"  # PCP: advanced more than the clock allows

    @property
    def state_lost(self) -> bool:
        """True when the server must be assumed to have forgotten our mappings."""
        return self not in (EpochCheck.FIRST, EpochCheck.VALID)


def _div16(value: int) -> int:
    # RFC 6887 §8.5 divides integers as C does: truncation toward zero.
    return value // 16 if value >= 0 else -((-value) // 16)


def check_pcp_epoch(previous: EpochObservation | None, current: EpochObservation) -> EpochCheck:
    """RFC 6887 §8.5 applied to *current* given the *previous* observation.

    The caller stores *current* as the new previous whatever the verdict
    (§8.5 updates both times on every response).
    """
    if previous is None:
        return EpochCheck.FIRST
    curr_server, prev_server = current.server_epoch, previous.server_epoch
    if curr_server < prev_server - 1:
        return EpochCheck.WENT_BACKWARDS
    # Signed on purpose: server_delta may be -1 (a reordered packet).
    client_delta = math.floor(current.client_time) - math.floor(previous.client_time)
    server_delta = curr_server - prev_server
    if client_delta + 2 < server_delta - _div16(server_delta):
        return EpochCheck.TOO_FAST
    if server_delta + 2 < client_delta - _div16(client_delta):
        return EpochCheck.TOO_SLOW
    return EpochCheck.VALID


def check_natpmp_epoch(previous: EpochObservation | None, current: EpochObservation) -> EpochCheck:
    """RFC 6886 §3.6 applied to *current* given the *previous* observation.

    Reboot when the new SSSoE is more than 2 s below the conservative estimate
    ``previous + 7/8 * elapsed``. A jump forward is never flagged.
    """
    if previous is None:
        return EpochCheck.FIRST
    elapsed = math.floor(current.client_time) - math.floor(previous.client_time)
    expected = previous.server_epoch + elapsed - elapsed // 8
    if current.server_epoch + 2 < expected:
        return EpochCheck.TOO_SLOW
    return EpochCheck.VALID


# -- what methods report --------------------------------------------------------
#
# Methods do not decide that a gateway lost its state; they report what they
# saw through a callback given at construction (a :data:`SignalSink`), and the
# gateway's tracker decides. PCP and NAT-PMP epochs reach the tracker from the
# transport's observer; UPnP has no epoch, so its method reports these.


@attrs.frozen
class BootIdSeen:
    """A UPnP device's BOOTID.UPNP.ORG (UDA 2.0 §1.2.2), read from an SSDP reply.

    A change means the device rebooted and forgot its port mappings.
    """

    boot_id: int
    at: float


@attrs.frozen
class UptimeSeen:
    """WANIPConnection GetStatusInfo's NewUptime, in seconds, read at *at*.

    Uptime going down (by more than the clock allows) means the WAN connection
    restarted, and IGDs drop their mappings with it.
    """

    uptime: int
    at: float


@attrs.frozen
class EntryMissing:
    """The gateway definitely said a mapping we hold is not there.

    UPnP error 714 NoSuchEntryInArray from GetSpecificPortMappingEntry, never a
    transport failure or a timeout (those prove nothing).
    """

    detail: str
    at: float


GatewaySignal = BootIdSeen | UptimeSeen | EntryMissing
SignalSink = Callable[[GatewaySignal], None]


# -- the tracker ----------------------------------------------------------------

# At most one confirmation request per this many seconds: an unsolicited
# message is a hint, and a flood of spoofed ones (any on-link host can send
# them, RFC 6887 §14.1.1 / RFC 6886 §3.2.1) must cost a bounded number of
# requests to the gateway.
CONFIRM_INTERVAL = 2.0


@attrs.frozen
class StateLoss:
    """One incident: the gateway (the whole box) forgot its mappings."""

    reason: str
    at: float


@attrs.frozen
class Confirm:
    """An unsolicited message hinted at a change: ask the gateway before believing it.

    *families* are the protocols whose solicited answer can settle it (those
    with an epoch to compare against), most telling first; empty when none
    has one yet, in which case the broker re-checks a mapping itself (the least
    recently renewed one: a restart lost them all).
    """

    reason: str
    families: tuple[str, ...]
    # Whether any solicited answer of families[0] asked for after the hint
    # settles it (an epoch hint). An announced NAT-PMP address is settled only
    # by the confirmation itself: a MAP answer carries no external address,
    # and only the broker's confirmation re-checks the mappings' addresses.
    settled_by_epoch: bool = True


Verdict = StateLoss | Confirm | None


class _Deferred(NamedTuple):
    """A hint held back by the confirmation rate limit (EpochTracker._deferred)."""

    reason: str
    family: str
    at: float  # when it came
    settled_by_epoch: bool  # as Confirm's: a solicited answer asked for after *at* settles it


@attrs.frozen
class _Stamp:
    """A server epoch and the interval of our clock in which the server read it."""

    epoch: int
    earliest: float  # when the request was first sent
    latest: float  # when its answer arrived


def _interval_check(
    family: str, previous: _Stamp | None, epoch: int, earliest: float, latest: float
) -> EpochCheck:
    """The RFC rule, failed only if no pair of moments in the two intervals passes it.

    Too slow (or backwards) is judged on the least client time that can have
    passed (the previous answer's arrival to this request's first send); too
    fast on the most (the previous request's send to this answer's arrival).
    """
    if previous is None:
        return EpochCheck.FIRST
    check = check_pcp_epoch if family == "pcp" else check_natpmp_epoch
    slow = check(
        EpochObservation(previous.epoch, previous.latest), EpochObservation(epoch, earliest)
    )
    if slow in (EpochCheck.WENT_BACKWARDS, EpochCheck.TOO_SLOW):
        return slow
    fast = check(
        EpochObservation(previous.epoch, previous.earliest), EpochObservation(epoch, latest)
    )
    if fast is EpochCheck.TOO_FAST:
        return fast
    return EpochCheck.VALID


@attrs.define
class EpochTracker:
    """Decides, for one gateway, when its mapping state was lost. Sans-IO.

    Fed by every PCP and NAT-PMP response (:meth:`epoch`), NAT-PMP address
    announcements (:meth:`address_announced`) and what the UPnP method saw
    (:meth:`signal`). Its rules:

    - **Facts and hints.** A solicited response (one that answers a request we
      sent) is a fact: its epoch is checked (RFC 6887 §8.5, RFC 6886 §3.6) and
      becomes the baseline. An unsolicited one (an ANNOUNCE, an address
      announcement, a reply nobody waited for) is only a hint: if it would
      mean a loss, the answer is :class:`Confirm` — at most one per
      :data:`CONFIRM_INTERVAL` — and it never moves the baseline.
    - **One box, one incident.** PCP, NAT-PMP and UPnP on one gateway share
      its fate (miniupnpd restarts all three at once, and announces it only
      with a PCP ANNOUNCE), so a loss seen by any of them is one
      :class:`StateLoss` for every mapping on the gateway; afterwards every
      baseline starts again from the next answer, so the other protocols'
      first post-restart answers are not a second incident.
    - **UPnP**: an uptime that goes back by more than the NAT-PMP rule allows,
      or an entry reported missing (714), is a loss; an uptime that does not
      move at all is a counter that does not count (no news); a BOOTID.UPNP.ORG
      that changes is a hint, confirmed like an ANNOUNCE.
    """

    incidents: int = 0
    _epochs: dict[str, _Stamp] = attrs.field(factory=dict)
    _boot_id: int | None = None
    _uptime: EpochObservation | None = None
    _last_confirm: float | None = None
    # A hint that came within CONFIRM_INTERVAL of the last confirmation.
    # Dropping it lost a real restart announced just after a confirmation (a
    # spoofed hint, say) until the next renewal; it is confirmed once the
    # interval is over (deferred_until, take_deferred).
    _deferred: _Deferred | None = None
    _natpmp_address: object = None  # the last external address NAT-PMP told us, asked

    def epoch(
        self,
        family: str,
        epoch: int,
        now: float,
        *,
        solicited: bool,
        announcement: bool = False,
        asked_at: float | None = None,
    ) -> Verdict:
        """A PCP (*family* "pcp") or NAT-PMP ("natpmp") response's epoch, seen at *now*.

        *asked_at* is when the request it answers was first sent: the server
        read its clock somewhere between then and *now*, and only a reading
        that no moment of that interval explains is a loss. (miniupnpd works
        through a burst of requests one after another, 100-250 ms each with
        50 nftables rules, and stamps a whole batch with one epoch: by the
        receive time alone its clock would seem to stand still for seconds.)

        *announcement* marks an unsolicited message sent to announce a
        (re)start (to UDP 5350): with no baseline to compare it with, it is
        still worth one look; a stray late reply is not.
        """
        earliest = now if asked_at is None or not solicited else min(asked_at, now)
        previous = self._epochs.get(family)
        check = _interval_check(family, previous, epoch, earliest, now)
        if not solicited:
            if check.state_lost:
                assert previous is not None
                return self._confirm(
                    now,
                    f"unsolicited {family} epoch {epoch} (expected about"
                    f" {previous.epoch + math.floor(now - previous.latest)})",
                    family,
                )
            if previous is None and announcement:
                # Nothing to compare with: an announcement of a (re)start is
                # worth one look at the mappings, never a verdict.
                return self._confirm(now, f"unsolicited {family} epoch {epoch}", family)
            return None
        self._epochs[family] = _Stamp(epoch, earliest, now)
        deferred = self._deferred
        if (
            deferred is not None
            and deferred.settled_by_epoch
            and deferred.family == family
            and earliest >= deferred.at
        ):
            # A fact asked for after the hint came settles it (a loss, or none).
            self._deferred = None
        if check.state_lost:
            assert previous is not None
            return self._incident(
                f"{family} epoch {check.value} ({previous.epoch} -> {epoch})", now
            )
        return None

    def address_announced(
        self, address: object, now: float, *, announcement: bool = True
    ) -> Verdict:
        """RFC 6886 §3.2.1: an unsolicited NAT-PMP external address.

        Worth a confirmation when it differs from the address NAT-PMP last told
        us; with none known, only when it came as an announcement (a stray
        late reply to our own request is not news).
        """
        if address == self._natpmp_address or (self._natpmp_address is None and not announcement):
            return None
        return self._confirm(
            now, f"announced external address {address}", "natpmp", settled_by_epoch=False
        )

    def response(
        self,
        response: pcp.PcpResponse | natpmp.NatPmpResponse,
        now: float,
        *,
        solicited: bool,
        announcement: bool = False,
        asked_at: float | None = None,
    ) -> Verdict:
        """Any decoded PCP or NAT-PMP response: its epoch, and a NAT-PMP address in it."""
        if isinstance(response, pcp.PcpResponse):
            family = "natpmp" if response.is_natpmp else "pcp"
        else:
            family = "natpmp"
        verdict = self.epoch(
            family,
            response.epoch,
            now,
            solicited=solicited,
            announcement=announcement,
            asked_at=asked_at,
        )
        if (
            isinstance(response, natpmp.ExternalAddressResponse)
            and response.result_code == natpmp.ResultCode.SUCCESS
        ):
            if solicited:
                self._natpmp_address = response.external_address
            elif verdict is None:
                verdict = self.address_announced(
                    response.external_address, now, announcement=announcement
                )
        return verdict

    def signal(self, signal: GatewaySignal) -> Verdict:
        """What the UPnP method saw."""
        if isinstance(signal, BootIdSeen):
            previous_boot = self._boot_id
            self._boot_id = signal.boot_id
            if previous_boot is not None and previous_boot != signal.boot_id:
                # A hint, not a fact: it comes in an unauthenticated UDP reply
                # (any host that sees our multicast M-SEARCH can forge one),
                # and UDA 1.1 §1.2.2 bumps it when a device merely rejoins the
                # network. One solicited answer settles it: an epoch, or one
                # mapping's check (714 if the table is gone).
                return self._confirm(
                    signal.at,
                    f"BOOTID.UPNP.ORG changed ({previous_boot} -> {signal.boot_id})",
                    "upnp",
                )
            return None
        if isinstance(signal, UptimeSeen):
            current = EpochObservation(max(0, min(signal.uptime, 2**32 - 1)), signal.at)
            if self._uptime is not None and current.server_epoch == self._uptime.server_epoch:
                # An uptime that did not move at all is a counter that does not
                # count (some IGDs answer 0, or a constant), not a restart: a
                # restarted one counts again from 0. No news; keep the baseline
                # (a real restart still shows as a missing entry, 714).
                return None
            previous_uptime, self._uptime = self._uptime, current
            if check_natpmp_epoch(previous_uptime, current).state_lost:
                assert previous_uptime is not None
                return self._incident(
                    f"WAN uptime went down ({previous_uptime.server_epoch} s -> {signal.uptime} s)",
                    signal.at,
                )
            return None
        return self._incident(f"entry missing: {signal.detail}", signal.at)

    def deferred_until(self) -> float | None:
        """When a hint that came too soon after the last confirmation may be confirmed."""
        if self._deferred is None or self._last_confirm is None:
            return None
        return self._last_confirm + CONFIRM_INTERVAL

    def take_deferred(self, now: float) -> Confirm | None:
        """The deferred hint's confirmation, once :meth:`deferred_until` has come."""
        due = self.deferred_until()
        if due is None or now < due or self._deferred is None:
            return None
        deferred, self._deferred = self._deferred, None
        return self._confirm(
            now, deferred.reason, deferred.family, settled_by_epoch=deferred.settled_by_epoch
        )

    def defer(self, confirm: Confirm, now: float) -> None:
        """*confirm* could not be sent now (another is in flight): confirm it after the interval."""
        family = confirm.families[0] if confirm.families else "upnp"
        self._deferred = _Deferred(confirm.reason, family, now, confirm.settled_by_epoch)
        if self._last_confirm is None:
            self._last_confirm = now

    def _confirm(
        self, now: float, reason: str, family: str, *, settled_by_epoch: bool = True
    ) -> Confirm | None:
        # now < last + interval, not now - last < interval: the same sum as
        # deferred_until's, or a hint deferred to 4.1 (last 2.1) was never due
        # (4.1 - 2.1 < 2.0 in floating point) and _confirm_later spun on it.
        if self._last_confirm is not None and now < self._last_confirm + CONFIRM_INTERVAL:
            # Not now (a flood must cost a bounded number of requests), but
            # not never: the latest such hint is confirmed after the interval.
            self._deferred = _Deferred(reason, family, now, settled_by_epoch)
            return None
        self._last_confirm = now
        self._deferred = None
        order = (family, *(f for f in ("pcp", "natpmp") if f != family))
        return Confirm(reason, tuple(f for f in order if f in self._epochs), settled_by_epoch)

    def _incident(self, reason: str, now: float) -> StateLoss:
        self.incidents += 1
        self._deferred = None  # a loss settles every hint
        self._epochs.clear()
        self._boot_id = None
        self._uptime = None
        return StateLoss(reason, now)
