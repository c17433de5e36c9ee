"""The receive loop reads every datagram already queued before it yields.

With thousands of requests in flight, one datagram per pass through trio's
scheduler left answers in the socket until their requests timed out
(benchmarks/scale.py, 50,000 mappings); Transport._drain reads a burst at once.
"""

from __future__ import annotations

import ipaddress
import socket

import trio

from portbroker.transport import Transport, open_udp_link, pcp_key
from portbroker.wire import pcp

COUNT = 300


def _request(port: int) -> pcp.PcpRequest:
    data = pcp.MapData(port.to_bytes(12, "big"), 17, port, port)
    return pcp.PcpRequest(pcp.Opcode.MAP, 600, ipaddress.IPv4Address("127.0.0.1"), data)


def _answer(request: pcp.PcpRequest) -> bytes:
    data = request.data
    assert isinstance(data, pcp.MapData)
    granted = pcp.MapData(
        data.nonce,
        data.protocol,
        data.internal_port,
        data.internal_port,
        ipaddress.IPv4Address("203.0.113.7"),
    )
    return pcp.encode_response(
        pcp.PcpResponse(pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, 600, 10, granted)
    )


async def test_a_burst_of_queued_answers_is_read_in_one_go() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    link = await open_udp_link(ipaddress.IPv4Address("127.0.0.1"), server.getsockname()[1])
    link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    assert link.receive_nowait() is None  # nothing queued: None, no wait
    transport = Transport(link)
    requests = [_request(port) for port in range(20000, 20000 + COUNT)]
    answered: list[int] = []
    passes = 0

    async def ask(request: pcp.PcpRequest) -> None:
        response = await transport.request(pcp.encode_request(request), pcp_key(request), [30.0])
        assert isinstance(response, pcp.PcpResponse)
        assert response.data is not None
        answered.append(response.data.internal_port)

    original = link.receive

    async def counting_receive() -> tuple[bytes, tuple[str, int]]:
        nonlocal passes
        passes += 1
        return await original()

    link.receive = counting_receive  # type: ignore[method-assign]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(ask, request)
            await trio.sleep(0.2)  # every request sent, none answered
            # The server answers all of them before the loop runs at all.
            for _ in range(COUNT):
                data, client = server.recvfrom(2048)
                server.sendto(_answer(pcp.decode_request(data)), client)
            await trio.sleep(0.05)
            nursery.start_soon(transport.run)
            while len(answered) < COUNT:  # noqa: ASYNC110 - real sockets, a short wait
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    server.close()
    link.close()
    assert sorted(answered) == [r.data.internal_port for r in requests]  # type: ignore[union-attr]
    assert transport.stats.received == COUNT
    # Read in bursts of up to MAX_DRAIN, not one receive per datagram.
    assert passes <= 5
