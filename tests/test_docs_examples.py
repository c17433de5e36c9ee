"""The Python examples in docs/*.md and README.md parse, and name what exists.

This is the part of "every code example runs in a test" that holds without a
gateway: each ```python block compiles (top-level ``await`` and ``async
with`` allowed, as the examples are written inside an async app), every
``from portbroker... import name`` imports, and every attribute chain rooted
at ``portbroker`` (``portbroker.client.open_client``) resolves. An example
that names an API that was renamed or removed fails here. Running the
examples against FakeGateway and the lab is not done yet.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```(?:python|py)\n(.*?)^```", text, re.S | re.M):
            line = text[: match.start()].count("\n") + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


EXAMPLES = _examples()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 10, [where for where, _ in EXAMPLES]


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of *dotted*, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def _chain(node: ast.expr) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
        return ".".join(reversed(names))
    return None


@pytest.mark.parametrize(("where", "source"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_the_example_parses_and_names_what_exists(where: str, source: str) -> None:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | ast.PyCF_ONLY_AST
    tree = compile(source, where, "exec", flags=flags)
    assert isinstance(tree, ast.Module)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("portbroker"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("portbroker"):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute):
            dotted = _chain(node)
            if dotted is not None and dotted.split(".")[0] == "portbroker":
                try:
                    _resolve(dotted)
                except (AttributeError, ModuleNotFoundError) as exc:
                    pytest.fail(f"{where}: {dotted} does not exist ({exc})")
