"""Two peers behind two NATs chat directly over their mapped UDP ports (docs/p2p.md).

    python examples/rendezvous_server.py --port 7000            # on a host both can reach
    python examples/p2p_chat.py --name alice --peer bob \\
        --rendezvous 11.0.0.3:7000 --gateway 192.168.1.1         # on alice's lan
    python examples/p2p_chat.py --name bob --peer alice \\
        --rendezvous 11.0.0.3:7000 --gateway 192.168.2.1         # on bob's lan

Each peer maps its UDP port through portbroker (PCP, NAT-PMP or UPnP: the
chat does not care which), gathers its candidates (``portbroker.p2p``),
registers them with the rendezvous, fetches the other peer's, and checks them
in priority order: a ``hello`` to each, paced, repeated until one answers
(a minimal connectivity check in the spirit of RFC 8445 §7.2); the first
candidate that answers carries the chat. Lines typed on stdin go to the peer;
the peer's lines are printed with the address they came from.

Non-interactive (tests): ``--say TEXT --expect TEXT`` sends TEXT, waits for
the peer's TEXT and for the peer's acknowledgement of ours, prints one JSON
summary line and exits 0 (1 on failure). ``--json`` prints every step as a
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import secrets
import socket
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import trio

import portbroker
import portbroker.p2p
from portbroker.types import METHOD_NAMES

PACE = 0.05  # s between two hellos of one round (RFC 8445 §14.2: Ta = 50 ms)
ROUND = 0.5  # s between rounds over the whole list
LINGER = 2.0  # s to keep answering after done: the peer may not have our ack yet
# What a rendezvous may send us: it is not trusted (it may lie, or be someone
# else's). One reply line is at most this long (the server's own limit on a
# request is 64 KiB, and a fetch reply is one registration plus a few fields),
# and at most this many of the peer's candidates are tried (the server keeps
# 32 per peer), so a lying rendezvous can neither fill our memory nor turn the
# checks into a flood of hellos toward addresses of its choosing.
MAX_REPLY = 256 * 1024
MAX_REMOTES = 32


class ChatError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


@attrs.frozen
class Remote:
    """One of the peer's candidates, as the rendezvous gave it."""

    address: str
    port: int
    priority: int
    kind: str

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.address, self.port)


def parse_candidates(items: Any, family: int) -> list[Remote]:
    """The peer's candidates that this socket can try, highest priority first."""
    out: list[Remote] = []
    if not isinstance(items, list):
        raise ChatError("the rendezvous sent no candidate list")
    for item in items:
        if not isinstance(item, dict):
            continue
        try:
            address = ipaddress.ip_address(item["address"])
            port = int(item["port"])
            priority = int(item.get("priority", 0))
        except (KeyError, TypeError, ValueError, OverflowError):
            # A peer's junk is skipped, not trusted (OverflowError: JSON's 1e400 is inf).
            continue
        if not 1 <= port <= 65535 or address.is_unspecified or address.is_multicast:
            continue
        if address.is_loopback or address.is_link_local:
            # No peer offers these (RFC 8445 §5.1.1.1 leaves loopback out, and a
            # link-local one needs a zone JSON does not carry): only a lying
            # rendezvous would, to aim our hellos at this host's own services.
            continue
        if item.get("protocol", "udp") != "udp" or address.version != (
            6 if family == socket.AF_INET6 else 4
        ):
            continue
        out.append(Remote(str(address), port, priority, str(item.get("kind", "?"))))
    out.sort(key=lambda r: -r.priority)
    return out[:MAX_REMOTES]


def offered(candidates: tuple[portbroker.p2p.Candidate, ...]) -> list[portbroker.p2p.Candidate]:
    """The candidates to register: at most MAX_REMOTES, the mapped ones always among them.

    The rendezvous keeps 32 per peer (and the peer checks no more). A host
    with many addresses (container bridges, VPNs) has more host candidates
    than that, and host candidates outrank server-reflexive ones (RFC 8445
    §5.1.2.2), so the first 32 would leave out the mapping: the one
    candidate a peer behind another NAT can reach (or, for a pinhole, the host
    candidate that carries the mapping's method).
    """
    mapped = [c for c in candidates if c.method is not None]
    hosts = [c for c in candidates if c.method is None]
    kept = mapped[:MAX_REMOTES] + hosts[: max(0, MAX_REMOTES - len(mapped))]
    return sorted(kept, key=lambda c: -c.priority)


def endpoint(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ChatError naming *what*."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
        ipaddress.ip_address(host)
    except ValueError:
        raise ChatError(f"{what} must be ADDRESS:PORT (e.g. 11.0.0.3:7000), got {text!r}") from None
    if not sep or not 1 <= number <= 65535:
        raise ChatError(f"{what} must be ADDRESS:PORT with a port 1..65535, got {text!r}")
    return host, number


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def say(self, event: str, line: str, /, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps({"event": event, **fields}), flush=True)
        else:
            print(line, flush=True)


class Rendezvous:
    """A JSON-lines conversation with examples/rendezvous_server.py."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.stream.send_all(json.dumps(request).encode() + b"\n")
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REPLY:
                raise ChatError(f"the rendezvous sent a line longer than {MAX_REPLY} bytes")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ChatError("the rendezvous closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
            raise ChatError(
                f"the rendezvous answered something else than JSON: {line[:80]!r}"
            ) from None
        if not isinstance(reply, dict):
            raise ChatError("the rendezvous answered something else than a JSON object")
        if not reply.get("ok"):
            raise ChatError(f"the rendezvous said: {reply.get('error', 'no reason given')}")
        return reply


class Peer:
    """The UDP side: connectivity checks, then chat lines with acknowledgements."""

    def __init__(self, sock: trio.socket.SocketType, name: str, peer: str, out: Output) -> None:
        self.sock = sock
        self.name = name
        self.peer = peer
        self.out = out
        self.nonce = secrets.token_hex(8)
        self.selected: tuple[str, int] | None = None
        self.connected = trio.Event()
        self.heard: list[tuple[str, tuple[str, int]]] = []  # (text, source)
        self.heard_event = trio.Event()
        self.acked: set[int] = set()
        self.ack_event = trio.Event()
        self.hellos_from: set[tuple[str, int]] = set()
        self.seen_seqs: set[Any] = set()  # the peer's lines already printed (retransmissions)

    async def send(self, to: tuple[str, int], message: dict[str, Any]) -> None:
        data = json.dumps({"from": self.name, "to": self.peer, **message}).encode()
        with contextlib.suppress(OSError):  # unreachable candidates are the norm here
            await self.sock.sendto(data, to)

    async def receive(self) -> None:
        """Answer hellos, take acks and chat lines: the one reader of the socket."""
        while True:
            try:
                data, source = await self.sock.recvfrom(65536)
            except OSError:
                continue  # ICMP errors of candidates that did not work
            source = (source[0], source[1])
            try:
                message = json.loads(data)
            except ValueError:
                continue
            # Only the peer talking to us: our own hellos (a host candidate
            # that is our own address) and strangers are ignored.
            if (
                not isinstance(message, dict)
                or message.get("from") != self.peer
                or message.get("to") != self.name
            ):
                continue
            kind = message.get("type")
            if kind == "hello":
                self.hellos_from.add(source)
                await self.send(source, {"type": "hello-ack", "nonce": message.get("nonce")})
            elif kind == "hello-ack" and message.get("nonce") == self.nonce:
                if self.selected is None:
                    self.selected = source
                    self.connected.set()
            elif (
                kind == "chat"
                and isinstance(message.get("text"), str)
                and isinstance(message.get("seq"), int)
            ):
                seq = message.get("seq")
                await self.send(source, {"type": "chat-ack", "seq": seq})
                if seq not in self.seen_seqs:
                    self.seen_seqs.add(seq)
                    self.heard.append((message["text"], source))
                    # A peer's text is not trusted with the terminal (escape sequences).
                    shown = "".join(ch if ch.isprintable() else "\ufffd" for ch in message["text"])
                    self.out.say(
                        "chat",
                        f"{self.peer}: {shown}  (from {source[0]}:{source[1]})",
                        text=message["text"],
                        source=f"{source[0]}:{source[1]}",
                    )
                    self.heard_event.set()
                    self.heard_event = trio.Event()
            elif kind == "chat-ack" and isinstance(message.get("seq"), int):
                self.acked.add(message["seq"])
                self.ack_event.set()
                self.ack_event = trio.Event()

    async def check(self, remotes: list[Remote]) -> None:
        """Hello to each remote, highest priority first, round after round, until one answers."""
        while not self.connected.is_set():
            for remote in remotes:
                if self.connected.is_set():
                    return
                await self.send(remote.endpoint, {"type": "hello", "nonce": self.nonce})
                await trio.sleep(PACE)
            await trio.sleep(ROUND)

    async def chat(self, seq: int, text: str) -> None:
        """Send one line until the peer acknowledges it."""
        assert self.selected is not None
        while seq not in self.acked:
            await self.send(self.selected, {"type": "chat", "seq": seq, "text": text})
            with trio.move_on_after(ROUND):
                await self.ack_event.wait()


@contextlib.contextmanager
def failing(what: str) -> Iterator[None]:
    """Turn the errors a user can cause into one line naming *what* was being done."""
    try:
        yield
    except portbroker.PortBrokerError as exc:
        raise ChatError(f"{what}: {exc}") from None
    except OSError as exc:
        raise ChatError(f"{what}: {exc.strerror or exc}") from None


def describe(candidate: portbroker.p2p.Candidate) -> str:
    via = f" via {candidate.method}" if candidate.method else ""
    reach = "public" if candidate.public else "not public"
    return (
        f"{candidate.kind.value} {candidate.address}:{candidate.port}{via} ({reach},"
        f" priority {candidate.priority})"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Output(args.json)
    rendezvous = endpoint(args.rendezvous, "--rendezvous")
    family = socket.AF_INET6 if ":" in rendezvous[0] else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(sock)
        with failing(f"cannot bind UDP port {args.port}"):
            await sock.bind((wildcard, args.port))
        with failing("the gateway"):
            broker = await stack.enter_async_context(
                portbroker.open_broker(
                    None if args.gateway == "auto" else args.gateway,
                    tuple(args.methods.split(",")),
                    probe_timeout=args.probe_timeout,
                    port=args.pcp_port,
                    upnp_port=args.upnp_port,
                    ssdp_multicast=False,
                    announce_port=args.announce_port or None,
                )
            )
        # Without host candidates the enumeration seam sees no address at all.
        addresses: portbroker.p2p.AddressSource = (
            portbroker.p2p.interface_addresses if args.host_candidates else list
        )
        with failing("gathering candidates"):
            gatherer = await stack.enter_async_context(
                portbroker.p2p.open_candidates(
                    broker,
                    sock.getsockname()[1],
                    "udp",
                    require_mapping=args.require_mapping,
                    bound_address=wildcard,
                    addresses=addresses,
                )
            )
        return await _chat(args, out, sock, gatherer, rendezvous)
    raise AssertionError("unreachable")  # mypy: AsyncExitStack may swallow exceptions


async def _chat(
    args: argparse.Namespace,
    out: Output,
    sock: trio.socket.SocketType,
    gatherer: portbroker.p2p.CandidateGatherer,
    rendezvous: tuple[str, int],
) -> dict[str, Any]:
    candidates = offered(gatherer.candidates())
    if gatherer.mapping_error is not None:
        out.say(
            "no-mapping",
            f"no mapping ({gatherer.mapping_error}); offering host candidates only",
            error=str(gatherer.mapping_error),
        )
    if not candidates:
        raise ChatError(
            "no candidate to offer: no mapping and no usable host address"
            + (f" ({gatherer.mapping_error})" if gatherer.mapping_error else "")
        )
    out.say(
        "candidates",
        "candidates:\n  " + "\n  ".join(describe(c) for c in candidates),
        candidates=[c.to_json() for c in candidates],
    )
    with failing(f"cannot reach the rendezvous at {rendezvous[0]}:{rendezvous[1]}"):
        with trio.fail_after(args.timeout):
            stream = await trio.open_tcp_stream(*rendezvous)
    async with stream:
        directory = Rendezvous(stream)
        # The fetch waits up to --timeout at the server; its answer gets a little more.
        with failing("the rendezvous"), trio.move_on_after(args.timeout + 5) as scope:
            await directory.ask(
                {
                    "op": "register",
                    "name": args.name,
                    "candidates": [c.to_json() for c in candidates],
                }
            )
            out.say("registered", f"registered as {args.name}", name=args.name)
            reply = await directory.ask({"op": "fetch", "name": args.peer, "wait": args.timeout})
        if scope.cancelled_caught:
            raise ChatError(f"the rendezvous at {rendezvous[0]}:{rendezvous[1]} did not answer")
    remotes = parse_candidates(reply.get("candidates"), sock.family)
    if not remotes:
        raise ChatError(f"{args.peer} registered no candidate this socket can try")
    out.say(
        "peer-candidates",
        f"{args.peer}'s candidates: "
        + ", ".join(f"{r.kind} {r.address}:{r.port}" for r in remotes),
        candidates=[attrs.asdict(r) for r in remotes],
    )
    peer = Peer(sock, args.name, args.peer, out)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.receive)
        with trio.move_on_after(args.timeout):
            nursery.start_soon(peer.check, remotes)
            await peer.connected.wait()
        if peer.selected is None:
            raise ChatError(
                f"none of {args.peer}'s {len(remotes)} candidates answered within"
                f" {args.timeout:g} s (tried "
                + ", ".join(f"{r.address}:{r.port}" for r in remotes)
                + ")"
            )
        chosen = next((r for r in remotes if r.endpoint == peer.selected), None)
        kind = chosen.kind if chosen else "peer-reflexive"
        out.say(
            "connected",
            f"connected to {args.peer} at {peer.selected[0]}:{peer.selected[1]} ({kind})",
            address=peer.selected[0],
            port=peer.selected[1],
            kind=kind,
        )
        if args.say is not None:
            result = await _scripted(args, peer)
        else:
            await _interactive(peer)
            result = {"result": "ok"}
        result.update(
            selected=f"{peer.selected[0]}:{peer.selected[1]}",
            selected_kind=kind,
            local_candidates=[c.to_json() for c in gatherer.candidates()],
        )
        # Keep answering a while: our ack of the peer's line may have been lost.
        await trio.sleep(LINGER)
        nursery.cancel_scope.cancel()
    return result


async def _scripted(args: argparse.Namespace, peer: Peer) -> dict[str, Any]:
    with trio.move_on_after(args.timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.chat, 1, args.say)
            while args.expect is not None and not any(t == args.expect for t, _s in peer.heard):
                await peer.heard_event.wait()
    if 1 not in peer.acked:
        raise ChatError(f"{args.peer} never acknowledged our line within {args.timeout:g} s")
    got = [(t, s) for t, s in peer.heard if t == args.expect]
    if args.expect is not None and not got:
        heard = ", ".join(repr(t) for t, _s in peer.heard) or "nothing"
        raise ChatError(
            f"expected {args.expect!r} from {args.peer} within {args.timeout:g} s; heard {heard}"
        )
    return {
        "result": "ok",
        "said": args.say,
        "heard": [t for t, _s in peer.heard],
        "heard_from": sorted({f"{s[0]}:{s[1]}" for _t, s in peer.heard}),
        "hellos_from": sorted(f"{s[0]}:{s[1]}" for s in peer.hellos_from),
    }


async def _interactive(peer: Peer) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    seq = 0
    while True:
        chunk = await stdin.receive_some(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            text = line.decode(errors="replace").rstrip("\r")
            if text:
                seq += 1
                with trio.move_on_after(10) as scope:
                    await peer.chat(seq, text)
                if scope.cancelled_caught:
                    print(f"p2p_chat: {peer.peer} did not acknowledge {text!r}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chat directly with a peer behind another NAT: map the UDP port with"
        " portbroker, swap candidates through examples/rendezvous_server.py, check them"
        " in priority order, then talk (docs/p2p.md).",
    )
    parser.add_argument("--name", required=True, help="this peer's name at the rendezvous")
    parser.add_argument("--peer", required=True, help="the other peer's name")
    parser.add_argument("--rendezvous", required=True, help="the rendezvous, ADDRESS:PORT")
    parser.add_argument(
        "--gateway",
        required=True,
        help="the NAT gateway's address; 'auto' finds it from the default route",
    )
    parser.add_argument("--port", type=int, default=0, help="local UDP port (0: any)")
    parser.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help="mapping methods, most preferred first"
    )
    parser.add_argument("--pcp-port", type=int, default=5351, help="the gateway's PCP/NAT-PMP port")
    parser.add_argument("--upnp-port", type=int, default=1900, help="the gateway's SSDP port")
    parser.add_argument(
        "--announce-port",
        type=int,
        default=5350,
        help="where to hear the gateway's announcements (0: do not listen)",
    )
    parser.add_argument("--probe-timeout", type=float, default=2.0, help="seconds per probe")
    parser.add_argument(
        "--no-host-candidates",
        dest="host_candidates",
        action="store_false",
        help="offer only the mapped endpoint, not this host's own addresses",
    )
    parser.add_argument(
        "--require-mapping", action="store_true", help="fail if the port cannot be mapped"
    )
    parser.add_argument("--say", help="non-interactive: send this line")
    parser.add_argument("--expect", help="non-interactive: wait for this line from the peer")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds for each step (20)")
    parser.add_argument("--json", action="store_true", help="every step as a JSON line")
    args = parser.parse_args(argv)
    if args.name == args.peer:
        parser.error("--name and --peer must differ")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.expect is not None and args.say is None:
        parser.error("--expect needs --say (the non-interactive mode)")
    unknown = [m for m in args.methods.split(",") if m not in METHOD_NAMES]
    if unknown:
        parser.error(f"--methods must be some of {', '.join(METHOD_NAMES)}; got {args.methods!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = trio.run(run, args)
    except ChatError as exc:
        print(f"p2p_chat: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed --gateway, say
        print(f"p2p_chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
