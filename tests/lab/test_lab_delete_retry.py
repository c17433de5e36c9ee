"""A release while the gateway's PCP port is firewalled is retried until it lands (issue 8).

Before, the one delete attempt went unanswered, the app heard
``Released(confirmed=False)`` and the DNAT rule stayed at the gateway until the
lease ran out. Now the broker retries in the background (lifecycle rule 10):
once the firewall is lifted the rule is gone. When only the answers were lost
the first attempt did delete it, and miniupnpd answers the retry with
NO_RESOURCES ("Failed to remove PCP mapping": it holds none): that ends the
retries as done, not after an hour of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from tests.lab.faults import REPO, dnat_rules, stop
from tests.lab.helpers import lines_of

pytestmark = [pytest.mark.faults]

AGENT = Path(__file__).with_name("delete_agent.py")
PORT = 26001
FIREWALLS = {
    # The requests never reach miniupnpd.
    "requests": """
table inet pbdelete {
  chain input {
    type filter hook input priority -10; policy accept;
    udp dport 5351 drop
  }
}
""",
    # miniupnpd carries them out, but its answers are lost.
    "answers": """
table inet pbdelete {
  chain output {
    type filter hook output priority -10; policy accept;
    udp sport 5351 drop
  }
}
""",
}


def next_event(process: subprocess.Popen[str], kind: str, timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = lines_of(process).next(deadline - time.monotonic())
        if not text:  # None: the time is up; "": the agent ended
            break
        event: dict[str, Any] = json.loads(text)
        if event["event"] == kind:
            return event
    raise AssertionError(f"no {kind} from the agent within {timeout:g} s")


@pytest.mark.parametrize("dropped", sorted(FIREWALLS))
def test_a_release_during_a_firewalled_gateway_is_deleted_once_it_lifts(
    lab_factory: Callable[..., Lab], figure: Callable[[str], None], dropped: str
) -> None:
    lab = lab_factory()
    process = subprocess.Popen(
        lab.exec_argv(lab.lan_ns, [sys.executable, str(AGENT), str(GATEWAY_ADDRESS), str(PORT)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        next_event(process, "Mapped", timeout=60)
        assert dnat_rules(lab)[PORT] == 1, lab.nft_rules()
        lab.nft(lab.gw_ns, FIREWALLS[dropped])
        assert process.stdin is not None
        process.stdin.write("release\n")
        process.stdin.flush()
        released = next_event(process, "Released", timeout=60)
        # release() came back after one attempt, saying the delete goes on.
        assert released["detail"] == [{"confirmed": False, "retrying": True}]
        assert released["pending"] == 1
        # Let two retries fail too (attempt 1's line came before Released),
        # then lift the firewall.
        next_event(process, "DeleteFailed", timeout=60)
        failed_again = next_event(process, "DeleteFailed", timeout=60)
        # Unheard, the rule is still there; heard but unanswered, it is gone.
        assert dnat_rules(lab)[PORT] == (1 if dropped == "requests" else 0)
        lab.nft(lab.gw_ns, "delete table inet pbdelete\n")
        lifted = time.monotonic()
        done = next_event(process, "DeleteDone", timeout=120)
        next_event(process, "Deleted", timeout=10)
        rules = dnat_rules(lab)
        figure(
            f"FAULT delete-retry ({dropped} dropped): release() returned in {released['took']:.1f} s; "
            f"{failed_again['message']!r}; after the firewall lifted: {done['message']!r} "
            f"in {time.monotonic() - lifted:.1f} s; DNAT rules left for {PORT}: {rules[PORT]}"
        )
        assert rules[PORT] == 0, f"{lab.nft_rules()}\n--- miniupnpd log ---\n{lab.log_text()}"
    finally:
        stop(process)
