"""What the broker tests share: a broker on a FakeGateway in memory, an event recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from portbroker.broker import Broker, Mapping, open_broker
from portbroker.lifecycle import MappingEvent
from portbroker.testing.fake_gateway import FakeGateway

HOUR = 3600.0


@asynccontextmanager
async def broker_for(
    gateway: FakeGateway, methods: tuple[str, ...] = ("pcp", "natpmp"), **kwargs: Any
) -> AsyncIterator[Broker]:
    """A broker pinned to the fake (127.0.0.1, memory links, no 5350 listener)."""
    async with open_broker(
        "127.0.0.1",
        methods,
        link_factory=gateway.link_factory(),
        announce_port=None,
        seed=7,
        **kwargs,
    ) as broker:
        yield broker


class Recorder:
    """A mapping's events with the (mock) time each arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, MappingEvent]] = []

    async def run(self, mapping: Mapping, *, task_status: trio.TaskStatus[None]) -> None:
        stream = mapping.events()
        task_status.started()
        async for event in stream:
            self.events.append((trio.current_time(), event))

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def first(self, kind: type[Any]) -> tuple[float, Any]:
        return next((t, e) for t, e in self.events if isinstance(e, kind))


async def wait_for(predicate: Callable[[], bool], limit: float = HOUR) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - MockClock makes polling free
            await trio.sleep(0.5)
