"""portbroker.p2p against a real miniupnpd: the candidates, and every kind of change.

The agent (tests/lab/candidates_agent.py) runs in the lab's lan namespace as a
P2P stack would; the test changes the world around it — an address added to
and removed from the host's interface, the gateway's external address, a
gateway restart — and reads the changes the agent prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import GATEWAY_ADDRESS, LAN_ADDRESS, Lab, open_lab
from tests.conftest import _require_lab
from tests.lab.helpers import lines_of

AGENT = Path(__file__).with_name("candidates_agent.py")
PORT = 41000
LIFETIME = 10  # with min_lifetime=10: renewals every ~5 s, so a new external address shows soon
# PCP only: a re-creation after the restart may otherwise race to UPnP while
# miniupnpd's PCP is still starting, and a UPnP lease keeps the external
# address the method read first (methods/upnp.py), so its candidate would
# never move to the new address.
METHODS = "pcp"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_lab()
    with open_lab(
        workdir=tmp_path_factory.mktemp("p2p-candidates"), extra_config=["min_lifetime=10"]
    ) as built:
        yield built


class Agent:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.seen: list[dict[str, Any]] = []

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        text = lines_of(self.process).next(timeout)
        assert text is not None, f"the agent said nothing within {timeout} s; so far: {self.seen}"
        assert text, f"the agent ended: {self.process.stderr.read() if self.process.stderr else ''}"
        message: dict[str, Any] = json.loads(text)
        self.seen.append(message)
        return message


def kinds(candidates: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["kind"], c["address"]) for c in candidates]


def test_candidates_follow_interface_external_address_and_gateway_restart(
    lab: Lab, figure: Callable[[str], None]
) -> None:
    process = subprocess.Popen(
        lab.exec_argv(
            lab.lan_ns,
            [sys.executable, str(AGENT), str(GATEWAY_ADDRESS), str(PORT), str(LIFETIME), METHODS],
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    agent = Agent(process)
    try:
        first = agent.next()
        assert first["event"] == "candidates"
        assert kinds(first["candidates"]) == [
            ("host", str(LAN_ADDRESS)),
            ("server-reflexive", str(lab.external_address)),
        ]
        host, mapped = first["candidates"]
        assert host["public"] is False
        assert mapped["public"] is True
        assert mapped["method"] == "pcp"
        assert mapped["port"] == PORT

        # An address added to the host's interface, then removed.
        extra = "192.168.77.50"
        subprocess.run(
            ["ip", "-n", lab.lan_ns, "addr", "add", f"{extra}/24", "dev", lab.lan_if], check=True
        )
        added = agent.next()
        assert (added["reason"], kinds(added["added"])) == ("address-added", [("host", extra)])
        subprocess.run(
            ["ip", "-n", lab.lan_ns, "addr", "del", f"{extra}/24", "dev", lab.lan_if], check=True
        )
        removed = agent.next()
        assert (removed["reason"], kinds(removed["removed"])) == (
            "address-removed",
            [("host", extra)],
        )

        # A gateway restart: the mapping is lost, then restored. (Not within
        # 2 s of the gateway's start: RFC 6887 §8.5's slack of 2 s would make
        # its epoch look right, and the next renewal re-creates the mapping
        # unseen, which is then no loss to report.)
        time.sleep(3)
        lab.restart_miniupnpd()
        lost = agent.next()
        assert lost["reason"] == "mapping-lost", lost
        assert kinds(lost["candidates"]) == [("host", str(LAN_ADDRESS))]
        restored = agent.next()
        assert restored["reason"] == "mapping-restored", restored
        assert kinds(restored["added"]) == [("server-reflexive", str(lab.external_address))]

        # The gateway's external address changes (an ISP lease). The
        # server-reflexive candidate moves: by ExternalAddressChanged on a
        # renewal, or (what miniupnpd 2.3.1 does: its PCP ANNOUNCE carries
        # epoch 0) a loss and a restore at the new address.
        old = lab.external_address
        new = IPv4Address("11.0.0.5")
        lab.set_external_address(new)
        moves = [agent.next()]
        while ("server-reflexive", str(new)) not in kinds(moves[-1]["candidates"]):
            moves.append(agent.next())
        reasons = [m["reason"] for m in moves]
        assert reasons in (
            ["external-address-changed"],
            ["mapping-lost", "mapping-restored"],
        ), moves
        assert kinds(moves[0]["removed"]) == [("server-reflexive", str(old))]
        assert kinds(moves[-1]["added"]) == [("server-reflexive", str(new))]
        assert kinds(moves[-1]["candidates"]) == [
            ("host", str(LAN_ADDRESS)),
            ("server-reflexive", str(new)),
        ]
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == 0
    assert f"dport {PORT}" not in lab.nft_rules()  # released on the way out
    figure(
        "p2p candidates in the lab: "
        + ", ".join(m.get("reason", m["event"]) for m in agent.seen)
        + f"; external {old} -> {new}"
    )
