"""Copies of an answer to a retransmitted request, read after it was answered.

A request sent twice gets two answers, each stamped with the server's epoch
when it was read; the second may reach the next request with the same key
(a PCP renewal keeps its nonce) long after, when a busy broker catches up
with its socket. The epoch check must judge it from the first request's
first send (transport.LATE_ANSWER_MEMORY), or a later fresh answer looks
"too fast" (seen in benchmarks/scale.py at 10,000 mappings).
"""

from __future__ import annotations

import ipaddress

import trio
import trio.testing

from portbroker.transport import Response, Transport, pcp_key
from portbroker.wire import pcp
from tests.test_transport import InjectedLink


async def test_a_copy_for_a_retransmission_is_judged_from_the_first_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = InjectedLink()
    seen: list[tuple[float, bool, float]] = []

    def observer(response: Response, now: float, matched: bool, asked_at: float) -> None:
        seen.append((now, matched, asked_at))

    transport = Transport(link, observer)
    data = pcp.MapData(b"n" * 12, 6, 8080, 8080, ipaddress.IPv4Address("203.0.113.7"))
    request = pcp.PcpRequest(pcp.Opcode.MAP, 600, ipaddress.IPv4Address("192.168.1.100"), data)
    payload, key = pcp.encode_request(request), pcp_key(request)

    def reply(epoch: int) -> bytes:
        return pcp.encode_response(
            pcp.PcpResponse(pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, 600, epoch, data)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run)
        start = trio.current_time()

        async def answer_after(delay: float, epoch: int) -> None:
            await trio.sleep(delay)
            await link.inbox_send.send(reply(epoch))

        # The first send's answer is slow; the retransmission's comes first.
        nursery.start_soon(answer_after, 0.3, 0)
        await transport.request(payload, key, [0.25, 0.5])
        assert len(link.sent) == 2
        await trio.sleep(20)  # the renewal, same nonce: the same key
        renewal = trio.current_time()
        # The copy for the first request's retransmission arrives now, then
        # the renewal's own answer.
        nursery.start_soon(answer_after, 0.1, 0)
        await transport.request(payload, key, [3.0])
        assert seen[-1][1]  # taken by the renewal, as solicited
        # Stamped perhaps as early as the first request's first send.
        assert seen[-1][2] == start
        assert seen[-1][2] < renewal
        # A request answered at its first send leaves nothing behind.
        other_data = pcp.MapData(b"m" * 12, 6, 8081, 8081, ipaddress.IPv4Address("203.0.113.7"))
        other = pcp.PcpRequest(
            pcp.Opcode.MAP, 600, ipaddress.IPv4Address("192.168.1.100"), other_data
        )
        answer = pcp.encode_response(
            pcp.PcpResponse(pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, 600, 30, other_data)
        )

        async def answer_other(delay: float) -> None:
            await trio.sleep(delay)
            await link.inbox_send.send(answer)

        nursery.start_soon(answer_other, 0.1)
        await transport.request(pcp.encode_request(other), pcp_key(other), [3.0])
        await trio.sleep(20)
        again = trio.current_time()
        nursery.start_soon(answer_other, 0.1)
        await transport.request(pcp.encode_request(other), pcp_key(other), [3.0])
        assert seen[-1][2] == again
        nursery.cancel_scope.cancel()
