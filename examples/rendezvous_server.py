"""A tiny rendezvous server for examples/p2p_chat.py: peers leave their candidates, fetch another's.

    python examples/rendezvous_server.py --listen 0.0.0.0 --port 7000

It runs where both peers can reach it (the wan side: a public host, or the
lab's wan namespace) and only introduces them: the chat itself goes directly
between the peers, never through here. The protocol is JSON lines over TCP,
one request and one reply per line (docs/p2p.md):

    {"op": "register", "name": "alice", "candidates": [{...}, ...]}
    -> {"ok": true, "seen_from": "11.0.0.1:40112"}
    {"op": "fetch", "name": "bob", "wait": 20}
    -> {"ok": true, "name": "bob", "candidates": [...], "seen_from": "..."}
    -> {"ok": false, "error": "bob did not register within 20 s"}

``seen_from`` is the TCP source the server saw (the peer's NAT's address,
for information). Registrations last ``--ttl`` seconds; until then a name
belongs to the address that registered it (another address cannot replace
it). Bad requests get an ``{"ok": false, "error": ...}`` line; the
connection stays open. A client gets :data:`REQUEST_TIMEOUT` seconds for
each request line and for reading each reply,
at most :data:`MAX_CONNECTIONS` clients are served at once, and one address
holds at most :data:`MAX_NAMES_PER_ADDRESS` names: the server
is on the wan side, open to anyone, and must stay up and bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import Any

import trio

MAX_LINE = 64 * 1024  # bytes; a candidate list is a few hundred
MAX_PEERS = 1000
# Names one address may hold at once: one client must not fill the directory.
MAX_NAMES_PER_ADDRESS = 16
MAX_CANDIDATES = 32
MAX_WAIT = 120.0
# A silent or trickling client (slowloris) would hold its socket forever:
# each request line must arrive, and each reply be taken, within this.
REQUEST_TIMEOUT = 30.0
MAX_CONNECTIONS = 256  # well under the usual 1024 descriptors


class Directory:
    """The registered peers: name -> (candidates, seen_from, registered at)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.peers: dict[str, tuple[list[dict[str, Any]], str, float]] = {}
        self.changed = trio.Event()
        self.connections = 0

    def _expire(self) -> None:
        now = trio.current_time()
        for name, (_c, _s, at) in list(self.peers.items()):
            if now - at > self.ttl:
                del self.peers[name]

    def register(self, name: str, candidates: list[dict[str, Any]], seen_from: str) -> None:
        self._expire()
        if name not in self.peers and len(self.peers) >= MAX_PEERS:
            raise ValueError(f"the directory is full ({MAX_PEERS} peers)")
        mine = sum(1 for _c, s, _a in self.peers.values() if _host(s) == _host(seen_from))
        if name not in self.peers and mine >= MAX_NAMES_PER_ADDRESS:
            raise ValueError(
                f"this address holds {MAX_NAMES_PER_ADDRESS} names already; they expire"
                f" {self.ttl:g} s after their last registration"
            )
        held = self.peers.get(name)
        if held is not None and _host(held[1]) != _host(seen_from):
            # Someone else's name: replacing it would send its peer to us.
            left = self.ttl - (trio.current_time() - held[2])
            raise ValueError(
                f"{name} is registered from another address; pick another name"
                f" or wait {math.ceil(left)} s"
            )
        self.peers[name] = (candidates, seen_from, trio.current_time())
        self.changed.set()
        self.changed = trio.Event()

    async def fetch(self, name: str, wait: float) -> dict[str, Any]:
        with trio.move_on_after(wait):
            while True:
                self._expire()
                if name in self.peers:
                    candidates, seen_from, _at = self.peers[name]
                    return {
                        "ok": True,
                        "name": name,
                        "candidates": candidates,
                        "seen_from": seen_from,
                    }
                await self.changed.wait()
        return {"ok": False, "error": f"{name} did not register within {wait:g} s"}


def _host(seen_from: str) -> str:
    return seen_from.rsplit(":", 1)[0]


def _name(request: dict[str, Any]) -> str:
    name = request.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValueError("name must be a printable string of 1 to 64 characters")
    return name


async def answer(directory: Directory, request: Any, seen_from: str) -> dict[str, Any]:
    """One reply to one decoded request line."""
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    op = request.get("op")
    if op == "register":
        candidates = request.get("candidates")
        if (
            not isinstance(candidates, list)
            or len(candidates) > MAX_CANDIDATES
            or not all(isinstance(c, dict) for c in candidates)
        ):
            raise ValueError(f"candidates must be a list of at most {MAX_CANDIDATES} objects")
        directory.register(_name(request), candidates, seen_from)
        return {"ok": True, "seen_from": seen_from}
    if op == "fetch":
        wait = request.get("wait", 0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not wait >= 0:
            raise ValueError("wait must be a number of seconds >= 0")
        # Compared before float(): a JSON integer like 10**400 has no float.
        return await directory.fetch(_name(request), MAX_WAIT if wait > MAX_WAIT else float(wait))
    raise ValueError(f"op must be 'register' or 'fetch', got {op!r}")


async def serve_client(directory: Directory, stream: trio.SocketStream) -> None:
    async with stream:
        if directory.connections >= MAX_CONNECTIONS:
            with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
                await _send(stream, {"ok": False, "error": "too many clients; try again later"})
            return
        directory.connections += 1
        try:
            await _converse(directory, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
            # Gone, reset, or not reading its replies: that client only. (An
            # exception out of here would end trio.serve_listeners: the server.)
            return
        finally:
            directory.connections -= 1


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _converse(directory: Directory, stream: trio.SocketStream) -> None:
    # getpeername() raises (ENOTCONN) when the client reset before we got here.
    peer = stream.socket.getpeername()
    seen_from = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
    buffer = b""
    while True:
        # A whole request within REQUEST_TIMEOUT, however slowly it trickles.
        with trio.move_on_after(REQUEST_TIMEOUT) as idle:
            while b"\n" not in buffer and len(buffer) <= MAX_LINE:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
        if idle.cancelled_caught:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _send(stream, {"ok": False, "error": "no request line in time"})
            return
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                reply = await answer(directory, json.loads(line), seen_from)
                # Encoded here: a registration nested nearly as deep as json
                # can parse may be one level too deep to encode inside a reply.
                data = json.dumps(reply).encode() + b"\n"
            except (ValueError, RecursionError, OverflowError) as exc:
                data = json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n"
            with trio.fail_after(REQUEST_TIMEOUT):  # a client that reads no replies
                await stream.send_all(data)
        if len(buffer) > MAX_LINE:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _send(stream, {"ok": False, "error": "line too long"})
            return


async def serve(host: str, port: int, ttl: float) -> None:
    directory = Directory(ttl)

    async def handler(stream: trio.SocketStream) -> None:
        await serve_client(directory, stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    # One line on stdout once listening: a script (or a test) waits for it.
    print(f"rendezvous listening on {bound[0]}:{bound[1]}", flush=True)
    await trio.serve_listeners(handler, listeners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A rendezvous for examples/p2p_chat.py: peers register their candidates"
        " and fetch each other's (JSON lines over TCP).",
    )
    parser.add_argument("--listen", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("--port", type=int, default=7000, help="TCP port (7000; 0 picks one)")
    parser.add_argument(
        "--ttl", type=float, default=600.0, help="seconds a registration lasts (600)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if not (args.ttl > 0 and math.isfinite(args.ttl)):
        parser.error(f"--ttl must be a positive number of seconds, got {args.ttl}")
    try:
        trio.run(serve, args.listen, args.port, args.ttl)
    except OSError as exc:
        print(
            f"rendezvous_server: cannot listen on {args.listen}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
