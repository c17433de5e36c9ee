"""A broker with many mappings, run inside the lab's lan namespace by the fault tests.

    python fault_agent.py CONFIG_JSON

CONFIG_JSON holds ``open_broker`` keywords under ``"broker"`` (``gateway``,
``methods``, ``port``, ``upnp_port``, ``ssdp_multicast``, ``probe_timeout``,
``announce_port``, ``recovery_delay``) and the mappings under ``"maps"``: a
list of ``{"port": N, "lifetime": S, "via": null | "pcp" | ...}``. With
``"probe_first": true`` it probes first (printing ``Probed``). All maps
start at once on one (cold) broker, one trio task each. The agent prints one
JSON line per result (``Mapped`` or ``MapError``, with ``t``: seconds since
the broker opened), then ``AllDone``, then every broker event (``Renewed``,
``Lost``, ``Restored``, ...) with its port, until its stdin closes; then it
releases everything and prints ``Done``.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from typing import Any

import trio

import portbroker


def line(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def main(config: dict[str, Any]) -> None:
    started = trio.current_time()

    def elapsed() -> float:
        return round(trio.current_time() - started, 3)

    async with portbroker.open_broker(**config["broker"]) as broker:
        events = broker.events()

        async def report_events() -> None:
            async for item in events:
                mapping = item.mapping
                line(
                    event=type(item.event).__name__,
                    port=mapping.request.internal_port,
                    method=mapping.lease.method if mapping.lease else None,
                    external_port=mapping.lease.external_port if mapping.lease else None,
                    detail=repr(item.event),
                    t=elapsed(),
                )

        async def map_one(spec: dict[str, Any]) -> None:
            try:
                mapping = await broker.map(
                    spec["port"], "tcp", lifetime=spec.get("lifetime", 600), via=spec.get("via")
                )
            except portbroker.PortBrokerError as exc:
                line(
                    event="MapError",
                    port=spec["port"],
                    kind=type(exc).__name__,
                    message=str(exc),
                    t=elapsed(),
                )
                return
            line(
                event="Mapped",
                port=spec["port"],
                method=mapping.method,
                external_address=mapping.external_address,
                external_port=mapping.external_port,
                lifetime=mapping.lease.lifetime if mapping.lease else None,
                t=elapsed(),
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_events)
            if config.get("probe_first"):
                report = await broker.probe()
                line(
                    event="Probed",
                    selected=report.selected,
                    available=[o.method for o in report.outcomes if o.available],
                    t=elapsed(),
                )
            async with trio.open_nursery() as mappers:
                for spec in config["maps"]:
                    mappers.start_soon(map_one, spec)
            line(event="AllDone", t=elapsed())
            # Hold until the test closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()
    line(event="Done", t=elapsed())


if __name__ == "__main__":
    # A test that waits in vain sends SIGUSR1: every thread's stack goes to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The broker's log goes to stderr (a file the test shows when it fails).
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s %(levelname)s %(message)s"
    )
    trio.run(main, json.loads(sys.argv[1]))
