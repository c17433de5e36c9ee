"""THIRD_PARTY (RFC 6887 §13.1) and FILTER (§13.3): the API, the three methods,
the daemon's parameters and the CLI, against FakeGateway and FakeIgd.

docs/third-party-and-filter.md says what each method can do; the lab proves it
against miniupnpd (tests/lab/test_lab_third_party.py).
"""

from __future__ import annotations

import argparse
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from portbroker.broker import Broker, open_broker
from portbroker.cli import _filter, _third_party
from portbroker.daemon.ownership import Ownership, Peer, Policy
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.server import _third_party_params
from portbroker.errors import MappingError, RequestUnsupported
from portbroker.methods import pcp_rules
from portbroker.methods.rules import Undo
from portbroker.methods.upnp import upnp_remote_host
from portbroker.state import RecordError, lease_from_record, lease_record
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.testing.fake_igd import FakeIgd
from portbroker.types import Lease, MappingRequest, RemoteFilter, TransportProtocol, lease_json
from portbroker.wire import pcp
from tests.broker_harness import broker_for
from tests.test_cli import cli
from tests.test_upnp import MINIUPNPD_V2, igd_and_broker

CLIENT = IPv4Address("127.0.0.1")
CAMERA = "192.168.77.3"

# -- RemoteFilter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown", "wire", "host"),
    [
        ("11.0.0.2", "11.0.0.2/32", 128, True),
        ("11.0.0.2/32", "11.0.0.2/32", 128, True),
        ("11.0.0.0/24", "11.0.0.0/24", 120, False),
        ("11.0.0.2/32:5000", "11.0.0.2/32:5000", 128, True),
        ("2001:db8::1", "2001:db8::1/128", 128, True),
        ("[2001:db8::/64]:443", "[2001:db8::/64]:443", 64, False),
    ],
)
def test_filters_parse_and_count_ipv4_bits_over_the_mapped_address(
    text: str, shown: str, wire: int, host: bool
) -> None:
    remote = RemoteFilter.parse(text)
    assert str(remote) == shown
    assert remote.wire_prefix_length == wire  # §13.3 over §5's 128-bit field
    assert remote.is_host is host
    assert RemoteFilter.parse(str(remote)) == remote


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("11.0.0.1/24", "host bits set"),
        ("0.0.0.0/0", "admits every remote host"),
        ("::/0", "admits every remote host"),
        ("11.0.0.2:0", "remote port must be 1..65535"),
        ("11.0.0.2:99999", "remote port must be 1..65535"),
        ("11.0.0.2:http", "remote port must be 1..65535"),
        ("camera", "not an address prefix"),
        ("[2001:db8::1", "write [IPv6-prefix]:port"),
    ],
)
def test_bad_filters_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="bad filter") as caught:
        RemoteFilter.parse(text)
    assert words in str(caught.value)
    with pytest.raises(argparse.ArgumentTypeError, match="bad filter"):
        _filter(text)


def test_a_request_carries_its_filters_and_refuses_duplicates() -> None:
    request = MappingRequest(8080, "tcp", filters=("11.0.0.2", RemoteFilter("11.0.1.0/24", 80)))
    assert [str(f) for f in request.filters] == ["11.0.0.2/32", "11.0.1.0/24:80"]
    with pytest.raises(ValueError, match="twice"):
        MappingRequest(8080, "tcp", filters=("11.0.0.2", "11.0.0.2/32"))
    with pytest.raises(ValueError, match="names no host"):
        MappingRequest(8080, "tcp", internal_address="0.0.0.0")


def test_cli_third_party_takes_an_address_only() -> None:
    assert _third_party(" 192.168.77.3 ") == CAMERA
    for bad in ("camera.lan", "0.0.0.0", "127.0.0.1", "224.0.0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _third_party(bad)


def test_a_lease_records_its_filters_and_reads_them_back() -> None:
    lease = Lease(
        "pcp",
        TransportProtocol.TCP,
        CAMERA,
        8080,
        "203.0.113.7",
        8080,
        600,
        0.0,
        "192.168.77.1",
        nonce=bytes(12),
        filters=("11.0.0.2",),
    )
    record = lease_record(lease)
    assert record["filters"] == ["11.0.0.2/32"]
    assert lease_from_record(record).filters == lease.filters
    assert "filters" not in lease_json(attrs.evolve(lease, filters=()))
    with pytest.raises(RecordError, match="'filters'"):
        lease_from_record({**record, "filters": ["0.0.0.0/0"]})
    with pytest.raises(RecordError, match="'filters'"):
        lease_from_record({**record, "filters": "11.0.0.2"})


# -- PCP: what is sent, what the answers mean -------------------------------------


def _sent(request: MappingRequest) -> pcp.PcpRequest:
    return pcp_rules.map_request(CLIENT, request, None, secrets.token_bytes(12), exact=False)


def _answer(
    sent: pcp.PcpRequest, options: tuple[pcp.Option, ...], code: int = 0
) -> pcp.PcpResponse:
    assert isinstance(sent.data, pcp.MapData)
    data = attrs.evolve(sent.data, external_port=8080, external_address="203.0.113.7")
    return pcp.PcpResponse(pcp.Opcode.MAP, code, 600 if code == 0 else 0, 100, data, options)


def _interpret(request: MappingRequest, response: pcp.PcpResponse, sent: pcp.PcpRequest) -> object:
    return pcp_rules.interpret_map(
        response, request=request, sent=sent, server=CLIENT, now=0.0, renewal=False
    )


def test_pcp_sends_third_party_filters_and_the_echo_probe() -> None:
    request = MappingRequest(
        8080, "tcp", internal_address=CAMERA, filters=("11.0.0.2", "11.0.1.0/24:443")
    )
    sent = _sent(request)
    assert sent.options == (
        pcp.ThirdParty(CAMERA),
        pcp.Filter(128, 0, "11.0.0.2"),
        pcp.Filter(120, 443, "11.0.1.0"),
        pcp_rules.ECHO_PROBE,
    )
    assert not pcp_rules.ECHO_PROBE.code.is_mandatory  # §7.3: a server may skip it
    # Round trip through the codec: what goes on the wire decodes the same.
    assert pcp.decode_request(pcp.encode_request(sent)).options == sent.options
    # No filters, no probe: a plain MAP is unchanged.
    assert _sent(MappingRequest(8080, "tcp")).options == ()


def test_pcp_grants_a_filtered_mapping_only_when_the_server_processed_the_filters() -> None:
    request = MappingRequest(8080, "tcp", filters=("11.0.0.2",))
    sent = _sent(request)
    processed = tuple(o for o in sent.options if o != pcp_rules.ECHO_PROBE)
    lease = _interpret(request, _answer(sent, processed), sent)
    assert isinstance(lease, Lease)
    assert lease.filters == request.filters

    # miniupnpd 2.3.1: every option echoed, the unknown optional one too.
    blind = _interpret(request, _answer(sent, sent.options), sent)
    assert isinstance(blind, Undo)
    assert not blind.move_on
    assert "proves nothing" in blind.reason
    assert "--via upnp" in blind.reason
    # A server that dropped FILTER from its answer did not apply it (§13).
    dropped = _interpret(request, _answer(sent, ()), sent)
    assert isinstance(dropped, Undo)
    assert "open to anyone" in dropped.reason


def test_pcp_third_party_missing_from_the_answer_is_undone() -> None:
    request = MappingRequest(8080, "tcp", internal_address=CAMERA)
    sent = _sent(request)
    lease = _interpret(request, _answer(sent, sent.options), sent)
    assert isinstance(lease, Lease)
    assert str(lease.internal_address) == CAMERA
    missing = _interpret(request, _answer(sent, ()), sent)
    assert isinstance(missing, Undo)
    assert "THIRD_PARTY" in missing.reason


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (
            MappingRequest(8080, "tcp", internal_address=CAMERA),
            pcp.ResultCode.UNSUPP_OPTION,
            "does not allow mapping for another host (192.168.77.3)",
        ),
        (
            MappingRequest(8080, "tcp", internal_address=CAMERA),
            pcp.ResultCode.NOT_AUTHORIZED,
            "or another client holds that mapping",
        ),
        (
            MappingRequest(8080, "tcp", filters=("11.0.0.2",)),
            pcp.ResultCode.UNSUPP_OPTION,
            "does not support these remote-peer filters",
        ),
        (
            MappingRequest(8080, "tcp", filters=("11.0.0.2", "11.0.0.3")),
            pcp.ResultCode.EXCESSIVE_REMOTE_PEERS,
            "cannot install 2 remote-peer filter(s)",
        ),
    ],
)
def test_pcp_option_refusals_are_about_the_request(
    request_: MappingRequest, code: pcp.ResultCode, words: str
) -> None:
    sent = _sent(request_)
    with pytest.raises(MappingError) as caught:  # not MethodUnavailable: PCP stays in use
        _interpret(request_, _answer(sent, (), int(code)), sent)
    assert words in str(caught.value)
    assert caught.value.result_code == int(code)


# -- the broker, on FakeGateway ------------------------------------------------------


async def test_a_third_party_mapping_is_made_renewed_and_deleted_for_the_other_host(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", internal_address=CAMERA, lifetime=600, via="pcp")
        assert mapping.lease is not None
        assert str(mapping.lease.internal_address) == CAMERA
        assert [m.internal_address for m in gateway.mappings.values()] == [IPv4Address(CAMERA)]
        asks = len([r for r in gateway.requests if isinstance(r, pcp.PcpRequest)])
        await trio.sleep(400)  # past the first renewal window
        pcp_sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)]
        renewals = [r for r in pcp_sent[asks:] if r.opcode == pcp.Opcode.MAP and r.lifetime]
        assert renewals
        assert all(pcp.ThirdParty(CAMERA) in r.options for r in renewals)
        await mapping.release()
        assert gateway.mappings == {}
        delete = gateway.requests[-1]
        assert isinstance(delete, pcp.PcpRequest)
        assert delete.lifetime == 0
        assert pcp.ThirdParty(CAMERA) in delete.options


async def test_a_gateway_that_refuses_third_party_still_maps_our_own_ports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_third_party=False)
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError, match="does not allow mapping for another host"):
            await broker.map(8080, "tcp", internal_address=CAMERA)
        assert gateway.mappings == {}
        # The refusal was about that request: PCP is still the method.
        own = await broker.map(8081, "tcp")
        assert own.method == "pcp"


async def test_filters_granted_by_a_server_that_processes_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", filters=["11.0.0.2/32:5000"], via="pcp")
        assert mapping.lease is not None
        assert [str(f) for f in mapping.lease.filters] == ["11.0.0.2/32:5000"]
        (held,) = gateway.mappings.values()
        assert held.filters == (pcp.Filter(128, 5000, "11.0.0.2"),)


@pytest.mark.parametrize("mode", ["echo_all", "omit"])
async def test_filters_a_server_does_not_confirm_leave_no_mapping_behind(
    mode: str, autojump_clock: trio.testing.MockClock
) -> None:
    gateway = FakeGateway(pcp_filter=mode)
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError, match="deleted it"):
            await broker.map(8080, "tcp", filters=["11.0.0.2"], via="pcp")
        assert gateway.mappings == {}  # granted, then deleted: nothing open to anyone
        last = gateway.requests[-1]
        assert isinstance(last, pcp.PcpRequest)
        assert last.lifetime == 0


async def test_natpmp_refuses_filters_and_third_party_without_asking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway, ("natpmp",)) as broker:
        asked = len(gateway.requests)
        with pytest.raises(MappingError, match="NAT-PMP cannot restrict"):
            await broker.map(8080, "tcp", filters=["11.0.0.2"])
        with pytest.raises(MappingError, match="NAT-PMP maps only for the sender"):
            await broker.map(8080, "tcp", internal_address=CAMERA)
        sent = gateway.requests[asked:]
        assert all(not hasattr(r, "internal_port") for r in sent)  # no map request went out
        assert gateway.mappings == {}


# -- UPnP, on FakeIgd --------------------------------------------------------------


def test_upnp_expresses_one_remote_host_only() -> None:
    assert upnp_remote_host(MappingRequest(80, "tcp")) == ""
    assert upnp_remote_host(MappingRequest(80, "tcp", filters=["11.0.0.2"])) == "11.0.0.2"
    assert upnp_remote_host(MappingRequest(80, "tcp", filters=["::ffff:11.0.0.2"])) == "11.0.0.2"
    for filters, words in (
        (["11.0.0.0/24"], "not the prefix 11.0.0.0/24"),
        (["11.0.0.2:5000"], "not remote port 5000"),
        (["11.0.0.2", "11.0.0.3"], "not 2 filters"),
    ):
        with pytest.raises(MappingError, match="one remote host") as caught:
            upnp_remote_host(MappingRequest(80, "tcp", filters=filters))
        assert words in str(caught.value)


async def test_upnp_maps_with_new_remote_host_and_deletes_with_it() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with igd_and_broker(igd) as broker:
        mapping = await broker.map(18080, "tcp", filters=["11.0.0.2"])
        assert mapping.lease is not None
        assert [str(f) for f in mapping.lease.filters] == ["11.0.0.2/32"]
        await mapping.release()
    adds = [args for action, args in igd.actions if action == "AddPortMapping"]
    deletes = [args for action, args in igd.actions if action == "DeletePortMapping"]
    assert [a["NewRemoteHost"] for a in adds] == ["11.0.0.2"]
    assert [d["NewRemoteHost"] for d in deletes] == ["11.0.0.2"]
    assert igd.entries == {}


async def test_upnp_refuses_what_it_cannot_express_before_sending_anything() -> None:
    igd = FakeIgd(MINIUPNPD_V2)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError, match="one remote host"):
            await broker.map(18081, "tcp", filters=["11.0.0.0/24"])
    assert not [a for a, _ in igd.actions if a.startswith("Add")]


async def test_upnp_secure_mode_refusal_reads_as_a_third_party_refusal() -> None:
    igd = FakeIgd(MINIUPNPD_V2, secure_mode=True)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError) as caught:
            await broker.map(18082, "tcp", internal_address=CAMERA)
        # And our own port still maps: the refusal was about the other host.
        own = await broker.map(18083, "tcp")
        assert own.method == "upnp"
    message = str(caught.value)
    assert "refused to map for another host (192.168.77.3" in message
    assert "secure_mode=yes" in message
    # One attempt: other ports would be refused the same way.
    adds = [
        a for a, args in igd.actions if a.startswith("Add") and args["NewInternalPort"] == "18082"
    ]
    assert adds == ["AddPortMapping"]


# -- the daemon's parameters and policy (sans-IO) --------------------------------------


def _params(**params: object) -> tuple[object, tuple[RemoteFilter, ...]]:
    return _third_party_params(Request("map", 1, dict(params)))


def test_daemon_map_parameters_are_checked() -> None:
    assert _params() == (None, ())
    address, filters = _params(internal_address=CAMERA, filters=["11.0.0.2/32:80"])
    assert str(address) == CAMERA
    assert [str(f) for f in filters] == ["11.0.0.2/32:80"]
    for params, words in (
        ({"internal_address": "camera"}, "must be an IP address"),
        ({"internal_address": "127.0.0.1"}, "names no lan host"),
        ({"internal_address": 3}, "must be a string"),
        ({"filters": "11.0.0.2"}, "must be a list"),
        ({"filters": [7]}, "list of strings"),
        ({"filters": ["11.0.0.1/24"]}, "host bits set"),
        ({"filters": ["11.0.0.2", "11.0.0.2/32"]}, "the same filter twice"),
        ({"filters": [f"11.0.0.{i}" for i in range(40)]}, "at most 32"),
    ):
        with pytest.raises(ProtocolError) as caught:
            _params(**params)
        assert caught.value.code is ErrorCode.BAD_REQUEST
        assert words in caught.value.message, params


def test_only_root_and_the_third_party_group_may_map_for_another_host() -> None:
    owners = Ownership(Policy(third_party_gids=frozenset({500})))
    root = owners.connect(Peer(0, 1))
    member = owners.connect(Peer(1000, 2, frozenset({1000, 500})))
    other = owners.connect(Peer(1001, 3, frozenset({1001})))
    for conn, port in ((root, 8080), (member, 80)):  # 80: another host's, not ours
        entry = owners.claim(
            conn, ("tcp", port), persist=False, external_port=None, now=0.0, third_party=True
        )
        assert entry.creating
    with pytest.raises(ProtocolError) as caught:
        owners.claim(
            other, ("tcp", 8081), persist=False, external_port=None, now=0.0, third_party=True
        )
    assert caught.value.code is ErrorCode.THIRD_PARTY_FORBIDDEN
    assert "--third-party-group" in caught.value.message
    # Without third_party the privileged-port rule applies as before.
    with pytest.raises(ProtocolError) as privileged:
        owners.claim(member, ("tcp", 81), persist=False, external_port=None, now=0.0)
    assert privileged.value.code is ErrorCode.PRIVILEGED_PORT


# -- the command --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "80", "--filter", "11.0.0.1/24"], "has host bits set"),
        (["map", "80", "--filter", "0.0.0.0/0"], "admits every remote host"),
        (["map", "80", "--filter", "11.0.0.2:0"], "remote port must be 1..65535"),
        (["map", "80", "--third-party", "camera.lan"], "is not an IP address"),
        (["map", "80", "--third-party", "127.0.0.1"], "is no lan host to map for"),
    ],
)
def test_bad_third_party_and_filter_values_are_usage_errors(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = cli(*args, server_port=1, state=tmp_path / "s", check_rc=2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_maps_for_another_host_with_a_filter_and_unmaps(
    gateway_port: int, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    args = ("map", "8554/tcp", "--third-party", CAMERA, "--filter", "11.0.0.2/32:5000")
    done = cli(*args, "--json", server_port=gateway_port, state=state, check_rc=0)
    mapped = json.loads(done.stdout)
    assert mapped["internal_address"] == CAMERA
    assert mapped["filters"] == ["11.0.0.2/32:5000"]
    # Another run (its own nonce) while the first holds it: §11.3's NOT_AUTHORIZED.
    done = cli(*args, server_port=gateway_port, state=tmp_path / "other", check_rc=1)
    assert "or another client holds that mapping" in done.stderr
    # unmap finds the record and deletes with THIRD_PARTY (FakeGateway keys by host).
    cli("unmap", "8554/tcp", server_port=gateway_port, state=state, check_rc=0)
    assert json.loads(state.read_text())["mappings"] == []
    done = cli(*args, server_port=gateway_port, state=tmp_path / "other", check_rc=0)
    assert f"{CAMERA}:8554/tcp ->" in done.stdout
    assert "only from 11.0.0.2/32:5000" in done.stdout
    cli("unmap", "8554/tcp", server_port=gateway_port, state=tmp_path / "other", check_rc=0)


# -- the broker offers such a request to the other methods ------------------------------


@asynccontextmanager
async def pcp_and_upnp(gateway: FakeGateway, igd: FakeIgd) -> AsyncIterator[Broker]:
    """PCP and NAT-PMP on the FakeGateway (memory links), UPnP on the FakeIgd."""
    async with trio.open_nursery() as nursery:
        await nursery.start(igd.serve)
        async with open_broker(
            "127.0.0.1",
            ("pcp", "natpmp", "upnp"),
            link_factory=gateway.link_factory(),
            upnp_port=igd.ssdp_port,
            ssdp_multicast=False,
            announce_port=None,
            seed=7,
        ) as broker:
            yield broker
        nursery.cancel_scope.cancel()


async def test_a_third_party_request_pcp_refuses_goes_to_upnp_and_pcp_stays_chosen() -> None:
    gateway = FakeGateway(pcp_third_party=False)
    igd = FakeIgd(MINIUPNPD_V2)
    async with pcp_and_upnp(gateway, igd) as broker:
        camera = await broker.map(18090, "tcp", internal_address=CAMERA)
        assert camera.method == "upnp"
        assert [e.client for e in igd.entries.values()] == [CAMERA]
        assert gateway.mappings == {}
        own = await broker.map(18091, "tcp")
        assert own.method == "pcp"  # the refusal was about the camera only
        assert broker.selected_method == "pcp"
        await camera.release()
        assert igd.entries == {}


async def test_a_filter_pcp_cannot_prove_goes_to_upnp_enforced_as_asked() -> None:
    gateway = FakeGateway(pcp_filter="echo_all")  # miniupnpd 2.3.1
    igd = FakeIgd(MINIUPNPD_V2)
    async with pcp_and_upnp(gateway, igd) as broker:
        mapping = await broker.map(18092, "tcp", filters=["11.0.0.2"])
        assert mapping.method == "upnp"
        assert mapping.lease is not None
        assert [str(f) for f in mapping.lease.filters] == ["11.0.0.2/32"]
        assert gateway.mappings == {}  # PCP's unenforced grant was deleted
        adds = [args for action, args in igd.actions if action == "AddPortMapping"]
        assert [a["NewRemoteHost"] for a in adds] == ["11.0.0.2"]
        # A prefix UPnP cannot express either: every method's refusal, nothing left.
        with pytest.raises(RequestUnsupported) as caught:
            await broker.map(18093, "tcp", filters=["11.0.0.0/24"])
        message = str(caught.value)
        for words in ("proves nothing", "NAT-PMP cannot restrict", "one remote host"):
            assert words in message
        assert gateway.mappings == {}
        assert len(igd.entries) == 1


def test_the_daemons_mappings_print_their_filters() -> None:
    from portbroker.cli import _describe_daemon_mapping

    mapping = {
        "id": "8554/tcp",
        "external_address": "11.0.0.1",
        "external_port": 8554,
        "method": "upnp",
        "owner_uid": 0,
        "holders": 1,
    }
    assert "only from" not in _describe_daemon_mapping(mapping)
    shown = _describe_daemon_mapping({**mapping, "filters": ["11.0.0.2/32"]})
    assert shown == "8554/tcp -> 11.0.0.1:8554 via upnp only from 11.0.0.2/32 (uid 0, 1 holder(s))"


async def test_a_filter_of_the_other_family_is_refused_before_anything_is_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        # An IPv4 mapping no IPv6 peer can ever reach: a mistake, said in words.
        with pytest.raises(MappingError, match="filter 2001:db8::1/128 is IPv6 but the mapping"):
            await broker.map(8080, "tcp", filters=["2001:db8::1"], via="pcp")
        assert gateway.mappings == {}
        assert not [r for r in gateway.requests if getattr(r, "options", ())]
        # IPv4-mapped is RFC 6887 §5's wire form of IPv4: the same filter as 11.0.0.0/24.
        mapping = await broker.map(8080, "tcp", filters=["::ffff:11.0.0.0/120"], via="pcp")
        (held,) = gateway.mappings.values()
        assert held.filters == (pcp.Filter(120, 0, "11.0.0.0"),)
        await mapping.release()


async def test_upnp_refuses_a_remote_host_of_the_other_family() -> None:
    igd = FakeIgd(description=MINIUPNPD_V2)
    async with igd_and_broker(igd) as broker:
        with pytest.raises(MappingError, match="is IPv6 but the mapping is for the IPv4"):
            await broker.map(8080, "tcp", filters=["2001:db8::1"], via="upnp")
    assert "AddPortMapping" not in [name for name, _ in igd.actions]
