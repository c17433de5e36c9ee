"""PCP (RFC 6887) requests and what the answers mean: pure functions, no I/O.

:class:`portbroker.methods.pcp.PcpMethod` only sends what these functions
build and raises or returns what they decide. The result-code table
(:data:`RESULT_RULES`) is the one place that says which codes move the broker
on to the next method; ``docs/result-codes.md`` documents it row by row.
"""

from __future__ import annotations

from typing import Final

import attrs

from portbroker.errors import MappingError, MethodUnavailable, RequestUnsupported
from portbroker.methods.rules import Scope, Undo, grant_problem
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, RemoteFilter
from portbroker.wire import pcp
from portbroker.wire.pcp import ErrorClass, ResultCode

__all__ = [
    "ECHO_PROBE",
    "NAME",
    "RESULT_RULES",
    "UNKNOWN_RULE",
    "CodeRule",
    "announce_outcome",
    "announce_request",
    "delete_request",
    "error_hold_off",
    "family_problem",
    "filter_option",
    "interpret_map",
    "interpret_peer",
    "map_request",
    "option_refusal",
    "options_problem",
    "peer_delete_request",
    "peer_request",
    "refusal",
    "reply_problem",
    "retry_without_suggestion",
    "rule_for",
]

NAME: Final = "pcp"

# RFC 6887 §7.4 suggests 30 s for short and 30 min for long errors, but
# miniupnpd sends long errors (and CANNOT_PROVIDE_EXTERNAL) with lifetime 0,
# which read literally means "retry at once": clamp to these minimums.
_MIN_HOLD_OFF: Final = {ErrorClass.SHORT: 5.0, ErrorClass.LONG: 60.0, ErrorClass.DEPENDS: 30.0}


@attrs.frozen
class CodeRule:
    """What portbroker does with one PCP result code (docs/result-codes.md).

    Attributes:
        create: scope of the refusal for a new mapping.
        renewal: scope for a renewal or re-creation with the previous nonce.
        announce_available: a solicited ANNOUNCE answered with this code still
            proves a PCP server that may serve MAP (probe says available).
        meaning: the reason the error carries, in words.
        section: where RFC 6887 says so.
    """

    code: ResultCode
    create: Scope
    renewal: Scope
    announce_available: bool
    meaning: str
    section: str


_S, _R = Scope.SERVER, Scope.REQUEST

RESULT_RULES: Final[tuple[CodeRule, ...]] = (
    CodeRule(
        ResultCode.UNSUPP_VERSION,
        _S,
        _S,
        False,
        "the server does not speak PCP version 2",
        "§7.4, §9",
    ),
    # §11.3: also the answer to a MAP whose nonce differs from the existing
    # mapping's for that internal address and port, with Lifetime = that
    # mapping's remaining life. For a new mapping either reading (policy, or
    # someone else holds the port) leaves PCP no use for this request while
    # another method may still work; for a renewal with our own nonce it means
    # the port is now held under another nonce (after a gateway restart) or
    # policy changed: about this mapping, retry after Lifetime.
    CodeRule(
        ResultCode.NOT_AUTHORIZED,
        _S,
        _R,
        False,
        "the PCP server refuses this client (NOT_AUTHORIZED)",
        "§7.4, §11.3",
    ),
    CodeRule(
        ResultCode.MALFORMED_REQUEST,
        _S,
        _S,
        True,
        "the PCP server cannot parse our MAP request (MALFORMED_REQUEST)",
        "§7.4",
    ),
    CodeRule(
        ResultCode.UNSUPP_OPCODE,
        _S,
        _S,
        True,
        "the PCP server does not support MAP (UNSUPP_OPCODE)",
        "§7.4",
    ),
    # We send THIRD_PARTY, PREFER_FAILURE and FILTER, all mandatory to process
    # (§13.1-§13.3): without them this request cannot be made with PCP. (A
    # refusal of THIRD_PARTY or FILTER is worded by option_refusal first, and
    # is about that request only.)
    CodeRule(
        ResultCode.UNSUPP_OPTION,
        _S,
        _S,
        True,
        "the PCP server does not support an option this request needs (UNSUPP_OPTION)",
        "§7.4, §13",
    ),
    CodeRule(
        ResultCode.MALFORMED_OPTION,
        _S,
        _S,
        True,
        "the PCP server rejects an option this request needs (MALFORMED_OPTION)",
        "§7.4, §13",
    ),
    CodeRule(
        ResultCode.NETWORK_FAILURE,
        _R,
        _R,
        True,
        "the gateway has a network failure, e.g. no external address yet (NETWORK_FAILURE)",
        "§7.4",
    ),
    CodeRule(
        ResultCode.NO_RESOURCES,
        _R,
        _R,
        True,
        "the gateway is out of resources (NO_RESOURCES)",
        "§7.4",
    ),
    # We ask only for TCP and UDP. A server that lacks one still serves the
    # other; moving on would make the broker treat PCP as unavailable for both.
    CodeRule(
        ResultCode.UNSUPP_PROTOCOL,
        _R,
        _R,
        True,
        "the PCP server does not map this transport protocol (UNSUPP_PROTOCOL)",
        "§7.4",
    ),
    CodeRule(
        ResultCode.USER_EX_QUOTA,
        _R,
        _R,
        True,
        "this client's mapping quota is used up (USER_EX_QUOTA)",
        "§7.4",
    ),
    CodeRule(
        ResultCode.CANNOT_PROVIDE_EXTERNAL,
        _R,
        _R,
        True,
        "the requested external port or address cannot be provided (CANNOT_PROVIDE_EXTERNAL)",
        "§7.4, §11.3, §13.2",
    ),
    # §7.4, §8.2: another NAT between us and the server rewrote our address;
    # nothing we send to this server will work.
    CodeRule(
        ResultCode.ADDRESS_MISMATCH,
        _S,
        _S,
        False,
        "another NAT sits between this host and the PCP server (ADDRESS_MISMATCH)",
        "§7.4, §8.2",
    ),
    # Only for MAP with FILTER (§13.3); option_refusal words it when we sent
    # FILTER, so this row is a server answering it to a request without one.
    CodeRule(
        ResultCode.EXCESSIVE_REMOTE_PEERS,
        _R,
        _R,
        True,
        "the PCP server answered EXCESSIVE_REMOTE_PEERS to a request without FILTER",
        "§7.4, §13.3",
    ),
)

# Codes without a rule (RFC 7652's, future ones): refused, long hold-off.
UNKNOWN_RULE: Final = CodeRule(
    ResultCode.SUCCESS, _R, _R, True, "the PCP server refused with an unknown result", "§7.4"
)
_BY_CODE: Final = {rule.code: rule for rule in RESULT_RULES}


def rule_for(code: ResultCode) -> CodeRule:
    """The table's row for *code* (an error code), :data:`UNKNOWN_RULE` if none."""
    return _BY_CODE.get(code, UNKNOWN_RULE)


def error_hold_off(response: pcp.PcpResponse) -> float:
    """Seconds before the same request may be sent again (RFC 6887 §8.3)."""
    floor = _MIN_HOLD_OFF.get(response.result_code.error_class, 60.0)
    return max(float(response.lifetime), floor)


def refusal(
    response: pcp.PcpResponse, *, renewal: bool, what: str = "map"
) -> MethodUnavailable | MappingError:
    """The error for a non-SUCCESS answer to a MAP (new or renewal), per the table."""
    code = response.result_code
    rule = rule_for(code)
    scope = rule.renewal if renewal else rule.create
    if scope is Scope.SERVER:
        return MethodUnavailable(NAME, rule.meaning)
    meaning = rule.meaning if rule is not UNKNOWN_RULE else f"{rule.meaning} {code.name}"
    return MappingError(
        NAME,
        f"{what} refused: {meaning}, a {code.error_class.value}-lifetime error",
        result_code=int(code),
        retry_after=error_hold_off(response),
    )


def reply_problem(response: pcp.PcpResponse) -> MethodUnavailable | None:
    """A reply that shows no PCP v2 server answers here (RFC 6887 §9), or None."""
    if response.is_natpmp:
        return MethodUnavailable(
            NAME, "the gateway answered as a NAT-PMP server (version 0)", natpmp_hint=True
        )
    if response.version != pcp.VERSION:
        return MethodUnavailable(NAME, f"the server speaks PCP version {response.version}")
    return None


def family_problem(client: IPAddress, internal: IPAddress | None, server: IPAddress) -> str | None:
    """Why a MAP for *internal* cannot go from *client* to *server*, or None.

    RFC 6887 §11.1: a mapping's internal address is the request's source
    address (THIRD_PARTY aside), so an IPv6 internal address (a firewall
    pinhole) is asked over IPv6, with the host's own IPv6 address as the
    header's Client IP Address; an IPv4 one over IPv4. A server reached over the other family cannot
    serve the request (docs/ipv6.md): it is about this request only, the
    server still serves the family it is reached over.
    """
    if internal is None or internal.version == client.version:
        return None
    return (
        f"internal address {internal} is IPv{internal.version} but the PCP server {server}"
        f" is reached over IPv{client.version}; open a broker on the gateway's"
        f" IPv{internal.version} address (gateway= or pcp_server=)"
    )


# -- requests -------------------------------------------------------------------


def announce_request(client: IPAddress) -> pcp.PcpRequest:
    """A solicited ANNOUNCE, lifetime 0 (RFC 6887 §14.1)."""
    return pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, client)


# Sent with FILTER only: an optional-to-process option (§7.3: code 128 and up)
# from the unassigned Standards Action range, which no server can have
# processed. §7.3 has a server ignore an optional option it does not
# process, and §13 lets options appear in a response only as processed, so a
# server that echoes this one echoes options blindly and its FILTER echo
# proves nothing: miniupnpd 2.3.1 does exactly that (it builds the answer in
# the request's buffer) and ignores FILTER (pcpserver.c: "TODO fully
# implement filter"; seen in the lab, docs/third-party-and-filter.md).
ECHO_PROBE: Final = pcp.UnknownOption(pcp.OptionCode(191))


def filter_option(remote: RemoteFilter) -> pcp.Filter:
    """*remote* as RFC 6887 §13.3 writes it (IPv4 prefixes IPv4-mapped, §5)."""
    return pcp.Filter(remote.wire_prefix_length, remote.port, remote.network.network_address)


def _options(
    client: IPAddress,
    internal: IPAddress | None,
    *,
    exact: bool,
    filters: tuple[RemoteFilter, ...] = (),
) -> list[pcp.Option]:
    options: list[pcp.Option] = []
    if internal is not None and internal != client:
        options.append(pcp.ThirdParty(internal))  # §13.1
    if exact:
        options.append(pcp.PreferFailure())  # §13.2
    if filters:
        options.extend(filter_option(f) for f in filters)  # §13.3, as many as asked
        options.append(ECHO_PROBE)
    return options


def map_request(
    client: IPAddress,
    request: MappingRequest,
    previous: Lease | None,
    nonce: bytes,
    *,
    exact: bool,
) -> pcp.PcpRequest:
    """The MAP for *request*; with *previous* (and its nonce) a renewal or re-creation.

    A renewal suggests what the server assigned before, with the same nonce
    (RFC 6887 §11.2.1, §8.5); *nonce* is used only without one.
    """
    if previous is not None and previous.nonce is not None:
        nonce = previous.nonce
        suggested_port = previous.external_port
        suggested_address = previous.external_address
    else:
        suggested_port = request.external_port or 0
        suggested_address = pcp.no_preference(client)
    return pcp.PcpRequest(
        pcp.Opcode.MAP,
        request.lifetime,
        client,
        pcp.MapData(
            nonce,
            request.protocol.number,
            request.internal_port,
            suggested_port,
            suggested_address,
        ),
        _options(client, request.internal_address, exact=exact, filters=request.filters),
    )


def retry_without_suggestion(sent: pcp.PcpRequest) -> pcp.PcpRequest:
    """*sent* (a MAP or a PEER) again with no suggested port or address, same nonce.

    For CANNOT_PROVIDE_EXTERNAL to a plain MAP: §11.3 allows it only with
    PREFER_FAILURE, so it is a server bug, and asking with no suggestion is
    the way round it (§11.3 step "if the suggested ... cannot be provided").
    A PEER behaves as with PREFER_FAILURE (§12.3), so a suggestion it cannot
    give again fails the same way; its remote peer is kept.
    """
    assert sent.data is not None
    return attrs.evolve(
        sent,
        data=attrs.evolve(
            sent.data, external_port=0, external_address=pcp.no_preference(sent.client_address)
        ),
    )


def delete_request(client: IPAddress, lease: Lease) -> pcp.PcpRequest:
    """MAP with lifetime 0 and the mapping's nonce (RFC 6887 §15)."""
    return _lease_map(client, lease, 0, suggest=False)


def shorten_request(client: IPAddress, lease: Lease) -> pcp.PcpRequest:
    """A MAP renewing *lease* for 1 s (the server raises it to its minimum), same nonce.

    What is left when a server refuses to delete a mapping it granted us:
    miniupnpd 2.3.1's nftables backend answers NOT_AUTHORIZED to the delete of
    an IPv6 pinhole it has renewed (its renewal drops the description that
    names the nonce), yet renews it with that nonce. Cut short, the pinhole
    closes at the server's minimum lifetime instead of at the end of its lease.
    """
    return _lease_map(client, lease, 1, suggest=True)


def _lease_map(client: IPAddress, lease: Lease, lifetime: int, *, suggest: bool) -> pcp.PcpRequest:
    """A MAP with *lease*'s nonce for *lifetime*, suggesting its external endpoint or none."""
    assert lease.nonce is not None, "a PCP lease always has its nonce"
    return pcp.PcpRequest(
        pcp.Opcode.MAP,
        lifetime,
        client,
        pcp.MapData(
            lease.nonce,
            lease.protocol.number,
            lease.internal_port,
            lease.external_port if suggest else 0,
            lease.external_address if suggest else pcp.no_preference(client),
        ),
        _options(client, lease.internal_address, exact=False),
    )


# -- answers --------------------------------------------------------------------


def announce_outcome(
    response: pcp.PcpResponse, rtt: float, external_address: IPAddress | None
) -> ProbeOutcome:
    """A probe's verdict on the answer to a solicited ANNOUNCE.

    Any PCP v2 answer proves a server; only the codes that refuse the client
    or the version outright (``announce_available`` False) make it
    unavailable. Some servers answer ANNOUNCE with UNSUPP_OPCODE (or
    MALFORMED_REQUEST, like creytiv repcpd for a non-zero lifetime) but serve
    MAP, which is all portbroker needs.
    """
    code = response.result_code
    if code == ResultCode.SUCCESS:
        return ProbeOutcome(NAME, True, rtt, external_address, epoch=response.epoch)
    rule = rule_for(code)
    if rule.announce_available:
        return ProbeOutcome(NAME, True, rtt, external_address, epoch=response.epoch)
    return ProbeOutcome(NAME, False, rtt, epoch=response.epoch, error=rule.meaning)


def interpret_map(
    response: pcp.PcpResponse,
    *,
    request: MappingRequest,
    sent: pcp.PcpRequest,
    server: IPAddress,
    now: float,
    renewal: bool,
) -> Lease | Undo:
    """The lease a MAP answer grants, or what to undo; raises the table's error.

    Raises:
        MethodUnavailable: a code that says the server will not serve us.
        MappingError: a code about this request, or SUCCESS with lifetime 0.
    """
    if response.result_code != ResultCode.SUCCESS:
        raise option_refusal(response, sent) or refusal(response, renewal=renewal)
    data = response.data
    assert data is not None
    assert sent.data is not None
    if response.lifetime == 0:
        raise MappingError(NAME, "SUCCESS with lifetime 0: the server deleted it")
    return _granted(response, data, request=request, sent=sent, server=server, now=now)


def _granted(
    response: pcp.PcpResponse,
    data: pcp.MapData | pcp.PeerData,
    *,
    request: MappingRequest,
    sent: pcp.PcpRequest,
    server: IPAddress,
    now: float,
    remote: tuple[IPAddress, int] | None = None,
) -> Lease | Undo:
    """The lease of a SUCCESS to a MAP or PEER, or what to undo (MAP and PEER alike)."""
    assert sent.data is not None
    lease = Lease(
        method=NAME,
        protocol=request.protocol,
        internal_address=request.internal_address or sent.client_address,
        internal_port=request.internal_port,
        external_address=data.external_address,
        external_port=data.external_port,
        lifetime=response.lifetime,
        granted_at=now,
        gateway=server,
        epoch=response.epoch,
        nonce=sent.data.nonce,
        remote=remote,
    )
    problem = grant_problem(data.external_port, data.external_address)
    if problem is not None:
        # A mapping exists on the server that nobody can use: delete it and
        # let the next method try (docs/result-codes.md, "Useless grants").
        return Undo(lease, f"the PCP server {problem}")
    missing = options_problem(response, sent)
    if missing is not None:
        # Not what was asked: a mapping (or a PEER binding, §13.1) for the
        # wrong host, or open to every remote peer when the app asked for a
        # few. Delete it and say so; no other method would do better with the
        # same request.
        return Undo(lease, f"the PCP server {missing}", move_on=False, unsupported=True)
    if request.filters:
        lease = attrs.evolve(lease, filters=request.filters)
    return lease


# -- PEER (RFC 6887 §12) ------------------------------------------------------------


def peer_request(
    client: IPAddress,
    request: MappingRequest,
    previous: Lease | None,
    nonce: bytes,
) -> pcp.PcpRequest:
    """The PEER for *request* (which names its remote peer); with *previous* a renewal.

    As for MAP, a renewal or re-creation reuses the nonce and suggests the
    external address and port assigned before (RFC 6887 §11.2.1, §12.3, §8.5).
    No PREFER_FAILURE: §12.1 forbids it (MALFORMED_REQUEST) and PEER behaves
    as if it were set, so a suggestion the server cannot meet is
    CANNOT_PROVIDE_EXTERNAL.
    """
    assert request.remote is not None, "a PEER request names its remote peer"
    if previous is not None and previous.nonce is not None:
        nonce = previous.nonce
        suggested_port = previous.external_port
        suggested_address = previous.external_address
    else:
        suggested_port = request.external_port or 0
        suggested_address = pcp.no_preference(client)
    remote_address, remote_port = request.remote
    return pcp.PcpRequest(
        pcp.Opcode.PEER,
        request.lifetime,
        client,
        pcp.PeerData(
            nonce,
            request.protocol.number,
            request.internal_port,
            suggested_port,
            suggested_address,
            remote_port,
            remote_address,
        ),
        _options(client, request.internal_address, exact=False),
    )


def peer_delete_request(client: IPAddress, lease: Lease) -> pcp.PcpRequest:
    """PEER with lifetime 0 and the binding's nonce and remote peer.

    RFC 6887 §15 lets a PEER only extend a binding, never cut it short, so a
    server that follows it answers with the lifetime left; miniupnpd deletes
    its peer rule (pcpserver.c DeletePCPPeer). Either way portbroker stops
    renewing it (docs/peer.md).
    """
    assert lease.nonce is not None, "a PCP lease always has its nonce"
    assert lease.remote is not None, "a PEER lease names its remote peer"
    remote_address, remote_port = lease.remote
    return pcp.PcpRequest(
        pcp.Opcode.PEER,
        0,
        client,
        pcp.PeerData(
            lease.nonce,
            lease.protocol.number,
            lease.internal_port,
            0,
            pcp.no_preference(client),
            remote_port,
            remote_address,
        ),
        _options(client, lease.internal_address, exact=False),
    )


def interpret_peer(
    response: pcp.PcpResponse,
    *,
    request: MappingRequest,
    sent: pcp.PcpRequest,
    server: IPAddress,
    now: float,
    renewal: bool,
) -> Lease | Undo:
    """The lease a PEER answer grants (the flow's external endpoint), or what to undo.

    §12.4: the answer echoes the remote peer; one that names another is not
    about our flow (the transport already drops those, ``pcp_key``: this is
    the last check). The assigned external address and port are what the
    remote peer sees as the flow's source.

    Raises:
        MethodUnavailable: a code that says the server will not serve us
            (UNSUPP_OPCODE: a PCP server without PEER, §7.4).
        MappingError: a code about this request, SUCCESS with lifetime 0, or
            an answer about another remote peer.
    """
    if response.result_code != ResultCode.SUCCESS:
        # A refused THIRD_PARTY is about this request (a PEER for another
        # host), not the server: the host's own PEERs still work there.
        error = option_refusal(response, sent, what="peer") or refusal(
            response, renewal=renewal, what="peer"
        )
        if isinstance(error, MethodUnavailable):
            # The table's words name MAP (UNSUPP_OPCODE: "does not support MAP").
            error = MethodUnavailable(NAME, error.reason.replace("MAP", "PEER"))
        raise error
    data = response.data
    sent_data = sent.data
    assert isinstance(sent_data, pcp.PeerData)
    if not isinstance(data, pcp.PeerData):
        raise MappingError(NAME, "a PEER answer without PEER data")
    asked = (sent_data.remote_peer_address, sent_data.remote_peer_port)
    answered = (data.remote_peer_address, data.remote_peer_port)
    if answered != asked:
        raise MappingError(
            NAME,
            f"the PEER answer names remote peer {answered[0]}:{answered[1]}, "
            f"not {asked[0]}:{asked[1]} as asked (RFC 6887 §12.4)",
        )
    if response.lifetime == 0:
        raise MappingError(NAME, "PEER SUCCESS with lifetime 0: the server dropped the binding")
    return _granted(
        response, data, request=request, sent=sent, server=server, now=now, remote=asked
    )


def _sent_third_party(sent: pcp.PcpRequest) -> pcp.ThirdParty | None:
    return next((o for o in sent.options if isinstance(o, pcp.ThirdParty)), None)


def _sent_filters(sent: pcp.PcpRequest) -> list[pcp.Filter]:
    return [o for o in sent.options if isinstance(o, pcp.Filter)]


def option_refusal(
    response: pcp.PcpResponse, sent: pcp.PcpRequest, *, what: str = "map"
) -> MappingError | None:
    """The error for a refusal of THIRD_PARTY or FILTER, or None for the table's.

    These refusals are about the request, not the client: the same server
    still maps this host's own ports without options, so the method stays in
    use (MappingError, never MethodUnavailable). §13.1: a server that does
    not allow third-party mappings answers UNSUPP_OPTION (miniupnpd unless
    ``pcp_allow_thirdparty=yes``, seen in the lab) or NOT_AUTHORIZED; §13.3:
    EXCESSIVE_REMOTE_PEERS when the filters cannot be installed.
    """
    code = response.result_code
    third = _sent_third_party(sent)
    filters = _sent_filters(sent)
    why: str | None = None
    if third is not None and code == ResultCode.UNSUPP_OPTION:
        why = (
            f"the PCP server does not allow mapping for another host ({third.internal_address})"
            " (UNSUPP_OPTION to THIRD_PARTY, RFC 6887 §13.1"
            + ("; or it lacks FILTER" if filters else "")
            + "; miniupnpd needs pcp_allow_thirdparty=yes)"
        )
    elif third is not None and code == ResultCode.NOT_AUTHORIZED:
        # Both readings are the server's to pick: a policy against third
        # parties (§13.1), or that mapping held under another nonce (§11.3).
        port = sent.data.internal_port if sent.data is not None else 0
        why = (
            f"the PCP server refused a mapping for another host ({third.internal_address}:{port})"
            " (NOT_AUTHORIZED: it does not allow third-party mappings, RFC 6887 §13.1,"
            " or another client holds that mapping, §11.3)"
        )
    elif filters and code in (ResultCode.UNSUPP_OPTION, ResultCode.MALFORMED_OPTION):
        why = f"the PCP server does not support these remote-peer filters ({code.name} to FILTER)"
    elif filters and code == ResultCode.EXCESSIVE_REMOTE_PEERS:
        why = (
            f"the PCP server cannot install {len(filters)} remote-peer filter(s)"
            " (EXCESSIVE_REMOTE_PEERS, RFC 6887 §13.3)"
        )
    if why is None:
        return None
    return RequestUnsupported(
        NAME,
        f"{what} refused: {why}",
        result_code=int(code),
        retry_after=error_hold_off(response),
    )


def options_problem(response: pcp.PcpResponse, sent: pcp.PcpRequest) -> str | None:
    """What a SUCCESS says about the THIRD_PARTY and FILTER we sent, if wrong.

    §13: an option appears in a response only if the server processed it, so
    a THIRD_PARTY missing from the answer means the mapping may be for the
    sender instead, and a FILTER missing means no filter is enforced. A
    server that echoes :data:`ECHO_PROBE` echoes without processing, and so
    its FILTER echo is no proof either (miniupnpd 2.3.1, seen in the lab).
    """
    third = _sent_third_party(sent)
    if third is not None and third not in response.options:
        return f"answered without the THIRD_PARTY option for {third.internal_address} (§13.1)"
    filters = _sent_filters(sent)
    if not filters:
        return None
    if any(f not in response.options for f in filters):
        return "granted the mapping without the FILTER options asked for (§13.3): open to anyone"
    if ECHO_PROBE in response.options:
        return (
            "echoes options it does not process (it echoed an unknown optional one too),"
            " so its FILTER echo proves nothing; miniupnpd 2.3.1 ignores FILTER: the mapping"
            " would be open to anyone (UPnP can restrict a mapping to one remote host:"
            " use --via upnp)"
        )
    return None
