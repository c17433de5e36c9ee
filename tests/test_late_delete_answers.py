"""A gateway that answers seconds late, and a delete that is lost.

A gateway answering 2 s late has an answer in flight for every
retransmission of a map, and those late copies of the grant (same PCP nonce;
NAT-PMP has no transaction ID at all) match the delete that follows. The
delete asks again for each (a copy has a lifetime, a delete's answer has 0),
but after DELETE_ATTEMPTS copies it gave up with a *refusal*, which the broker
does not retry: had the delete itself been lost, the mapping stayed open on
the gateway for its whole lease while the broker had forgotten it. Found by
stop 14's review. Now that is silence, and silence is retried (lifecycle
rule 10).
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from portbroker.lifecycle import Released
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import Recorder, broker_for, wait_for


def _is_delete(data: bytes) -> bool:
    if data[:1] == b"\x02":  # PCP: a MAP request (opcode 1) with Requested Lifetime 0
        return len(data) >= 8 and data[1] == 1 and int.from_bytes(data[4:8], "big") == 0
    # NAT-PMP: a map request (opcode 1 or 2) with lifetime 0
    return len(data) == 12 and data[1] in (1, 2) and int.from_bytes(data[8:12], "big") == 0


@pytest.mark.parametrize("method", ["pcp", "natpmp"])
async def test_a_lost_delete_behind_late_copies_of_the_grant_is_retried_until_done(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    gateway = FakeGateway(delay=2.0)  # every answer 2 s late: the map is retransmitted
    handle = FakeGateway.handle
    lost: list[bytes] = []

    def first_delete_lost(self: FakeGateway, data: bytes, source: tuple[str, int]) -> list[bytes]:
        if _is_delete(data) and not lost:
            lost.append(data)
            return []  # the gateway never saw it
        return handle(self, data, source)

    monkeypatch.setattr(FakeGateway, "handle", first_delete_lost)
    recorder = Recorder()
    async with broker_for(gateway, (method,)) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7100, "udp", lifetime=600)
        await nursery.start(recorder.run, mapping)
        await mapping.release()
        assert lost  # the first delete was lost
        await wait_for(lambda: bool(recorder.of(Released)))
        (released,) = recorder.of(Released)
        assert not released.confirmed
        assert released.retrying  # not "refused, not retried"
        await wait_for(lambda: not broker.undeleted())
        assert gateway.mapping_for("udp", 7100) is None  # deleted after all
        nursery.cancel_scope.cancel()


async def test_a_delete_answered_with_the_implicit_mappings_lifetime_is_done(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RFC 6887 §15: a mapping that also carries implicit traffic loses its
    # explicit part, and the SUCCESS carries the remaining idle timeout as its
    # Lifetime. The answer copies the delete's zero port and all-zeros address
    # (§15.1, erratum 3621), which no grant of a TCP or UDP port has: it is
    # this delete's answer, not a late copy of a grant. Taken for one, the
    # delete was retried for the whole lease, Released said unconfirmed and
    # retrying, and each retry of a delete that was done could meet another
    # client's mapping of the endpoint (NOT_AUTHORIZED, then _cut_short).
    gateway = FakeGateway()
    pcp_map = FakeGateway._pcp_map

    def implicit_traffic(self: FakeGateway, request: pcp.PcpRequest) -> bytes:
        reply = pcp_map(self, request)
        if request.lifetime != 0:
            return reply
        response = pcp.decode_response(reply)
        return pcp.encode_response(attrs.evolve(response, lifetime=100))

    monkeypatch.setattr(FakeGateway, "_pcp_map", implicit_traffic)
    recorder = Recorder()
    async with broker_for(gateway, ("pcp",)) as broker, trio.open_nursery() as nursery:
        mapping = await broker.map(7100, "udp", lifetime=600)
        await nursery.start(recorder.run, mapping)
        await mapping.release()
        await wait_for(lambda: bool(recorder.of(Released)))
        (released,) = recorder.of(Released)
        assert released.confirmed
        assert not released.retrying
        assert not broker.undeleted()
        await trio.sleep(700)  # past the lease: no retry came
        deletes = [r for r in gateway.requests if isinstance(r, pcp.PcpRequest) and not r.lifetime]
        assert len(deletes) == 1
        nursery.cancel_scope.cancel()
