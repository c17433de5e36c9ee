"""PCP PEER (RFC 6887 §12) end to end against FakeGateway, under trio's MockClock.

What is checked: the request on the wire, create / renew (same nonce,
previous endpoint suggested) / delete on release, re-creation after a state
loss, the MAP fallback where there is no PEER and the error when the caller
wants PEER only, an answer naming another remote peer rejected, and how a
PEER and a MAP of one port share the broker's claims (docs/peer.md).
"""

from __future__ import annotations

from ipaddress import IPv4Address

import attrs
import pytest
import trio
import trio.testing

from portbroker.errors import AlreadyMapped, MappingError, MethodUnavailable
from portbroker.lifecycle import (
    Lost,
    Released,
    Renewed,
    Restored,
    State,
    supersedes,
)
from portbroker.methods import pcp_rules
from portbroker.probe import NoMethodAvailable
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, MappingRequest, TransportProtocol, lease_json
from portbroker.wire import pcp
from tests.broker_harness import HOUR, Recorder, broker_for, wait_for

REMOTE = ("198.51.100.20", 7000)
CLIENT = IPv4Address("192.168.1.100")


def peer_requests(gateway: FakeGateway) -> list[pcp.PcpRequest]:
    return [
        r for r in gateway.requests if isinstance(r, pcp.PcpRequest) and r.opcode == pcp.Opcode.PEER
    ]


# -- the value types ----------------------------------------------------------------


def test_mapping_request_validates_the_remote_peer() -> None:
    request = MappingRequest(5000, "udp", remote=("198.51.100.20", 7000))
    assert request.remote == (IPv4Address("198.51.100.20"), 7000)
    for bad, words in [
        (("198.51.100.20", 0), "remote port must be 1..65535"),
        (("198.51.100.20", 70000), "remote port must be 1..65535"),
        (("not-an-address", 7000), "remote address must be an IP address"),
        (("0.0.0.0", 7000), "must name a host"),
        (("198.51.100.20",), "remote must be \\(address, port\\)"),
    ]:
        with pytest.raises(ValueError, match=words):
            MappingRequest(5000, "udp", remote=bad)
    with pytest.raises(ValueError, match="PEER request cannot carry it"):
        MappingRequest(5000, "udp", external_port=5000, exact=True, remote=REMOTE)


def _lease(remote: tuple[str, int] | None, nonce: bytes = b"\x01" * 12) -> Lease:
    return Lease(
        "pcp",
        TransportProtocol.UDP,
        CLIENT,
        5000,
        "203.0.113.7",
        5000,
        600,
        0.0,
        "127.0.0.1",
        nonce=nonce,
        remote=remote,
    )


def test_lease_json_shows_the_remote_peer_only_for_a_peer() -> None:
    assert "remote_address" not in lease_json(_lease(None))
    shown = lease_json(_lease(REMOTE))
    assert (shown["remote_address"], shown["remote_port"]) == ("198.51.100.20", 7000)


# -- the pure rules -------------------------------------------------------------------


def test_peer_request_layout_and_renewal_suggestion() -> None:
    request = MappingRequest(5000, "udp", 600, remote=REMOTE)
    first = pcp_rules.peer_request(CLIENT, request, None, b"\x01" * 12)
    assert first.opcode == pcp.Opcode.PEER
    data = first.data
    assert isinstance(data, pcp.PeerData)
    assert (data.internal_port, data.protocol, data.external_port) == (5000, 17, 0)
    assert data.external_address == IPv4Address("0.0.0.0")
    assert (data.remote_peer_address, data.remote_peer_port) == (IPv4Address(REMOTE[0]), 7000)
    assert not any(isinstance(o, pcp.PreferFailure) for o in first.options)  # §12.1
    assert len(pcp.encode_request(first)) == pcp.HEADER_SIZE + pcp.PEER_DATA_SIZE
    previous = Lease(
        "pcp",
        TransportProtocol.UDP,
        CLIENT,
        5000,
        "203.0.113.7",
        6123,
        600,
        0.0,
        "127.0.0.1",
        nonce=b"\x02" * 12,
        remote=REMOTE,
    )
    renewal = pcp_rules.peer_request(CLIENT, request, previous, b"\x03" * 12)
    assert isinstance(renewal.data, pcp.PeerData)
    assert renewal.data.nonce == b"\x02" * 12  # the previous lease's, not the fresh one
    assert (renewal.data.external_port, renewal.data.external_address) == (
        6123,
        IPv4Address("203.0.113.7"),
    )


def test_interpret_peer_rejects_an_answer_about_another_remote_peer() -> None:
    request = MappingRequest(5000, "udp", 600, remote=REMOTE)
    sent = pcp_rules.peer_request(CLIENT, request, None, b"\x01" * 12)
    assert isinstance(sent.data, pcp.PeerData)
    other = pcp.PeerData(
        b"\x01" * 12, 17, 5000, 5000, "203.0.113.7", 7001, sent.data.remote_peer_address
    )
    answer = pcp.PcpResponse(pcp.Opcode.PEER, pcp.ResultCode.SUCCESS, 600, 10, other)
    with pytest.raises(MappingError, match=r"names remote peer 198\.51\.100\.20:7001"):
        pcp_rules.interpret_peer(
            answer, request=request, sent=sent, server=CLIENT, now=0.0, renewal=False
        )
    unsupported = pcp.PcpResponse(
        pcp.Opcode.PEER, pcp.ResultCode.UNSUPP_OPCODE, 1800, 10, sent.data
    )
    with pytest.raises(MethodUnavailable, match="does not support PEER"):
        pcp_rules.interpret_peer(
            unsupported, request=request, sent=sent, server=CLIENT, now=0.0, renewal=False
        )


def test_a_peer_and_a_map_of_one_port_never_supersede_each_other() -> None:
    assert not supersedes(_lease(REMOTE), _lease(None))
    assert not supersedes(_lease(None), _lease(REMOTE))
    assert not supersedes(_lease(REMOTE), _lease(("198.51.100.20", 7001)))
    assert supersedes(_lease(REMOTE), _lease(REMOTE))
    assert not supersedes(MappingRequest(5000, "udp", remote=REMOTE), _lease(None))


# -- the broker -------------------------------------------------------------------------


async def test_peer_create_renew_with_one_nonce_and_delete_on_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.peer(5000, "udp", remote=REMOTE, lifetime=600)
        assert (mapping.method, mapping.state) == ("pcp", State.ACTIVE)
        assert mapping.remote == (IPv4Address(REMOTE[0]), REMOTE[1])
        assert mapping.lease is not None
        assert mapping.lease.remote == mapping.remote
        live = gateway.peer_for("udp", 5000, REMOTE)
        assert live is not None
        assert (mapping.external_address, mapping.external_port) == (
            gateway.external_address,
            live.external_port,
        )
        assert gateway.mapping_for("udp", 5000) is None  # a PEER, not a MAP
        await nursery.start(recorder.run, mapping)
        await trio.sleep(2 * HOUR)
        renewals = recorder.of(Renewed)
        assert len(renewals) >= 2 * HOUR / (0.625 * 600) - 2
        assert {e.lease.nonce for e in renewals} == {mapping.lease.nonce}
        sent = peer_requests(gateway)
        assert {r.data.nonce for r in sent if r.data} == {mapping.lease.nonce}
        # Every renewal suggests the endpoint the first answer assigned (§11.2.1).
        assert all(
            isinstance(r.data, pcp.PeerData) and r.data.external_port == live.external_port
            for r in sent[1:]
        )
        await mapping.release()
        assert gateway.peer_for("udp", 5000, REMOTE) is None
        last = peer_requests(gateway)[-1]
        assert last.lifetime == 0
        await wait_for(lambda: bool(recorder.of(Released)), limit=10)
        assert recorder.of(Released) == [Released(confirmed=True)]
        nursery.cancel_scope.cancel()


async def test_open_peer_releases_when_the_block_exits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        seen: list[object] = []

        async def app() -> None:
            async with broker.open_peer(5000, "udp", REMOTE) as mapping:
                seen.append(gateway.peer_for("udp", 5000, REMOTE))
                seen.append(mapping.remote)
                raise RuntimeError("app crashed")

        with pytest.raises(RuntimeError, match="app crashed"):
            await app()
        assert all(item is not None for item in seen)
        assert len(seen) == 2
        assert gateway.peers == {}


async def test_peer_is_recreated_with_its_nonce_after_an_epoch_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        peer = await broker.peer(5000, "udp", remote=REMOTE, lifetime=7200)
        mapped = await broker.map(8080, "tcp", lifetime=7200)
        await nursery.start(recorder.run, peer)
        assert peer.lease is not None
        nonce, port = peer.lease.nonce, peer.lease.external_port
        await trio.sleep(100)
        gateway.reset()  # a reboot: both tables empty, epoch from 0
        await gateway.announce()
        await wait_for(lambda: bool(recorder.of(Restored)), limit=60)
        assert len(recorder.of(Lost)) == 1
        restored = recorder.of(Restored)[0].lease
        assert (restored.nonce, restored.external_port, restored.remote) == (
            nonce,
            port,
            peer.remote,
        )
        live = gateway.peer_for("udp", 5000, REMOTE)
        assert live is not None
        assert live.nonce == nonce
        await wait_for(lambda: gateway.mapping_for("tcp", 8080) is not None, limit=60)
        assert mapped.state is State.ACTIVE
        assert broker.state_losses == 1
        nursery.cancel_scope.cancel()


async def test_without_peer_support_the_default_falls_back_to_a_map(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(peer_enabled=False)  # PCP MAP works, PEER is UNSUPP_OPCODE
    async with broker_for(gateway) as broker:
        mapping = await broker.peer(5000, "udp", remote=REMOTE)
        assert mapping.remote is None  # a MAP of the port, as documented
        assert mapping.method == "pcp"
        assert gateway.mapping_for("udp", 5000) is not None
        assert gateway.peers == {}
        # PCP stays the method for MAPs: the PEER refusal ruled nothing out.
        assert broker.selected_method == "pcp"
        # A second call does not ask for PEER again (UNAVAILABLE_TTL).
        asked = len(peer_requests(gateway))
        second = await broker.peer(5001, "udp", remote=REMOTE)
        assert second.remote is None
        assert len(peer_requests(gateway)) == asked


async def test_without_pcp_the_fallback_maps_with_natpmp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(natpmp_only=True)
    async with broker_for(gateway) as broker:
        mapping = await broker.peer(5000, "udp", remote=REMOTE)
        assert (mapping.method, mapping.remote) == ("natpmp", None)
        assert gateway.mapping_for("udp", 5000) is not None


async def test_peer_only_without_pcp_says_so(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(natpmp_only=True)
    async with broker_for(gateway) as broker:
        with pytest.raises(NoMethodAvailable) as caught:
            await broker.peer(5000, "udp", remote=REMOTE, fallback=None)
        text = str(caught.value)
        assert "NAT-PMP server" in text  # why PCP is not there
        assert "natpmp: PEER needs PCP" in text
        assert gateway.mappings == {}  # nothing made instead


async def test_peer_only_with_a_pcp_server_without_peer_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(peer_enabled=False)
    async with broker_for(gateway) as broker:
        with pytest.raises(NoMethodAvailable, match="does not support PEER"):
            await broker.peer(5000, "udp", remote=REMOTE, fallback=None)
        assert gateway.mappings == {}


async def test_natpmp_and_upnp_refuse_peer_requests_in_words(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from portbroker.methods.upnp import UpnpMethod

    gateway = FakeGateway()
    async with broker_for(gateway, methods=("natpmp",)) as broker:
        natpmp_method = broker._methods["natpmp"]
        with pytest.raises(MethodUnavailable, match="PEER needs PCP"):
            await natpmp_method.create(MappingRequest(5000, "udp", remote=REMOTE), None)
    upnp = UpnpMethod(IPv4Address("127.0.0.1"), ssdp_port=1, multicast=False)
    with pytest.raises(MethodUnavailable, match="PEER needs PCP"):
        await upnp.create(MappingRequest(5000, "udp", remote=REMOTE), None)
    assert not [r for r in gateway.requests if not isinstance(r, pcp.PcpRequest)]


async def test_an_answer_naming_another_remote_peer_is_not_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(wrong_remote=True)
    async with broker_for(gateway, methods=("pcp",)) as broker:
        with pytest.raises(NoMethodAvailable) as caught:
            await broker.peer(5000, "udp", remote=REMOTE, fallback=None)
        assert "remote peer mismatch" in str(caught.value)
        assert not broker.mappings
        # Every answer was dropped by the transport (RFC 6887 §12.4), none taken.
        transport = broker.transport
        assert transport is not None
        assert transport.stats.received >= 1


@attrs.define(eq=False)
class ForgingGateway(FakeGateway):
    """Before each PEER answer, a forged one for another remote peer (port
    40000 to 7001), as an off-path host that guessed the nonce would send."""

    def handle(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        replies = super().handle(data, source)
        answer = pcp.decode_response(replies[0]) if replies and data[0] == 2 else None
        if answer is None or not isinstance(answer.data, pcp.PeerData):
            return replies
        forged = attrs.evolve(
            answer,
            data=attrs.evolve(answer.data, external_port=40000, remote_peer_port=7001),
        )
        return [pcp.encode_response(forged), *replies]


@attrs.define(eq=False)
class PeerSwallowingGateway(FakeGateway):
    """Serves PEER but its answers are lost (MAP answers get through)."""

    def handle(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        replies = super().handle(data, source)
        is_peer = len(data) > 1 and data[0] == 2 and data[1] == pcp.Opcode.PEER
        return [] if is_peer else replies


async def test_wrong_remote_answer_is_ignored_and_the_right_one_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = ForgingGateway()
    async with broker_for(gateway, methods=("pcp",)) as broker:
        mapping = await broker.peer(5000, "udp", remote=REMOTE, fallback=None)
        assert mapping.external_port == 5000  # the server's answer, not the forged 40000
        transport = broker.transport
        assert transport is not None
        assert transport.stats.received == 2


async def test_a_peer_and_a_map_of_one_port_coexist(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapped = await broker.map(5000, "udp")
        first = await broker.peer(5000, "udp", remote=REMOTE)
        second = await broker.peer(5000, "udp", remote=("198.51.100.20", 7001))
        with pytest.raises(AlreadyMapped, match=r"to 198\.51\.100\.20:7000"):
            await broker.peer(5000, "udp", remote=REMOTE)
        with pytest.raises(AlreadyMapped):
            await broker.map(5000, "udp")
        assert first.lease is not None
        assert second.lease is not None
        assert first.lease.nonce != second.lease.nonce
        # An endpoint-independent NAT gives the flows the MAP's external port.
        assert first.external_port == second.external_port == mapped.external_port
        # Releasing the PEER leaves the MAP and the other PEER in place.
        await first.release()
        assert gateway.mapping_for("udp", 5000) is not None
        assert gateway.peer_for("udp", 5000, ("198.51.100.20", 7001)) is not None
        assert gateway.peer_for("udp", 5000, REMOTE) is None
        await mapped.release()
        assert gateway.peer_for("udp", 5000, ("198.51.100.20", 7001)) is not None
        assert second.state is State.ACTIVE


async def test_peer_arguments_are_checked(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        with pytest.raises(ValueError, match="needs remote"):
            await broker.peer(5000, "udp")
        with pytest.raises(ValueError, match="fallback must be"):
            await broker.peer(5000, "udp", remote=REMOTE, fallback="upnp")
        with pytest.raises(ValueError, match="remote port"):
            await broker.peer(5000, "udp", remote=("198.51.100.20", 0))
        assert gateway.requests == []


async def test_silent_pcp_falls_back_after_cleaning_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PCP that swallows PEERs (their answers lost): the PEER is abandoned (a
    delete with its nonce, in case it was made) before the MAP fallback."""
    gateway = PeerSwallowingGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.peer(5000, "udp", remote=REMOTE)
        assert mapping.remote is None
        assert gateway.mapping_for("udp", 5000) is not None
        assert gateway.peers == {}  # the abandon's delete reached it
        assert any(r.lifetime == 0 for r in peer_requests(gateway))


async def test_a_recreated_peer_whose_old_port_is_taken_gets_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a reboot another mapping took the PEER's old external port: PEER
    behaves as with PREFER_FAILURE (CANNOT_PROVIDE_EXTERNAL, §12.3), so the
    re-creation asks again at once with no suggestion, same nonce."""
    gateway = FakeGateway()
    async with broker_for(gateway, methods=("pcp",)) as broker:
        method = broker._methods["pcp"]
        request = MappingRequest(5000, "udp", 600, remote=REMOTE)
        lease = await method.create(request, None)
        assert lease.external_port == 5000
        gateway.reset()
        other = await method.create(MappingRequest(6000, "udp", external_port=5000), None)
        assert other.external_port == 5000
        again = await method.create(request, lease)
        assert again.nonce == lease.nonce
        assert again.external_port not in (0, 5000)
        tried = [r.data for r in peer_requests(gateway)[-2:]]
        assert [d.external_port for d in tried if isinstance(d, pcp.PeerData)] == [5000, 0]


def test_a_peer_lease_survives_a_state_record_round_trip() -> None:
    from portbroker.state import RecordError, lease_from_record, lease_record

    record = lease_record(_lease(REMOTE))
    assert lease_from_record(record, now=0.0).remote == (IPv4Address(REMOTE[0]), REMOTE[1])
    assert lease_from_record(lease_record(_lease(None)), now=0.0).remote is None
    for damage in ({"remote_port": 0}, {"remote_address": "nowhere"}, {"remote_port": None}):
        with pytest.raises(RecordError, match="remote_"):
            lease_from_record({**record, **damage}, now=0.0)


async def test_a_remote_peer_of_the_other_family_is_refused_in_words(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError, match="same family"):
            await broker.peer(5000, "udp", remote=("2001:db8::2", 7000))
        assert gateway.requests == []
        assert not broker.mappings


async def test_the_fallback_to_a_map_already_held_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(peer_enabled=False)
    async with broker_for(gateway) as broker:
        await broker.map(5000, "udp")
        with pytest.raises(AlreadyMapped, match="the fallback, a MAP of 5000/udp, is held"):
            await broker.peer(5000, "udp", remote=REMOTE)


# -- THIRD_PARTY on a PEER (RFC 6887 §13.1) ---------------------------------------------

CAMERA = "192.168.1.77"


async def test_a_refused_third_party_peer_leaves_our_own_peers_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(pcp_third_party=False)  # miniupnpd without pcp_allow_thirdparty
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError, match=r"peer refused: .*another host \(192\.168\.1\.77\)"):
            await broker.peer(5000, "udp", remote=REMOTE, internal_address=CAMERA)
        assert gateway.mappings == {}  # no MAP for the camera made instead
        # The refusal was about that request: this host's own PEER is a PEER.
        own = await broker.peer(5001, "udp", remote=REMOTE)
        assert own.remote is not None
        assert gateway.peer_for("udp", 5001, REMOTE) is not None


async def test_a_third_party_peer_answered_without_third_party_is_undone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server bound the sender's flow, not the camera's: the lease would lie.
    gateway = FakeGateway(pcp_ignore_third_party=True)
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError, match="without the THIRD_PARTY option"):
            await broker.peer(5000, "udp", remote=REMOTE, internal_address=CAMERA)
    assert gateway.peers == {}  # and the binding it made was deleted
    assert gateway.mappings == {}
