"""The documentation site (docs/) builds with no warning, and shows what it says.

``sphinx-build -W --keep-going -b html docs <tmp>``, as a reader's build would
run it: any warning (a broken cross-reference, a page outside every toctree,
a docstring autodoc cannot parse, a page without a title) fails the build.
(.ci/run's docs step makes that build and names it in $PORTBROKER_DOCS_SITE,
which the tests then read instead of building again.) Then the built pages
are read back: the lifecycle diagram holds every edge of
the code's tables, and the API reference documents the public surface, with
async functions and context managers shown as such (sphinxcontrib-trio).
"""

from __future__ import annotations

import enum
import html
import os
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
    # The docs extra (in dev, which .ci/run installs); a clone with only
    # .[test] has no Sphinx to build with.
    pytest.importorskip(
        "sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')"
    )
    built = os.environ.get("PORTBROKER_DOCS_SITE")
    if built:
        # .ci/run's docs step built it, with -W, moments ago: read that one.
        assert (Path(built) / "index.html").is_file(), f"PORTBROKER_DOCS_SITE={built} holds no site"
        return Path(built)
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
        f"pip install -e '.[docs]', and Graphviz's dot (scripts/setup installs both)\n"
        f"{result.stderr}{result.stdout}"
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


def _diagram_edges(svg: str) -> set[tuple[str, str, str]]:
    """(from, trigger, to) of every edge Graphviz drew, the start and end points' too."""
    edges = set()
    for title, body in re.findall(
        r'<g id="edge\d+" class="edge">\s*<title>(.*?)</title>(.*?)</g>', svg, re.S
    ):
        a, b = html.unescape(title).split("->")
        label = " ".join(html.unescape(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", body))
        for trigger in label.split(" / ") if label else [""]:
            edges.add((a, trigger.strip(), b))
    return edges


def _table_edges(table: Mapping[tuple[E, Trigger], E | tuple[E, ...]]) -> set[tuple[str, str, str]]:
    edges = set()
    for (state, trigger), target in table.items():
        for to in target if isinstance(target, tuple) else (target,):
            edges.add((state.name, trigger.name, to.name))
    return edges


def test_the_lifecycle_diagrams_are_the_code_tables(site: Path) -> None:
    # Drawn at build time (SVG files the page embeds): an offline reader sees them.
    page = (site / "lifecycle.html").read_text()
    images = re.findall(r'<object data="(_images/[^"]+\.svg)" type="image/svg\+xml"', page)
    assert len(images) == 2, f"expected the mapping and the delete diagram, found {images}"
    mapping, delete = (_diagram_edges((site / image).read_text()) for image in images)
    ends = {
        ("start", "", "REQUESTING"),
        ("RELEASED", "", "end_RELEASED"),
        ("FAILED", "", "end_FAILED"),
    }
    assert mapping == _table_edges(TRANSITIONS) | ends
    delete_ends = {
        ("start", "", "DELETING"),
        ("DELETED", "", "end_DELETED"),
        ("GAVE_UP", "", "end_GAVE_UP"),
    }
    assert delete == _table_edges(DELETE_TRANSITIONS) | delete_ends
    assert "<script" not in (site / images[0]).read_text()


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
