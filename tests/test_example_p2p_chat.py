"""examples/p2p_chat.py and examples/rendezvous_server.py on this host, with two FakeGateways.

The FakeGateways serve on 127.0.0.1 and grant this host's own (non-loopback)
IPv4 address as the external one, so the server-reflexive candidates lead
back to the peers' sockets without a datagram leaving the machine; the peers
offer no host candidates (``--no-host-candidates``). The lab test over two
real NATs is tests/lab/test_lab_p2p_chat.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing

from portbroker.p2p import host_addresses, interface_addresses
from portbroker.testing.fake_gateway import FakeGateway
from tests.scripts import load_script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHAT = str(EXAMPLES / "p2p_chat.py")


def load(name: str) -> ModuleType:
    return load_script(EXAMPLES / f"{name}.py", name)


rendezvous_server = load("rendezvous_server")


def own_ipv4() -> str:
    for host in host_addresses(interface_addresses()):
        if host.address.version == 4:
            return str(host.address)
    pytest.skip("this host has no non-loopback IPv4 address to stand for an external one")


async def start_rendezvous(nursery: trio.Nursery) -> str:
    directory = rendezvous_server.Directory(600.0)

    async def handler(stream: trio.SocketStream) -> None:
        await rendezvous_server.serve_client(directory, stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def chat_argv(
    name: str, peer: str, rendezvous: str, gateway: FakeGateway, *extra: str
) -> list[str]:
    return [
        sys.executable,
        CHAT,
        "--name",
        name,
        "--peer",
        peer,
        "--rendezvous",
        rendezvous,
        "--gateway",
        "127.0.0.1",
        "--pcp-port",
        str(gateway.port),
        "--methods",
        "pcp,natpmp",
        "--announce-port",
        "0",
        "--no-host-candidates",
        # How long a peer waits for the other to register: the two start
        # side by side, and on a loaded CI machine one peer's interpreter and
        # imports took over 15 s (seen); the chat itself is what is tested.
        "--timeout",
        "60",
        *extra,
    ]


async def run_chat(argv: list[str], results: dict[str, Any], key: str) -> None:
    results[key] = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False
    )


async def test_two_peers_behind_two_gateways_chat_over_their_mapped_endpoints() -> None:
    external = own_ipv4()
    gateways = [FakeGateway(port=0, external_address=external) for _ in range(2)]
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for gateway in gateways:
            await nursery.start(gateway.serve_udp)
        rendezvous = await start_rendezvous(nursery)
        async with trio.open_nursery() as peers:
            peers.start_soon(
                run_chat,
                chat_argv(
                    "alice",
                    "bob",
                    rendezvous,
                    gateways[0],
                    "--say",
                    "hi bob",
                    "--expect",
                    "hi alice",
                ),
                results,
                "alice",
            )
            peers.start_soon(
                run_chat,
                chat_argv(
                    "bob",
                    "alice",
                    rendezvous,
                    gateways[1],
                    "--say",
                    "hi alice",
                    "--expect",
                    "hi bob",
                    "--json",
                ),
                results,
                "bob",
            )
        nursery.cancel_scope.cancel()
    summaries = {}
    for name in ("alice", "bob"):
        done: subprocess.CompletedProcess[bytes] = results[name]
        if done.returncode != 0:
            # Whole, not as an assertion's repr (which pytest cuts in the
            # middle): a run once failed with "port closed (ICMP port
            # unreachable)" from a port this test's fakes should have held.
            pytest.fail(
                f"{name} exited with {done.returncode}; the gateways' ports"
                f" {[g.port for g in gateways]}, the rendezvous {rendezvous}\n"
                f"stdout:\n{done.stdout.decode(errors='replace')}\n"
                f"stderr:\n{done.stderr.decode(errors='replace')}"
            )
        summaries[name] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    alice, bob = summaries["alice"], summaries["bob"]
    assert alice["heard"] == ["hi alice"]
    assert bob["heard"] == ["hi bob"]
    # Each heard the other from the other's mapped endpoint (its only candidate).
    (alice_mapped,) = alice["local_candidates"]
    (bob_mapped,) = bob["local_candidates"]
    assert alice_mapped["kind"] == "server-reflexive"
    assert alice_mapped["method"] == "pcp"
    assert alice["heard_from"] == [f"{external}:{bob_mapped['port']}"]
    assert bob["heard_from"] == [f"{external}:{alice_mapped['port']}"]
    assert alice["selected_kind"] == bob["selected_kind"] == "server-reflexive"
    # --json: every step a JSON line, the summary last.
    events = [
        json.loads(line)["event"] for line in results["bob"].stdout.decode().splitlines()[:-1]
    ]
    # (the peer's line may come before our own check's answer: the peer got its answer first)
    assert events[:3] == ["candidates", "registered", "peer-candidates"]
    assert sorted(events[3:]) == ["chat", "connected"]
    # Both released their mappings on the way out.
    assert all(gateway.mappings == {} for gateway in gateways)
    assert all(len(gateway.requests) >= 2 for gateway in gateways)


async def test_a_peer_that_never_registers_is_a_clear_error() -> None:
    external = own_ipv4()
    gateway = FakeGateway(port=0, external_address=external)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve_udp)
        rendezvous = await start_rendezvous(nursery)
        argv = chat_argv("alice", "bob", rendezvous, gateway, "--say", "x")
        argv[argv.index("--timeout") + 1] = "1"
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    assert done.returncode == 1
    assert (
        done.stderr.decode().strip()
        == "p2p_chat: the rendezvous said: bob did not register within 1 s"
    )
    assert gateway.mappings == {}


async def test_an_unreachable_rendezvous_is_a_clear_error() -> None:
    gateway = FakeGateway(port=0, external_address=own_ipv4())
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nobody listens there
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve_udp)
            argv = chat_argv("alice", "bob", f"127.0.0.1:{port}", gateway)
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
            nursery.cancel_scope.cancel()
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.startswith(f"p2p_chat: cannot reach the rendezvous at 127.0.0.1:{port}:")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--rendezvous", "nowhere", "--gateway", "127.0.0.1"],
            "--rendezvous must be ADDRESS:PORT",
        ),
        (
            ["--rendezvous", "127.0.0.1:7000", "--gateway", "not-an-ip"],
            "gateway: 'not-an-ip' is not an IP address",
        ),
        (
            ["--rendezvous", "127.0.0.1:7000", "--gateway", "127.0.0.1", "--methods", "stun"],
            "--methods must be some of",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, CHAT, "--name", "a", "--peer", "b", "--announce-port", "0", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode in (1, 2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", ["p2p_chat.py", "rendezvous_server.py"])
def test_examples_have_help(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "usage:" in done.stdout
    assert "rendezvous" in done.stdout


# -- the rendezvous protocol, in process -------------------------------------------------


async def converse(address: str, lines: list[Any]) -> list[dict[str, Any]]:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    replies: list[dict[str, Any]] = []
    async with stream:
        buffer = b""
        for line in lines:
            data = line if isinstance(line, bytes) else json.dumps(line).encode()
            await stream.send_all(data + b"\n")
            while b"\n" not in buffer:
                buffer += await stream.receive_some(65536)
            reply, buffer = buffer.split(b"\n", 1)
            replies.append(json.loads(reply))
    return replies


async def test_rendezvous_fetch_waits_for_the_registration() -> None:
    candidates = [{"kind": "host", "address": "192.0.2.1", "port": 4000, "priority": 1}]
    async with trio.open_nursery() as nursery:
        address = await start_rendezvous(nursery)
        fetched: list[dict[str, Any]] = []
        done = trio.Event()

        async def fetch() -> None:
            fetched.extend(await converse(address, [{"op": "fetch", "name": "bob", "wait": 30}]))
            done.set()

        nursery.start_soon(fetch)
        await trio.sleep(0.2)
        assert fetched == []
        (registered,) = await converse(
            address, [{"op": "register", "name": "bob", "candidates": candidates}]
        )
        assert registered["ok"] is True
        assert registered["seen_from"].startswith("127.0.0.1:")
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert fetched[0]["candidates"] == candidates
    assert fetched[0]["name"] == "bob"


async def test_rendezvous_answers_bad_requests_and_keeps_the_connection() -> None:
    async with trio.open_nursery() as nursery:
        address = await start_rendezvous(nursery)
        replies = await converse(
            address,
            [
                b"not json",
                [1, 2],
                {"op": "dance"},
                {"op": "register", "name": "", "candidates": []},
                {"op": "register", "name": "a", "candidates": "many"},
                {"op": "fetch", "name": "a", "wait": -1},
                b"[" * 60000,  # nesting deeper than json can parse
                {"op": "fetch", "name": "nobody", "wait": 0},
            ],
        )
        nursery.cancel_scope.cancel()
    assert [r["ok"] for r in replies[:-1]] == [False] * 7
    assert "op must be" in replies[2]["error"]
    assert "name must be" in replies[3]["error"]
    assert "candidates must be" in replies[4]["error"]
    assert "wait must be" in replies[5]["error"]
    assert replies[-1] == {"ok": False, "error": "nobody did not register within 0 s"}


async def test_interactive_lines_go_to_the_peer_and_the_peers_lines_are_printed() -> None:
    external = own_ipv4()
    gateways = [FakeGateway(port=0, external_address=external) for _ in range(2)]
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for gateway in gateways:
            await nursery.start(gateway.serve_udp)
        rendezvous = await start_rendezvous(nursery)
        alice = await trio.lowlevel.open_process(
            chat_argv("alice", "bob", rendezvous, gateways[0]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert alice.stdin is not None
        assert alice.stdout is not None
        try:
            async with trio.open_nursery() as peers:
                argv = chat_argv(
                    "bob", "alice", rendezvous, gateways[1], "--say", "hi", "--expect", "typed"
                )
                peers.start_soon(run_chat, argv, results, "bob")
                await alice.stdin.send_all(b"typed\n")
                printed = b""
                with trio.fail_after(30):
                    while b"bob: hi  (from " not in printed:
                        chunk = await alice.stdout.receive_some(4096)
                        assert chunk, printed
                        printed += chunk
                await alice.stdin.aclose()  # end of input: alice says goodbye
                with trio.fail_after(30):
                    await alice.wait()
        finally:
            if alice.returncode is None:
                alice.kill()
            await alice.wait()
        nursery.cancel_scope.cancel()
    assert alice.returncode == 0
    assert results["bob"].returncode == 0, results["bob"].stderr
    assert json.loads(results["bob"].stdout.decode().splitlines()[-1])["heard"] == ["typed"]
    assert all(gateway.mappings == {} for gateway in gateways)


# -- a rendezvous that lies ---------------------------------------------------------------

p2p_chat = load("p2p_chat")


async def test_a_reply_too_deep_to_parse_is_a_chat_error_not_a_traceback() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    directory = p2p_chat.Rendezvous(ours)
    await theirs.send_all(b'{"ok": true, "candidates": ' + b"[" * 100_000 + b"\n")
    with pytest.raises(p2p_chat.ChatError, match="something else than JSON"):
        await directory.ask({"op": "fetch", "name": "bob"})


async def test_a_reply_line_that_never_ends_is_refused_before_it_fills_memory() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    directory = p2p_chat.Rendezvous(ours)
    sent = 0

    async def answer() -> None:
        nonlocal sent
        while sent < 16 * p2p_chat.MAX_REPLY:  # and then silence, never a newline
            await theirs.send_all(b"x" * 65536)
            sent += 65536
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with trio.fail_after(10), pytest.raises(p2p_chat.ChatError, match="longer than"):
            await directory.ask({"op": "fetch", "name": "bob"})
        nursery.cancel_scope.cancel()
    assert len(directory.buffer) <= p2p_chat.MAX_REPLY + 65536


def test_lying_candidates_are_skipped_and_capped() -> None:
    items = json.loads(
        '[{"address": "192.168.2.7", "port": 1e400},'
        ' {"address": "192.168.2.7", "port": 4000, "priority": -1e400}]'
    )
    assert p2p_chat.parse_candidates(items, socket.AF_INET) == []
    # Never this host's own services, nor a link-local address without its zone.
    for address in ("127.0.0.1", "::1", "169.254.1.1", "fe80::1"):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        assert p2p_chat.parse_candidates([{"address": address, "port": 4000}], family) == []
    many = [{"address": "192.168.2.7", "port": 1000 + i, "priority": i} for i in range(5000)]
    remotes = p2p_chat.parse_candidates(many, socket.AF_INET)
    assert len(remotes) == p2p_chat.MAX_REMOTES
    assert remotes[0].port == 1000 + 4999  # the highest priorities are the ones kept


# -- a rendezvous against hostile clients ------------------------------------------------


async def test_one_hostile_line_does_not_stop_the_rendezvous(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        address = await start_rendezvous(nursery)
        # An integer wait too large for a float (json has no limit on integers).
        (huge,) = await converse(
            address, [b'{"op": "fetch", "name": "a", "wait": 1' + b"0" * 400 + b"}"]
        )
        (registered,) = await converse(address, [{"op": "register", "name": "a", "candidates": []}])
        nursery.cancel_scope.cancel()
    assert huge == {"ok": False, "error": "a did not register within 120 s"}
    assert registered["ok"] is True


async def test_a_client_that_trickles_or_says_nothing_is_dropped(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        address = await start_rendezvous(nursery)
        host, port = address.rsplit(":", 1)
        for opening in (b"", b'{"op": "fet'):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(opening)
                received = b""
                with trio.fail_after(10 * rendezvous_server.REQUEST_TIMEOUT):
                    while chunk := await stream.receive_some(4096):
                        received += chunk
            assert json.loads(received) == {"ok": False, "error": "no request line in time"}
        nursery.cancel_scope.cancel()


async def test_clients_beyond_the_limit_are_told_to_come_back() -> None:
    directory = rendezvous_server.Directory(600.0)
    directory.connections = rendezvous_server.MAX_CONNECTIONS
    ours, theirs = trio.testing.memory_stream_pair()
    await rendezvous_server.serve_client(directory, ours)
    reply = json.loads(await theirs.receive_some(4096))
    assert reply == {"ok": False, "error": "too many clients; try again later"}
    assert await theirs.receive_some(4096) == b""  # and closed
    assert directory.connections == rendezvous_server.MAX_CONNECTIONS


async def test_a_name_is_not_taken_over_from_another_address() -> None:
    directory = rendezvous_server.Directory(600.0)
    mine = [{"address": "192.0.2.1", "port": 4000}]
    directory.register("bob", mine, "192.0.2.1:40000")
    with pytest.raises(ValueError, match="bob is registered from another address"):
        directory.register("bob", [{"address": "198.51.100.9", "port": 1}], "198.51.100.9:5000")
    directory.register("bob", mine * 2, "192.0.2.1:40001")  # bob again, a new connection
    assert directory.peers["bob"][0] == mine * 2


def test_a_host_with_many_addresses_still_offers_its_mapped_endpoint() -> None:
    from portbroker.p2p import CandidateKind, InterfaceAddress, build_candidates
    from portbroker.types import Lease, TransportProtocol

    # 40 container bridges: more host candidates than the rendezvous keeps.
    hosts = [InterfaceAddress(f"br{i}", i + 2, f"172.17.{i}.1", 24) for i in range(40)]
    lease = Lease(
        method="pcp",
        protocol=TransportProtocol.UDP,
        internal_address="172.17.0.1",
        internal_port=4000,
        external_address="203.0.113.7",
        external_port=40000,
        lifetime=600,
        granted_at=0.0,
        gateway="172.17.0.254",
    )
    candidates = build_candidates(4000, TransportProtocol.UDP, hosts, lease)
    assert (
        len(candidates) > rendezvous_server.MAX_CANDIDATES
    )  # all: "at most 32" from the rendezvous
    offered = p2p_chat.offered(candidates)
    assert len(offered) == rendezvous_server.MAX_CANDIDATES == p2p_chat.MAX_REMOTES
    (reflexive,) = [c for c in offered if c.kind is CandidateKind.SERVER_REFLEXIVE]
    assert (str(reflexive.address), reflexive.port) == ("203.0.113.7", 40000)
    assert [c.priority for c in offered] == sorted((c.priority for c in offered), reverse=True)


async def test_one_address_cannot_fill_the_directory() -> None:
    directory = rendezvous_server.Directory(600.0)
    for i in range(rendezvous_server.MAX_NAMES_PER_ADDRESS):
        directory.register(f"peer{i}", [], f"198.51.100.9:{5000 + i}")
    with pytest.raises(ValueError, match="holds 16 names already"):
        directory.register("one-more", [], "198.51.100.9:6000")
    directory.register("peer0", [], "198.51.100.9:6001")  # its own names stay renewable
    directory.register("alice", [], "192.0.2.1:40000")  # and others still get in
