"""What PCP and NAT-PMP answers mean, shared by both: pure values, no I/O.

The per-protocol tables live in :mod:`portbroker.methods.pcp_rules` and
:mod:`portbroker.methods.natpmp_rules`; ``docs/result-codes.md`` is their
reference. This module holds what they share: the two scopes a refusal can
have, and the checks on what a gateway *granted*.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv6Network

import attrs

from portbroker.errors import MappingError, MethodUnavailable, RequestUnsupported
from portbroker.types import IPAddress, Lease, RemoteFilter

_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")

__all__ = ["Scope", "Undo", "filter_family_problem", "grant_problem", "unusable_address"]


class Scope(enum.Enum):
    """Whom a refusal is about (docs/result-codes.md, "Scopes")."""

    # The server will not serve this client with this method at all:
    # MethodUnavailable, so the broker tries the next method when the caller
    # did not force one.
    SERVER = "server"
    # This request only: MappingError, final for this method.
    REQUEST = "request"


@attrs.frozen
class Undo:
    """The gateway granted a mapping we cannot use: delete *lease*, then fail.

    *reason* says what was wrong with the grant; *move_on* picks the error:
    MethodUnavailable (the next method may do better) or MappingError (no
    method can: the request itself cannot be met).
    """

    lease: Lease
    reason: str
    move_on: bool = True
    # The grant lacks an option the request needs (THIRD_PARTY, FILTER):
    # RequestUnsupported, so another method may be asked for this request.
    unsupported: bool = False

    def error(self, cleanup: str) -> MethodUnavailable | MappingError:
        """The error to raise once the delete was tried; *cleanup* says how it went."""
        text = f"{self.reason}; {cleanup}"
        if self.unsupported:
            return RequestUnsupported(self.lease.method, text)
        if self.move_on:
            return MethodUnavailable(self.lease.method, text)
        return MappingError(self.lease.method, text)


def unusable_address(address: IPAddress) -> str | None:
    """Why *address* cannot be an external address anyone reaches, or None.

    Unusable: unspecified (0.0.0.0, ::), loopback, multicast, link-local
    (169.254/16, fe80::/10: no router forwards them, so a WAN side with one has
    no real address yet, RFC 3927 §7) and IPv4's reserved 240/4 (with the
    limited broadcast 255.255.255.255). Private and shared (100.64/10)
    addresses are usable: behind a double NAT they are what the next NAT
    reaches, and an app may still want them.
    """
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, IPv4Address) and address.is_reserved:
        return "reserved"
    return None


def grant_problem(external_port: int, external_address: IPAddress | None) -> str | None:
    """Why a SUCCESS granting *external_port* on *external_address* is useless, or None.

    Port 0 is a valid answer only for an all-ports mapping (RFC 6887 §11.1,
    internal port 0), which portbroker never asks for: for a TCP or UDP
    mapping of one port it reaches nothing (offbynull/portmapper rejects it
    too; docs/result-codes.md).
    """
    if external_port == 0:
        return "granted port 0"
    if external_address is not None:
        why = unusable_address(external_address)
        if why is not None:
            return f"granted an unusable ({why}) external address {external_address}"
    return None


def filter_family_problem(internal: IPAddress, filters: tuple[RemoteFilter, ...]) -> str | None:
    """Why *filters* admit no remote peer of a mapping of *internal*, or None.

    An IPv4 mapping (NAT44) is reached by IPv4 peers only and an IPv6
    pinhole by IPv6 peers only, so a filter of the other family leaves a
    mapping nobody can use: a mistake to say, not a request to send. An
    IPv4-mapped IPv6 prefix (::ffff:a.b.c.d/n, RFC 6887 §5's wire form) counts
    as IPv4.
    """
    for remote in filters:
        network = remote.network
        version = network.version
        if version == 6 and network.subnet_of(_IPV4_MAPPED):  # type: ignore[arg-type]
            version = 4
        if version != internal.version:
            return (
                f"filter {remote} is IPv{version} but the mapping is for the IPv{internal.version}"
                f" address {internal}: no IPv{version} peer can reach it; give IPv{internal.version}"
                " remote peers"
            )
    return None
