"""A map whose answers are all lost leaves no rule on the gateway.

The peers benchmark at 60 % loss found it: miniupnpd made the mapping, every
answer was lost, ``map`` raised NoAnswer, and the DNAT rule stayed until its
lease ran out (two hours by default), with no Mapping to delete it. Now the
broker deletes what silence may have made, in the background.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from tests.lab.faults import REPO, dnat_rules

WARM, LOST = 26101, 26102
# miniupnpd carries the requests out, but its answers are lost.
ANSWERS_LOST = """
table inet pbfailedmap {
  chain output {
    type filter hook output priority -10; policy accept;
    udp sport 5351 drop
  }
}
"""
AGENT = """
import sys, trio, portbroker

async def main():
    async with portbroker.open_broker(sys.argv[1], ("pcp",)) as broker:
        warm = await broker.map(int(sys.argv[2]), "tcp")  # PCP is known to work
        print("warm", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)  # the answers are lost now
        try:
            await broker.map(int(sys.argv[3]), "tcp")
        except portbroker.PortBrokerError as exc:  # NoAnswer, or NoMethodAvailable
            print("failed:", exc, flush=True)
        await warm.release()
    print("closed", flush=True)  # the broker's close waited for the cleanup

trio.run(main)
"""


def test_a_map_whose_every_answer_is_lost_leaves_no_rule_on_the_gateway(
    lab_full: Lab, figure: Callable[[str], None]
) -> None:
    argv = [sys.executable, "-c", AGENT, str(GATEWAY_ADDRESS), str(WARM), str(LOST)]
    process = subprocess.Popen(
        lab_full.exec_argv(lab_full.lan_ns, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        assert process.stdin is not None
        assert process.stdout.readline() == "warm\n", (
            process.stderr.read() if process.stderr else ""
        )
        lab_full.nft(lab_full.gw_ns, ANSWERS_LOST)
        process.stdin.write("go\n")
        process.stdin.flush()
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        lab_full.nft(lab_full.gw_ns, "delete table inet pbfailedmap\n")
    assert process.returncode == 0, err
    assert "failed: " in out, out + err
    assert "no answer within" in out, out + err
    assert out.endswith("closed\n")
    log = lab_full.log_text()
    made = f"PCP MAP: added mapping TCP {LOST}->" in log
    assert made, "miniupnpd never made it: the test proves nothing\n" + log[-3000:]
    assert dnat_rules(lab_full)[LOST] == 0, f"left on the gateway:\n{lab_full.nft_rules()}"
    figure(f"failed map: answers lost, miniupnpd made {LOST}/tcp; after the cleanup: no rule")
