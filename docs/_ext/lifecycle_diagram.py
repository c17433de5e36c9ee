"""The ``lifecycle-diagram`` directive: a state diagram drawn from the code's tables.

The diagram on the lifecycle page is generated at build time from
:data:`portbroker.lifecycle.TRANSITIONS` (or ``DELETE_TRANSITIONS`` with
``:table: delete``), so it cannot drift from the rules the broker runs.
Where a (state, trigger) pair leads to two states, the trigger's payload (a
failure's kind, the lease's expiry) picks one: both edges are drawn. Triggers
that lead from one state to the same other state share one edge.

Drawn by Graphviz (``dot``, sphinx.ext.graphviz) into an SVG when the site is
built, so the page shows the picture with no script and no network: a
diagram drawn in the reader's browser (mermaid) needs its library from a
CDN, and offline shows its source text instead. scripts/setup installs
Graphviz.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

from docutils.parsers.rst import Directive, directives
from sphinx.ext.graphviz import graphviz

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


def dot_source(table: str = "mapping") -> str:
    """The table as a Graphviz digraph: start and end are points, as in UML."""
    start, finals = _ENDS[table]
    lines = [
        f"digraph {table} {{",
        '    graph [rankdir=TB, fontname="sans-serif", nodesep=0.5, ranksep=0.55];',
        '    node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
        '    start [shape=circle, style=filled, fillcolor=black, label="", width=0.2];',
        f"    start -> {start.name};",
    ]
    labels: dict[tuple[str, str], list[str]] = {}
    for a, b, trigger in edges(table):
        labels.setdefault((a, b), []).append(trigger)
    lines += [f'    {a} -> {b} [label="{" / ".join(names)}"];' for (a, b), names in labels.items()]
    for final in finals:
        lines.append(
            f'    end_{final.name} [shape=doublecircle, style=filled, fillcolor=black, label="",'
            " width=0.15];"
        )
        lines.append(f"    {final.name} -> end_{final.name};")
    lines.append("}")
    return "\n".join(lines) + "\n"


class LifecycleDiagram(Directive):
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {
        "table": lambda arg: directives.choice(arg, ("mapping", "delete"))
    }

    def run(self) -> list[Any]:
        table = self.options.get("table", "mapping")
        node = graphviz()
        node["code"] = dot_source(table)
        node["options"] = {"docname": self.state.document.settings.env.docname}
        node["alt"] = f"the {table} lifecycle: states and the triggers between them"
        return [node]


def setup(app: Any) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.graphviz")
    app.add_directive("lifecycle-diagram", LifecycleDiagram)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
