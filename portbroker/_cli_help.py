"""The ``portbroker`` command's manual: what each subcommand does and examples.

``portbroker.cli`` builds the parser; the prose of ``portbroker COMMAND
--help`` lives here, man-page style (a description, the options grouped, then
EXAMPLES), so that the parser code stays a list of options. It also generates
the bash completion script from that parser (``portbroker completion bash``).

Stdlib only: ``portbroker --help`` must not import trio (see the test
``test_help_is_quick_and_imports_nothing_heavy``).

Every example names the gateway it asks (``--gateway 192.168.1.1``, a typical
home router: the reader's own), goes through the reader's daemon, or asks
nobody; tests/test_cli_help.py parses each one with the real parser.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

__all__ = ["MAIN_EPILOG", "bash_completion", "command_help", "completion_action", "examples"]


class ManFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and EXAMPLES as written (their line breaks and
    alignment are the point); option help is still wrapped to the terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


MAIN_EPILOG = """\
Run `portbroker COMMAND --help` for a command's options and examples.

EXAMPLES
  portbroker probe --gateway 192.168.1.1
      what does the router at 192.168.1.1 speak?
  portbroker map 8080/tcp --gateway 192.168.1.1 --hold
      map TCP 8080, keep it alive until Ctrl-C, then delete it
  sudo portbroker daemon &
      one broker for every app on this host
  portbroker map 8080/tcp
      the same, through that daemon (until `portbroker unmap 8080/tcp`)
  portbroker list
      the daemon's mappings

ENVIRONMENT
  PORTBROKER_GATEWAY   the gateway to ask when --gateway is not given
  PORTBROKER_STATE     the state file of map/unmap (--state-file)
  PORTBROKER_SOCKET    the daemon's socket (--socket)
  PORTBROKER_DEBUG     set: internal errors show their traceback
  PORTBROKER_DAEMON_TIMEOUT
                       seconds list/map/unmap wait for the daemon to answer
                       (default 120)

EXIT STATUS
  0 success, 1 failure (one line on stderr says which method failed and why),
  2 usage error.
"""

# name -> (one-line summary for `portbroker --help`, description, examples).
# Examples are "command line" or ("command line", "what it does").
_Example = str | tuple[str, str]
_COMMANDS: dict[str, tuple[str, str, Sequence[_Example]]] = {
    "probe": (
        "ask every method at once and report what the gateway speaks",
        """\
Ask the gateway with PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP IGD at the
same time and report, per method, whether it answered, its round trip, the
external address it reports, its epoch, and why a method is unavailable.
Nothing is mapped. The method `map` would use is marked as selected. An
external address nobody on the Internet can reach (double NAT, CGNAT) is
named as such (docs/double-nat.md).""",
        (
            ("portbroker probe --gateway 192.168.1.1", "ask the router at 192.168.1.1"),
            (
                "portbroker probe --gateway 192.168.1.1 --json",
                "the same report as one JSON object",
            ),
            (
                "portbroker probe --gateway 192.168.1.1 --methods natpmp,upnp --timeout 5",
                "skip PCP; wait up to 5 s",
            ),
        ),
    ),
    "map": (
        "create a mapping",
        """\
Ask the gateway to forward PORT (TCP unless /udp) from its external address to
this host, print the external address and port, and exit: the mapping stays
on the gateway for --lifetime seconds (until deleted, where a UPnP gateway
grants only permanent ones) and is recorded in the state file so that
`portbroker unmap` can delete it. With --hold the command instead keeps
it renewed, and restores it when the gateway loses it, until Ctrl-C, SIGTERM
or SIGHUP, then deletes it; without --gateway it follows the default route:
when that leads to another gateway (another network), it deletes the mapping
on the old one and makes it on the new one (a GatewayChanged line, then
Restored), unless --no-follow.

When a portbroker daemon runs (and neither --gateway nor --no-daemon is
given), the daemon makes and keeps the mapping: without --hold it lasts until
`portbroker unmap`. A daemon named with --socket or $PORTBROKER_SOCKET must
be running: without it, map fails rather than ask the gateway itself.

The most preferred method (--methods: PCP, then NAT-PMP, then UPnP IGD) that
the gateway answers is used; --via picks one. The gateway may give another
external port than the one asked for, unless --exact.""",
        (
            (
                "portbroker map 8080/tcp --gateway 192.168.1.1",
                "map TCP 8080 for two hours, record it",
            ),
            (
                "portbroker map 8080/tcp --gateway 192.168.1.1 --hold",
                "keep it alive until Ctrl-C, then delete it",
            ),
            (
                "portbroker map 51820/udp --gateway 192.168.1.1 --external-port 51820 --exact",
                "that external port or nothing",
            ),
            (
                "portbroker map 8443/tcp --gateway 192.168.1.1 --filter 198.51.100.7/32",
                "only one remote host may connect",
            ),
            (
                "portbroker map 8554/tcp --gateway 192.168.1.1 --third-party 192.168.1.20",
                "a camera's port, on its behalf",
            ),
            ("portbroker map 8080/tcp", "through the running daemon"),
            (
                "portbroker map 8080/tcp --hold --publish _http._tcp:web",
                "and announce it on the LAN with DNS-SD",
            ),
        ),
    ),
    "peer": (
        "keep the NAT binding of an outbound flow to one remote peer (PCP PEER)",
        """\
Create or extend the gateway's binding of PORT's flow to --remote (PCP PEER,
RFC 6887 §12) and print the external address and port the remote peer sees.
Without PEER on the gateway, the port is mapped instead (unless --peer-only).
Without --hold the binding lapses after --lifetime; `portbroker unmap PORT
--remote ADDRESS:PORT` deletes it (docs/peer.md).""",
        (
            (
                "portbroker peer 5000/udp --gateway 192.168.1.1 --remote 192.0.2.9:7000",
                "the binding to that peer",
            ),
            (
                "portbroker peer 5000/udp --gateway 192.168.1.1 --remote 192.0.2.9:7000 --hold",
                "kept until Ctrl-C, then deleted",
            ),
        ),
    ),
    "unmap": (
        "delete a mapping made by map",
        """\
Delete the mapping of PORT that `portbroker map` (or `portbroker peer`, with
--remote) made and recorded in the state file, with the method and PCP nonce
it was made with; through a running daemon, delete your daemon mapping of
PORT. Only recorded mappings can be unmapped: one made with --hold is deleted
when its command ends.""",
        (
            ("portbroker unmap 8080/tcp --gateway 192.168.1.1", "delete what map made"),
            ("portbroker unmap 8080/tcp", "through the running daemon"),
            (
                "portbroker unmap 5000/udp --gateway 192.168.1.1 --remote 192.0.2.9:7000",
                "delete a PEER binding",
            ),
            (
                "portbroker unmap 8554/tcp --gateway 192.168.1.1 --third-party 192.168.1.20",
                "the camera's mapping",
            ),
        ),
    ),
    "list": (
        "the daemon's mappings (yours; all for root)",
        """\
Print the running daemon's mappings, one a line: id, external endpoint and
method (or its state while it has none), owner, how many apps hold it, and
whether it persists. A user sees their own mappings; root sees every one.""",
        (
            "portbroker list",
            ("portbroker list --json", "one JSON object a line"),
            (
                "portbroker list --socket $XDG_RUNTIME_DIR/portbroker.sock",
                "a user's own daemon",
            ),
        ),
    ),
    "watch": (
        "print the daemon's mapping events",
        """\
Print the running daemon's mapping events as they happen (Acquired, Renewed,
Lost, Restored, ExternalAddressChanged, ...; docs/daemon-protocol.md) until
Ctrl-C: your mappings' events, or every user's for root.""",
        (
            "portbroker watch",
            ("portbroker watch --json", "one JSON object a line, for scripts"),
        ),
    ),
    "browse": (
        "DNS-SD peers of a service type on the LAN, with their external endpoints",
        """\
Browse the LAN with multicast DNS-SD for services of TYPE and print each
instance as it appears, changes or goes, with its LAN address and, where a
portbroker published it, the external endpoint it is mapped to
(docs/dnssd.md). Sends mDNS on the LAN, never to the gateway.""",
        (
            ("portbroker browse _http._tcp", "changes until Ctrl-C"),
            ("portbroker browse _http._tcp --for 3 --json", "what is there after 3 s"),
            ("portbroker browse _ssh._tcp --interface 192.168.1.10", "on one interface"),
        ),
    ),
    "daemon": (
        "run the broker that every app on this host shares",
        """\
Run one broker for the whole host and serve it on a Unix socket (JSON lines,
docs/daemon-protocol.md): apps and `portbroker map`/`unmap`/`list`/`watch`
ask it for mappings, and it keeps them renewed and restored, releases them a
grace period after their app's connection ends (persistent ones live until
`portbroker unmap`, across daemon restarts: they are kept in --state). It
runs in the foreground and logs to stderr; stop it with SIGTERM or Ctrl-C.""",
        (
            ("sudo portbroker daemon", "for every user: /run/portbroker/portbroker.sock"),
            (
                "sudo portbroker daemon --gateway 192.168.1.1 --group portbroker",
                "socket mode 0660 for that group",
            ),
            ("portbroker daemon --quiet &", "a user's own, at $XDG_RUNTIME_DIR"),
            (
                "sudo portbroker daemon --max-mappings 8 --grace 30",
                "tighter limits, a longer grace",
            ),
        ),
    ),
    "completion": (
        "print a shell completion script",
        """\
Print a completion script for SHELL (bash only, for now), generated from this
version's subcommands and options: it completes subcommands, options, the
values of options with a fixed set (--via) and paths (--state-file).""",
        (
            ('eval "$(portbroker completion bash)"', "in ~/.bashrc"),
            (
                "portbroker completion bash | sudo tee /etc/bash_completion.d/portbroker",
                "for every user (with the bash-completion package)",
            ),
        ),
    ),
}


def _examples(examples: Sequence[_Example]) -> str:
    lines = ["EXAMPLES"]
    for example in examples:
        command, says = (example, "") if isinstance(example, str) else example
        lines.append(f"  {command}")
        if says:
            lines.append(f"      {says}")
    return "\n".join(lines) + "\n"


def command_help(name: str) -> dict[str, Any]:
    """``add_parser`` keywords for subcommand *name*: its summary, description,
    EXAMPLES epilog and the formatter that keeps them as written."""
    summary, description, examples = _COMMANDS[name]
    return {
        "help": summary,
        "description": description,
        "epilog": _examples(examples),
        "formatter_class": ManFormatter,
    }


def examples(name: str) -> list[str]:
    """The command lines of *name*'s EXAMPLES (for tests that parse them)."""
    return [e if isinstance(e, str) else e[0] for e in _COMMANDS[name][2]]


# -- completion --------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """The option strings of *parser* a user may type (hidden ones left out),
    and for those that take a value, what to complete it with."""
    words: list[str] = []
    values: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public walk of a parser's options
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        words.extend(action.option_strings)
        if action.nargs == 0:
            continue
        if action.choices:
            value = f"compgen -W {shlex.quote(' '.join(map(str, action.choices)))}"
        elif action.metavar == "PATH":
            value = _PATHS
        else:
            value = ""  # an address, a number: nothing to offer
        for option in action.option_strings:
            values[option] = value
    return words, values


# Paths, one a line into COMPREPLY: `COMPREPLY=($(compgen -f ...))` would split
# a name at its spaces and expand a `*` in it; -o filenames quotes what is
# inserted and marks directories (compopt works only while completing, and
# from bash 4). A read loop, not mapfile, which macOS's bash 3.2 lacks.
_PATHS = (
    "compopt -o filenames 2>/dev/null; local path; COMPREPLY=();"
    ' while IFS= read -r path; do COMPREPLY+=("$path"); done < <(compgen -f -- "$cur"); '
)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for *parser*: its subcommands, each one's
    options, and the values of options with choices (``--via``) or paths."""
    commands = _subcommands(parser)
    top, _ = _options(parser)
    cases = []
    for name, sub in commands.items():
        words, values = _options(sub)
        value_cases = "".join(
            f"                {option}) "
            + (_PATHS if how == _PATHS else f'COMPREPLY=($({how} -- "$cur")); ' if how else "")
            + "return ;;\n"
            for option, how in values.items()
        )
        # A positional with choices (completion's SHELL) is offered before
        # any option; otherwise options are offered where a word may go.
        choices = [
            str(choice)
            for a in sub._actions
            if not a.option_strings and a.choices and a.help != argparse.SUPPRESS
            for choice in a.choices
        ]
        offer = f'COMPREPLY=($(compgen -W {shlex.quote(" ".join(words))} -- "$cur"))'
        if choices:
            offer = (
                f"if [[ $cur == -* ]]; then {offer}; else "
                f'COMPREPLY=($(compgen -W {shlex.quote(" ".join(choices))} -- "$cur")); fi'
            )
        cases.append(
            f"        {name})\n"
            f'            case "$prev" in\n{value_cases}            esac\n'
            f"            {offer} ;;\n"
        )
    return f"""\
# bash completion for portbroker, generated by `portbroker completion bash`
_portbroker() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local command="" i
    # The first word that is not an option is the subcommand (the top level
    # has no option that takes a value).
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            -*) ;;
            *) command=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case "$command" in
        "")
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W {shlex.quote(" ".join(top))} -- "$cur"))
            else
                COMPREPLY=($(compgen -W {shlex.quote(" ".join(commands))} -- "$cur"))
            fi ;;
{"".join(cases)}    esac
}}
complete -F _portbroker portbroker
"""


def completion_action(root: argparse.ArgumentParser) -> type[argparse.Action]:
    """An argparse action that prints *root*'s completion script and exits as
    the parser reads SHELL, as argparse's own ``--version`` does, so that
    ``portbroker completion`` needs no dispatch of its own."""

    class CompletionAction(argparse.Action):
        def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Any,
            option_string: str | None = None,
        ) -> None:
            print(bash_completion(root), end="")
            parser.exit()

    return CompletionAction
