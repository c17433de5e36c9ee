"""benchmarks/peers.py's "left" column: what a failed map left on the gateway
is counted once a background cleanup has had its time (portbroker's daemon
answers the failure first and deletes after). It was counted at once, so the
re-run of 2026-12-02 showed one rule "left" for a daemon map at 60 % loss
whose cleanup was still on its way."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RULE = "th dport 20349 dnat ip to 192.168.77.2:20349\n"


def _load() -> ModuleType:
    return load_script(ROOT / "benchmarks" / "peers.py", "bench_peers")


class Gateway:
    """The lab's nft_rules(), whose rule a cleanup removes after *reads* reads."""

    def __init__(self, reads: int | None) -> None:
        self.reads = 0
        self.removed_after = reads

    def nft_rules(self) -> str:
        self.reads += 1
        if self.removed_after is not None and self.reads > self.removed_after:
            return ""
        return RULE


@pytest.fixture
def peers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _load()
    monkeypatch.setattr(module.time, "sleep", lambda _s: None)
    return module


def test_a_rule_a_failed_maps_cleanup_removes_soon_is_not_left(peers: ModuleType) -> None:
    attempt = peers.Attempt(section="loss:60", tool="portbroker map (daemon)", run=1, port=20349)
    peers.finish(Gateway(reads=3), attempt, None)
    assert attempt.left_rules == 0


def test_a_rule_that_stays_is_left(peers: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10_000))
    monkeypatch.setattr(peers.time, "monotonic", lambda: float(next(clock)))
    attempt = peers.Attempt(section="loss:60", tool="py-natpmp", run=1, port=20349)
    gateway = Gateway(reads=None)
    peers.finish(gateway, attempt, None)
    assert attempt.left_rules == 1
    assert gateway.reads > 1  # waited for a cleanup that never came


def test_a_mapping_that_worked_is_counted_at_once(peers: ModuleType) -> None:
    # Deleted by the tool (or not at all): nothing runs in the background.
    attempt = peers.Attempt(section="loss:60", tool="natpmpc", run=1, port=20349)
    attempt.external_port = 20349
    gateway = Gateway(reads=None)
    peers.finish(gateway, attempt, None)
    assert (attempt.left_rules, gateway.reads) == (1, 1)
