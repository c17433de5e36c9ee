"""The ``lifecycle-diagram`` directive: a state diagram drawn from the code's tables.

The diagram on the lifecycle page is generated at build time from
:data:`portbroker.lifecycle.TRANSITIONS` (or ``DELETE_TRANSITIONS`` with
``:table: delete``), so it cannot drift from the rules the broker runs.
Where a (state, trigger) pair leads to two states, the trigger's payload (a
failure's kind, the lease's expiry) picks one: both edges are drawn. Triggers
that lead from one state to the same other state share one edge. Rendered
by sphinxcontrib-mermaid.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

from docutils.parsers.rst import Directive, directives
from sphinxcontrib.mermaid import mermaid

from portbroker.lifecycle import DELETE_TRANSITIONS, TRANSITIONS, DeleteState, State

# The states a mapping starts and ends in (MappingLifecycle starts REQUESTING;
# RELEASED and FAILED are final, rule 8; a PendingDelete starts DELETING).
_ENDS: Mapping[str, tuple[enum.Enum, tuple[enum.Enum, ...]]] = {
    "mapping": (State.REQUESTING, (State.RELEASED, State.FAILED)),
    "delete": (DeleteState.DELETING, (DeleteState.DELETED, DeleteState.GAVE_UP)),
}


def edges(table: str = "mapping") -> list[tuple[str, str, str]]:
    """Every (from state, to state, trigger) of the table, in the table's order."""
    source: Mapping[tuple[Any, Any], Any] = (
        TRANSITIONS if table == "mapping" else DELETE_TRANSITIONS
    )
    out: list[tuple[str, str, str]] = []
    for (state, trigger), target in source.items():
        targets = target if isinstance(target, tuple) else (target,)
        out.extend((state.name, t.name, trigger.name) for t in targets)
    return out


def mermaid_source(table: str = "mapping") -> str:
    """The table as a mermaid ``stateDiagram-v2``."""
    start, finals = _ENDS[table]
    lines = ["stateDiagram-v2", f"    [*] --> {start.name}"]
    labels: dict[tuple[str, str], list[str]] = {}
    for a, b, trigger in edges(table):
        labels.setdefault((a, b), []).append(trigger)
    lines += [f"    {a} --> {b}: {' / '.join(names)}" for (a, b), names in labels.items()]
    lines += [f"    {final.name} --> [*]" for final in finals]
    return "\n".join(lines) + "\n"


class LifecycleDiagram(Directive):
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {
        "table": lambda arg: directives.choice(arg, ("mapping", "delete"))
    }

    def run(self) -> list[Any]:
        node = mermaid()
        node["code"] = mermaid_source(self.options.get("table", "mapping"))
        node["options"] = {}
        return [node]


def setup(app: Any) -> dict[str, Any]:
    app.setup_extension("sphinxcontrib.mermaid")
    app.add_directive("lifecycle-diagram", LifecycleDiagram)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
