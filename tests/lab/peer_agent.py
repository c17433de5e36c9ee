"""A P2P-style app using ``Broker.peer``, run inside the lab's lan namespace.

    python peer_agent.py GATEWAY PORT REMOTE_ADDRESS REMOTE_PORT LIFETIME [send-first]

Binds a UDP socket on PORT, asks for a PCP PEER of PORT/udp to the remote
peer (``fallback=None``: PEER or nothing), prints one JSON line for the
binding and one per event. Each stdin line ``send TEXT`` sends TEXT from the
socket to the remote peer (and prints ``Sent``); stdin closing releases the
binding. With ``send-first`` one datagram ("first") goes to the remote peer
before the PEER is asked for, so the gateway already has the flow's binding
(RFC 6887 §12: PEER then extends it). The lab tests drive it from outside
the namespace.
"""

from __future__ import annotations

import json
import socket
import sys

import trio

import portbroker


def line(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


async def main(
    gateway: str, port: int, remote: tuple[str, int], lifetime: int, send_first: bool
) -> None:
    flow = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await flow.bind(("0.0.0.0", port))
    if send_first:
        await flow.sendto(b"first", remote)
    async with portbroker.open_broker(gateway, ("pcp",), probe_timeout=2.0) as broker:
        try:
            async with broker.open_peer(
                port, "udp", remote, lifetime=lifetime, fallback=None
            ) as mapping:
                assert mapping.lease is not None
                assert mapping.lease.nonce is not None
                line(
                    event="Peered",
                    method=mapping.method,
                    external_address=mapping.external_address,
                    external_port=mapping.external_port,
                    nonce=mapping.lease.nonce.hex(),
                )
                events = mapping.events()
                async with trio.open_nursery() as nursery:

                    async def report() -> None:
                        async for event in events:
                            lease = getattr(event, "lease", None)
                            line(
                                event=type(event).__name__,
                                detail=repr(event),
                                external_port=lease.external_port if lease else None,
                                nonce=lease.nonce.hex() if lease and lease.nonce else None,
                            )

                    nursery.start_soon(report)
                    while True:
                        command = await trio.to_thread.run_sync(sys.stdin.readline)
                        if not command:
                            break
                        if command.startswith("send "):
                            await flow.sendto(command[5:].strip().encode(), remote)
                            line(event="Sent")
                    nursery.cancel_scope.cancel()
            async for event in events:  # the Released event
                line(event=type(event).__name__, detail=repr(event))
        except portbroker.PortBrokerError as exc:
            line(event="Error", kind=type(exc).__name__, message=str(exc))
    flow.close()
    line(event="Done")


if __name__ == "__main__":
    trio.run(
        main,
        sys.argv[1],
        int(sys.argv[2]),
        (sys.argv[3], int(sys.argv[4])),
        int(sys.argv[5]),
        sys.argv[6:] == ["send-first"],
    )
