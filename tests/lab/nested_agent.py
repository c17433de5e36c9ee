"""An app behind two NATs, run inside the inner lan namespace of the lab's series.

    python nested_agent.py GATEWAY PORT OUTER_PCP_SERVER|-|none [LEASE_FILE]

Maps PORT/tcp on GATEWAY (the inner gateway) and through the outer NAT with
``portbroker.nested.open_nested_mapping`` (the outer PCP server named, or
"-" and learned from LEASE_FILE, RFC 7291), prints one JSON line for the
two mappings and one per event, and releases both when its stdin closes.
"""

from __future__ import annotations

import json
import sys

import trio

import portbroker
from portbroker.nested import open_nested_mapping


def line(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def plain(gateway: str, port: int) -> None:
    """OUTER_PCP_SERVER "none": one NAT-PMP mapping, every event from before its
    first grant (the broker's stream), until stdin closes."""
    async with portbroker.open_broker(gateway, ("natpmp",), probe_timeout=2.0) as broker:
        seen = broker.events()
        async with broker.open_mapping(port, "tcp", lifetime=600) as mapping:
            line(event="Mapped", external_address=mapping.external_address)
            async with trio.open_nursery() as nursery:

                async def report() -> None:
                    async for item in seen:
                        line(
                            event=type(item.event).__name__,
                            external_address=getattr(item.event, "lease", mapping).external_address,
                            public=getattr(item.event, "public", None),
                            reason=getattr(item.event, "reason", None),
                        )

                nursery.start_soon(report)
                await trio.to_thread.run_sync(sys.stdin.read)
                nursery.cancel_scope.cancel()
    line(event="Done")


async def main(gateway: str, port: int, outer: str, leases: list[str]) -> None:
    if outer == "none":
        await plain(gateway, port)
        return
    async with portbroker.open_broker(gateway, ("pcp", "natpmp"), probe_timeout=2.0) as broker:
        seen = broker.events()  # from before the first grant: its ReachabilityChanged too
        try:
            async with open_nested_mapping(
                broker,
                port,
                "tcp",
                outer_gateway=None if outer == "-" else outer,
                dhcp_leases=leases or None,
                lifetime=600,
            ) as nested:
                events = nested.events()
                inner = nested.inner
                while True:
                    try:
                        first = seen.receive_nowait().event
                    except trio.WouldBlock:
                        break
                    line(
                        event=type(first).__name__,
                        layer="inner broker",
                        public=getattr(first, "public", None),
                        reason=getattr(first, "reason", None),
                    )
                line(
                    event="Mapped",
                    inner_method=inner.method,
                    outer_method=nested.outer.method if nested.outer else None,
                    inner_external=f"{inner.external_address}:{inner.external_port}",
                    inner_public=inner.reachability.public,
                    inner_reason=inner.reachability.reason,
                    outer_server=nested.outer_server,
                    outer_source=nested.outer_server_source,
                    external_address=nested.external_address,
                    external_port=nested.external_port,
                    public=nested.reachability.public,
                )
                async with trio.open_nursery() as nursery:

                    async def report() -> None:
                        async for item in events:
                            line(
                                event=type(item.event).__name__,
                                layer=item.layer,
                                public=getattr(item.event, "public", None),
                                reason=getattr(item.event, "reason", None),
                            )

                    nursery.start_soon(report)
                    await trio.to_thread.run_sync(sys.stdin.read)  # hold until stdin closes
                    nursery.cancel_scope.cancel()
            async for item in events:  # the two Released events
                line(event=type(item.event).__name__, layer=item.layer)
        except (portbroker.PortBrokerError, ValueError) as exc:
            line(event="Error", kind=type(exc).__name__, message=str(exc))
    line(event="Done")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])
