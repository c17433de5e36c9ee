"""A P2P stack's view, run inside the lab's lan namespace: portbroker.p2p's candidates and changes.

    python candidates_agent.py GATEWAY PORT LIFETIME METHODS

Opens a broker and ``portbroker.p2p.open_candidates(broker, PORT, "udp")``
(interfaces polled every 0.5 s, debounced 0.5 s; re-creation after a loss
within 0.5 s), prints one JSON line with the candidates and one per change,
and leaves (releasing the mapping) when its stdin closes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

import portbroker
import portbroker.p2p


def line(**fields: Any) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def main(gateway: str, port: int, lifetime: int, methods: tuple[str, ...]) -> None:
    async with (
        portbroker.open_broker(gateway, methods, probe_timeout=2.0, recovery_delay=0.5) as broker,
        portbroker.p2p.open_candidates(
            broker, port, "udp", lifetime=lifetime, poll_interval=0.5, debounce=0.5
        ) as gatherer,
        trio.open_nursery() as nursery,
    ):
        changes = gatherer.changes()
        line(event="candidates", candidates=[c.to_json() for c in gatherer.candidates()])

        async def report() -> None:
            async for change in changes:
                line(
                    event="change",
                    reason=change.reason.value,
                    added=[c.to_json() for c in change.added],
                    removed=[c.to_json() for c in change.removed],
                    candidates=[c.to_json() for c in change.candidates],
                )

        nursery.start_soon(report)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin
        nursery.cancel_scope.cancel()
    line(event="done")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), tuple(sys.argv[4].split(",")))
