"""The one exception hierarchy of portbroker.

Every error portbroker raises on purpose derives from :class:`PortBrokerError`.
Protocol facts travel as attributes (``result_code``, ``method``,
``retry_after``), never only inside the message string.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "AlreadyMapped",
    "GatewayNotFound",
    "LinkError",
    "MalformedMessage",
    "MappingError",
    "MethodUnavailable",
    "NoAnswer",
    "NoMethodAvailable",
    "PortBrokerError",
    "RequestUnsupported",
    "UnsupportedOpcode",
    "UnsupportedVersion",
    "UpnpError",
]


class PortBrokerError(Exception):
    """Base class of every error portbroker raises on purpose."""


class MalformedMessage(PortBrokerError):
    """Bytes that are not a valid message of the protocol being decoded.

    This is the only exception a decoder in :mod:`portbroker.wire` raises,
    whatever bytes it is fed.

    Attributes:
        reason: what was wrong, in words fit for a log line.
        result_code: for request decoders, the result code a server should
            answer with (for example PCP MALFORMED_REQUEST or MALFORMED_OPTION),
            or ``None`` when the message must be dropped without an answer.
    """

    def __init__(self, reason: str, *, result_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result_code = result_code


class UnsupportedVersion(MalformedMessage):
    """A request carries a protocol version this codec does not speak.

    A server answers it with UNSUPP_VERSION (PCP, RFC 6887 §9) or the 8-byte
    "unsupported version" reply (NAT-PMP, RFC 6886 §3.5).
    """

    def __init__(self, version: int, *, result_code: int | None = None) -> None:
        super().__init__(f"unsupported version {version}", result_code=result_code)
        self.version = version


class UnsupportedOpcode(MalformedMessage):
    """A request carries an opcode this codec does not know.

    A server answers it with UNSUPP_OPCODE (PCP, RFC 6887 §7.4) or result 5
    (NAT-PMP, RFC 6886 §3.5).
    """

    def __init__(self, opcode: int, *, result_code: int | None = None) -> None:
        super().__init__(f"unsupported opcode {opcode}", result_code=result_code)
        self.opcode = opcode


class GatewayNotFound(PortBrokerError):
    """No gateway was given and none could be found in the routing table."""


class MethodUnavailable(PortBrokerError):
    """The gateway does not speak this method (or did not answer it).

    Attributes:
        method: ``"pcp"``, ``"natpmp"`` or ``"upnp"``.
        natpmp_hint: True when a PCP request was answered by a NAT-PMP server
            (a version-0 reply): NAT-PMP is there even though PCP is not.
    """

    def __init__(self, method: str, reason: str, *, natpmp_hint: bool = False) -> None:
        super().__init__(f"{method}: {reason}")
        self.method = method
        self.reason = reason
        self.natpmp_hint = natpmp_hint


class MappingError(PortBrokerError):
    """The gateway refused a mapping request.

    Attributes:
        method: the method that failed.
        result_code: the protocol's result or error code (PCP result code,
            NAT-PMP result code, UPnP error code), or None.
        retry_after: seconds before the same request may be sent again
            (RFC 6887 §8.3), or None when retrying unchanged is pointless.
    """

    def __init__(
        self,
        method: str,
        reason: str,
        *,
        result_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{method}: {reason}")
        self.method = method
        self.reason = reason
        self.result_code = result_code
        self.retry_after = retry_after


class RequestUnsupported(MappingError):
    """This method cannot carry out this request as asked; another method may.

    An option the method lacks or the gateway refuses for it: a mapping for
    another host (PCP THIRD_PARTY, RFC 6887 §13.1) or remote-peer filters it
    cannot enforce (FILTER, §13.3). The method stays in use for other
    requests; without a forced method the broker asks the other enabled ones
    for this request, which is then enforced as asked or refused, never
    mapped without its options (docs/third-party-and-filter.md).
    """


class AlreadyMapped(PortBrokerError):
    """This broker already holds (or is making) a mapping of that internal endpoint.

    The gateway knows one mapping per internal address, port and protocol (PCP:
    one nonce; NAT-PMP and UPnP: the port), so a second ``map()`` would share
    it, and releasing one would silently end the other. Use the existing
    :class:`~portbroker.broker.Mapping`, or release it first.
    """


class NoMethodAvailable(MethodUnavailable):
    """No enabled method works with this gateway; ``outcomes`` says why for each.

    ``outcomes`` is a sequence of :class:`portbroker.types.ProbeOutcome`.
    """

    def __init__(self, outcomes: Sequence[Any]) -> None:
        reasons = "; ".join(f"{o.method}: {o.error or 'unavailable'}" for o in outcomes)
        super().__init__("all", reasons or "no method enabled")
        self.outcomes = tuple(outcomes)


class NoAnswer(PortBrokerError):
    """A request went unanswered through its whole retransmission schedule.

    Attributes:
        ignored: datagrams that did arrive but were rejected, counted by why
            ("nonce mismatch", "wrong source", "wrong opcode", "malformed"...).
            Empty when nothing came back at all. The message names them, so a
            user reads "12 replies ignored: nonce mismatch", not "no answer".
    """

    def __init__(
        self,
        message: str,
        *,
        ignored: Mapping[str, int] | None = None,
        method: str | None = None,
    ) -> None:
        self.method = method  # the method that got no answer, when known
        self.ignored: dict[str, int] = dict(ignored or {})
        if self.ignored:
            total = sum(self.ignored.values())
            if len(self.ignored) == 1:
                why = next(iter(self.ignored))
            else:
                why = ", ".join(f"{count} {reason}" for reason, count in self.ignored.items())
            message = f"{message} ({total} repl{'y' if total == 1 else 'ies'} ignored: {why})"
        super().__init__(message)


class LinkError(PortBrokerError):
    """The local network stack would not send or receive (not the gateway's answer).

    EPERM from a host firewall, ENETUNREACH / EHOSTUNREACH with no route,
    ENOBUFS, EADDRNOTAVAIL... The message says what failed in words, with the
    errno's name, never a bare errno text.

    Attributes:
        errno: the OS error number.
        target: what we tried to reach, as "address:port".
    """

    _HINTS: ClassVar[dict[int, str]] = {
        errno.EPERM: "a host firewall may drop it",
        errno.EACCES: "a host firewall may drop it",
        errno.ENETUNREACH: "no route to that network",
        errno.EHOSTUNREACH: "no route to that host",
        errno.ENOBUFS: "the kernel is out of buffer space",
        errno.EADDRNOTAVAIL: "no local address can reach it",
        errno.ENETDOWN: "the network is down",
    }

    def __init__(self, action: str, target: str, error: OSError) -> None:
        code = error.errno if isinstance(error.errno, int) and error.errno > 0 else 0
        if code:
            text = os.strerror(code)
            name = errno.errorcode.get(code)
            if name is not None:
                text = f"{text} ({name})"
        else:
            # No OS errno (a getaddrinfo failure's negative code, or none at
            # all): its own words, never "errno 0" or "Unknown error -2".
            text = error.strerror or str(error) or type(error).__name__
        hint = self._HINTS.get(code)
        super().__init__(f"cannot {action} {target}: {text}" + (f"; {hint}" if hint else ""))
        self.errno = code
        self.target = target


class UpnpError(PortBrokerError):
    """A UPnP action failed; ``code`` is the UPnP error code when known."""

    def __init__(self, action: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{action}: {message}")
        self.action = action
        self.message = message
        self.code = code
