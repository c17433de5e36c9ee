"""The documentation site (docs/) builds with no warning, and shows what it says.

``sphinx-build -W --keep-going -b html docs <tmp>``, as a reader's build would
run it: any warning (a broken cross-reference, a page outside every toctree,
a docstring autodoc cannot parse, a page without a title) fails the build.
Then the built pages are read back: the lifecycle diagram holds every edge of
the code's tables, and the API reference documents the public surface, with
async functions and context managers shown as such (sphinxcontrib-trio).
"""

from __future__ import annotations

import enum
import html
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import pytest

import portbroker
import portbroker.client
import portbroker.nested
import portbroker.p2p
import portbroker.rendezvous
from portbroker.lifecycle import DELETE_TRANSITIONS, TRANSITIONS, Trigger

E = TypeVar("E", bound=enum.Enum)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # -E: read every page afresh; -q: only warnings and errors on stderr.
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q"]
    result = subprocess.run(
        [*command, "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (
        f"sphinx-build failed (rc={result.returncode}); install the docs tools with "
        f"pip install -e '.[docs]'\n{result.stderr}{result.stdout}"
    )
    assert "WARNING" not in result.stderr, result.stderr
    return out


def _text(page: Path) -> str:
    """A built page as text: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_every_markdown_page_has_a_title() -> None:
    # A page whose first line is not a "# " heading has no title: Sphinx leaves
    # it out of the navigation (docs/performance.md lost its title once, to an
    # edit that put a table between every character of the page).
    for page in sorted(DOCS.glob("*.md")):
        first = page.read_text().split("\n", 1)[0]
        assert first.startswith("# "), f"{page.name} does not start with a '# ' title: {first!r}"


def test_the_site_builds_without_warnings_and_has_every_page(site: Path) -> None:
    for page in sorted(DOCS.glob("*.md")):
        assert (site / f"{page.stem}.html").is_file(), f"{page.name} was not built"
    index = (site / "index.html").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.stem != "index":
            assert f'href="{page.stem}.html"' in index, f"{page.name} is not in the index's toctree"


def _diagram_edges(source: str) -> set[tuple[str, str, str]]:
    edges = set()
    for line in source.splitlines():
        match = re.fullmatch(r"\s*(\w+) --> (\w+): (.+)", line)
        if match:
            for trigger in match.group(3).split(" / "):
                edges.add((match.group(1), trigger.strip(), match.group(2)))
    return edges


def _table_edges(table: Mapping[tuple[E, Trigger], E | tuple[E, ...]]) -> set[tuple[str, str, str]]:
    edges = set()
    for (state, trigger), target in table.items():
        for to in target if isinstance(target, tuple) else (target,):
            edges.add((state.name, trigger.name, to.name))
    return edges


def test_the_lifecycle_diagrams_are_the_code_tables(site: Path) -> None:
    page = (site / "lifecycle.html").read_text()
    diagrams = [
        html.unescape(block)
        for block in re.findall(r'<pre\s+class="mermaid"[^>]*>(.*?)</pre>', page, re.S)
    ]
    assert len(diagrams) == 2, f"expected the mapping and the delete diagram, found {len(diagrams)}"
    mapping, delete = diagrams
    assert _diagram_edges(mapping) == _table_edges(TRANSITIONS)
    assert _diagram_edges(delete) == _table_edges(DELETE_TRANSITIONS)
    assert "[*] --> REQUESTING" in mapping
    assert "RELEASED --> [*]" in mapping
    assert "FAILED --> [*]" in mapping


@pytest.mark.parametrize(
    "module",
    [portbroker, portbroker.client, portbroker.p2p, portbroker.rendezvous, portbroker.nested],
    ids=lambda m: m.__name__,
)
def test_the_api_reference_documents_every_public_name(site: Path, module: object) -> None:
    page = (site / "api.html").read_text()
    name = module.__name__  # type: ignore[attr-defined]
    for export in module.__all__:  # type: ignore[attr-defined]
        if export == "__version__":
            continue
        assert f'id="{name}.{export}"' in page, f"{name}.{export} is not in docs/api.md"


def test_the_api_reference_documents_the_testing_tools(site: Path) -> None:
    page = (site / "api.html").read_text()
    for name in ("FakeGateway", "MemoryLink", "FakeIgd"):
        assert f'id="portbroker.testing.{name}"' in page
    assert 'id="portbroker.testing.lab.open_lab"' in page


def test_the_api_reference_reads_async_as_async(site: Path) -> None:
    # sphinxcontrib-trio's prefixes; with Sphinx 9 they need
    # autodoc_use_legacy_class_based (docs/conf.py).
    text = _text(site / "api.html")
    assert "async with portbroker.open_broker(" in text
    assert "async with portbroker.client.open_client(" in text
    assert "await map(internal_port" in text
    assert "async with open_mapping(internal_port" in text


def test_internal_modules_stay_out_of_the_api_reference(site: Path) -> None:
    page = (site / "api.html").read_text()
    for internal in ("portbroker.wire.pcp", "portbroker.methods", "portbroker.daemon.server"):
        assert f'id="module-{internal}"' not in page
