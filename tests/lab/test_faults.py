"""The fault suite (issue 7 §3): faults a real network throws at the broker, in the lab.

Every case runs against the lab's miniupnpd (or a misbehaving server of
ours beside it, ``fault_servers.py``), with brokers, the CLI and the daemon
as processes in the lan namespace, and proves its mappings with inbound
connections from the wan side or with the gateway's nftables rules. Each
prints its figure (the ``figures`` section of the run's summary); none
asserts on wall-clock time. Run them alone with ``pytest -m faults``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portbroker.client import BlockingClient, DaemonNotRunning
from portbroker.testing.lab import GATEWAY_ADDRESS, HTTP_PORT, Lab, Variant
from tests.lab.faults import (
    PORTBROKER,
    REPO,
    cli,
    counter,
    dnat_pairs,
    dnat_rules,
    prove_inbound,
    run_agent,
    run_server,
    server_log,
)

pytestmark = [pytest.mark.faults]

LabFactory = Callable[..., Lab]
Figure = Callable[[str], None]

# miniupnpd's PCP floor is 120 s (min_lifetime): lowered so renewals come
# within seconds.
SHORT_LIFETIMES = ["min_lifetime=4"]


def mapped_ports(results: dict[int, dict[str, Any]]) -> dict[int, int]:
    return {p: r["external_port"] for p, r in results.items() if r["event"] == "Mapped"}


def assert_rules_match(lab: Lab, mapped: dict[int, int]) -> None:
    """The gateway holds one DNAT rule per mapping, to the external port reported, and no other."""
    rules = Counter(dnat_pairs(lab))
    wanted = Counter((external, internal) for internal, external in mapped.items())
    assert rules == wanted, (
        f"DNAT rules (external, internal) missing: {sorted(wanted - rules)}; "
        f"extra or duplicated: {sorted(rules - wanted)}"
    )


def failures(results: dict[int, dict[str, Any]]) -> dict[int, str]:
    return {p: r["message"] for p, r in results.items() if r["event"] == "MapError"}


# -- 1. loss ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "methods",
    [
        pytest.param(["pcp", "natpmp", "upnp"], id="any-method"),
        # UPnP's renewals ride TCP, which retransmits for us: PCP alone must
        # cope with the loss itself.
        pytest.param(
            ["pcp"],
            id="pcp-only",
            marks=pytest.mark.xfail(
                strict=True,
                reason="a race gives up after the broker's 8 s request budget: 3 PCP "
                "transmissions at RFC 6887 §8.1.1's IRT of 3 s, each through with "
                "p = 0.4 x 0.4, so about 6 races in 10 fail; a map runs up to 3 "
                "races (MAX_RACES), though maps deciding together share a race's "
                "failure: 1 to 5 maps in 10 failed in 5 fresh-clone runs (4 to 6 "
                "before a sole method was asked again, broker._race)",
            ),
        ),
    ],
)
def test_60_percent_silent_loss_at_the_gateway(
    lab_factory: LabFactory, figure: Figure, methods: list[str]
) -> None:
    lab = lab_factory(extra_config=SHORT_LIFETIMES)
    # No netem here: nftables drops 60 % of PCP/NAT-PMP and of SSDP, each way,
    # silently, so no method wins by being spared.
    lab.nft(
        lab.gw_ns,
        """
table inet pbfault {
  counter dropped {
  }
  chain input {
    type filter hook input priority -10; policy accept;
    udp dport { 1900, 5351 } numgen random mod 100 < 60 counter name dropped drop
  }
  chain output {
    type filter hook output priority -10; policy accept;
    udp sport { 1900, 5351 } numgen random mod 100 < 60 counter name dropped drop
  }
}
""",
    )
    ports = set(range(24001, 24011))
    maps = [{"port": p, "lifetime": 16} for p in sorted(ports)]
    with run_agent(lab, maps, methods=methods) as agent:
        # Under loss a create may take long by design: RFC 6886 §3.1's
        # schedule, and the broker's patience (up to 120 s) while the gateway
        # answers other requests.
        done = agent.wait_all(timeout=125)
        results = agent.results()
        # A 16 s lease renews from 8 s on; under 60 % loss a renewal needs its
        # retransmissions (RFC 6887 §8.1.1). Each renewal ends Renewed or, at
        # expiry, Lost (then re-created): wait for every mapping's outcome.
        renewed: set[int] = set()
        lost: set[int] = set()
        if done is not None and not failures(results):
            deadline = time.monotonic() + 25
            while renewed | lost != ports and time.monotonic() < deadline:
                event = agent.next(deadline - time.monotonic())
                if event is not None and event["event"] == "Renewed":
                    renewed.add(event["port"])
                elif event is not None and event["event"] == "Lost":
                    lost.add(event["port"])
        last_event = {e["port"]: e["event"] for e in agent.seen if "port" in e}
        held = {
            p: e
            for p, e in mapped_ports(results).items()
            if last_event.get(p) not in ("Lost", "Failed")
        }
        failed = sorted(p for p, e in last_event.items() if e == "Failed")
        used = sorted(r.get("method") or "failed" for r in results.values())
        figure(
            f"FAULT 60%-loss ({'+'.join(methods)}): {len(mapped_ports(results))}/{len(ports)} "
            f"mapped ({', '.join(f'{m} x{used.count(m)}' for m in sorted(set(used)))}), "
            f"last at {done or float('nan'):.2f} s; first renewal: {len(renewed)} renewed, "
            f"{len(lost)} lost; "
            f"{counter(lab, lab.gw_ns, 'pbfault', 'dropped')} packets dropped"
        )
        assert done is not None, "the maps did not finish within 125 s"
        assert failures(results) == {}
        assert renewed, "no renewal got through"
        assert failed == [], "a lost mapping must be re-created, not given up"
        assert not prove_inbound(lab, held)


# -- 2. a host firewall -------------------------------------------------------------


def test_host_firewall_eperm_moves_on_to_upnp(
    lab_factory: LabFactory, figure: Figure, tmp_path: Path
) -> None:
    lab = lab_factory()
    # A host firewall that drops outgoing 5351: send() fails with EPERM.
    lab.nft(
        lab.lan_ns,
        """
table inet pbfault {
  chain output {
    type filter hook output priority 0; policy accept;
    udp dport 5351 drop
  }
}
""",
    )
    state = tmp_path / "state.json"
    port = 24101
    probed = cli(lab, "probe", "--json", state=state)
    done = cli(lab, "map", f"{port}/tcp", "--json", "--lifetime", "600", state=state)
    report = json.loads(probed.stdout) if probed.returncode in (0, 1) and probed.stdout else {}
    mapped = json.loads(done.stdout) if done.returncode == 0 else {}
    methods = report.get("methods", {})
    figure(
        f"FAULT eperm: probe {({m: o['error'] for m, o in methods.items()}) or probed.stderr.strip()}; "
        f"map: {mapped.get('method') or done.stderr.strip()}"
    )
    for stream in (probed.stdout, probed.stderr, done.stdout, done.stderr):
        assert "Traceback" not in stream
        assert "ExceptionGroup" not in stream
    assert report["selected"] == "upnp", report
    for name in ("pcp", "natpmp"):
        outcome = methods[name]
        assert outcome["available"] is False
        assert "EPERM" in outcome["error"] or "Operation not permitted" in outcome["error"]
    assert done.returncode == 0, done.stderr
    assert mapped["method"] == "upnp"
    assert not prove_inbound(lab, {port: mapped["external_port"]})
    assert cli(lab, "unmap", f"{port}/tcp", state=state).returncode == 0


# -- 3. 50 maps at once on a cold broker ----------------------------------------------


PROBE_COUNTERS = """
table inet pbcount {
  counter announce {
  }
  counter natpmp_address {
  }
  counter msearch {
  }
  chain input {
    type filter hook input priority -10; policy accept;
    udp dport 5351 @th,64,16 0x0200 counter name announce
    udp dport 5351 @th,64,16 0x0000 counter name natpmp_address
    udp dport 1900 @th,64,64 0x4d2d534541524348 counter name msearch
  }
}
"""


def test_50_concurrent_maps_on_a_cold_broker_share_one_probe(
    lab_factory: LabFactory, figure: Figure
) -> None:
    lab = lab_factory()
    # Counted on the gateway: PCP ANNOUNCE (version 2, opcode 0), NAT-PMP
    # address requests (version 0, opcode 0) and SSDP M-SEARCH.
    lab.nft(lab.gw_ns, PROBE_COUNTERS)
    ports = set(range(24201, 24251))
    with run_agent(lab, [{"port": p, "lifetime": 600} for p in sorted(ports)]) as agent:
        done = agent.wait_all(timeout=60)
        results = agent.results()
        probes = {
            name: counter(lab, lab.gw_ns, "pbcount", name)
            for name in ("announce", "natpmp_address", "msearch")
        }
        mapped = mapped_ports(results)
        figure(
            f"FAULT 50-concurrent: {len(mapped)}/50 mapped ({len(failures(results))} failed), "
            f"last at {done or float('nan'):.2f} s; probe packets at the gateway: {probes}"
        )
        assert done is not None, "the 50 maps did not finish within 60 s"
        assert failures(results) == {}
        assert {r["method"] for r in results.values()} == {"pcp"}
        # One shared probe costs a few packets of each kind (retransmissions,
        # SSDP's two search targets); one probe per map would cost 50 or more.
        assert all(count < 10 for count in probes.values()), probes
        assert_rules_match(lab, mapped)
        assert not prove_inbound(lab, mapped)
        # A gateway slow with 50 rules is alive: nothing was declared lost.
        while agent.next(0) is not None:
            pass
        spurious = [e for e in agent.seen if e["event"] in ("Lost", "Restored", "Failed")]
        assert spurious == [], [(e["port"], e["detail"]) for e in spurious[:3]]


# -- 4. a gateway restart while 50 mappings are held ------------------------------------


def test_gateway_restart_with_50_mappings_brings_every_one_back(
    lab_factory: LabFactory, figure: Figure
) -> None:
    lab = lab_factory()
    ports = list(range(24301, 24351))
    via = {24301: "natpmp", 24302: "natpmp", 24303: "natpmp"}
    via |= {24304: "upnp", 24305: "upnp", 24306: "upnp"}
    maps = [{"port": p, "lifetime": 600, "via": via.get(p)} for p in ports]
    # A warm broker (probed first), so that this case is about the restart
    # alone, not about 50 maps on a cold broker (the case above).
    with run_agent(lab, maps, probe_first=True) as agent:
        assert agent.wait_all(timeout=60) is not None, "the 50 maps did not finish within 60 s"
        results = agent.results()
        assert failures(results) == {}, f"the broker's log:\n{agent.stderr_text()[-6000:]}"
        assert {p: r["method"] for p, r in results.items() if p in via} == via
        assert dnat_rules(lab) == dict.fromkeys(ports, 1)
        # The epoch rule (RFC 6887 §8.5) cannot tell a restart within its 2 s
        # tolerance from jitter: let the epoch grow past it first.
        time.sleep(3.5)
        while agent.next(0) is not None:
            pass  # what the broker said before the restart
        spurious = [e for e in agent.seen if e["event"] in ("Lost", "Restored", "Failed")]
        since = len(agent.seen)
        restarted = time.monotonic()
        lab.restart_miniupnpd()
        restored = agent.collect("Restored", set(ports), timeout=90, since=since)
        # Read as they come, so the test's clock at the last one is the figure.
        to_last = time.monotonic() - restarted
        missing = sorted(set(ports) - set(restored))
        by_method = {m: sum(1 for p in missing if results[p]["method"] == m) for m in via.values()}
        figure(
            f"FAULT restart-50: {len(restored)}/50 restored"
            + (f", the last {to_last:.2f} s after the restart" if not missing else " within 90 s")
            + f"; not restored: {missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"(natpmp {by_method.get('natpmp', 0)}, upnp {by_method.get('upnp', 0)}); "
            f"{len(spurious)} Lost/Restored/Failed events before the restart"
        )
        # A healthy gateway was never declared lost.
        assert spurious == [], (
            f"{[(e['port'], e['detail']) for e in spurious[:3]]}\n"
            f"the broker's log:\n{agent.stderr_text()[-5000:]}"
        )
        assert missing == [], (
            f"{[(e['port'], e['event'], e.get('detail')) for e in agent.seen[since:]][-20:]}\n"
            f"the broker's log:\n{agent.stderr_text()[-6000:]}"
        )
        final = {p: restored[p]["external_port"] for p in ports}
        assert_rules_match(lab, final)
        assert not prove_inbound(lab, final)


# -- 5. an SSDP reply from an ephemeral port ---------------------------------------------


def test_ssdp_reply_from_an_ephemeral_port_is_accepted(
    lab_factory: LabFactory, figure: Figure, tmp_path: Path
) -> None:
    lab = lab_factory(Variant.FULL)
    log = tmp_path / "ssdp.jsonl"
    location = f"http://{GATEWAY_ADDRESS}:{HTTP_PORT}/rootDesc.xml"
    port = 24401
    with (
        run_server(lab, "ssdp-ephemeral", str(GATEWAY_ADDRESS), "1901", str(log), location),
        run_agent(
            lab,
            [{"port": port, "lifetime": 600}],
            methods=["upnp"],
            upnp_port=1901,
            ssdp_multicast=False,
            announce_port=None,
        ) as agent,
    ):
        agent.wait_all(timeout=30)
        results = agent.results()
        searches = server_log(log)
        figure(
            f"FAULT ssdp-ephemeral: {len(searches)} M-SEARCH answered from ports "
            f"{sorted({s['source_port'] for s in searches})}; map: "
            f"{results.get(port, {}).get('method') or results.get(port)}"
        )
        assert searches, "the broker never searched on port 1901"
        assert all(s["source_port"] != 1901 for s in searches)
        assert results[port]["event"] == "Mapped", results[port]
        assert results[port]["method"] == "upnp"
        assert not prove_inbound(lab, {port: results[port]["external_port"]})


# -- 6. PCP servers that refuse ANNOUNCE or grant port 0 ---------------------------------


def test_pcp_server_refusing_announce_is_still_pcp(
    lab_factory: LabFactory, figure: Figure, tmp_path: Path
) -> None:
    lab = lab_factory()
    log = tmp_path / "pcp.jsonl"
    port = 24501
    with run_server(
        lab, "pcp-refuse-announce", str(GATEWAY_ADDRESS), "5361", str(log), lab.gw_wan_if
    ):
        probed = cli(
            lab,
            "probe",
            "--json",
            "--methods",
            "pcp",
            "--server-port",
            "5361",
            state=tmp_path / "s",
        )
        report = json.loads(probed.stdout)
        # A broker whose (cached) probe met the refused ANNOUNCE must still map with PCP.
        with run_agent(
            lab,
            [{"port": port, "lifetime": 600}],
            methods=["pcp", "upnp"],
            port=5361,
            announce_port=None,
            probe_first=True,
        ) as agent:
            done = agent.wait_all(timeout=30)
            probe_line = next((e for e in agent.seen if e["event"] == "Probed"), {})
            result = agent.results().get(port, {})
            requests = server_log(log)
            figure(
                f"FAULT pcp-refuses-announce: CLI probe pcp available="
                f"{report['methods']['pcp']['available']}; broker probe selected "
                f"{probe_line.get('selected')}, map via {result.get('method') or result.get('message')};"
                f" server saw {[r['op'] for r in requests]}"
            )
            assert report["methods"]["pcp"]["available"] is True, report
            assert done is not None, "no result within 30 s"
            assert probe_line["selected"] == "pcp"
            assert result["event"] == "Mapped", result
            assert result["method"] == "pcp"
            assert any(r["op"] == "ANNOUNCE" for r in requests)
            assert not prove_inbound(lab, {port: result["external_port"]})


def test_pcp_grant_of_port_zero_is_deleted_and_upnp_used(
    lab_factory: LabFactory, figure: Figure, tmp_path: Path
) -> None:
    lab = lab_factory()
    log = tmp_path / "pcp.jsonl"
    port = 24601
    with (
        run_server(lab, "pcp-port-zero", str(GATEWAY_ADDRESS), "5361", str(log)),
        run_agent(
            lab,
            [{"port": port, "lifetime": 600}],
            methods=["pcp", "upnp"],
            port=5361,
            announce_port=None,
        ) as agent,
    ):
        done = agent.wait_all(timeout=30)
        result = agent.results().get(port, {})
        requests = [r for r in server_log(log) if r["op"] == "MAP"]
        deletes = [r for r in requests if r["lifetime"] == 0 and r["internal_port"] == port]
        figure(
            f"FAULT pcp-port-zero: map via {result.get('method') or result.get('message')}; "
            f"server saw {len(requests)} MAP ({len(deletes)} delete)"
        )
        assert done is not None, f"no result within 30 s; the server saw {requests}"
        assert result["event"] == "Mapped", result
        assert result["method"] == "upnp"
        assert not prove_inbound(lab, {port: result["external_port"]})
        granted = {r["nonce"] for r in requests if r["lifetime"] > 0}
        assert deletes, f"the port-0 grant was never deleted: {requests}"
        assert {d["nonce"] for d in deletes} <= granted


# -- 7. the daemon SIGKILLed during a burst of renewals -----------------------------------

# PCP MAP requests (version 2, opcode 1) reaching the gateway: PCP retransmits
# only after 3 s (RFC 6887 §8.1.1), so one more per PCP mapping means every
# renewal of the burst is out.
RENEWAL_COUNTER = """
table inet pbkill {
  counter requests {
  }
  chain input {
    type filter hook input priority -10; policy accept;
    udp dport 5351 @th,64,16 0x0201 counter name requests
  }
  chain output {
    type filter hook output priority -10; policy accept;
  }
}
"""


def start_daemon(lab: Lab, directory: Path) -> subprocess.Popen[bytes]:
    """A daemon in the lan namespace, serving its socket."""
    process = launch_daemon(lab, directory)
    deadline = time.monotonic() + 30
    while True:
        try:
            BlockingClient(directory / "pb.sock").close()
            return process
        except (DaemonNotRunning, OSError) as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"daemon did not start: {(directory / 'daemon.log').read_text()}"
                ) from exc
            time.sleep(0.1)


def launch_daemon(lab: Lab, directory: Path) -> subprocess.Popen[bytes]:
    with (directory / "daemon.log").open("ab") as log:
        return subprocess.Popen(
            lab.exec_argv(
                lab.lan_ns,
                [
                    *PORTBROKER,
                    "daemon",
                    "--socket",
                    str(directory / "pb.sock"),
                    "--state",
                    str(directory / "state.json"),
                    "--gateway",
                    str(GATEWAY_ADDRESS),
                    "--no-multicast",
                ],
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
        )


def test_daemon_sigkilled_during_renewals_loses_and_duplicates_nothing(
    lab_factory: LabFactory, figure: Figure
) -> None:
    lab = lab_factory(extra_config=SHORT_LIFETIMES)
    lab.nft(lab.gw_ns, RENEWAL_COUNTER)
    directory = Path(tempfile.mkdtemp(prefix="pbk-"))  # short: a Unix socket path
    ports = list(range(24701, 24711))
    via = {24709: "natpmp", 24710: "upnp"}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        daemon = start_daemon(lab, directory)
        with BlockingClient(directory / "pb.sock") as client:
            for port in ports:
                client.map(port, "tcp", lifetime=12, persist=True, via=via.get(port))
            granted = {m["internal_port"]: m for m in client.list()}
        assert {p: granted[p]["method"] for p in via} == via
        pcp_mappings = sum(1 for p in ports if granted[p]["method"] == "pcp")
        before = counter(lab, lab.gw_ns, "pbkill", "requests")
        # The gateway serves the renewals but their answers are lost, so they
        # are all in flight when the daemon dies.
        lab.nft(lab.gw_ns, "add rule inet pbkill output udp sport 5351 counter drop\n")
        deadline = time.monotonic() + 30
        while counter(lab, lab.gw_ns, "pbkill", "requests") < before + pcp_mappings:
            assert time.monotonic() < deadline, "the renewals never came"
            time.sleep(0.05)
        in_flight = counter(lab, lab.gw_ns, "pbkill", "requests") - before
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()

        # Killed again while its restore renews them (a burst of renewals
        # too), the PCP answers still lost.
        before = counter(lab, lab.gw_ns, "pbkill", "requests")
        daemon = launch_daemon(lab, directory)
        deadline = time.monotonic() + 30
        while counter(lab, lab.gw_ns, "pbkill", "requests") == before:
            assert time.monotonic() < deadline, "the restarted daemon renewed nothing"
            assert daemon.poll() is None, (directory / "daemon.log").read_text()
            time.sleep(0.05)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        lab.nft(lab.gw_ns, "flush chain inet pbkill output\n")
        killed_at = time.monotonic()

        daemon = start_daemon(lab, directory)
        with BlockingClient(directory / "pb.sock") as client:
            deadline = time.monotonic() + 30
            while True:
                listed = {m["internal_port"]: m for m in client.list()}
                active = {p for p, m in listed.items() if m["state"] == "active"}
                if active == set(ports) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            adopted_after = time.monotonic() - killed_at
            rules = dnat_rules(lab)
            wrong = {p: rules.get(p, 0) for p in ports if rules.get(p, 0) != 1}
            # Past a whole lifetime: the adopted mappings are being renewed.
            time.sleep(13)
            later = {m["internal_port"]: m for m in client.list()}
        rules = dnat_rules(lab)
        wrong_later = {p: rules.get(p, 0) for p in ports if rules.get(p, 0) != 1}
        figure(
            f"FAULT daemon-sigkill: {in_flight} PCP renewal(s) in flight at SIGKILL, "
            "killed again during its restore; "
            f"after restart {len(active)}/{len(ports)} active "
            f"({adopted_after:.1f} s after the kill); gateway rules not exactly once: "
            f"{wrong or 'none'}, a lifetime later: {wrong_later or 'none'}"
        )
        assert active == set(ports), (directory / "daemon.log").read_text()[-3000:]
        assert wrong == {}, lab.nft_rules()
        assert wrong_later == {}, lab.nft_rules()
        assert not prove_inbound(lab, {p: later[p]["external_port"] for p in ports})
    finally:
        if daemon is not None:
            if daemon.poll() is None:
                daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(directory, ignore_errors=True)
