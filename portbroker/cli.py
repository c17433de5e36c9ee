"""The ``portbroker`` command: probe, map, unmap.

Exit status: 0 on success, 2 on a usage error, 1 on a failure, with a
one-line reason on stderr naming the method and what went wrong.

Heavy imports (trio, the broker; miniupnpc and zeroconf further down) happen
only once a command runs, so ``portbroker --help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portbroker._basics import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME, format_endpoint

# Light (no trio, no broker: the package imports those when first used), so
# that a command through the daemon stays quick; the lifetime range is named
# once, in types.
from portbroker.errors import PortBrokerError

if TYPE_CHECKING:
    from portbroker.broker import Broker, Mapping
    from portbroker.lifecycle import MappingEvent
    from portbroker.nested import NestedEvent
    from portbroker.types import Lease, ProbeReport

__all__ = ["main"]

ENV_STATE = "PORTBROKER_STATE"


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


class Failure(Exception):
    """The command could not do its job (exit status 1)."""


def _port_spec(text: str) -> tuple[int, str]:
    port_text, _, proto = text.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(
            f"protocol must be tcp or udp, not {proto!r} (in {text!r})"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{port_text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {port}")
    return port, proto


def _third_party(text: str) -> str:
    """--third-party's value: another lan host's IP address (RFC 6887 §13.1)."""
    from portbroker.types import no_host_reason, unscoped
    from portbroker.wire._fields import to_address

    try:
        # ::ffff:192.168.1.50 (as dual-stack sockets spell it) is IPv4: PCP
        # sends it so anyway, and its checks below must see the IPv4 address.
        # A scope (fe80::5%eth0) the gateway never sees, nor the daemon keeps.
        address = unscoped(to_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address (the lan host to map for, e.g. 192.168.1.50)"
        ) from None
    reason = no_host_reason(address)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"{address} is no lan host to map for ({reason})")
    return str(address)


def _filter(text: str) -> Any:
    """--filter's value: PREFIX[:PORT] (docs/third-party-and-filter.md)."""
    from portbroker.types import RemoteFilter

    try:
        return RemoteFilter.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(upper: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= upper:
            raise argparse.ArgumentTypeError(f"must be 1..{upper}, got {value}")
        return value

    return parse


def _lifetime(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of seconds ({MIN_LIFETIME}..{MAX_LIFETIME})"
        ) from None
    if not MIN_LIFETIME <= value <= MAX_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"must be {MIN_LIFETIME}..{MAX_LIFETIME} seconds, got {value}"
            + (" (to delete a mapping, use unmap)" if value == 0 else "")
        )
    return value


def _remote_spec(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (``[v6]:PORT`` for IPv6) of a PEER's remote peer."""
    from portbroker.wire._fields import to_address

    example = "e.g. 11.0.0.2:7000 or [2001:db8::2]:7000"
    if text.startswith("["):
        address, bracket, port_text = text[1:].partition("]:")
        if not bracket:
            raise argparse.ArgumentTypeError(
                f"--remote must be ADDRESS:PORT ({example}), not {text!r}"
            )
    else:
        address, colon, port_text = text.rpartition(":")
        if not colon or ":" in address:
            raise argparse.ArgumentTypeError(
                f"--remote must be ADDRESS:PORT ({example}), not {text!r}"
                + (": put an IPv6 address in brackets" if ":" in address else "")
            )
    try:
        # As the library keeps it (::ffff:11.0.0.2 is 11.0.0.2), so that unmap
        # --remote finds the record `peer` made with the same spelling.
        parsed = to_address(address)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--remote: {address!r} is not an IP address ({example}); names are not looked up"
        ) from None
    if parsed.is_unspecified:
        raise argparse.ArgumentTypeError(f"--remote must name a host, not {address}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--remote: {port_text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--remote: port must be 1..65535, got {port}")
    return str(parsed), port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    # The manual's prose (descriptions, EXAMPLES) is in _cli_help; here, the options.
    from portbroker import __version__, _cli_help

    parser = argparse.ArgumentParser(
        prog="portbroker",
        description="Make this host reachable from outside its NAT: ask the gateway for a\n"
        "port mapping with PCP, NAT-PMP or UPnP IGD, and keep it alive.",
        epilog=_cli_help.MAIN_EPILOG,
        formatter_class=_cli_help.ManFormatter,
    )
    parser.add_argument("--version", action="version", version=f"portbroker {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # Groups of a parent parser are copied into each child (argparse merges
    # them by title), so probe, map, unmap and peer list these alike.
    gateway = common.add_argument_group("gateway options")
    output = common.add_argument_group("output options")
    gateway.add_argument(
        "--gateway",
        metavar="IP",
        help="the gateway to ask (default: $PORTBROKER_GATEWAY, else the default route)",
    )
    gateway.add_argument(
        "--pcp-server",
        metavar="IP",
        help="a PCP server other than the gateway (RFC 7488); NAT-PMP and UPnP still ask the gateway",
    )
    gateway.add_argument(
        "--dhcp-leases",
        action="append",
        metavar="PATH",
        help="learn the PCP server from these DHCP lease files or directories (RFC 7291; "
        "repeatable; default: the system's, when the gateway is the default route)",
    )
    gateway.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="how long any one probe may take (default 2 s)",
    )
    gateway.add_argument(
        "--methods",
        default="pcp,natpmp,upnp",
        help="methods to use, most preferred first (default pcp,natpmp,upnp)",
    )
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument(
        "--state-file", metavar="PATH", help=f"where map records mappings for unmap (${ENV_STATE})"
    )
    common.add_argument(
        "--server-port", type=_positive_int(65535), default=5351, help=argparse.SUPPRESS
    )
    common.add_argument(
        "--ssdp-port", type=_positive_int(65535), default=1900, help=argparse.SUPPRESS
    )
    common.add_argument("--no-multicast", action="store_true", help=argparse.SUPPRESS)
    via_daemon = argparse.ArgumentParser(add_help=False)
    through = via_daemon.add_argument_group("daemon options")
    through.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket ($PORTBROKER_SOCKET, else the default)",
    )
    through.add_argument(
        "--no-daemon",
        action="store_true",
        help="talk to the gateway directly even if a daemon runs",
    )
    daemon_only = argparse.ArgumentParser(add_help=False)
    daemon_only.add_argument("--socket", metavar="PATH", help="the daemon's socket")
    daemon_only.add_argument("--json", action="store_true", help="print JSON, one object a line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("probe", parents=[common], **_cli_help.command_help("probe"))

    map_cmd = sub.add_parser("map", parents=[common, via_daemon], **_cli_help.command_help("map"))
    map_cmd.add_argument(
        "spec",
        metavar="PORT[/tcp|/udp]",
        type=_port_spec,
        help="the port on this host to map, TCP unless /udp: 8080, 8080/tcp, 5000/udp",
    )
    map_cmd.add_argument(
        "--external-port",
        type=_positive_int(65535),
        metavar="N",
        help="the external port to ask for (default: PCP lets the gateway choose;"
        " NAT-PMP and UPnP ask for PORT)",
    )
    map_cmd.add_argument(
        "--exact", action="store_true", help="fail rather than take another external port"
    )
    map_cmd.add_argument(
        "--lifetime",
        type=_lifetime,
        default=DEFAULT_LIFETIME,
        metavar="S",
        help=f"seconds to ask for, {MIN_LIFETIME}..{MAX_LIFETIME} (default {DEFAULT_LIFETIME})",
    )
    map_cmd.add_argument("--via", choices=("pcp", "natpmp", "upnp"), help="use only this method")
    map_cmd.add_argument(
        "--third-party",
        type=_third_party,
        metavar="IP",
        help="map the port of another lan host (a camera) on its behalf (PCP THIRD_PARTY, UPnP)",
    )
    map_cmd.add_argument(
        "--filter",
        type=_filter,
        action="append",
        default=[],
        metavar="PREFIX[:PORT]",
        help="only this remote prefix (and port) may connect, e.g. 11.0.0.2/32 (repeatable;"
        " refused where the gateway cannot enforce it)",
    )
    keeping = map_cmd.add_argument_group("keeping it alive")
    keeping.add_argument(
        "--hold",
        action="store_true",
        help="keep it renewed (and restored) until Ctrl-C, SIGTERM or SIGHUP, then delete it",
    )
    keeping.add_argument(
        "--no-follow",
        action="store_true",
        help="with --hold and no --gateway: stay on the first gateway when the default route"
        " moves (by default the mapping moves with it)",
    )
    keeping.add_argument(
        "--outer-gateway",
        metavar="IP",
        help="double NAT: also map through this outer NAT (PCP, else UPnP IGD) for the "
        "gateway's external endpoint (needs --hold; docs/double-nat.md)",
    )
    keeping.add_argument(
        "--persist",
        action="store_true",
        help="through the daemon: keep it after --hold ends, until an explicit unmap",
    )
    dnssd = map_cmd.add_argument_group("DNS-SD options (docs/dnssd.md)")
    dnssd.add_argument(
        "--publish",
        type=_publish_spec,
        metavar="TYPE:NAME",
        help="also publish it on the LAN with DNS-SD, e.g. _http._tcp:web (docs/dnssd.md);"
        " without the daemon it needs --hold",
    )
    dnssd.add_argument(
        "--txt",
        action="append",
        default=[],
        type=_txt_item,
        metavar="KEY=VALUE",
        help="an extra TXT entry for --publish (repeatable)",
    )

    _add_peer_parser(sub, common)

    unmap = sub.add_parser("unmap", parents=[common, via_daemon], **_cli_help.command_help("unmap"))
    unmap.add_argument(
        "spec",
        metavar="PORT[/tcp|/udp]",
        type=_port_spec,
        help="the internal port of the mapping, as given to map or peer",
    )
    unmap.add_argument(
        "--remote",
        type=_remote_spec,
        metavar="ADDRESS:PORT",
        help="delete the PEER made by `portbroker peer` to this remote peer",
    )
    unmap.add_argument(
        "--third-party",
        type=_third_party,
        metavar="IP",
        help="delete the mapping made by `map --third-party IP` for that host",
    )

    sub.add_parser("list", parents=[daemon_only], **_cli_help.command_help("list"))
    sub.add_parser("watch", parents=[daemon_only], **_cli_help.command_help("watch"))

    browse = sub.add_parser("browse", **_cli_help.command_help("browse"))
    browse.add_argument("service_type", metavar="TYPE", help="for example _http._tcp")
    browse.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="IP",
        help="an address of this host to browse on (repeatable; default every interface)",
    )
    browse.add_argument("--json", action="store_true", help="print JSON, one object a line")
    browse.add_argument(
        "--for",
        dest="duration",
        type=_seconds,
        metavar="S",
        help="print the peers seen after S seconds and exit (default: changes until Ctrl-C)",
    )

    daemon = sub.add_parser("daemon", **_cli_help.command_help("daemon"))
    access = daemon.add_argument_group("socket and access")
    limits = daemon.add_argument_group("limits")
    asking = daemon.add_argument_group("gateway options")
    access.add_argument(
        "--socket",
        metavar="PATH",
        help="default: $PORTBROKER_SOCKET, else "
        "/run/portbroker/portbroker.sock (root) or $XDG_RUNTIME_DIR/portbroker.sock",
    )
    daemon.add_argument(
        "--state",
        metavar="PATH",
        help="state file (default /var/lib/portbroker/"
        "daemon-state.json for root, else under $XDG_STATE_HOME)",
    )
    asking.add_argument(
        "--gateway",
        metavar="IP",
        help="the gateway to ask (default: $PORTBROKER_GATEWAY, else the default route)",
    )
    asking.add_argument(
        "--methods",
        default="pcp,natpmp,upnp",
        help="methods to use, most preferred first (default pcp,natpmp,upnp)",
    )
    access.add_argument(
        "--group", metavar="NAME", help="socket mode 0660 for this group (default 0600)"
    )
    limits.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="how long a mapping outlives its app's connection (default 10 s)",
    )
    limits.add_argument(
        "--max-mappings",
        type=_positive_int(100000),
        default=64,
        metavar="N",
        help="mappings one user may hold (default 64)",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive_int(100000),
        default=64,
        metavar="N",
        help="connections one user may have open at once (default 64)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="close connections that hold, watch and ask nothing for this long (default 60 s)",
    )
    access.add_argument(
        "--allow-privileged-ports",
        action="store_true",
        help="let every user map internal ports below 1024 (default: root only)",
    )
    access.add_argument(
        "--privileged-group",
        action="append",
        default=[],
        metavar="NAME",
        help="let members of this group map internal ports below 1024 (repeatable)",
    )
    access.add_argument(
        "--third-party-group",
        action="append",
        default=[],
        metavar="NAME",
        help="let members of this group map ports of other lan hosts (default: root only;"
        " repeatable)",
    )
    limits.add_argument(
        "--max-publications",
        type=_positive_int(100000),
        default=16,
        metavar="N",
        help="DNS-SD publications one user may have (default 16)",
    )
    asking.add_argument("--timeout", type=_seconds, default=2.0, metavar="S", help="probe timeout")
    daemon.add_argument(
        "--server-port", type=_positive_int(65535), default=5351, help=argparse.SUPPRESS
    )
    daemon.add_argument(
        "--ssdp-port", type=_positive_int(65535), default=1900, help=argparse.SUPPRESS
    )
    daemon.add_argument("--no-multicast", action="store_true", help=argparse.SUPPRESS)
    daemon.add_argument("--no-announcements", action="store_true", help=argparse.SUPPRESS)
    daemon.add_argument(
        "--no-follow",
        action="store_true",
        help="without --gateway: stay on the first gateway when the default route moves"
        " (by default every client's mappings move with it, docs/roaming.md)",
    )
    daemon.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    completion = sub.add_parser("completion", **_cli_help.command_help("completion"))
    completion.add_argument(
        "shell",
        choices=("bash",),
        metavar="SHELL",
        help="the shell: bash",
        action=_cli_help.completion_action(parser),
    )
    return parser


def _add_peer_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``portbroker peer``: keep an outbound flow's NAT binding (PCP PEER, docs/peer.md)."""
    from portbroker import _cli_help

    peer_cmd = sub.add_parser("peer", parents=[common], **_cli_help.command_help("peer"))
    peer_cmd.add_argument(
        "spec",
        metavar="PORT[/tcp|/udp]",
        type=_port_spec,
        help="the flow's port on this host, TCP unless /udp",
    )
    peer_cmd.add_argument(
        "--remote",
        required=True,
        type=_remote_spec,
        metavar="ADDRESS:PORT",
        help="the remote peer of the flow, e.g. 11.0.0.2:7000",
    )
    peer_cmd.add_argument(
        "--lifetime",
        type=_lifetime,
        default=DEFAULT_LIFETIME,
        metavar="S",
        help=f"seconds to ask for, {MIN_LIFETIME}..{MAX_LIFETIME} (default {DEFAULT_LIFETIME})",
    )
    peer_cmd.add_argument(
        "--peer-only",
        action="store_true",
        help="fail where the gateway has no PEER, rather than map the port instead",
    )
    peer_cmd.add_argument(
        "--hold",
        action="store_true",
        help="keep it renewed (and restored) until Ctrl-C, SIGTERM or SIGHUP, then delete it",
    )
    peer_cmd.add_argument(
        "--no-follow",
        action="store_true",
        help="with --hold and no --gateway: stay on the first gateway when the default route"
        " moves (by default the binding moves with it)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except BaseException as exc:
        # Whatever went wrong, the user reads one line, never a traceback or
        # an ExceptionGroup: trio nurseries group errors that happen together.
        leaves = _leaves(exc)
        usage = [leaf for leaf in leaves if isinstance(leaf, UsageError | ValueError)]
        if usage:
            parser.error(str(usage[0]))
        if any(isinstance(leaf, SystemExit) for leaf in leaves):
            raise
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print("portbroker: interrupted", file=sys.stderr)
            return 1
        if any(isinstance(leaf, BrokenPipeError) for leaf in leaves) and _stdout_gone():
            return 1  # `portbroker list | head`: the reader has what it wanted
        lines = list(
            dict.fromkeys(
                _explain(args.command, leaf)
                for leaf in leaves
                if not isinstance(leaf, KeyboardInterrupt)
            )
        )
        print(f"portbroker: {'; '.join(lines)}", file=sys.stderr)
        return 1


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR
    of its write end); if so, stdout is pointed at /dev/null, so that Python's
    flush at exit does not complain of it again (the recipe of the signal
    module's documentation, "Note on SIGPIPE")."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file (a test's StringIO)
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def _one_line_handler() -> Any:
    """A logging handler that writes each record in one line on stderr; an
    attached exception as its type and message (its traceback only with
    PORTBROKER_DEBUG set)."""
    import logging

    class OneLine(logging.Formatter):
        def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
            if os.environ.get("PORTBROKER_DEBUG"):
                return super().formatException(ei)
            return f"({type(ei[1]).__name__}: {ei[1]}; PORTBROKER_DEBUG=1 shows the traceback)"

        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            return text if os.environ.get("PORTBROKER_DEBUG") else text.replace("\n", " ")

    handler = logging.StreamHandler()
    handler.setFormatter(OneLine("portbroker: %(message)s"))
    return handler


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "daemon":
        return _daemon(args)
    if args.command in ("list", "watch"):
        return _through_daemon(args)
    if args.command == "browse":
        return _trio_run(_browse, args)
    methods = _methods(args.methods)
    if args.command == "map" and args.outer_gateway:
        if not args.hold:
            raise UsageError(
                "--outer-gateway needs --hold (the two mappings live as long as the command)"
            )
        # A nested mapping is made without these: ignoring one silently would
        # open to everyone a port the user restricted (--filter), or map this
        # host instead of the camera (--third-party).
        unsupported = [
            option
            for option, given in (
                ("--filter", args.filter),
                ("--third-party", args.third_party),
                ("--exact", args.exact),
                ("--publish", args.publish),
                ("--persist", args.persist),
            )
            if given
        ]
        if unsupported:
            raise UsageError(
                f"{', '.join(unsupported)} cannot go with --outer-gateway: a mapping through"
                " two NATs does not support them (docs/double-nat.md)"
            )
        from portbroker.gateway import checked_address

        checked_address(args.outer_gateway, "--outer-gateway")
    if args.command == "map" and args.exact and args.external_port is None:
        raise UsageError("--exact needs --external-port")
    if args.command == "map" and args.via and args.via not in methods:
        methods = (args.via,)
    if args.command == "map" and args.txt and not args.publish:
        raise UsageError("--txt goes with --publish")
    if args.command == "map" and args.publish:
        # Before anything is mapped: through the daemon the map would stay
        # (persistent without --hold) under a "map failed" for the publish.
        proto = args.publish[0].split(".")[1][1:]
        if proto != args.spec[1]:
            raise UsageError(
                f"--publish {args.publish[0]} is {proto.upper()}, but {args.spec[0]}/"
                f"{args.spec[1]} is {args.spec[1].upper()}: use '_name._{args.spec[1]}'"
            )
    # The daemon has no PEER op: `unmap --remote` deletes a `peer` record itself.
    if args.command in ("map", "unmap") and not getattr(args, "remote", None) and _use_daemon(args):
        return _through_daemon(args)
    if args.command == "map" and args.publish and not args.hold:
        raise UsageError(
            "--publish without the daemon needs --hold: the publication lasts as long as"
            " this command"
        )
    return _trio_run(_run, args, methods)


def _trio_run(function: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run the library (every command but the daemon's, and the blocking
    client's: that logs nothing)."""
    import logging

    import trio

    # The library's warnings (a failed delete, a gateway that lost state) are
    # the user's to read too: say whose they are, without logging's "WARNING:root",
    # and one line each: an internal error's traceback only with PORTBROKER_DEBUG.
    logging.basicConfig(level=logging.WARNING, handlers=[_one_line_handler()])

    return trio.run(function, *args)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _explain(command: str, exc: BaseException) -> str:
    """One line for one failure, in words (the errors module's rule for users)."""
    if isinstance(exc, Failure):
        return str(exc)
    if isinstance(exc, PortBrokerError):
        return f"{command} failed: {exc}"
    if isinstance(exc, OSError):
        return f"{command} failed: {os_error_words(exc)}"
    return f"{command} failed: internal error {type(exc).__name__}: {exc} (a bug in portbroker)"


def os_error_words(exc: OSError) -> str:
    """An OSError as a sentence: what could not be used, why, and the errno's name.

    ``"cannot use the network: Operation not permitted (EPERM); a host
    firewall may drop it"`` rather than ``"[Errno 1] Operation not permitted"``.
    A socket error is phrased (and hinted at) by :class:`LinkError`, as the
    daemon's replies are.
    """
    from portbroker.errors import LinkError

    code = exc.errno if isinstance(exc.errno, int) else None
    name = errno.errorcode.get(code) if code is not None else None
    if exc.filename is None and name is not None:
        return str(LinkError("use", "the network", exc))
    # No errno to name (a getaddrinfo error, a bare OSError): its own words.
    where = "the network" if exc.filename is None else str(exc.filename)
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot use {where}: {text}" + (f" ({name})" if name else "")


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in ("pcp", "natpmp", "upnp")]
    if bad or not methods:
        raise UsageError(f"--methods takes pcp, natpmp, upnp (comma-separated), not {text!r}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods names one twice: {text!r}")
    return methods


async def _run(args: argparse.Namespace, methods: tuple[str, ...]) -> int:
    from portbroker.broker import open_broker

    try:
        async with open_broker(
            args.gateway,
            methods,
            args.timeout,
            pcp_server=args.pcp_server,
            port=args.server_port,
            upnp_port=args.ssdp_port,
            ssdp_multicast=not args.no_multicast,
            announce_port=5350 if args.command in ("map", "peer") and args.hold else None,
            dhcp_leases=args.dhcp_leases,
            follow=_follows(args),
            watch_resume=_watches_resume(args),
        ) as broker:
            if args.command == "probe":
                return _print_probe(await broker.probe(), as_json=args.json, broker=broker)
            if args.command == "peer":
                return await _peer(broker, args)
            if args.command == "map":
                return await _map(broker, args)
            return await _unmap(broker, args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except PortBrokerError as exc:
        raise Failure(f"{args.command} failed: {exc}") from exc
    except OSError as exc:
        raise Failure(f"{args.command} failed: {os_error_words(exc)}") from exc


def _describe_watch_event(event: dict[str, Any]) -> str:
    """One `portbroker watch` line: the event, the mapping, and a move's two gateways."""
    line = f"{event['event']}: {_describe_daemon_mapping(event['mapping'])}"
    detail = event.get("detail") or {}
    if event["event"] == "GatewayChanged" and "new_gateway" in detail:
        line += f"; gateway {detail.get('old_gateway')} -> {detail['new_gateway']}"
    return line


def _watches_resume(args: argparse.Namespace) -> bool:
    """map / peer --hold renew everything within 0-5 s of a suspend or a stop (lifecycle
    rule 14), pinned gateway or not: a resume means any lease may have expired."""
    return args.command in ("map", "peer") and bool(args.hold)


def _follows(args: argparse.Namespace) -> bool:
    """map / peer --hold on the default route's gateway follow it (portbroker.roaming).

    Not with --gateway (a pinned gateway never moves), --no-follow, or
    --outer-gateway (the outer NAT's mapping would stay behind).
    """
    return (
        args.command in ("map", "peer")
        and bool(args.hold)
        and args.gateway is None
        and not getattr(args, "no_follow", False)
        and not getattr(args, "outer_gateway", None)
    )


# -- the daemon ---------------------------------------------------------------------


def _use_daemon(args: argparse.Namespace) -> bool:
    """Go through a running daemon unless told not to (or given a gateway to ask).

    A socket named with --socket or $PORTBROKER_SOCKET is the daemon to use,
    running or not: with none there, asking the gateway instead would map on
    whatever gateway this host has (a benchmark's or test's own daemon gone,
    the real one), so the command fails and says so.
    """
    if args.no_daemon or args.gateway is not None:
        return False
    from portbroker.daemon.paths import ENV_SOCKET

    if args.socket or os.environ.get(ENV_SOCKET):
        return True
    from portbroker.client import socket_path
    from portbroker.daemon.paths import NoSocketPath

    try:
        path = socket_path(args.socket)
    except NoSocketPath:
        return False  # nowhere a user's daemon could listen: none does
    return _daemon_listening(path)


def _daemon_listening(path: Path) -> bool:
    import socket as socket_module

    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    # Not blocking: a blocking connect to a stopped daemon's full listen
    # queue waited for ever. A full queue (EAGAIN) is a daemon there.
    probe.settimeout(0)
    try:
        probe.connect(str(path))
    except BlockingIOError:
        return True
    except PermissionError:
        # A daemon this user may not use: going through it says so
        # (DaemonAccessDenied), rather than silently around it.
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _daemon(args: argparse.Namespace) -> int:
    import logging

    import trio

    from portbroker.daemon.server import DaemonConfig, DaemonError, run_daemon

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Not the clients' default: a user's daemon binds the user's path even
    # when the system daemon's socket exists.
    from portbroker.daemon.server import bind_socket_path

    options: dict[str, Any] = {
        "port": args.server_port,
        "upnp_port": args.ssdp_port,
        "ssdp_multicast": not args.no_multicast,
    }
    if args.no_announcements:
        options["announce_port"] = None
    config = DaemonConfig(
        socket_path=bind_socket_path(args.socket),
        state_path=args.state or DaemonConfig().state_path,
        gateway=args.gateway,
        methods=_methods(args.methods),
        group=args.group,
        grace=args.grace,
        max_mappings=args.max_mappings,
        probe_timeout=args.timeout,
        broker_options=options,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        allow_privileged_ports=args.allow_privileged_ports,
        privileged_groups=tuple(args.privileged_group),
        third_party_groups=tuple(args.third_party_group),
        max_publications=args.max_publications,
        follow=not args.no_follow,
    )
    from portbroker.daemon.server import raise_fd_limit

    raise_fd_limit()
    try:
        trio.run(run_daemon, config)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except (DaemonError, PortBrokerError) as exc:
        raise Failure(f"daemon: {exc}") from exc
    except OSError as exc:
        raise Failure(f"daemon: {os_error_words(exc)}") from exc
    return 0


def _through_daemon(args: argparse.Namespace) -> int:
    """A command through the daemon: with the blocking client, without trio,
    unless it waits for events or signals (watch, map --hold).

    A short command is mostly its imports: trio and the broker would triple
    the time of `portbroker list` (benchmarks/cli_daemon.py).
    """
    if args.command == "watch" or (args.command == "map" and args.hold):
        return _trio_run(_daemon_client, args)
    # The blocking client's calls, wrapped as coroutines, never suspend: the
    # coroutine runs to its end in one step, with no event loop.
    coroutine = _daemon_client(args, functools.partial(_open_blocking_client, args.command))
    try:
        coroutine.send(None)
    except StopIteration as done:
        return int(done.value)
    coroutine.close()
    raise RuntimeError(f"{args.command} through the daemon waited for an event loop")


class _AwaitableBlockingClient:
    """A BlockingClient behind the trio Client's coroutine methods (those
    :func:`_daemon_client` uses); each returns without suspending."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._client.list()
        return result

    async def map(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._client.map(*args, **kwargs)
        return result

    async def unmap(self, *args: Any, **kwargs: Any) -> str:
        result: str = self._client.unmap(*args, **kwargs)
        return result

    async def publish(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._client.publish(*args, **kwargs)
        return result


ENV_DAEMON_TIMEOUT = "PORTBROKER_DAEMON_TIMEOUT"
# How long list/map/unmap wait for the daemon to send anything. A map through
# a silent gateway takes the daemon under a minute (three probe races, each
# within its request budget, then the cleanup of what silence may have made);
# a daemon that is stopped (SIGSTOP), deadlocked, or sent half a line would
# otherwise keep the command waiting for ever.
DAEMON_TIMEOUT = 120.0
DAEMON_TIMEOUT_MAX = 1e9


def _daemon_timeout() -> float:
    text = os.environ.get(ENV_DAEMON_TIMEOUT)
    if text is None or not text.strip():
        return DAEMON_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise UsageError(
            f"${ENV_DAEMON_TIMEOUT} must be a positive number of seconds, not {text!r}"
        )
    # socket.settimeout refuses what time_t cannot hold (1e10 s on Linux):
    # a longer wait than ~30 years is one of ~30 years.
    return min(value, DAEMON_TIMEOUT_MAX)


@contextlib.asynccontextmanager
async def _open_blocking_client(command: str, path: str | None) -> Any:
    from portbroker.client import BlockingClient

    timeout = _daemon_timeout()
    try:
        client = BlockingClient(path, timeout=timeout)
    except TimeoutError as exc:  # its listen queue is full: stopped or stuck
        raise Failure(_no_answer(path, timeout, command)) from exc
    with client:
        try:
            yield _AwaitableBlockingClient(client)
        except TimeoutError as exc:
            raise Failure(_no_answer(client.path, timeout, command)) from exc


def _no_answer(path: object, timeout: float, command: str) -> str:
    if path is None:
        from portbroker.client import socket_path

        path = socket_path(None)
    # A map is not left behind: the daemon rolls back the map of a client
    # that closed its connection (tests/test_daemon.py), once it runs again.
    then = {
        "map": " The daemon undoes the map once it sees this command gone.",
        "unmap": " The unmap may still complete there: `portbroker list` shows what it holds.",
    }.get(command, "")
    return (
        f"the daemon at {path} sent no answer within {timeout:g} s: it may be"
        f" stopped or stuck (its log says why; ${ENV_DAEMON_TIMEOUT} sets how long to"
        f" wait).{then}"
    )


async def _daemon_client(args: argparse.Namespace, connect: Any = None) -> int:
    from portbroker.client import (
        DaemonAccessDenied,
        DaemonNotRunning,
        DaemonProtocolError,
        DaemonRequestError,
        open_client,
    )

    try:
        async with (connect or open_client)(args.socket) as client:
            if args.command == "list":
                mappings = await client.list()
                for mapping in mappings:
                    if args.json:
                        print(json.dumps(mapping))
                    else:
                        print(_describe_daemon_mapping(mapping))
                return 0
            if args.command == "watch":
                async for event in client.watch():
                    if args.json:
                        print(json.dumps(event), flush=True)
                    else:
                        print(_describe_watch_event(event), flush=True)
                return 0
            port, proto = args.spec
            if args.command == "unmap":
                if args.third_party is not None:
                    # The daemon holds one mapping per port, whichever host:
                    # unmap it only if it is the one for that host.
                    await _check_daemon_host(client, port, proto, args.third_party)
                unmapped = await client.unmap(port, proto)
                print(json.dumps({"unmapped": unmapped}) if args.json else f"unmapped {unmapped}")
                return 0
            if not args.hold:
                mapping = await _daemon_map(client, args)
                print(
                    json.dumps(mapping) if args.json else _describe_daemon_mapping(mapping),
                    flush=True,
                )
                await _daemon_publish(client, args)
                return 0
            import trio

            # As in _hold, the handlers go in first, so that a signal right
            # after the line is printed ends the hold instead of killing us.
            # A signal during the request waits for its answer rather than
            # cancelling it: the daemon then has the hold, and releases it
            # after its grace period once we are gone.
            with trio.open_signal_receiver(*_hold_signals()) as signals:
                timeout = _daemon_timeout()
                try:
                    with trio.fail_after(timeout):
                        mapping = await _daemon_map(client, args)
                except trio.TooSlowError as exc:
                    raise Failure(_no_answer(args.socket, timeout, "map")) from exc
                print(
                    json.dumps(mapping) if args.json else _describe_daemon_mapping(mapping),
                    flush=True,
                )
                await _daemon_publish(client, args)
                async for _ in signals:
                    break
            return 0
    except DaemonNotRunning as exc:
        instead = (
            ", or use --no-daemon to ask the gateway directly"
            if args.command in ("map", "unmap")
            else ""
        )
        raise Failure(
            f"{args.command} failed: {exc}; start one with `portbroker daemon`{instead}"
        ) from exc
    except (DaemonAccessDenied, DaemonProtocolError) as exc:
        raise Failure(f"{args.command} failed: {exc}") from exc
    except DaemonRequestError as exc:
        raise Failure(f"{args.command} failed: {exc.code}: {exc.message}") from exc


async def _check_daemon_host(client: Any, port: int, proto: str, host: str) -> None:
    """``unmap --third-party HOST`` through the daemon: its mapping must be for HOST."""
    for mapping in await client.list():
        if mapping.get("id") == f"{port}/{proto}":
            if mapping.get("internal_address") != host:
                raise Failure(
                    f"unmap failed: the daemon's {port}/{proto} is for"
                    f" {mapping.get('internal_address')}, not {host}; left in place"
                )
            return


async def _daemon_map(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    port, proto = args.spec
    mapping: dict[str, Any] = await client.map(
        port,
        proto,
        lifetime=args.lifetime,
        external_port=args.external_port,
        exact=args.exact,
        # Without --hold the command ends at once, so the mapping must
        # outlive it; with --hold it ends with the command unless --persist.
        persist=args.persist or not args.hold,
        via=args.via,
        internal_address=args.third_party,
        filters=[str(f) for f in args.filter],
    )
    return mapping


async def _daemon_publish(client: Any, args: argparse.Namespace) -> None:
    """map --publish through the daemon: it publishes, and withdraws with the mapping."""
    from portbroker.client import DaemonRequestError

    if not args.publish:
        return
    port, proto = args.spec
    service_type, name = args.publish
    try:
        published = await client.publish(
            port, proto, service_type=service_type, name=name, txt=dict(args.txt)
        )
    except DaemonRequestError as exc:
        # The mapping is made: say so, and whether it outlives this command.
        stays = (
            f"it stays mapped (`portbroker unmap {port}/{proto}` ends it)"
            if args.persist or not args.hold
            else "it ends with this command"
        )
        raise Failure(
            f"{port}/{proto} is mapped, but publishing it failed: {exc.code}: {exc.message};"
            f" {stays}"
        ) from exc
    _print_published(published, as_json=args.json)


def _print_published(published: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "Published", **published}), flush=True)
    else:
        txt = " ".join(f"{k}={v}" for k, v in published["txt"].items())
        print(f"published {published['name']!r} ({published['type']}): {txt}", flush=True)


def _publish_spec(text: str) -> tuple[str, str]:
    """``_http._tcp:web`` -> (service type, instance name), both checked."""
    from portbroker.rendezvous import RendezvousError, check_instance_name, check_service_type

    service_type, sep, name = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TYPE:NAME such as _http._tcp:web, not {text!r}")
    try:
        return check_service_type(service_type), check_instance_name(name)
    except RendezvousError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _txt_item(text: str) -> tuple[str, str]:
    from portbroker.rendezvous import RendezvousError, check_txt

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        check_txt({key: value})
    except RendezvousError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, value


async def _browse(args: argparse.Namespace) -> int:
    """browse TYPE: peers' internal and external endpoints (docs/dnssd.md)."""
    import trio

    from portbroker.rendezvous import Peer, RendezvousError, check_service_type, open_rendezvous

    def line(kind: str, name: str, peer: Peer | None) -> str:
        if args.json:
            out: dict[str, Any] = {"change": kind, "name": name}
            if peer is not None:
                out.update(
                    internal=[f"{a}:{p}" for a, p in peer.internal],
                    external=f"{peer.external[0]}:{peer.external[1]}" if peer.external else None,
                    method=peer.method,
                    public=peer.public,
                    state=peer.state,
                    txt=dict(peer.txt),
                )
            return json.dumps(out)
        if peer is None:
            return f"{kind} {name!r}"
        inside = ", ".join(f"{a}:{p}" for a, p in peer.internal) or "?"
        outside = f"{peer.external[0]}:{peer.external[1]}" if peer.external else "none"
        return f"{kind} {name!r}: internal {inside}, external {outside} ({peer.state or '?'})"

    try:
        service_type = check_service_type(args.service_type)
        async with (
            open_rendezvous(args.interface or None) as rendezvous,
            rendezvous.browse(service_type) as browser,
        ):
            if args.duration is not None:
                await trio.sleep(args.duration)
                for name, peer in sorted(browser.snapshot().items()):
                    print(line("seen", name, peer), flush=True)
                return 0
            with trio.open_signal_receiver(*_hold_signals()) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                    async for change in browser:
                        print(line(change.kind, change.name, change.peer), flush=True)
            return 0
    except RendezvousError as exc:
        raise Failure(f"browse failed: {exc}") from exc


def _describe_daemon_mapping(mapping: dict[str, Any]) -> str:
    where = (
        f"{format_endpoint(mapping.get('external_address'), mapping.get('external_port'))}"
        f" via {mapping.get('method')}"
        if mapping.get("external_port")
        else mapping.get("state", "?")
    )
    flags = " persist" if mapping.get("persist") else ""
    filters = mapping.get("filters")
    if isinstance(filters, list) and filters:
        where += f" only from {', '.join(str(f) for f in filters)}"
    if mapping.get("gateway") and mapping.get("external_port"):
        where += f" at gateway {mapping['gateway']}"  # it moves with the default route
    return (
        f"{mapping['id']} -> {where} (uid {mapping.get('owner_uid')}, "
        f"{mapping.get('holders')} holder(s){flags})"
    )


# -- probe ----------------------------------------------------------------------


def _print_probe(report: ProbeReport, *, as_json: bool, broker: Broker | None = None) -> int:
    server = broker.pcp_server if broker is not None else None
    if as_json:
        from portbroker.probe import report_json

        out = report_json(report)
        if server is not None:
            out["pcp_server"] = {"address": str(server.address), "source": server.source}
        print(json.dumps(out))
    else:
        print(f"gateway {report.gateway}: {report.selected or 'no method works'}")
        if server is not None and server.address != report.gateway:
            print(f"  PCP server {server.address} ({server.source})")
        for o in report.outcomes:
            if o.available:
                details = [f"{o.rtt * 1000:.1f} ms" if o.rtt is not None else ""]
                if o.external_address is not None:
                    details.append(f"external {o.external_address}")
                if o.epoch is not None:
                    details.append(f"epoch {o.epoch}")
                print(f"  {o.method:7} yes  {', '.join(d for d in details if d)}")
                if o.reachability is not None and not o.reachability.public:
                    print(f"  {'':7}      {o.reachability.reason}")
            else:
                print(f"  {o.method:7} no   {o.error}")
    return 0 if report.selected else 1


# -- map / unmap ---------------------------------------------------------------------


def _lease_json(lease: Lease) -> dict[str, Any]:
    from portbroker.types import lease_json

    return lease_json(lease)


def _event_json(event: MappingEvent) -> dict[str, Any]:
    from portbroker.lifecycle import event_detail

    out: dict[str, Any] = {"event": type(event).__name__}
    lease = getattr(event, "lease", None)
    if lease is not None:
        out.update(_lease_json(lease))
    out.update(event_detail(event))
    return out


def _describe_lease(lease: Lease) -> str:
    kind = "permanent" if lease.permanent else f"lifetime {lease.lifetime} s"
    only = f", only from {', '.join(str(f) for f in lease.filters)}" if lease.filters else ""
    return (
        f"{format_endpoint(lease.internal_address, lease.internal_port)}/{lease.protocol.value}"
        f" -> {format_endpoint(lease.external_address, lease.external_port)}"
        f" via {lease.method} ({kind}{only})"
    )


async def _map(broker: Broker, args: argparse.Namespace) -> int:
    if args.hold and args.outer_gateway:
        return await _hold_nested(broker, args)
    if args.hold:
        return await _hold(broker, args)
    port, proto = args.spec
    mapping = await broker.map(
        port,
        proto,
        lifetime=args.lifetime,
        external_port=args.external_port,
        exact=args.exact,
        via=args.via,
        internal_address=args.third_party,
        filters=args.filter,
    )
    lease = mapping.lease
    assert lease is not None
    store = StateFile.locate(args.state_file)
    store.add(lease, third_party=args.third_party is not None)
    broker.detach(mapping)
    if args.json:
        print(json.dumps({**_lease_json(lease), **_reachability_json(lease)}))
    else:
        print(_describe_lease(lease))
        _print_unreachable(lease)
    return 0


def _reachability_json(lease: Lease) -> dict[str, Any]:
    """``public`` and (when not) ``reachability``'s reason (docs/double-nat.md)."""
    reachability = lease.reachability
    return {"public": reachability.public, "reachability": reachability.reason}


def _print_unreachable(lease: Lease) -> None:
    if not lease.reachability.public:
        print(f"  {lease.reachability.reason}", flush=True)


async def _peer(broker: Broker, args: argparse.Namespace) -> int:
    """peer: a PEER's binding, or the MAP it fell back to, left in place and recorded
    for unmap (as map does); --hold keeps it renewed until a signal, then deletes it."""
    if args.hold:
        return await _hold_peer(broker, args)
    port, proto = args.spec
    mapping = await broker.peer(
        port,
        proto,
        remote=args.remote,
        lifetime=args.lifetime,
        fallback=None if args.peer_only else "map",
    )
    lease = mapping.lease
    assert lease is not None
    # Recorded as map records its mappings, so that unmap can delete it
    # (`unmap PORT/PROTO --remote ADDRESS:PORT` for a PEER).
    StateFile.locate(args.state_file).add(lease)
    broker.detach(mapping)
    if args.json:
        print(json.dumps({"peer": mapping.remote is not None, **_lease_json(lease)}))
    elif mapping.remote is None:
        print(f"no PEER on this gateway; mapped {_describe_lease(lease)} (unmap deletes it)")
    else:
        print(f"peer {_describe_peer(lease)}; it lapses unless renewed (--hold keeps it)")
    return 0


def _describe_peer(lease: Lease) -> str:
    assert lease.remote is not None
    return (
        f"{format_endpoint(lease.internal_address, lease.internal_port)}/{lease.protocol.value}"
        f" to {format_endpoint(*lease.remote)} leaves as "
        f"{format_endpoint(lease.external_address, lease.external_port)} via {lease.method}"
        f" (lifetime {lease.lifetime} s)"
    )


async def _hold_peer(broker: Broker, args: argparse.Namespace) -> int:
    """peer --hold: as map --hold (signals first, then the gateway), for a PEER."""
    port, proto = args.spec

    async def make() -> Mapping:
        return await broker.peer(
            port,
            proto,
            remote=args.remote,
            lifetime=args.lifetime,
            fallback=None if args.peer_only else "map",
        )

    def announce(mapping: Mapping, lease: Lease) -> None:
        is_peer = mapping.remote is not None
        if args.json:
            print(
                json.dumps({"event": "Acquired", "peer": is_peer, **_lease_json(lease)}), flush=True
            )
        elif is_peer:
            print(f"peer {_describe_peer(lease)}; holding until Ctrl-C", flush=True)
        else:
            print(
                f"no PEER on this gateway; mapped {_describe_lease(lease)}; holding until Ctrl-C",
                flush=True,
            )

    return await _hold_until_signal(args, make, announce, what="peer", noun="binding")


def _hold_signals() -> tuple[int, ...]:
    import signal

    return (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _cancel_on_signal(signals: Any, scope: Any) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _print_event(event: MappingEvent, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_event_json(event)), flush=True)
    else:
        print(f"{type(event).__name__}: {_event_json(event)}", flush=True)


async def _hold(broker: Broker, args: argparse.Namespace) -> int:
    """map --hold: keep the mapping until a signal, then delete it."""
    port, proto = args.spec

    async def make() -> Mapping:
        return await broker.map(
            port,
            proto,
            lifetime=args.lifetime,
            external_port=args.external_port,
            exact=args.exact,
            via=args.via,
            internal_address=args.third_party,
            filters=args.filter,
        )

    def announce(_mapping: Mapping, lease: Lease) -> None:
        if args.json:
            print(
                json.dumps(
                    {"event": "Acquired", **_lease_json(lease), **_reachability_json(lease)}
                ),
                flush=True,
            )
        else:
            print(f"mapped {_describe_lease(lease)}; holding until Ctrl-C", flush=True)
            _print_unreachable(lease)

    return await _hold_until_signal(
        args, make, announce, what="map", noun="mapping", publish=bool(args.publish)
    )


async def _hold_until_signal(
    args: argparse.Namespace,
    make: Callable[[], Awaitable[Mapping]],
    announce: Callable[[Mapping, Lease], None],
    *,
    what: str,
    noun: str,
    publish: bool = False,
) -> int:
    """Make a mapping (*make*), hold it until a signal, then delete it: map and peer --hold.

    The signal handlers are installed before the gateway is even asked: a
    SIGTERM (SIGINT, SIGHUP) that arrives the instant the mapping is printed,
    or while it is being made, must still delete it. Before a handler is in
    place, SIGTERM's default action kills the process and leaves the mapping
    on the gateway until its lifetime runs out.
    """
    import trio

    from portbroker._util import collapse_single
    from portbroker.lifecycle import Failed

    mapping: Mapping | None = None
    failed: Failed | None = None
    with trio.open_signal_receiver(*_hold_signals()) as signals, collapse_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            mapping = await make()
            events = mapping.events()
            lease = mapping.lease
            assert lease is not None
            announce(mapping, lease)
            async with contextlib.AsyncExitStack() as stack:
                if publish:
                    # Withdrawn (goodbye packets) before the mapping is deleted.
                    await _publish_held(stack, mapping, lease, args)
                async for event in events:
                    _print_event(event, as_json=args.json)
                    if isinstance(event, Failed):
                        failed = event
            # The stream ended on its own: the mapping failed for good.
            nursery.cancel_scope.cancel()
        if mapping is None:
            # Signalled before the gateway answered: the broker's exit deletes
            # whatever it was granted meanwhile.
            raise Failure(f"{what} interrupted before the {noun} was made")
        if failed is not None:
            raise Failure(f"{what} failed: the {noun} could not be kept: {failed.reason}")
        # Still inside the signal receiver: a second SIGTERM during the delete
        # does not kill us half-way (the delete has its own time limit).
        await mapping.release()
        async for event in events:  # the Released event
            _print_event(event, as_json=args.json)
    return 0


async def _hold_nested(broker: Broker, args: argparse.Namespace) -> int:
    """map --hold --outer-gateway: the gateway's mapping and the outer NAT's
    for it (portbroker.nested, by PCP or UPnP), until a signal; then both
    are deleted."""
    import trio

    from portbroker._util import collapse_single
    from portbroker.lifecycle import Failed
    from portbroker.nested import open_nested_mapping

    port, proto = args.spec
    outer_options = {
        "port": args.server_port,
        "upnp_port": args.ssdp_port,
        "probe_timeout": args.timeout,
    }
    made = False
    failed: NestedEvent | None = None
    with trio.open_signal_receiver(*_hold_signals()) as signals, collapse_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            async with open_nested_mapping(
                broker,
                port,
                proto,
                outer_gateway=args.outer_gateway,
                lifetime=args.lifetime,
                external_port=args.external_port,
                via=args.via,
                outer_options=outer_options,
            ) as nested:
                made = True
                events = nested.events()
                while True:  # where each stands now: printed below, in one line
                    try:
                        events.receive_nowait()
                    except trio.WouldBlock:
                        break
                inner = nested.inner._lease()
                outer = nested.outer._lease() if nested.outer else None
                assert outer is not None
                if args.json:
                    print(
                        json.dumps(
                            {
                                "event": "Acquired",
                                "inner": {**_lease_json(inner), **_reachability_json(inner)},
                                "outer": {**_lease_json(outer), **_reachability_json(outer)},
                            }
                        ),
                        flush=True,
                    )
                else:
                    print(f"mapped {_describe_lease(inner)}", flush=True)
                    print(
                        f"  and {_describe_lease(outer)} on {nested.outer_server};"
                        " holding until Ctrl-C",
                        flush=True,
                    )
                    _print_unreachable(outer)
                async for item in events:
                    if args.json:
                        print(
                            json.dumps({"layer": item.layer, **_event_json(item.event)}),
                            flush=True,
                        )
                    else:
                        print(f"{item.layer}: {type(item.event).__name__}", flush=True)
                    if isinstance(item.event, Failed):
                        # One of the two is gone for good: holding the other
                        # reaches nobody (as map --hold ends on Failed).
                        failed = item
                        break
            nursery.cancel_scope.cancel()
    # Leaving open_nested_mapping deleted the outer mapping, then the inner one.
    if not made:
        raise Failure("map interrupted before the mappings were made")
    if failed is not None:
        assert isinstance(failed.event, Failed)
        raise Failure(
            f"map failed: the {failed.layer} mapping could not be kept: {failed.event.reason}"
            " (both deleted)"
        )
    print(json.dumps({"event": "Released"}) if args.json else "deleted both mappings")
    return 0


async def _publish_held(
    stack: contextlib.AsyncExitStack, mapping: Mapping, lease: Lease, args: argparse.Namespace
) -> None:
    """map --hold --publish without the daemon: zeroconf on the interface toward the gateway."""
    from portbroker.rendezvous import RendezvousError, open_rendezvous

    service_type, name = args.publish
    try:
        rendezvous = await stack.enter_async_context(open_rendezvous([str(lease.internal_address)]))
        publication = await rendezvous.publish(mapping, service_type, name, txt=dict(args.txt))
    except RendezvousError as exc:
        raise Failure(f"map failed: could not publish: {exc}") from exc
    advert = publication.advert
    _print_published(
        {
            "mapping": f"{lease.internal_port}/{lease.protocol.value}",
            "type": advert.service_type,
            "name": advert.name,
            "txt": advert.txt(),
        },
        as_json=args.json,
    )


async def _unmap(broker: Broker, args: argparse.Namespace) -> int:
    port, proto = args.spec
    store = StateFile.locate(args.state_file)
    remote = getattr(args, "remote", None)
    host = getattr(args, "third_party", None)
    lease = store.find(str(broker.gateway), port, proto, remote, host)
    others = [] if host else store.other_hosts(str(broker.gateway), port, proto, remote)
    if lease is None and len(others) == 1:
        # None of this host's own, one for another host: that one is meant.
        host = others[0]
        lease = store.find(str(broker.gateway), port, proto, remote, host)
    if lease is None:
        what = f"{port}/{proto}" + (f" to {format_endpoint(*remote)}" if remote else "")
        what += f" for {host}" if host else ""
        raise Failure(
            f"unmap failed: no record of {what} on {broker.gateway} in {store.path}; "
            + (
                f"there are records of it for other hosts ({', '.join(others)}):"
                " name one with --third-party"
                if others
                else "only mappings made by `portbroker map` or `peer` (without --hold)"
                " can be unmapped"
            )
        )
    if lease.method not in broker.methods:
        raise Failure(
            f"unmap failed: {port}/{proto} was made with {lease.method}, not enabled here"
        )
    await broker.delete(lease)
    store.remove(lease, host=host)
    if args.json:
        print(json.dumps({"deleted": _lease_json(lease)}))
    else:
        print(f"deleted {_describe_lease(lease)}")
    return 0


# -- the state file ----------------------------------------------------------------


class StateFile:
    """Mappings that ``map`` left in place, so that ``unmap`` can delete them.

    The state store shared with the daemon (:mod:`portbroker.state`: JSON,
    atomic writes, under an flock); a record holds each PCP nonce, without
    which a PCP mapping cannot be deleted (RFC 6887 §15).
    """

    def __init__(self, path: Path) -> None:
        from portbroker.state import StateStore

        self.path = path
        self._store = StateStore(path)

    @classmethod
    def locate(cls, explicit: str | None) -> StateFile:
        if explicit:
            return cls(Path(explicit))
        if os.environ.get(ENV_STATE):
            return cls(Path(os.environ[ENV_STATE]))
        if os.geteuid() == 0:
            return cls(Path("/var/lib/portbroker/cli-state.json"))
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return cls(Path(base) / "portbroker" / "cli-state.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[Any]]:
        from portbroker.state import StateError

        try:
            with self._store.locked() as entries:
                yield entries
        except StateError as exc:
            raise Failure(str(exc)) from exc

    @staticmethod
    def _same(
        entry: Any, gateway: str, port: int, proto: str, remote: Any = None, host: Any = None
    ) -> bool:
        # A PEER's record names its remote peer; a MAP's none (docs/peer.md).
        wanted = (None, None) if remote is None else (str(remote[0]), remote[1])
        return (
            isinstance(entry, dict)
            and entry.get("gateway") == gateway
            and entry.get("internal_port") == port
            and entry.get("protocol") == proto
            and (entry.get("remote_address"), entry.get("remote_port")) == wanted
            and StateFile._host(entry) == (None if host is None else str(host))
        )

    @staticmethod
    def _host(entry: dict[str, Any]) -> Any:
        """The other host a third-party record is for; None for this host's own.

        Two cameras both serve 554, beside this host's own 554: each is its
        own mapping on the gateway, so each needs its own record (marked
        ``"third_party"``, as the daemon marks its records), or unmap could
        delete only the last one made.
        """
        return entry.get("internal_address") if entry.get("third_party") is True else None

    def add(self, lease: Lease, *, third_party: bool = False) -> None:
        from portbroker.state import lease_record

        host = str(lease.internal_address) if third_party else None
        record = lease_record(lease)
        if third_party:
            record["third_party"] = True
        with self._locked() as entries:
            entries[:] = [e for e in entries if not self._same_lease(e, lease, host)]
            entries.append(record)

    def _same_lease(self, entry: Any, lease: Lease, host: str | None) -> bool:
        return self._same(
            entry, str(lease.gateway), lease.internal_port, lease.protocol.value, lease.remote, host
        )

    def find(
        self, gateway: str, port: int, proto: str, remote: Any = None, host: Any = None
    ) -> Lease | None:
        from portbroker.state import RecordError, lease_from_record

        with self._locked() as entries:
            for entry in entries:
                if self._same(entry, gateway, port, proto, remote, host):
                    try:
                        return lease_from_record(entry)
                    except RecordError as exc:
                        raise Failure(
                            f"the record of {port}/{proto} in {self.path} is damaged: {exc}"
                        ) from exc
        return None

    def other_hosts(self, gateway: str, port: int, proto: str, remote: Any = None) -> list[str]:
        """The other hosts (``map --third-party``) with a record of this port."""
        with self._locked() as entries:
            return [
                str(self._host(e))
                for e in entries
                if isinstance(e, dict)
                and self._host(e) is not None
                and self._same(e, gateway, port, proto, remote, self._host(e))
            ]

    def remove(self, lease: Lease, *, host: str | None = None) -> None:
        with self._locked() as entries:
            entries[:] = [e for e in entries if not self._same_lease(e, lease, host)]


if __name__ == "__main__":
    sys.exit(main())
