"""Work that arrives after a broker's nursery closed is dropped, never a crash.

The transports' receive loops are shielded from the broker's cancellation (a
delete's answer must still be read while the broker releases), so they run on
for a moment after the broker's own nursery has closed: an answer or an
announcement read then may still ask for a confirmation, a renewal or a
delete retry. Under overload (benchmarks/scale.py, an exception in the
``open_broker`` block) that was ``RuntimeError: Nursery is closed to new
arrivals`` at teardown.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import trio

from portbroker.epoch import Confirm
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.wire import pcp
from tests.broker_harness import broker_for

GATEWAY = IPv4Address("127.0.0.1")


async def test_an_announcement_read_after_the_broker_closed_asks_for_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    async with broker_for(gateway) as broker:
        mapping = await broker.map(8080, "tcp", lifetime=600)
        assert mapping.lease is not None
    await trio.sleep(100)
    sent = len(gateway.requests)
    # An unsolicited ANNOUNCE whose epoch says "restarted": before, a Confirm
    # task was started on the closed nursery (RuntimeError in the receive loop).
    announce = pcp.PcpResponse(pcp.Opcode.ANNOUNCE, pcp.ResultCode.SUCCESS, 0, 0)
    broker._observe(GATEWAY, announce, trio.current_time(), False, announcement=True)
    broker._on_verdict(GATEWAY, Confirm("a hint after the close", ("pcp",)))
    await trio.sleep(10)
    assert len(gateway.requests) == sent  # nothing asked of the gateway
