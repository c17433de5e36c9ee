"""Two apps sharing the portbroker daemon: run `portbroker daemon` first.

    python examples/two_apps.py

The first app is a trio program, the second a blocking one; both ask for
8080/tcp, and the daemon makes one gateway mapping that both hold.
"""

from __future__ import annotations

import trio

from portbroker.client import BlockingClient, open_client


def blocking_app() -> None:
    with BlockingClient() as client:
        shared = client.map(8080, "tcp")
        print(f"blocking app: the same mapping, now with {shared['holders']} holders")
        client.unmap(8080, "tcp")


async def trio_app() -> None:
    async with open_client() as client:
        mapping = await client.map(8080, "tcp")
        print(f"trio app: reachable at {mapping['external_address']}:{mapping['external_port']}")
        # The blocking app is another program in real life; here, a thread.
        await trio.to_thread.run_sync(blocking_app)
        await client.unmap(8080, "tcp")


if __name__ == "__main__":
    trio.run(trio_app)
