"""Closing a broker whose surrounding scope was cancelled still deletes for real."""

from __future__ import annotations

import logging

import pytest
import trio

from portbroker.broker import Broker
from portbroker.testing.fake_gateway import FakeGateway
from tests.broker_harness import broker_for


@pytest.mark.parametrize("methods", [("pcp",), ("natpmp",)])
async def test_a_cancelled_scope_around_the_broker_still_hears_its_deletes_answered(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, methods: tuple[str, ...]
) -> None:
    # Found by the double-NAT work: with the scope around open_broker
    # cancelled, the transports' receive loops died with it, so the release's
    # delete reached the gateway but its answer was never read: 5 s of waiting,
    # then "not deleted" in the log and in undeleted().
    gateway = FakeGateway()
    kept: list[Broker] = []
    with trio.CancelScope() as scope, caplog.at_level(logging.WARNING, "portbroker"):
        async with broker_for(gateway, methods) as broker:
            kept.append(broker)
            await broker.map(8080, "tcp", lifetime=7200)
            await broker.map(9000, "udp", lifetime=7200)
            assert len(gateway.mappings) == 2
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert not gateway.mappings
    assert kept[0].undeleted() == []
    assert not [r for r in caplog.records if "not answered" in r.getMessage()]
