"""PCP PEER against a real miniupnpd 2.3.1 (nftables backend), proven from the wan side.

A UDP flow from the lan host to the wan host: the lan host keeps the flow's
binding with ``Broker.peer`` (tests/lab/peer_agent.py, in the lan
namespace) and the wan host checks the datagrams' source against the PEER's
external endpoint; then the gateway restarts and the binding is re-created.
First, a second lan host whose flow masquerade had to move to another source
port (the first host holds 11.0.0.1:PORT toward the same remote peer) gets a
PEER that names that other port, which is the one the wan host sees: the
PEER's endpoint is the flow's, not merely the internal port.

What proves re-creation (the conntrack entry of the flow survives a
miniupnpd restart, so the flow's source alone cannot): after the restart,
whose chains the lab flushes, miniupnpd logs the PEER again ("PCP PEER:
added peer mapping") with the *same* nonce (RFC 6887 §8.5, §11.2.1), and its
SNAT rule is back in ``postrouting_miniupnpd``.

Seen with miniupnpd 2.3.1 (docs/peer.md): the SNAT rule it adds matches the
flow's reverse direction (daddr = internal host, dport = internal port), so
it never applies to the outbound packets; the flow leaves with the source
port masquerade keeps, which is the port miniupnpd assigns (the internal
port, or the flow's current one from conntrack). A PEER delete is answered
NO_RESOURCES and its rule stays: its nft backend cannot read peer rules back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from portbroker.testing.lab import EXTERNAL_ADDRESS, GATEWAY_ADDRESS, WAN_ADDRESS, Lab
from tests.lab.helpers import lines_of

AGENT = Path(__file__).with_name("peer_agent.py")
RESTART_MARK = "===== portbroker lab: restart"


@contextmanager
def peer_agent(
    lab: Lab,
    port: int,
    remote_port: int,
    lifetime: int = 600,
    *,
    ns: str | None = None,
    send_first: bool = False,
) -> Iterator[subprocess.Popen[str]]:
    argv = lab.exec_argv(
        ns or lab.lan_ns,
        [
            sys.executable,
            str(AGENT),
            str(GATEWAY_ADDRESS),
            str(port),
            str(WAN_ADDRESS),
            str(remote_port),
            str(lifetime),
            *(["send-first"] if send_first else []),
        ],
    )
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            assert process.stdin is not None
            if not process.stdin.closed:
                process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def next_event(
    process: subprocess.Popen[str], *wanted: str, timeout: float = 30.0
) -> dict[str, Any]:
    """The agent's next event of a *wanted* kind; fails (never hangs) after *timeout*."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        line = lines_of(process).next(deadline - time.monotonic())
        if line is None:
            raise AssertionError(f"no {wanted} event from the agent within {timeout:g} s")
        if not line:
            assert process.stderr is not None
            raise AssertionError(f"agent ended before {wanted}: {process.stderr.read()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] in wanted:
            return event


def miniupnpd_nonce(nonce_hex: str) -> str:
    """The nonce as miniupnpd logs it: three 32-bit words, each in host (little-endian)
    byte order (pcpserver.c: ``"PCP %s %08x%08x%08x"`` of the copied words)."""
    raw = bytes.fromhex(nonce_hex)
    return "".join(raw[i : i + 4][::-1].hex() for i in (0, 4, 8))


def peer_chain(lab: Lab) -> str:
    rules = lab.nft_rules()
    start = rules.index("chain postrouting_miniupnpd")
    return rules[start : rules.index("}", start)]


def flow_source(lab: Lab, process: subprocess.Popen[str], wan: Any, text: str) -> tuple[str, int]:
    """Send *text* from the lan host's flow socket; where the wan host saw it come from."""
    assert process.stdin is not None
    process.stdin.write(f"send {text}\n")
    process.stdin.flush()
    next_event(process, "Sent")
    data, source = wan.recvfrom(100)
    assert data == text.encode()
    return source[0], source[1]


def test_peer_binding_is_the_flows_source_and_is_recreated_after_a_restart(
    fresh_lab: Lab, figure: Callable[[str], None]
) -> None:
    lab = fresh_lab
    port, remote_port = 23001, 23002
    wan = lab.socket(lab.wan_ns)
    wan.bind((str(WAN_ADDRESS), remote_port))
    wan.settimeout(5)
    with wan:
        the_flows_own_port_is_reported(lab, wan, remote_port, figure)
        peer_then_flow_then_restart(lab, wan, port, remote_port, figure)


def the_flows_own_port_is_reported(
    lab: Lab, wan: Any, remote_port: int, figure: Callable[[str], None]
) -> None:
    """A flow that masquerade had to move to another source port: its PEER names
    that port (miniupnpd looks the flow up in conntrack), not the internal one."""
    port = 23003
    first = lab.socket(lab.lan_ns)  # the lan host takes 11.0.0.1:23003 toward the wan host
    first.bind(("0.0.0.0", port))
    with first:
        first.sendto(b"taken", (str(WAN_ADDRESS), remote_port))
        assert wan.recvfrom(100) == (b"taken", (str(EXTERNAL_ADDRESS), port))
        second = lab.add_lan_host()
        with peer_agent(lab, port, remote_port, ns=second.ns, send_first=True) as process:
            moved = wan.recvfrom(100)  # the second host's "first": another source port
            assert moved[0] == b"first"
            assert moved[1][1] != port
            peered = next_event(process, "Peered", "Error")
            assert peered["event"] == "Peered", (peered, lab.log_text())
            assert (peered["external_address"], peered["external_port"]) == moved[1]
            again = flow_source(lab, process, wan, "again")
            assert again == moved[1]
            figure(
                f"PEER of {second.address}:{port} (its flow masqueraded to"
                f" {moved[1][1]}): assigned {peered['external_port']}, wan sees {again[1]}"
            )


def peer_then_flow_then_restart(
    lab: Lab, wan: Any, port: int, remote_port: int, figure: Callable[[str], None]
) -> None:
    with peer_agent(lab, port, remote_port) as process:
        peered = next_event(process, "Peered", "Error")
        assert peered["event"] == "Peered", (peered, lab.log_text())
        assert peered["method"] == "pcp"
        assert peered["external_address"] == str(EXTERNAL_ADDRESS)
        endpoint = (peered["external_address"], peered["external_port"])
        logged = (
            f"PCP PEER: added peer mapping UDP 192.168.77.2:{port}({endpoint[1]})"
            f"->{WAN_ADDRESS}:{remote_port} 'PCP PEER {miniupnpd_nonce(peered['nonce'])}'"
        )
        assert logged in lab.log_text(), lab.log_text()
        assert f"snat ip to {EXTERNAL_ADDRESS}:{endpoint[1]}" in peer_chain(lab)
        before = flow_source(lab, process, wan, "before the restart")
        assert before == endpoint, (before, endpoint, peer_chain(lab))
        figure(f"PEER {port}/udp -> {WAN_ADDRESS}:{remote_port}: wan sees {before[0]}:{before[1]}")
        rule = next(r for r in peer_chain(lab).splitlines() if f"dport {port} " in r)
        figure(f"miniupnpd 2.3.1 PEER rule: {rule.strip()}")

        # Let the epoch grow past the §8.5 tolerance so the restart is a loss.
        time.sleep(3.5)
        lab.restart_miniupnpd()  # rules flushed, mappings forgotten, epoch 0, ANNOUNCE
        lost = next_event(process, "Lost")
        restored = next_event(process, "Restored")
        assert restored["nonce"] == peered["nonce"]  # re-created, not a new binding
        assert restored["external_port"] == endpoint[1]
        after_restart = lab.log_text().rsplit(RESTART_MARK, 1)[1]
        assert logged in after_restart, after_restart
        assert f"snat ip to {EXTERNAL_ADDRESS}:{endpoint[1]}" in peer_chain(lab)
        after = flow_source(lab, process, wan, "after the restart")
        assert after == endpoint
        figure(
            f"after a restart: {lost['detail']} -> Restored with the same nonce; wan sees {after[0]}:{after[1]}"
        )

        assert process.stdin is not None
        process.stdin.close()
        released = next_event(process, "Released")
        next_event(process, "Done")
        tail = lab.log_text().rsplit(RESTART_MARK, 1)[1]
        assert "PCP PEER: Failed to find PCP mapping" in tail or "peer mapping removed" in tail
        figure(
            f"PEER delete: {released['detail']}; miniupnpd: "
            + (
                "removed"
                if "peer mapping removed" in tail
                else "NO_RESOURCES (rule left: " + str(peer_chain(lab).count("snat")) + " in chain)"
            )
        )
