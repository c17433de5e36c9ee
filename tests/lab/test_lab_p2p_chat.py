"""examples/p2p_chat.py end to end across two real NATs (the lab's "two sites").

Site a (lan 192.168.77.0/24, gateway 11.0.0.1) and site b (192.168.78.0/24,
11.0.0.3) share one wan segment, where the rendezvous runs (11.0.0.2). Each
peer runs the example in its site's lan namespace: it maps its UDP port
through its own miniupnpd, swaps candidates through the rendezvous, checks
them, and chats. "Directly" is checked on what each peer saw: the chat
datagrams came from the other site's gateway address (its NAT, on the
mapped endpoint), not from the rendezvous host.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import Sites, open_sites
from tests.conftest import _require_lab

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
PORT = 40000


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    _require_lab()
    with open_sites(workdir=tmp_path_factory.mktemp("sites")) as built:
        yield built


def _start_rendezvous(sites: Sites) -> tuple[subprocess.Popen[str], str]:
    argv = [
        sys.executable,
        str(EXAMPLES / "rendezvous_server.py"),
        "--listen",
        str(sites.wan_address),
        "--port",
        "0",
    ]
    process = subprocess.Popen(
        sites.exec_argv(sites.wan_ns, argv), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("rendezvous listening on "), line
    return process, line.split()[-1]


def _chat(sites: Sites, site: str, name: str, peer: str, rendezvous: str) -> list[str]:
    lab = sites.a if site == "a" else sites.b
    argv = [
        sys.executable,
        str(EXAMPLES / "p2p_chat.py"),
        "--name",
        name,
        "--peer",
        peer,
        "--rendezvous",
        rendezvous,
        "--gateway",
        str(lab.gateway_address),
        "--port",
        str(PORT),
        "--say",
        f"hello from {name}",
        "--expect",
        f"hello from {peer}",
        "--timeout",
        "15",
        "--json",
    ]
    return lab.exec_argv(lab.lan_ns, argv)


def test_two_peers_behind_two_nats_chat_directly_over_their_mapped_endpoints(
    sites: Sites, figure: Callable[[str], None]
) -> None:
    gateway_a, gateway_b = str(sites.a.external_address), str(sites.b.external_address)
    # Counted on the wan bridge itself, apart from what the peers report: UDP
    # between the two gateways, each way, and UDP (none) and TCP (the
    # registrations) to the rendezvous host.
    sites.a.nft(
        sites.wan_ns,
        f"""
        table bridge p2p {{
            chain forward {{
                type filter hook forward priority 0; policy accept;
                ip saddr {gateway_a} ip daddr {gateway_b} meta l4proto udp counter
                ip saddr {gateway_b} ip daddr {gateway_a} meta l4proto udp counter
            }}
            chain input {{
                type filter hook input priority 0; policy accept;
                ip daddr {sites.wan_address} meta l4proto udp counter
                ip daddr {sites.wan_address} meta l4proto tcp counter
            }}
        }}
        """,
    )
    rendezvous, address = _start_rendezvous(sites)
    started = time.monotonic()
    try:
        peers = {
            "alice": subprocess.Popen(
                _chat(sites, "a", "alice", "bob", address),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            "bob": subprocess.Popen(
                _chat(sites, "b", "bob", "alice", address),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        }
        outputs = {name: p.communicate(timeout=40) for name, p in peers.items()}
    finally:
        rendezvous.terminate()
        rendezvous.wait(timeout=10)
        if rendezvous.stdout is not None:
            rendezvous.stdout.close()
    elapsed = time.monotonic() - started
    summaries: dict[str, dict[str, Any]] = {}
    for name, (stdout, stderr) in outputs.items():
        assert peers[name].returncode == 0, (
            name,
            stdout,
            stderr,
            sites.a.log_text(),
            sites.b.log_text(),
        )
        summaries[name] = json.loads(stdout.strip().splitlines()[-1])
    alice, bob = summaries["alice"], summaries["bob"]
    counted = [
        int(n)
        for n in re.findall(
            r"counter packets (\d+)",
            sites.a.nft(sites.wan_ns, "list table bridge p2p\n"),
        )
    ]
    a_to_b, b_to_a, to_rendezvous, rendezvous_tcp = counted

    # Each mapped its port: its server-reflexive candidate is its own gateway's address.
    def mapped(summary: dict[str, Any]) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            c for c in summary["local_candidates"] if c["kind"] == "server-reflexive"
        ]
        assert len(found) == 1, summary["local_candidates"]
        return found[0]

    assert mapped(alice)["address"] == gateway_a
    assert mapped(bob)["address"] == gateway_b
    assert mapped(alice)["method"] == mapped(bob)["method"] == "pcp"
    # ...and talked over the mapped endpoints: each heard the other from the
    # other's NAT, and picked the other's server-reflexive candidate.
    assert alice["heard"] == ["hello from bob"]
    assert bob["heard"] == ["hello from alice"]
    assert alice["heard_from"] == [f"{gateway_b}:{mapped(bob)['port']}"]
    assert bob["heard_from"] == [f"{gateway_a}:{mapped(alice)['port']}"]
    assert alice["selected"] == f"{gateway_b}:{mapped(bob)['port']}"
    assert bob["selected"] == f"{gateway_a}:{mapped(alice)['port']}"
    assert str(sites.wan_address) not in alice["heard_from"][0] + bob["heard_from"][0]
    # The wan bridge carried hellos, chat lines and acks each way; the rendezvous no UDP.
    assert a_to_b >= 3
    assert b_to_a >= 3
    assert to_rendezvous == 0
    assert rendezvous_tcp > 0  # the counter there does see the rendezvous's own traffic
    # Both deleted their mappings on the way out.
    for lab in sites.labs:
        assert f"dport {PORT}" not in lab.nft_rules()
    figure(
        f"p2p chat across two NATs: alice heard bob from {alice['heard_from'][0]}, bob heard"
        f" alice from {bob['heard_from'][0]} (rendezvous {sites.wan_address}); wan bridge:"
        f" {a_to_b} datagrams a->b, {b_to_a} b->a, {to_rendezvous} UDP to the rendezvous;"
        f" both exited 0 in {elapsed:.1f} s"
    )
