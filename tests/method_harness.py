"""PcpMethod and NatPmpMethod on one Transport over a FakeGateway memory link.

For the method, transport and probe tests: no broker, so they test exactly
the layer they name.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from portbroker.methods.natpmp import NatPmpMethod
from portbroker.methods.pcp import PcpMethod
from portbroker.testing.fake_gateway import FakeGateway, MemoryLink
from portbroker.transport import Response, Transport


@attrs.define
class Harness:
    gateway: FakeGateway
    link: MemoryLink
    transport: Transport
    pcp: PcpMethod
    natpmp: NatPmpMethod
    observed: list[tuple[Response, bool]]


@asynccontextmanager
async def harness(gateway: FakeGateway | None = None) -> AsyncIterator[Harness]:
    gateway = gateway or FakeGateway()
    link = gateway.memory_link()
    observed: list[tuple[Response, bool]] = []
    transport = Transport(
        link, lambda response, _now, matched: observed.append((response, matched))
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        yield Harness(
            gateway,
            link,
            transport,
            PcpMethod(transport, gateway.address, rng=random.Random(7)),
            NatPmpMethod(transport, gateway.address),
            observed,
        )
        nursery.cancel_scope.cancel()
