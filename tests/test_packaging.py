"""What `pip install portbroker` gives a user: the wheel built from this
checkout, installed with its dependencies in a fresh virtualenv, run from a
directory outside the checkout (so nothing can import the source tree).

Marked `packaging` (about 15 s: a wheel build and a pip install, from the
package index pip is configured with); `-m "not packaging"` leaves it out.
.ci/run runs it with the other non-lab tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import portbroker

pytestmark = pytest.mark.packaging

CHECKOUT = Path(__file__).resolve().parent.parent
# A guard against a hung pip, not an expectation of speed.
PATIENCE = 600


def _run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=PATIENCE, check=False
    )
    assert done.returncode == 0, f"{argv}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


class Installed:
    """A wheel of this checkout and a fresh virtualenv it is installed in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Outside the checkout, with nothing that points Python back into it.
        self.cwd = root / "elsewhere"
        self.cwd.mkdir()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        dist = root / "dist"
        _run(
            [sys.executable, "-m", "pip", "wheel", str(CHECKOUT), "--no-deps", "-w", str(dist)],
            cwd=self.cwd,
            env=self.env,
        )
        (self.wheel,) = dist.glob("portbroker-*.whl")
        venv = root / "venv"
        _run([sys.executable, "-m", "venv", str(venv)], cwd=self.cwd, env=self.env)
        self.bin = venv / "bin"
        _run(
            [str(self.bin / "python"), "-m", "pip", "install", "-q", str(self.wheel)],
            cwd=self.cwd,
            env=self.env,
        )

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bin / program), *args], cwd=self.cwd, env=self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("packaging"))


def test_wheel_holds_the_package_with_py_typed_and_no_tests(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = wheel.read(entry_points).decode()
    assert "portbroker/py.typed" in names  # PEP 561: users' mypy reads our annotations
    # The licence pyproject declares, as text (PEP 639: .dist-info/licenses/).
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], sorted(names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]
    assert not [n for n in names if "/tests/" in n or "conftest" in n]
    source = {p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / "portbroker").rglob("*.py")}
    assert source - names == set()  # no module of the package left out
    assert "portbroker = portbroker.cli:main" in scripts
    assert "portbroker-lab = portbroker.testing.lab:main" in scripts


def test_installed_command_prints_version_and_help(installed: Installed) -> None:
    assert installed.run("portbroker", "--version").stdout == (
        f"portbroker {portbroker.__version__}\n"
    )
    text = installed.run("portbroker", "--help").stdout
    assert text.startswith("usage: portbroker ")
    assert "EXAMPLES" in text
    assert "EXAMPLES" in installed.run("portbroker", "map", "--help").stdout


def test_installed_library_imports_from_the_venv_not_the_checkout(installed: Installed) -> None:
    code = (
        "import importlib.metadata, json, portbroker\n"
        "portbroker.open_broker\n"
        "print(json.dumps([portbroker.__file__, portbroker.__version__,"
        " importlib.metadata.version('portbroker')]))"
    )
    where, version, metadata_version = json.loads(installed.run("python", "-c", code).stdout)
    assert Path(where).is_relative_to(installed.root / "venv")
    assert version == metadata_version == portbroker.__version__


def test_installed_command_probes_a_fake_gateway(
    installed: Installed, gateway_port: int, tmp_path: Path
) -> None:
    # The installed command and its dependencies (trio, attrs) do the real
    # job, against tests/conftest.py's FakeGateway on 127.0.0.1 (SSDP, too,
    # goes to 127.0.0.1 only: a port nobody serves).
    done = installed.run(
        "portbroker",
        "probe",
        "--json",
        "--gateway",
        "127.0.0.1",
        "--server-port",
        str(gateway_port),
        "--ssdp-port",
        "9",
        "--no-multicast",
        "--timeout",
        "1",
        "--state-file",
        str(tmp_path / "state.json"),
    )
    report = json.loads(done.stdout)
    assert report["gateway"] == "127.0.0.1"
    assert report["selected"] == "pcp"


def test_installed_python_dash_m_and_completion(installed: Installed) -> None:
    # Review of issue 10: `python -m portbroker` (a venv without its bin/ on
    # PATH), and the completion script the installed command prints is bash.
    assert installed.run("python", "-m", "portbroker", "--version").stdout == (
        f"portbroker {portbroker.__version__}\n"
    )
    script = installed.run("portbroker", "completion", "bash").stdout
    done = subprocess.run(
        ["bash", "-n"], input=script, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")
