"""The broker against FakeGateway in memory, under trio's MockClock.

Hours of renewals run in milliseconds; every fault knob of FakeGateway gets a
test. No real socket is involved (see design.md on MockClock and autojump).
"""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from portbroker.broker import Mapping, open_broker
from portbroker.epoch import CONFIRM_INTERVAL
from portbroker.errors import MappingError, MethodUnavailable
from portbroker.lifecycle import (
    Acquired,
    ExternalAddressChanged,
    Lost,
    Released,
    Renewed,
    Restored,
    State,
)
from portbroker.probe import NoMethodAvailable
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.wire import natpmp, pcp
from tests.broker_harness import HOUR, Recorder, broker_for, wait_for


@attrs.define(eq=False)
class CountingGateway(FakeGateway):
    """Records the version byte of every datagram it receives, answered or not."""

    versions: list[int] = attrs.Factory(list)

    def handle(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        if data:
            self.versions.append(data[0])
        return super().handle(data, source)


@attrs.define(eq=False)
class SerialGateway(FakeGateway):
    """Answers one request at a time, *per_request* seconds each, like miniupnpd.

    miniupnpd is single-threaded, and its nftables backend takes 100-250 ms per
    rule once it holds 50: replies come out of a queue.
    """

    per_request: float = 0.2
    busy_until: float = 0.0

    def deliver(self, link: MemoryLink, reply: bytes) -> None:
        now = trio.current_time()
        self.busy_until = max(self.busy_until, now) + self.per_request
        link.put(reply, self._source(), self.busy_until - now)


async def test_map_pcp_and_release(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=3600)
        assert (mapping.method, mapping.state) == ("pcp", State.ACTIVE)
        assert mapping.external_address == IPv4Address("203.0.113.7")
        assert mapping.external_port == 8080
        live = gateway.mapping_for("tcp", 8080)
        assert live is not None
        assert mapping.lease is not None
        assert live.nonce == mapping.lease.nonce
        events = mapping.events()
        await mapping.release()
        assert gateway.mapping_for("tcp", 8080) is None
        assert [e async for e in events] == [Released(confirmed=True)]
        assert mapping.state is State.RELEASED


async def test_leaving_the_broker_releases_what_it_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        for port in (1001, 1002, 1003):
            await broker.map(port, "udp")
        assert len(gateway.mappings) == 3
    assert gateway.mappings == {}


async def test_open_mapping_releases_even_when_the_body_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        with pytest.raises(RuntimeError, match="app crashed"):
            async with broker.open_mapping(9000, "tcp"):
                raise RuntimeError("app crashed")
        assert gateway.mapping_for("tcp", 9000) is None


async def test_ten_hours_of_renewals_keep_one_nonce(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(8080, "tcp", lifetime=600)
        await nursery.start(recorder.run, mapping)
        await trio.sleep(10 * HOUR)
        renewals = recorder.of(Renewed)
        # One renewal every 1/2..5/8 of 600 s.
        assert 10 * HOUR / (0.625 * 600) - 2 <= len(renewals) <= 10 * HOUR / (0.5 * 600) + 1
        assert {e.lease.nonce for e in renewals} == {mapping.lease.nonce if mapping.lease else None}
        assert not recorder.of(Lost)
        nursery.cancel_scope.cancel()


async def test_renewals_fall_in_the_rfc_window(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(8080, "tcp", lifetime=1000)
        await nursery.start(recorder.run, mapping)
        await trio.sleep(5 * HOUR)
        grants = [mapping.lease] if mapping.lease else []
        leases = [e.lease for e in recorder.of(Renewed)]
        for before, after in itertools.pairwise(leases):
            elapsed = after.granted_at - before.granted_at
            # RFC 6887 §11.2.1: first renewal uniformly in [1/2, 5/8] of the lifetime.
            assert 500 <= elapsed <= 625 + 1, elapsed
        assert grants
        nursery.cancel_scope.cancel()


async def test_silent_gateway_renewals_spread_over_the_windows_then_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway, methods=("pcp",)) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(8080, "tcp", lifetime=1000)
        assert mapping.lease is not None
        granted, nonce = mapping.lease.granted_at, mapping.lease.nonce
        await nursery.start(recorder.run, mapping)
        sent_before = len(gateway.requests)
        gateway.drop_rate = 1.0
        await wait_for(lambda: bool(recorder.of(Lost)))
        lost_at = next(t for t, e in recorder.events if isinstance(e, Lost))
        assert lost_at == pytest.approx(granted + 1000, abs=1)
        times = [t for t in gateway.request_times[sent_before:] if t < lost_at]
        # Renewal attempts start in the windows [1/2,5/8], [3/4,3/4+1/16], [7/8,...]
        starts = [times[0]] + [b for a, b in itertools.pairwise(times) if b - a > 100]
        assert granted + 500 <= starts[0] <= granted + 625
        assert granted + 750 <= starts[1] <= granted + 750 + 62.5 + 1
        assert all(b - a >= 4 for a, b in itertools.pairwise(starts))
        assert max(times) < granted + 1000  # nothing in the last moment before expiry
        # The gateway comes back: the mapping is restored with its nonce.
        gateway.drop_rate = 0.0
        await wait_for(lambda: mapping.state is State.ACTIVE)
        restored = recorder.of(Restored)
        assert restored
        assert restored[0].lease.nonce == nonce
        nursery.cancel_scope.cancel()


async def test_epoch_reset_recreates_every_mapping_with_its_nonce(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorders = [Recorder() for _ in range(3)]
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mappings = [await broker.map(7000 + i, "udp", lifetime=7200) for i in range(3)]
        for recorder, mapping in zip(recorders, mappings, strict=True):
            await nursery.start(recorder.run, mapping)
        nonces = {m.lease.nonce for m in mappings if m.lease}
        await trio.sleep(100)
        gateway.reset()  # a reboot: table empty, epoch from 0
        assert gateway.mappings == {}
        await gateway.announce()  # RFC 6887 §14.1: the rebooted server announces
        await trio.sleep(6)  # the random 0-5 s delay, and the round trips
        assert {m.nonce for m in gateway.mappings.values()} == nonces
        for recorder in recorders:
            assert len(recorder.of(Lost)) == 1
            assert len(recorder.of(Restored)) == 1
        # Seen through PCP's ANNOUNCE and NAT-PMP's: one box, one incident.
        assert broker.state_losses == 1
        nursery.cancel_scope.cancel()


async def test_announce_with_a_consistent_epoch_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        await broker.map(7000, "udp")
        await trio.sleep(50)
        await gateway.announce()
        await trio.sleep(10)
        assert broker.state_losses == 0


async def test_external_address_change_is_an_event(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7000, "udp")
        await nursery.start(recorder.run, mapping)
        await trio.sleep(30)
        await gateway.change_external_address("198.51.100.9")
        await wait_for(lambda: bool(recorder.of(ExternalAddressChanged)), 30)
        change = recorder.of(ExternalAddressChanged)[0]
        assert change.old_address == IPv4Address("203.0.113.7")
        assert change.lease.external_address == IPv4Address("198.51.100.9")
        assert mapping.external_address == IPv4Address("198.51.100.9")
        nursery.cancel_scope.cancel()


async def test_thirty_percent_loss(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(drop_rate=0.3, seed=3)
    async with broker_for(gateway) as broker:
        mappings = [await broker.map(6000 + i, "tcp", lifetime=600) for i in range(20)]
        await trio.sleep(6 * HOUR)
        assert all(m.state in (State.ACTIVE, State.RENEWING) for m in mappings)
        assert all(gateway.mapping_for("tcp", 6000 + i) for i in range(20))


async def test_duplicated_and_reordered_replies(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(duplicate=True, reorder=True)
    async with broker_for(gateway) as broker:
        mappings = [await broker.map(6100 + i, "udp", lifetime=600) for i in range(5)]
        await trio.sleep(2 * HOUR)
        assert all(m.state is State.ACTIVE for m in mappings)
        assert broker.transport is not None
        # Every reply came twice, and none of the copies confused anything.
        assert broker.transport.stats.received >= 2 * len(gateway.requests) - 2
        assert broker.state_losses == 0


async def test_spoofed_sources_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(wrong_source=True)
    async with broker_for(gateway, probe_timeout=1.0) as broker:
        with pytest.raises(NoMethodAvailable):
            await broker.map(7000, "tcp")
        assert broker.transport is not None
        assert broker.transport.stats.foreign > 0
        assert broker.transport.stats.received == 0
        gateway.wrong_source = False
        mapping = await broker.map(7000, "tcp")
        assert mapping.method == "pcp"


async def test_natpmp_only_gateway_is_found_through_the_version_zero_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = CountingGateway(natpmp_only=True)
    async with broker_for(gateway) as broker:
        mapping = await broker.map(7000, "tcp", lifetime=600)
        assert mapping.method == "natpmp"
        assert mapping.external_address == IPv4Address("203.0.113.7")
        # One PCP datagram (the MAP that doubles as the probe), answered at the
        # version byte; NAT-PMP did the rest.
        assert gateway.versions.count(pcp.VERSION) == 1
        assert gateway.versions.count(0) >= 2  # external address + map
        await trio.sleep(2 * HOUR)
        assert mapping.state is State.ACTIVE
        # Hours of renewals never went back to PCP.
        assert gateway.versions.count(pcp.VERSION) == 1
        assert gateway.versions.count(0) >= 2 + 12


async def test_closed_port_fails_every_method_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(closed=True)
    async with broker_for(gateway, probe_timeout=30) as broker:
        started = trio.current_time()
        with pytest.raises(NoMethodAvailable) as info:
            await broker.map(7000, "tcp")
        # ICMP port unreachable decides, not the 30 s probe timeout.
        assert trio.current_time() - started < 1
        assert "ICMP" in str(info.value)


@pytest.mark.parametrize(
    ("code", "lifetime", "retry_after"),
    [
        (pcp.ResultCode.NO_RESOURCES, 30, 30.0),  # short class: as the server says
        (pcp.ResultCode.NETWORK_FAILURE, 0, 5.0),  # short, lifetime 0: clamped
        (pcp.ResultCode.EXCESSIVE_REMOTE_PEERS, 0, 60.0),  # long, miniupnpd's 0: clamped
        (pcp.ResultCode.EXCESSIVE_REMOTE_PEERS, 1800, 1800.0),  # long, as the RFC suggests
        (pcp.ResultCode.UNSUPP_PROTOCOL, 0, 60.0),
    ],
)
async def test_result_codes_by_class(
    autojump_clock: trio.testing.MockClock,
    code: pcp.ResultCode,
    lifetime: int,
    retry_after: float,
) -> None:
    gateway = FakeGateway(forced_result=code, forced_lifetime=lifetime)
    async with broker_for(gateway) as broker:
        with pytest.raises(MappingError) as info:
            await broker.map(7000, "tcp")
        assert info.value.method == "pcp"
        assert info.value.result_code == code
        assert info.value.retry_after == retry_after


async def test_address_mismatch_rules_pcp_out_and_natpmp_takes_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(forced_result=pcp.ResultCode.ADDRESS_MISMATCH)
    async with broker_for(gateway) as broker:
        mapping = await broker.map(7000, "tcp")
        assert mapping.method == "natpmp"


async def test_exact_port_taken_fails_with_prefer_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        await broker.map(7000, "tcp", external_port=7000)
        other_link = gateway.memory_link("192.168.1.101")
        async with open_broker(
            "127.0.0.1",
            ("pcp",),
            link_factory=lambda _a, _p: _async(other_link),
            announce_port=None,
        ) as second:
            with pytest.raises(MappingError) as info:
                await second.map(7001, "tcp", external_port=7000, exact=True)
            assert info.value.result_code == pcp.ResultCode.CANNOT_PROVIDE_EXTERNAL
            sent = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest)][-1]
            assert pcp.PreferFailure() in sent.options
            relaxed = await second.map(7001, "tcp", external_port=7000)
            assert relaxed.external_port != 7000
    assert gateway.mappings == {}


async def _async(value: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return value


async def test_via_forces_one_method(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(7000, "udp", via="natpmp")
        assert mapping.method == "natpmp"
        with pytest.raises(ValueError, match="not enabled"):
            await broker.map(7001, "udp", via="upnp")


async def test_cached_choice_is_dropped_when_the_method_stops_working(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway, probe_timeout=1.0) as broker:
        await broker.map(7000, "udp")
        assert broker.selected_method == "pcp"
        gateway.natpmp_only = True  # firmware "downgrade"
        mapping = await broker.map(7001, "udp")
        assert mapping.method == "natpmp"
        assert broker.selected_method == "natpmp"


async def test_lost_mapping_moves_to_the_next_method(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway, probe_timeout=1.0) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7000, "udp", lifetime=600)
        await nursery.start(recorder.run, mapping)
        gateway.pcp_enabled = False  # PCP goes silent; NAT-PMP still answers
        await wait_for(lambda: bool(recorder.of(Restored)))
        assert mapping.method == "natpmp"
        nursery.cancel_scope.cancel()


async def test_bad_arguments_are_value_errors(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        with pytest.raises(ValueError, match=r"1\.\.65535"):
            await broker.map(0, "tcp")
        with pytest.raises(ValueError, match="tcp' or 'udp"):
            await broker.map(80, "sctp")
        with pytest.raises(ValueError, match="lifetime"):
            await broker.map(80, "tcp", lifetime=0)
    with pytest.raises(ValueError, match="methods"):
        async with open_broker("127.0.0.1", ("pcp", "smoke-signals")):
            pass
    with pytest.raises(ValueError, match="not an IP address"):
        async with open_broker("gateway.example"):
            pass


async def test_events_stream_reports_acquired_first(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        stream = broker.events()
        mapping = await broker.map(7000, "tcp")
        first = await stream.receive()
        assert first.mapping is mapping
        assert isinstance(first.event, Acquired)


async def test_method_unavailable_carries_the_method(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(natpmp_only=True)
    async with broker_for(gateway, methods=("pcp",)) as broker:
        with pytest.raises(MethodUnavailable) as info:
            await broker.map(7000, "tcp")
        assert "NAT-PMP" in str(info.value)


async def test_a_thousand_mappings_share_one_socket(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(max_lifetime=3600)
    async with broker_for(gateway) as broker:
        mappings = [await broker.map(10000 + i, "udp", lifetime=3600) for i in range(1000)]
        await trio.sleep(4 * HOUR)
        assert all(m.state is State.ACTIVE for m in mappings)
        assert len(gateway.mappings) == 1000
        assert len(gateway.links) == 1  # one link (socket) carried everything
        assert broker.transport is not None
        assert broker.transport.stats.malformed == 0


async def test_fifty_concurrent_maps_on_a_cold_slow_gateway_share_one_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 7 item 3: one probe for all, and a slow but alive server is not dead."""
    gateway = SerialGateway(per_request=0.2)
    async with broker_for(gateway) as broker:
        mappings: list[Mapping] = []

        async def one(port: int) -> None:
            mappings.append(await broker.map(port, "tcp", lifetime=3600))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, 9000 + i)
        assert len(mappings) == 50
        assert {m.method for m in mappings} == {"pcp"}
        # The last answer came after 50 x 0.2 s, beyond the 8 s request budget.
        assert trio.current_time() > 9.0
        natpmp_probes = [r for r in gateway.requests if not isinstance(r, pcp.PcpRequest)]
        announces = [
            r
            for r in gateway.requests
            if isinstance(r, pcp.PcpRequest) and r.opcode == pcp.Opcode.ANNOUNCE
        ]
        assert len(natpmp_probes) <= 1  # one race's probe at most
        assert announces == []
        assert len(gateway.mappings) == 50
        assert broker.state_losses == 0
        assert all(m.state is State.ACTIVE for m in mappings)


async def test_answers_that_waited_in_a_slow_servers_queue_are_no_state_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each answer carries the epoch of when its request arrived, and comes out
    of the queue 3 s after the one before: by arrival time alone the server's
    clock stood still (RFC 6887 §8.5 "too slow"), as the lab saw with
    miniupnpd adding 50 nftables rules. The server read its clock between the
    request's send and the answer: no loss, nothing Lost."""
    gateway = SerialGateway(per_request=3.0)
    recorders: list[Recorder] = []
    async with (
        broker_for(gateway, probe_timeout=10.0) as broker,
        trio.open_nursery() as watchers,
    ):
        first = await broker.map(8999, "tcp", lifetime=3600)  # the baseline epoch
        mappings = [first]

        async def one(port: int) -> None:
            mapping = await broker.map(port, "tcp", lifetime=3600)
            recorder = Recorder()
            recorders.append(recorder)
            await watchers.start(recorder.run, mapping)
            mappings.append(mapping)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, 9100 + i)
        assert trio.current_time() > 60.0  # 20 answers, 3 s apart
        assert broker.state_losses == 0
        assert all(m.state is State.ACTIVE for m in mappings)
        assert not any(r.of(Lost) for r in recorders)
        watchers.cancel_scope.cancel()


async def test_a_bug_in_one_renewal_is_that_mappings_event_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 7 item 2: an exception in one renewal never cancels the broker or others."""
    gateway = FakeGateway()
    sick, healthy = Recorder(), Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        a = await broker.map(7100, "udp", lifetime=600)
        b = await broker.map(7101, "udp", lifetime=600)
        await nursery.start(sick.run, a)
        await nursery.start(healthy.run, b)
        method = broker._methods["pcp"]
        real_create = method.create

        async def create(request: Any, previous: Any) -> Any:
            if request.internal_port == 7100 and previous is not None:
                raise RuntimeError("boom")
            return await real_create(request, previous)

        method.create = create  # type: ignore[method-assign]
        await trio.sleep(2 * HOUR)
        lost = sick.of(Lost)
        assert lost
        assert "internal error: RuntimeError: boom" in lost[0].reason
        assert len(healthy.of(Renewed)) >= 10
        assert b.state is State.ACTIVE
        # The broker still works.
        c = await broker.map(7102, "udp")
        assert c.state is State.ACTIVE
        nursery.cancel_scope.cancel()


async def test_a_restart_recreates_every_mapping_whatever_its_method(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 7 item 12: one box lost its state; all its mappings are re-created."""
    gateway = FakeGateway()
    recorders = [Recorder(), Recorder()]
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        by_pcp = await broker.map(7200, "udp", lifetime=7200)
        by_natpmp = await broker.map(7201, "udp", lifetime=7200, via="natpmp")
        for recorder, mapping in zip(recorders, (by_pcp, by_natpmp), strict=True):
            await nursery.start(recorder.run, mapping)
        await trio.sleep(100)
        gateway.reset()
        await gateway.announce()
        await trio.sleep(10)  # the 0-5 s spread and the round trips, not half a lifetime
        assert sorted((m.via, m.internal_port) for m in gateway.mappings.values()) == [
            ("natpmp", 7201),
            ("pcp", 7200),
        ]
        for recorder in recorders:
            assert len(recorder.of(Lost)) == 1
            assert len(recorder.of(Restored)) == 1
        assert broker.state_losses == 1
        nursery.cancel_scope.cancel()


async def test_a_spoofed_address_announcement_is_confirmed_not_believed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 7 item 13: an unsolicited message is a hint to ask, never a fact."""
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7300, "udp", via="natpmp")
        await nursery.start(recorder.run, mapping)
        await trio.sleep(30)
        before = len(gateway.requests)
        (link,) = gateway.links
        spoof = natpmp.encode_response(
            natpmp.ExternalAddressResponse(0, gateway.epoch, IPv4Address("6.6.6.6"))
        )
        link.put(spoof, gateway._source())
        await trio.sleep(10)
        assert mapping.external_address == IPv4Address("203.0.113.7")
        assert recorder.of(ExternalAddressChanged) == []
        assert recorder.of(Lost) == []
        asked = gateway.requests[before:]
        assert len(asked) == 1  # one external address request settled it
        assert isinstance(asked[0], natpmp.ExternalAddressRequest)
        nursery.cancel_scope.cancel()


async def test_a_flood_of_spoofed_announces_costs_a_bounded_number_of_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(7400, "udp")
        await trio.sleep(30)
        before = len(gateway.requests)
        (link,) = gateway.links
        reset = pcp.encode_response(pcp.PcpResponse(pcp.Opcode.ANNOUNCE, 0, 0, 0))
        for _ in range(1000):  # 100 a second for 10 s
            link.put(reset, gateway._source())
            await trio.sleep(0.01)
        await trio.sleep(5)
        extra = len(gateway.requests) - before
        print(f"1000 spoofed ANNOUNCEs in 10 s cost {extra} requests")
        assert extra <= 10 / CONFIRM_INTERVAL + 2
        assert broker.state_losses == 0
        assert mapping.state is State.ACTIVE
        assert mapping.external_address == IPv4Address("203.0.113.7")


async def test_a_real_address_change_announced_by_natpmp_is_confirmed_and_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    recorder = Recorder()
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7500, "udp", via="natpmp")
        await nursery.start(recorder.run, mapping)
        await trio.sleep(30)
        # The WAN address moves, the table survives, NAT-PMP announces it
        # (and PCP's epoch restarts, RFC 6887 §8.5).
        await gateway.change_external_address("198.51.100.9")
        await wait_for(lambda: bool(recorder.of(ExternalAddressChanged)), 30)
        assert mapping.external_address == IPv4Address("198.51.100.9")
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class SilentUntil(FakeGateway):
    """Drops every reply until *until* (mock time): a lossy spell."""

    until: float = 0.0

    def deliver(self, link: MemoryLink, reply: bytes) -> None:
        if trio.current_time() >= self.until:
            super().deliver(link, reply)


async def test_a_race_lost_to_silence_is_run_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every answer of the first probe race is lost (a lossy spell): map() races
    again instead of failing, and a definite refusal would still end it at once."""
    gateway = SilentUntil(until=3.0)
    async with broker_for(gateway, probe_timeout=2.0) as broker:
        mapping = await broker.map(7900, "udp")
        assert mapping.method == "pcp"
        assert trio.current_time() > 3.0
    closed = FakeGateway(closed=True)
    async with broker_for(closed) as broker:
        started = trio.current_time()
        with pytest.raises(NoMethodAvailable):
            await broker.map(7901, "udp")
        assert trio.current_time() - started < 1.0  # ICMP refusals: no second race


@attrs.define(eq=False)
class NatPmpMapsGoUnanswered(FakeGateway):
    """NAT-PMP answers its probe but no map request; PCP is silent until switched on."""

    natpmp_maps_seen: int = 0

    def handle(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        if data[:1] == b"\x00" and data[1:2] in (b"\x01", b"\x02"):
            self.natpmp_maps_seen += 1
            super().handle(data, source)  # it did map it; the answer is lost
            return []
        return super().handle(data, source)


async def test_a_method_silent_after_its_probe_is_cleaned_up_and_the_next_one_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = NatPmpMapsGoUnanswered(pcp_enabled=False)
    async with broker_for(gateway) as broker, trio.open_nursery() as nursery:

        async def pcp_comes_back() -> None:
            await trio.sleep(5)
            gateway.pcp_enabled = True

        nursery.start_soon(pcp_comes_back)
        mapping = await broker.map(7902, "udp")
        assert mapping.method == "pcp"
        # NAT-PMP's own mapping (made, its answer lost) was deleted before PCP
        # was let in: one mapping of 7902 on the gateway, PCP's.
        assert [(m.via, m.internal_port) for m in gateway.mappings.values()] == [("pcp", 7902)]
        assert gateway.natpmp_maps_seen >= 2  # the map, then the delete


async def test_a_forced_method_silent_past_one_budget_is_asked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A gateway busy for longer than a whole request budget (8 s) is asked
    again, up to MAX_RACES times, for a forced method too."""
    gateway = SilentUntil(until=10.0)
    async with broker_for(gateway) as broker:
        mapping = await broker.map(7903, "udp", via="natpmp")
        assert mapping.method == "natpmp"
        assert trio.current_time() > 10.0
