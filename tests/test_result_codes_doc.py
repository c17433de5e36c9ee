"""docs/result-codes.md says what the tables in the code do, row by row."""

from __future__ import annotations

from pathlib import Path

import pytest

from portbroker.methods import natpmp_rules, pcp_rules
from portbroker.methods.rules import Scope

DOC = Path(__file__).parent.parent / "docs" / "result-codes.md"
WORDS = {Scope.SERVER: "next method", Scope.REQUEST: "refused"}


def _rows(heading: str) -> dict[str, list[str]]:
    """The first table after *heading*, keyed by its first cell."""
    text = DOC.read_text()
    section = text[text.index(heading) :]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| code") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
        elif rows and not line.startswith("|"):
            break
    return rows


@pytest.mark.parametrize("rule", pcp_rules.RESULT_RULES, ids=lambda r: r.code.name)
def test_pcp_rows(rule: pcp_rules.CodeRule) -> None:
    _code, name, klass, create, renewal, announce, section = _rows("## PCP")[str(int(rule.code))]
    assert name == rule.code.name
    assert klass == rule.code.error_class.value
    assert (create, renewal) == (WORDS[rule.create], WORDS[rule.renewal])
    assert announce == ("available" if rule.announce_available else "unavailable")
    assert section == rule.section


def test_pcp_unknown_row() -> None:
    row = _rows("## PCP")["other"]
    rule = pcp_rules.UNKNOWN_RULE
    assert row[3:6] == [WORDS[rule.create], WORDS[rule.renewal], "available"]
    assert len(_rows("## PCP")) == len(pcp_rules.RESULT_RULES) + 1


@pytest.mark.parametrize("rule", natpmp_rules.RESULT_RULES, ids=lambda r: r.code.name)
def test_natpmp_rows(rule: natpmp_rules.CodeRule) -> None:
    _code, name, scope, retry, section = _rows("## NAT-PMP")[str(int(rule.code))]
    assert name == rule.code.name
    assert scope == WORDS[rule.scope]
    assert retry == ("none" if rule.retry_after is None else f"{rule.retry_after:g} s")
    assert section == rule.section
    assert len(_rows("## NAT-PMP")) == len(natpmp_rules.RESULT_RULES) + 1
