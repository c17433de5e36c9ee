"""An app that uses portbroker's public API, run inside the lab's lan namespace.

    python agent.py GATEWAY PORT [METHODS [LIFETIME]]

Maps PORT/tcp with ``portbroker.open_broker`` / ``open_mapping``, prints one
JSON line for the mapping and one per event, and releases the mapping when its
stdin closes. The lab tests drive it from outside the namespace.
"""

from __future__ import annotations

import json
import sys

import trio

import portbroker


def line(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def main(gateway: str, port: int, methods: tuple[str, ...], lifetime: int) -> None:
    async with portbroker.open_broker(gateway, methods, probe_timeout=2.0) as broker:
        try:
            async with broker.open_mapping(port, "tcp", lifetime=lifetime) as mapping:
                line(
                    event="Mapped",
                    method=mapping.method,
                    external_address=mapping.external_address,
                    external_port=mapping.external_port,
                )
                events = mapping.events()
                async with trio.open_nursery() as nursery:

                    async def report() -> None:
                        async for event in events:
                            line(event=type(event).__name__, detail=repr(event))

                    nursery.start_soon(report)
                    # Hold until the test closes our stdin.
                    await trio.to_thread.run_sync(sys.stdin.read)
                    nursery.cancel_scope.cancel()
            # Leaving open_mapping released it: report the Released event.
            async for event in events:
                line(event=type(event).__name__, detail=repr(event))
        except portbroker.PortBrokerError as exc:
            line(event="Error", kind=type(exc).__name__, message=str(exc))
    line(event="Done")


if __name__ == "__main__":
    methods = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else portbroker.METHOD_NAMES
    lifetime = int(sys.argv[4]) if len(sys.argv) > 4 else 600
    trio.run(main, sys.argv[1], int(sys.argv[2]), methods, lifetime)
