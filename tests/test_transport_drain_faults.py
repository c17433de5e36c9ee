"""Transport._drain under a bad network: garbage, a flood, a socket error mid-batch.

The drain reads up to MAX_DRAIN queued datagrams without yielding
(tests/test_transport_drain.py). Each datagram no request takes costs a pass
over every waiting request, so a flood of them must not hold the event loop
for a whole batch; one bad datagram must not cost the good ones after it; a
socket error in the middle must not end the receive loop.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio
import trio.lowlevel

from portbroker.transport import (
    MAX_DRAIN,
    MAX_DRAIN_REJECTED,
    Transport,
    open_udp_link,
    pcp_key,
)
from portbroker.wire import pcp
from tests.test_transport_drain import _answer, _request

LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


async def _pair() -> tuple[socket.socket, Transport]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    link = await open_udp_link(LOCALHOST, server.getsockname()[1])
    link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return server, Transport(link)


async def test_a_flood_of_garbage_yields_to_other_tasks_every_few_datagrams() -> None:
    """Before: 1 + MAX_DRAIN malformed datagrams were handled between two
    passes of any other task (no checkpoint in the drain)."""
    server, transport = await _pair()
    flood = 3 * MAX_DRAIN
    # Datagrams reach the link only from its connected peer: the flood comes
    # from the server's own address and port (a spoofer on the path could).
    client = transport.link._sock.getsockname()  # type: ignore[attr-defined]
    for _ in range(flood):
        server.sendto(b"junk", client)
    await trio.sleep(0.05)
    per_pass: list[int] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.run)
            seen = 0
            while seen < flood:
                await trio.lowlevel.checkpoint()  # one pass of trio's scheduler
                now = transport.stats.malformed
                per_pass.append(now - seen)
                seen = now
            nursery.cancel_scope.cancel()
    server.close()
    transport.link.close()
    assert transport.stats.malformed == flood  # none lost
    # trio may run the receive loop twice between two of our passes (it
    # shuffles each batch): at most two receives and their drains.
    assert max(per_pass) <= 2 * (1 + MAX_DRAIN_REJECTED), max(per_pass)


async def test_a_bad_datagram_in_a_burst_costs_none_of_the_answers_after_it() -> None:
    server, transport = await _pair()
    requests = [_request(port) for port in range(21000, 21020)]
    answered: list[int] = []

    async def ask(request: pcp.PcpRequest) -> None:
        response = await transport.request(pcp.encode_request(request), pcp_key(request), [30.0])
        assert isinstance(response, pcp.PcpResponse)
        assert response.data is not None
        answered.append(response.data.internal_port)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for request in requests:
                nursery.start_soon(ask, request)
            await trio.sleep(0.2)
            for index in range(len(requests)):
                data, client = server.recvfrom(2048)
                if index % 5 == 0:
                    server.sendto(b"\x02\x81garbage", client)  # PCP-ish, too short
                server.sendto(_answer(pcp.decode_request(data)), client)
            await trio.sleep(0.05)
            nursery.start_soon(transport.run)
            while len(answered) < len(requests):  # noqa: ASYNC110 - real sockets
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    server.close()
    transport.link.close()
    assert sorted(answered) == list(range(21000, 21020))
    assert transport.stats.malformed == 4


class _Link:
    """A link whose queue holds datagrams and, in their midst, a socket error."""

    def __init__(self, queue: list[bytes | OSError]) -> None:
        self.queue = queue
        self.remote = (LOCALHOST, 5351)
        self.local_address = LOCALHOST

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        await trio.sleep(0 if self.queue else 3600)
        return self._next()

    def receive_nowait(self) -> tuple[bytes, tuple[str, int]] | None:
        return self._next() if self.queue else None

    def _next(self) -> tuple[bytes, tuple[str, int]]:
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item, ("127.0.0.1", 5351)

    async def send(self, payload: bytes) -> None:
        pass

    def close(self) -> None:
        pass


async def test_an_icmp_refusal_mid_drain_does_not_end_the_receive_loop() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    link = _Link([b"junk", refused, b"junk", b"junk"])
    transport = Transport(link)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run)
        with trio.fail_after(5):
            while transport.stats.malformed < 3:  # noqa: ASYNC110 - a fake link
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert transport.stats.refused == 1
