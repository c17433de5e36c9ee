"""The layout is the design (docs/architecture.md): checked, not just drawn.

- the module-level import graph of ``portbroker`` has no cycle;
- the sans-IO core (:mod:`portbroker.lifecycle`, :mod:`portbroker.epoch`,
  :mod:`portbroker.wire`, the daemon's ownership rules and protocol) imports no
  I/O (trio, socket, threading, miniupnpc);
- the wire codecs import nothing above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portbroker"
IO_MODULES = {"trio", "socket", "threading", "miniupnpc", "asyncio", "selectors", "subprocess"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, *, everywhere: bool) -> set[str]:
    """Modules *path* imports: at module level, or (*everywhere*) also inside functions."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if everywhere else _outside_functions(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _outside_functions(tree: ast.AST) -> list[ast.AST]:
    """Every node run at import time (if/try/class bodies too), not function bodies."""
    out: list[ast.AST] = []
    pending = list(ast.iter_child_nodes(tree))
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        out.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# The sans-IO core: tested with plain values, never a socket or a clock.
SANS_IO = {
    "portbroker.lifecycle",
    "portbroker.epoch",
    "portbroker.daemon.ownership",
    "portbroker.daemon.protocol",
    "portbroker.daemon.framing",
    "portbroker.netmon_wire",
}


def internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_the_module_level_import_graph_has_no_cycle() -> None:
    graph = {m: internal(imports(p, everywhere=False)) - {m} for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules is not a cycle of layers.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize(
    "module",
    sorted(m for m in MODULES if m in SANS_IO or m.startswith("portbroker.wire")),
)
def test_the_sans_io_core_imports_no_io(module: str) -> None:
    names = imports(MODULES[module], everywhere=True)
    assert not {n.split(".")[0] for n in names} & IO_MODULES


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("portbroker.wire")))
def test_the_codecs_import_nothing_above_them(module: str) -> None:
    above = {
        n
        for n in internal(imports(MODULES[module], everywhere=True))
        if not n.startswith("portbroker.wire") and n != "portbroker.errors"
    }
    assert above == set()


def test_the_broker_knows_no_protocol() -> None:
    """Protocol details live in methods/ and wire/; the broker executes actions."""
    names = internal(imports(MODULES["portbroker.broker"], everywhere=True))
    protocol = {
        n
        for n in names
        if n.startswith("portbroker.wire")
        or n in ("portbroker.methods.pcp", "portbroker.methods.natpmp", "portbroker.methods.upnp")
    }
    assert protocol == set()
