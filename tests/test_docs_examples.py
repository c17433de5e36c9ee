"""Every code example in docs/*.md and README.md runs, against fakes on loopback.

tests/docs_harness.py says how a block is classified (its fence's language,
a ``<!-- norun: ... -->`` / ``<!-- run: lab -->`` comment above it) and where
each kind runs: Python blocks in this process against FakeGateways in memory
(or a daemon process on a FakeGateway over UDP 127.0.0.1), shell blocks'
``portbroker`` commands as processes pinned to FakeGateways on 127.0.0.1 and
::1. A block that is neither marked nor runnable fails here, so a new
example cannot silently escape; one marked ``run: lab`` runs in
tests/lab/test_lab_docs_examples.py.

Every Python block, run or not, also compiles and names only what exists:
``from portbroker... import name`` imports, every attribute chain rooted at
``portbroker`` resolves.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import shutil
from pathlib import Path

import pytest

from portbroker.testing.lab import in_netns
from tests import docs_harness
from tests.docs_harness import Block, Gateways, blocks, pinned_library, run_python
from tests.realdata import realdata

ROOT = docs_harness.ROOT
BLOCKS = [b for b in blocks() if b.kind != "directive"]
PYTHON = [b for b in BLOCKS if b.lang in docs_harness.PYTHON_LANGS]
RUN_PYTHON = [b for b in BLOCKS if b.kind == "python"]
RUN_SHELL = [b for b in BLOCKS if b.kind == "shell"]


def _ids(found: list[Block]) -> list[str]:
    return [b.where for b in found]


def test_every_block_says_what_it_is() -> None:
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in BLOCKS if b.kind == "unknown"]
    assert not unknown, (
        "these blocks neither run nor say why not: give each a language (python, sh,"
        " console: runs; text: output) or `<!-- norun: why (the test that covers it) -->`"
        f" / `<!-- run: lab -->` on the line above: {unknown}"
    )


def test_every_norun_says_why_and_names_real_tests() -> None:
    for block in BLOCKS:
        if block.kind != "norun":
            continue
        assert len(block.reason) >= 10, f"{block.where}: norun needs a reason, got {block.reason!r}"
        for named in re.findall(r"tests/[\w/]+\.py", block.reason):
            assert (ROOT / named).is_file(), f"{block.where}: {named} does not exist"


def test_the_docs_have_examples_and_most_run() -> None:
    runs = len(RUN_PYTHON) + len(RUN_SHELL)
    norun = [b for b in BLOCKS if b.kind == "norun"]
    assert len(RUN_PYTHON) >= 10, _ids(RUN_PYTHON)
    assert runs > len(norun), (_ids(RUN_PYTHON + RUN_SHELL), _ids(norun))


def test_the_harness_classifies_by_language_and_mark(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```\nbare\n```\n\n```python\nx = 1\n```\n\n"
        "<!-- norun: a fragment of the block above -->\n```python\nx\n```\n\n"
        "<!-- run: lab -->\n```python\ny = 2\n```\n\n```text\nout\n```\n\n"
        "```{toctree}\nusage\n```\n\n```console\n$ portbroker list\n```\n"
    )
    found = docs_harness.blocks([page])
    kinds = [b.kind for b in found]
    assert kinds == ["unknown", "python", "norun", "lab", "text", "directive", "shell"]
    assert found[2].reason == "a fragment of the block above"


def test_a_failing_example_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # The harness reports what the block raised: an example that stopped
    # working cannot pass.
    block = Block("page.md:1", "python", "import portbroker\nportbroker.no_such_name\n", None, "")
    with pinned_library(monkeypatch), pytest.raises(AttributeError):
        run_python(block, real_clock=False)


def test_a_docs_example_never_finds_this_machines_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    block = Block(
        "page.md:1",
        "python",
        "import portbroker.gateway\nportbroker.gateway.find_gateway()\n",
        None,
        "",
    )
    with pinned_library(monkeypatch), pytest.raises(AssertionError, match="default gateway"):
        run_python(block, real_clock=False)


def test_an_example_that_hangs_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a block that waits on a stream (``async for``) may be stopped at the limit.
    block = Block("page.md:1", "python", "import trio\n\nawait trio.sleep_forever()\n", None, "")
    with pinned_library(monkeypatch), pytest.raises(AssertionError, match="did not finish"):
        run_python(block, real_clock=False)


def _uses_daemon(block: Block) -> bool:
    return "portbroker.client" in block.source


@pytest.mark.parametrize("block", RUN_PYTHON, ids=_ids(RUN_PYTHON))
def test_the_python_example_runs(
    block: Block,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    shutil.copy(realdata("miniupnpd-2.3.1-live", "rootDesc.xml"), tmp_path / "rootDesc.xml")
    monkeypatch.chdir(tmp_path)
    mdns = "open_rendezvous" in block.source
    if mdns and os.geteuid() != 0:
        pytest.skip("needs root: zeroconf runs in a network namespace of its own")
    with pinned_library(monkeypatch, mdns=mdns) as pinned, contextlib.ExitStack() as stack:
        gateways = None
        if _uses_daemon(block):
            gateways = stack.enter_context(Gateways())
            monkeypatch.setenv(
                "PORTBROKER_SOCKET", str(stack.enter_context(docs_harness.daemon(gateways)))
            )
        try:
            if mdns:
                netns = stack.enter_context(docs_harness.mdns_namespace())
                in_netns(
                    netns,
                    lambda: run_python(block, real_clock=True, limit=docs_harness.MDNS_LIMIT),
                )
            else:
                run_python(block, real_clock=gateways is not None)
        except BaseException as exc:
            out = capsys.readouterr()
            raise AssertionError(
                f"{block.where} raised {exc!r}; it printed:\n{out.out}{out.err}"
            ) from exc
    if "open_broker" in block.source:
        assert pinned.opened >= 1, f"{block.where} opened no broker"
    if pinned.fakes:
        assert any(fake.requests for fake in pinned.fakes.values()), f"{block.where} asked nothing"
    if gateways is not None:
        assert gateways.v4.requests, f"{block.where}: the daemon asked the gateway nothing"


@pytest.mark.parametrize("block", RUN_SHELL, ids=_ids(RUN_SHELL))
def test_the_shell_example_runs(block: Block, tmp_path: Path) -> None:
    commands = docs_harness.shell_commands(block)
    assert commands, f"{block.where} has no portbroker command"
    with contextlib.ExitStack() as stack:
        gateways = stack.enter_context(Gateways())
        sock = None
        for command in commands:
            if command.argv[:1] == ["daemon"]:
                # The harness's daemon, on the FakeGateway, stands in for it.
                sock = stack.enter_context(docs_harness.daemon(gateways))
                continue
            done = docs_harness.run_command(command, gateways, sock, tmp_path / "state.json")
            assert done.returncode == 0, (
                f"{block.where}: {command.line!r} exited {done.returncode}\n{done.stdout}{done.stderr}"
            )
            assert "Traceback" not in done.stderr, done.stderr
        asked = gateways.v4.requests or gateways.v6.requests or gateways.igd.actions
        assert asked, f"{block.where}: no command asked a gateway"


# -- every Python block, run or not: compiles and names what exists ----------------------


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


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_the_example_parses_and_names_what_exists(block: Block) -> None:
    where, source = block.where, block.source
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
