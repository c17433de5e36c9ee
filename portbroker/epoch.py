"""Did the gateway lose its mapping state? Epoch rules, as pure functions.

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

import attrs

from portbroker.wire._fields import uint

__all__ = [
    "BootIdSeen",
    "EntryMissing",
    "EpochCheck",
    "EpochObservation",
    "GatewaySignal",
    "SignalSink",
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
