"""Sphinx configuration for portbroker's documentation site.

Built by tests/test_docs_build.py with ``sphinx-build -W --keep-going -b html
docs <out>``: any warning fails the build. The Markdown pages are read by MyST
(myst-parser) as they are, so the same files read well on GitHub and here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
# The project itself (autodoc imports it) and the site's own extension.
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE / "_ext"))

import portbroker  # noqa: E402

project = "portbroker"
author = "portbroker developers"
copyright = "portbroker developers"
release = portbroker.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    # Async functions read as ``await f()``, context managers as ``async with``.
    "sphinxcontrib_trio",
    # The lifecycle diagrams: SVG drawn by Graphviz's dot at build time.
    "sphinx.ext.graphviz",
    "lifecycle_diagram",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/.venv"]

# Heading anchors so that links such as ``usage.md#errors`` resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# sphinxcontrib-trio extends autodoc's class-based documenters, which Sphinx 9
# keeps only behind this switch; without it ``open_broker`` would read as a
# plain function instead of ``async with open_broker()``.
autodoc_use_legacy_class_based = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Never fetched at build time (the build is offline); links to the standard
# library resolve only when an inventory is present, so none is configured.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

graphviz_output_format = "svg"

html_theme = "furo"
html_title = f"portbroker {release}"

# A module constant has no docstring of its own: autodoc would show the
# docstring of its type (``int([x]) -> integer``...). Its description is
# written in docs/api.md instead.
_VALUE_TYPES = (bool, int, float, str, bytes, tuple, list, dict, set, frozenset)


def _drop_type_docstrings(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    # Only the type's own docstring goes: a ``#:`` comment stays.
    own = (type(obj).__doc__ or "").strip().splitlines()
    if type(obj) in _VALUE_TYPES and own and lines and lines[0].strip() == own[0].strip():
        lines.clear()


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _drop_type_docstrings)
