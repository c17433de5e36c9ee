"""An app that releases a mapping while the gateway cannot hear it (lab, issue 8).

    python delete_agent.py GATEWAY PORT

Maps PORT/tcp with PCP and prints one JSON line per step: ``Mapped``; then, on
the line ``release`` on stdin, ``Released`` (its detail, and the leases still
pending) as soon as ``release()`` returns; ``DeleteFailed`` for each failed
attempt the broker logs; ``Deleted`` once nothing is pending. It exits when
stdin closes.
"""

from __future__ import annotations

import json
import logging
import sys

import trio

import portbroker
from portbroker.lifecycle import event_detail


def line(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


class Report(logging.Handler):
    """The broker's log lines about deletes, as events for the test."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "delete failed" in message:
            line(event="DeleteFailed", message=message)
        elif "deleted at attempt" in message:
            line(event="DeleteDone", message=message)


async def main(gateway: str, port: int) -> None:
    logger = logging.getLogger("portbroker")
    logger.setLevel(logging.INFO)
    logger.addHandler(Report())
    async with portbroker.open_broker(gateway, ("pcp",), probe_timeout=2.0) as broker:
        mapping = await broker.map(port, "tcp", lifetime=3600)
        line(event="Mapped", external_port=mapping.external_port)
        events = mapping.events()
        await trio.to_thread.run_sync(sys.stdin.readline)  # "release"
        began = trio.current_time()
        await mapping.release()
        detail = [event_detail(e) async for e in events]
        line(
            event="Released",
            detail=detail,
            took=trio.current_time() - began,
            pending=len(broker.undeleted()),
        )
        while broker.undeleted():  # noqa: ASYNC110 - a report for the test, not a wait on it
            await trio.sleep(0.2)
        line(event="Deleted")
        await trio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
