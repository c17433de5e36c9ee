"""The package's lazy names (PEP 562, portbroker/__init__.py) as users' tools see them.

Review of issue 10: the names are imported when first used, so that a command
through the daemon does not pay for trio; a type checker and ``python -m``
must still see the package a user expects.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import portbroker

ROOT = Path(__file__).resolve().parents[1]


def test_a_type_checker_sees_every_name_and_rejects_a_misspelt_one(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra, not in test")
    # A module-level __getattr__ that mypy (or an IDE) can see makes every
    # unknown name of the module an `object`: `portbroker.open_brokr` would
    # type-check. Names exist for type checkers through the TYPE_CHECKING imports.
    user = tmp_path / "user.py"
    user.write_text(
        "import portbroker\n"
        "from portbroker import Lease, open_broker\n"
        "reveal_type(portbroker.MappingRequest)\n"
        "portbroker.open_brokr\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--strict", str(user)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert any(
        ':3: note: Revealed type is "def' in line and "portbroker.types.MappingRequest" in line
        for line in lines
    ), done.stdout
    assert any(':4: error: Module has no attribute "open_brokr"' in line for line in lines), (
        done.stdout
    )
    assert done.stdout.count(": error:") == 1, done.stdout


def test_python_dash_m_portbroker_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "portbroker", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"portbroker {portbroker.__version__}\n",
        "",
    )


def test_submodules_are_attributes_of_the_package_as_before_it_went_lazy() -> None:
    # `import portbroker` used to import the broker and with it errors, wire,
    # lifecycle...: code that then wrote `portbroker.errors.MappingError` must
    # keep working. (A subpackage's own modules, `portbroker.wire.pcp`, still
    # need importing.) A dunder or private name imports nothing (`__main__`
    # would run the command).
    code = (
        "import sys, portbroker\n"
        "for name in ('__main__', '_util', 'no_such_module'):\n"
        "    try:\n"
        "        getattr(portbroker, name)\n"
        "    except AttributeError as exc:\n"
        "        print(exc)\n"
        "print('portbroker.__main__' in sys.modules, 'portbroker._util' in sys.modules)\n"
        "print(portbroker.errors.MappingError.__name__, portbroker.wire.__name__,"
        " portbroker.lifecycle.TRANSITIONS is not None, portbroker.testing.FakeGateway.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "module 'portbroker' has no attribute '__main__'",
        "module 'portbroker' has no attribute '_util'",
        "module 'portbroker' has no attribute 'no_such_module'",
        "False False",
        "MappingError portbroker.wire True FakeGateway",
    ]
