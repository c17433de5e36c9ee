"""docs/architecture.md's lifecycle table is the code's table, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from portbroker.lifecycle import (
    _IGNORED,
    DELETE_TRANSITIONS,
    TRANSITIONS,
    DeleteState,
    State,
    Trigger,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _section(name: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"<!-- {name}:[^>]*-->(.*?)<!-- end {name} -->", text, re.S)
    assert match is not None, f"docs/architecture.md lost its {name} markers"
    return match.group(1)


def test_the_documented_table_is_the_code_table() -> None:
    documented: dict[tuple[State, Trigger], frozenset[State]] = {}
    for line in _section("lifecycle-table").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("state", "---"):
            continue
        documented[(State[cells[0]], Trigger[cells[1]])] = frozenset(
            State[name.strip()] for name in cells[2].split(" or ")
        )
    code = {
        pair: frozenset(target if isinstance(target, tuple) else (target,))
        for pair, target in TRANSITIONS.items()
    }
    assert documented == code


def test_the_documented_ignored_pairs_are_the_code_ones() -> None:
    pairs = re.findall(r"([A-Z_]+)\+([A-Z_]+)", _section("ignored-pairs"))
    assert {(State[s], Trigger[t]) for s, t in pairs} == set(_IGNORED)


def test_the_documented_delete_table_is_the_code_table() -> None:
    documented: dict[tuple[DeleteState, Trigger], frozenset[DeleteState]] = {}
    for line in _section("delete-table").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("state", "---"):
            continue
        documented[(DeleteState[cells[0]], Trigger[cells[1]])] = frozenset(
            DeleteState[name.strip()] for name in cells[2].split(" or ")
        )
    code = {
        pair: frozenset(target if isinstance(target, tuple) else (target,))
        for pair, target in DELETE_TRANSITIONS.items()
    }
    assert documented == code
