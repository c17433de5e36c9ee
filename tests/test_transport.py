"""Transport details that the broker tests do not reach directly."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address

import pytest
import trio

from portbroker.errors import NoAnswer
from portbroker.transport import Transport, natpmp_key, pcp_key, probe_schedule
from portbroker.types import IPAddress
from portbroker.wire import natpmp, pcp


class RefusingLink:
    """A link whose second send reports the ICMP error of the first datagram,
    as a connected UDP socket does (the pending error is cleared by send)."""

    def __init__(self) -> None:
        self.sends = 0

    @property
    def local_address(self) -> IPAddress:
        return IPv4Address("192.168.1.100")

    @property
    def remote(self) -> tuple[IPAddress, int]:
        return (IPv4Address("192.168.1.1"), 5351)

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sends += 1
        if self.sends == 2:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


async def test_an_icmp_error_surfacing_on_send_fails_every_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = Transport(RefusingLink())
    announce = pcp.PcpRequest(pcp.Opcode.ANNOUNCE, 0, "192.168.1.100")
    outcomes: dict[str, BaseException] = {}

    async def ask(name: str, payload: bytes, key: tuple[object, ...]) -> None:
        try:
            await transport.request(payload, key, probe_schedule())
        except OSError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run)
        nursery.start_soon(ask, "pcp", pcp.encode_request(announce), pcp_key(announce))
        await trio.sleep(0.01)
        request = natpmp.ExternalAddressRequest()
        nursery.start_soon(ask, "natpmp", natpmp.encode_request(request), natpmp_key(request))
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert set(outcomes) == {"pcp", "natpmp"}
    assert all(isinstance(e, ConnectionRefusedError) for e in outcomes.values())
    assert transport.stats.refused == 1


async def test_an_exhausted_schedule_is_no_answer(autojump_clock: trio.testing.MockClock) -> None:
    transport = Transport(RefusingLink())
    transport.link.sends = 5  # type: ignore[attr-defined]  # never refuse
    request = natpmp.ExternalAddressRequest()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.run)
        with pytest.raises(NoAnswer):
            await transport.request(
                natpmp.encode_request(request), natpmp_key(request), [0.25, 0.5]
            )
        nursery.cancel_scope.cancel()
