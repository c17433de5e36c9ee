"""`portbroker --version`, every subcommand's man-page `--help`, and the bash
completion script generated from the parser.

Nothing here talks to a gateway: the examples are parsed, never run.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import portbroker
from portbroker import _cli_help, cli

PYTHON = sys.executable


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in cli._parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("portbroker's parser has no subcommands")


SUBCOMMANDS = sorted(_subcommands())


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_the_subcommands_are_the_ones_documented_here() -> None:
    # A new subcommand must come with its manual (_cli_help.command_help).
    assert (
        sorted(["probe", "map", "peer", "unmap", "list", "watch", "browse", "daemon", "completion"])
        == SUBCOMMANDS
    )


def test_version_prints_the_package_version() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "portbroker.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"portbroker {portbroker.__version__}\n"


def test_top_level_help_lists_examples_environment_and_exit_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys)
    for heading in ("EXAMPLES\n", "ENVIRONMENT\n", "EXIT STATUS\n"):
        assert heading in text
    assert "--version" in text
    for name in SUBCOMMANDS:
        assert f"    {name}" in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_has_a_description_and_an_example(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(capsys, name)
    assert text.startswith(f"usage: portbroker {name} ")
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 15, description
    examples = text.split("\nEXAMPLES\n", 1)[1]
    assert f"  portbroker {name}" in examples or f"  sudo portbroker {name}" in examples


@pytest.mark.parametrize("name", ["", *SUBCOMMANDS])
def test_help_fits_an_80_column_terminal(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # argparse wraps to $COLUMNS; the descriptions and EXAMPLES are kept as written.
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(capsys, *([name] if name else []))
    assert [line for line in text.splitlines() if len(line) > 80] == []


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_example_parses_as_that_subcommand(name: str) -> None:
    """An example that drifts from the options fails here, not in a user's shell."""
    parser = cli._parser()
    lines = _cli_help.examples(name)
    assert lines
    for line in lines:
        words = shlex.split(line.split("|")[0].split(">")[0].rstrip(" &"))
        if words[0] == "eval":
            words = shlex.split(words[1].strip("$()"))
        if words[0] == "sudo":
            words = words[1:]
        assert words[0] == "portbroker", line
        if name == "completion":
            # Parsing SHELL prints the script and exits: that is the command.
            with pytest.raises(SystemExit) as exited:
                parser.parse_args(words[1:])
            assert exited.value.code == 0
            continue
        args = parser.parse_args(words[1:])
        assert args.command == name, line


@pytest.mark.parametrize("name", ["probe", "map", "peer", "unmap"])
def test_examples_that_ask_a_gateway_name_the_readers_router(name: str) -> None:
    # An example that talks to a gateway directly names one, the reader's own
    # home router; only map and unmap have examples without, which go
    # through the reader's daemon.
    parser = cli._parser()
    gateways = {
        parser.parse_args(shlex.split(line)[1:]).gateway for line in _cli_help.examples(name)
    }
    assert gateways == ({"192.168.1.1", None} if name in ("map", "unmap") else {"192.168.1.1"})


def test_option_groups_sort_the_map_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "map")
    sections = {block.split(":\n", 1)[0]: block for block in text.split("\n\n") if ":\n" in block}
    assert "--gateway IP" in sections["gateway options"]
    assert "--json" in sections["output options"]
    assert "--no-daemon" in sections["daemon options"]
    assert "--hold" in sections["keeping it alive"]
    assert "--publish" in sections["DNS-SD options (docs/dnssd.md)"]
    assert "--external-port" in sections["options"]
    assert "--gateway" not in sections["options"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_argument_has_help(name: str) -> None:
    undocumented = [
        action.option_strings or action.metavar or action.dest
        for action in _subcommands()[name]._actions
        if not action.help
    ]
    assert undocumented == []


# -- completion --------------------------------------------------------------

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _complete(script: str, line: str) -> list[str]:
    """What bash offers for *line* (the word being completed is its last,
    empty after a trailing space), with the generated script loaded."""
    return _complete_words(script, line.split(" "))


def _complete_words(script: str, words: list[str]) -> list[str]:
    """As :func:`_complete`, for words that hold spaces (each a shell word)."""
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_portbroker\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [w for w in done.stdout.split("\n") if w]


@pytest.fixture(scope="module")
def script() -> str:
    done = subprocess.run(
        [PYTHON, "-m", "portbroker.cli", "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.endswith("complete -F _portbroker portbroker\n")
    return done.stdout


@needs_bash
def test_completion_offers_the_subcommands(script: str) -> None:
    assert _complete(script, "portbroker ma") == ["map"]
    assert set(_complete(script, "portbroker ")) == set(SUBCOMMANDS)


@needs_bash
def test_completion_offers_a_subcommands_options_and_not_hidden_ones(script: str) -> None:
    offered = _complete(script, "portbroker map --")
    assert {"--gateway", "--hold", "--via", "--publish", "--no-daemon"} <= set(offered)
    assert "--server-port" not in offered  # a test-only option (help=SUPPRESS)
    assert "--hold" not in _complete(script, "portbroker list --")


@needs_bash
def test_completion_offers_an_options_choices(script: str) -> None:
    assert _complete(script, "portbroker map 8080/tcp --via ") == ["pcp", "natpmp", "upnp"]
    assert _complete(script, "portbroker map --gateway ") == []
    assert _complete(script, "portbroker completion ") == ["bash"]


@needs_bash
def test_completion_offers_paths_for_a_path_option(script: str, tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("[]")
    offered = _complete(script, f"portbroker unmap 8080/tcp --state-file {tmp_path}/st")
    assert offered == [f"{tmp_path}/state.json"]


@needs_bash
def test_completion_offers_top_level_options(script: str) -> None:
    assert _complete(script, "portbroker --ver") == ["--version"]


@needs_bash
def test_completion_offers_a_path_with_spaces_or_a_star_as_one_word(
    script: str, tmp_path: Path
) -> None:
    # Review of issue 10: `COMPREPLY=($(compgen -f ...))` splits a name at its
    # spaces and expands a `*` in it against the current directory.
    (tmp_path / "my states").mkdir()
    (tmp_path / "my states" / "a*b.json").write_text("{}")
    (tmp_path / "decoy.json").write_text("{}")
    words = ["portbroker", "map", "8080/tcp", "--state-file", f"{tmp_path}/my"]
    assert _complete_words(script, words) == [f"{tmp_path}/my states"]
    words[-1] = f"{tmp_path}/my states/a"
    assert _complete_words(script, words) == [f"{tmp_path}/my states/a*b.json"]
