"""Runs the code examples of docs/*.md and README.md (tests/test_docs_examples.py).

How a page's code block is classified, by its fence's language and an HTML
comment on the line just above it (invisible on GitHub and on the site):

- ```` ```python ```` runs. Top-level ``await`` / ``async with`` are allowed,
  as a block is read as the body of an async app.
- ```` ```sh ```` / ```` ```console ```` (``$ `` before each command) runs
  every ``portbroker ...`` command in it.
- ```` ```text ```` is output, a diagram, a synopsis: never run. A fence
  with no language fails, so every block says which it is.
- ``<!-- norun: why (tests/...py) -->`` above a block keeps it from running;
  the reason is required, and a test file it names must exist (the one
  that covers what the block shows, in the lab say).
- ``<!-- run: lab -->`` runs the block in tests/lab/test_lab_docs_examples.py
  (as root): a Python block that opens a lab itself; a shell block's
  commands in the lan namespace of a lab (``<!-- run: lab ipv6 -->``: one
  with IPv6), with its addresses as written (192.168.77.1, fd77::1).
- ```` ```{...} ```` is a MyST directive (toctree, eval-rst): not an example.

Where the blocks run: never against this machine's gateway.

A Python block runs in this process under trio's MockClock (autojump). Every
``open_broker(...)`` it makes, with whatever gateway it names or the default
route, gets a :class:`~portbroker.testing.FakeGateway` in memory (one per
gateway named), no announcement listener, no SSDP multicast, and UPnP's
unicast search sent to a closed port on the loopback address; looking up the
default route raises. A block that names a loopback gateway brings fakes of
its own (a FakeGateway's ``link_factory``, a FakeIgd's ``upnp_port``, as in
docs/testing.md) and keeps them. A block runs in a scratch directory holding
``rootDesc.xml``, a real IGD's root description (miniupnpd 2.3.1's, from
tests/data), for a FakeIgd.

- A block using the daemon (``portbroker.client``) runs on the real clock
  against a daemon process the harness starts on a FakeGateway over UDP on
  127.0.0.1, found through ``$PORTBROKER_SOCKET``.
- A block that defines ``async def test_*`` functions has them called, as
  pytest-trio would: with an autojump MockClock for an ``autojump_clock``
  argument, else on the real clock.
- A block that waits forever (``async for event in mapping.events()``) is
  cancelled after three hours of virtual time, as a user's Ctrl-C would, and
  counts as run when it raised nothing; a block without ``async for`` that
  is still running then fails.
- A DNS-SD block (zeroconf, multicast DNS) runs on the real clock, for at
  most a few seconds, in a network namespace of its own that has only
  ``lo``: its multicast never reaches this machine's LAN (as root; DNS-SD is
  refused anywhere else).

A shell command runs as a subprocess (``python -m portbroker.cli``). One
that names ``--gateway`` asks a FakeGateway (and a FakeIgd) on the loopback
address of the same family instead, through the command's test-only flags
(``--server-port``, ``--ssdp-port``, ``--no-multicast``). One that names
none goes through the harness's daemon when the block has a ``portbroker
daemon`` line (the harness's daemon stands in for it), else is pinned like
the first. A command that runs until stopped (``--hold``, ``watch``) is
stopped after a few seconds and counts as run when it had not failed (and,
for ``--hold``, had printed its mapping); any other must exit 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from typing import Any

import attrs
import trio

from portbroker.testing import FakeGateway, FakeIgd
from tests.realdata import realdata
from tests.test_daemon_processes import wait_accepting

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
PYTHON = sys.executable

PYTHON_LANGS = frozenset({"python", "py"})
SHELL_LANGS = frozenset({"sh", "bash", "shell", "console"})
TEXT_LANGS = frozenset({"text", "json"})
# Three hours of virtual time: a mapping of the default two hours renews,
# and an ``async for`` over its events shows a few.
VIRTUAL_LIMIT = 3 * 3600.0
# Real time for a daemon block, and for a shell command that runs until stopped.
REAL_LIMIT = 30.0
HOLD_WAIT = 4.0

_FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!--\s*(norun|run)\s*:\s*(.*?)\s*-->")


@attrs.frozen
class Block:
    where: str  # page:line of the fence
    lang: str  # the fence's first word ("" when none)
    source: str
    mark: str | None  # "norun" / "run"
    reason: str  # the marker's text

    @property
    def kind(self) -> str:
        """python, shell, text, directive, lab, norun, or unknown."""
        if self.lang.startswith("{"):
            return "directive"
        if self.mark == "norun":
            return "norun"
        if self.mark == "run" and self.reason.split()[:1] == ["lab"]:
            return "lab"
        if self.mark is not None:
            return "unknown"
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SHELL_LANGS:
            return "shell"
        if self.lang in TEXT_LANGS:
            return "text"
        return "unknown"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text()
        for match in _FENCE.finditer(text):
            before = text[: match.start()]
            line = before.count("\n") + 1
            # Only a comment on the line right above the fence marks it.
            mark = _MARK.fullmatch(before.rstrip("\n").rsplit("\n", 1)[-1].strip())
            found.append(
                Block(
                    where=f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{line}",
                    lang=(match.group(2).split() or [""])[0],
                    source=match.group(3),
                    mark=mark.group(1) if mark else None,
                    reason=mark.group(2) if mark else "",
                )
            )
    return found


# -- Python blocks ----------------------------------------------------------------------


def free_port(family: int = socket.AF_INET) -> int:
    """A UDP port nothing listens on (UPnP's search there is refused at once)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@attrs.define
class Pinned:
    """Stands in for ``portbroker.open_broker`` in a block: FakeGateways only."""

    real: Any
    fakes: dict[str, FakeGateway] = attrs.Factory(dict)
    opened: int = 0

    def fake_for(self, named: object) -> FakeGateway:
        key = "default route" if named is None else str(named)
        if key not in self.fakes:
            v6 = named is not None and isinstance(ip_address(str(named).strip("[]")), IPv6Address)
            self.fakes[key] = FakeGateway(
                address="::1" if v6 else "127.0.0.1",
                # A second gateway (the outer NAT of docs/double-nat.md) has an
                # external address of its own.
                external_address=("2001:db8::7" if v6 else f"198.51.100.{len(self.fakes) + 7}")
                if self.fakes
                else ("2001:db8::2" if v6 else "203.0.113.7"),
            )
        return self.fakes[key]

    @contextlib.asynccontextmanager
    async def open_broker(
        self, gateway: Any = None, *args: Any, **options: Any
    ) -> AsyncIterator[Any]:
        options["ssdp_multicast"] = False
        options["announce_port"] = None
        options["dhcp_leases"] = ()
        own = gateway is not None and ip_address(str(gateway).strip("[]")).is_loopback
        if options.get("link_factory") is not None and not own:
            raise AssertionError(f"a block with its own link_factory names {gateway!r}")
        if own:
            # The block is a test with fakes of its own (a FakeGateway's
            # link_factory, a FakeIgd's upnp_port) on loopback: it keeps them.
            self.opened += 1
            async with self.real(gateway, *args, **options) as broker:
                yield broker
            return
        fake = self.fake_for(gateway)
        address = fake.address
        client = options.get("pcp_client_address")
        if client is None:
            client = "fd77::2" if isinstance(fake.address, IPv6Address) else "192.168.1.100"
        options["link_factory"] = fake.link_factory(client)
        options.pop("pcp_server", None)
        family = socket.AF_INET6 if ip_address(str(address)).version == 6 else socket.AF_INET
        options["upnp_port"] = free_port(family)
        self.opened += 1
        async with self.real(address, *args, **options) as broker:
            yield broker


# A block that waits for DNS-SD changes forever runs this long (real time).
MDNS_LIMIT = 3.0


@contextlib.contextmanager
def mdns_namespace() -> Iterator[str]:
    """A network namespace with only ``lo``, for a block that runs zeroconf.

    Multicast DNS must not reach this machine's LAN (tests/rendezvous_harness.py
    says why binding to 127.0.0.1 is not enough in the root namespace). ``lo``
    also holds 192.168.1.100, the internal address the in-memory FakeGateways
    report, so a block that publishes on ``mapping.internal_address`` can.
    """
    name = f"pbdocs-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "-n", name, "addr", "add", "192.168.1.100/32", "dev", "lo"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _no_mdns(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError(
        "DNS-SD sends multicast DNS, which never leaves a lab namespace: mark the block"
        " `<!-- norun: ... (tests/lab/...) -->` or `<!-- run: lab -->`"
    )


@contextlib.contextmanager
def pinned_library(monkeypatch: Any, *, mdns: bool = False) -> Iterator[Pinned]:
    """Patch every way a block could reach a gateway; yield the FakeGateways' keeper.

    DNS-SD stays refused unless *mdns* (the block runs in :func:`mdns_namespace`).
    """
    import portbroker
    import portbroker.broker
    import portbroker.daemon.server
    import portbroker.nested
    import portbroker.rendezvous

    pinned = Pinned(portbroker.broker.open_broker)
    # Every module that holds open_broker by name (an in-process daemon too).
    for module in (portbroker, portbroker.broker, portbroker.nested, portbroker.daemon.server):
        monkeypatch.setattr(module, "open_broker", pinned.open_broker)
    if not mdns:
        monkeypatch.setattr(portbroker.rendezvous, "open_rendezvous", _no_mdns)

    def no_discovery() -> Any:
        raise AssertionError("a docs example looked for this machine's default gateway")

    monkeypatch.setattr("portbroker.gateway.find_gateway", no_discovery)
    monkeypatch.delenv("PORTBROKER_GATEWAY", raising=False)
    yield pinned


def run_python(block: Block, *, real_clock: bool, limit: float | None = None) -> dict[str, Any]:
    """Run *block* (a Python example); returns its namespace.

    Under MockClock unless *real_clock* (the block talks to a daemon process or
    zeroconf, whose replies take real time), cancelled after *limit* seconds
    (default: three virtual hours, or REAL_LIMIT). Raises what the block raises.
    """
    flags = __import__("ast").PyCF_ALLOW_TOP_LEVEL_AWAIT
    code = compile(block.source, block.where, "exec", flags=flags)
    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    real_run = trio.run

    def clock() -> Any:
        return None if real_clock else trio.testing.MockClock(autojump_threshold=0)

    if limit is None:
        limit = REAL_LIMIT if real_clock else VIRTUAL_LIMIT

    def bounded_run(afn: Any, *args: Any, **kwargs: Any) -> Any:
        async def bounded() -> Any:
            assert limit is not None
            with trio.move_on_after(limit) as scope:
                return await afn(*args)
            if scope.cancelled_caught and "async for" not in block.source:
                # Only a block that waits on a stream may run on until stopped.
                raise AssertionError(f"{block.where} did not finish within {limit} s")
            return None

        kwargs.setdefault("clock", clock())
        return real_run(bounded, **kwargs)

    import inspect

    if code.co_flags & inspect.CO_COROUTINE:

        async def body() -> None:
            await eval(code, namespace)  # noqa: S307 - the docs' own examples

        bounded_run(body)
    else:
        trio.run = bounded_run  # type: ignore[assignment] # the block's own trio.run(main)
        try:
            exec(code, namespace)  # noqa: S102 - the docs' own examples
        finally:
            trio.run = real_run
    for name, value in list(namespace.items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(value):
            # As pytest-trio: MockClock for a test that asks for autojump_clock,
            # the real clock (a FakeIgd's real sockets) for one that does not.
            wanted = inspect.signature(value).parameters
            mock = trio.testing.MockClock(autojump_threshold=0)
            kwargs = {"autojump_clock": mock} if "autojump_clock" in wanted else {}
            test_limit = VIRTUAL_LIMIT if kwargs else REAL_LIMIT

            async def call(
                test: Any = value, kw: dict[str, Any] = kwargs, limit: float = test_limit
            ) -> None:
                with trio.fail_after(limit):
                    await test(**kw)

            real_run(call, clock=mock if kwargs else None)
    return namespace


# -- the daemon and the UDP gateways --------------------------------------------------


class Gateways:
    """FakeGateways on UDP 127.0.0.1 and ::1 and a FakeIgd on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self.v4 = FakeGateway(port=0)
        self.v6 = FakeGateway(address="::1", port=0, external_address="2001:db8::2")
        self.igd = FakeIgd(realdata("miniupnpd-2.3.1-live", "rootDesc.xml").read_text())
        self._ready = threading.Event()
        self._token: Any = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.v4.serve_udp)
                if socket.has_ipv6:
                    with contextlib.suppress(OSError):
                        await nursery.start(self.v6.serve_udp)
                await nursery.start(self.igd.serve)
                self._ready.set()
                await trio.sleep_forever()

    def __enter__(self) -> Gateways:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the FakeGateways did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        def stop() -> None:
            assert self._cancel is not None
            self._cancel.cancel()

        trio.from_thread.run_sync(stop, trio_token=self._token)
        self._thread.join(10)

    def pin(self, family: int) -> list[str]:
        """The test-only flags that send a command to these gateways."""
        fake = self.v6 if family == socket.AF_INET6 else self.v4
        return [
            "--server-port",
            str(fake.port),
            "--ssdp-port",
            str(self.igd.ssdp_port if family == socket.AF_INET else free_port(family)),
            "--no-multicast",
        ]


@contextlib.contextmanager
def daemon(gateways: Gateways) -> Iterator[Path]:
    """A ``portbroker daemon`` on the v4 FakeGateway; yields its socket's path."""
    directory = Path(tempfile.mkdtemp(prefix="pbdoc-"))
    sock = directory / "pb.sock"
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "portbroker.cli",
            "daemon",
            "--socket",
            str(sock),
            "--state",
            str(directory / "state.json"),
            "--gateway",
            "127.0.0.1",
            *gateways.pin(socket.AF_INET),
            "--no-announcements",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        wait_accepting(process, sock)
        yield sock
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- shell blocks -----------------------------------------------------------------------

# Subcommands that ask a gateway directly and take the test-only flags.
_DIRECT = frozenset({"probe", "map", "unmap", "peer"})


@attrs.frozen
class Command:
    argv: list[str]  # after "portbroker"
    line: str


def shell_commands(block: Block) -> list[Command]:
    """The ``portbroker`` commands of a shell block; AssertionError for anything else."""
    commands = []
    for raw in block.source.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "sudo":
            words = words[1:]
        if words and words[-1] == "&":
            words = words[:-1]
        if not words or Path(words[0]).name != "portbroker":
            raise AssertionError(
                f"{block.where}: {line!r} is not a portbroker command, which the harness cannot"
                " run: mark the block `<!-- norun: why (the test that covers it) -->`"
            )
        commands.append(Command(words[1:], line))
    return commands


def run_command(
    command: Command, gateways: Gateways, sock: Path | None, state: Path
) -> subprocess.CompletedProcess[str]:
    """Run one command pinned to the fakes; returns it, stopped if it ran on."""
    argv = list(command.argv)
    env = dict(os.environ)
    env.pop("PORTBROKER_GATEWAY", None)
    env["PORTBROKER_STATE"] = str(state)
    if sock is not None:
        env["PORTBROKER_SOCKET"] = str(sock)
    if "--gateway" in argv:
        at = argv.index("--gateway") + 1
        address = ip_address(argv[at].strip("[]"))
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        argv[at] = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        argv += gateways.pin(family)
    elif argv[0] in _DIRECT and sock is None:
        argv += ["--gateway", "127.0.0.1", *gateways.pin(socket.AF_INET)]
    process = subprocess.Popen(
        [PYTHON, "-m", "portbroker.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    runs_on = "--hold" in argv or argv[0] == "watch"
    try:
        out, err = process.communicate(timeout=HOLD_WAIT if runs_on else REAL_LIMIT)
    except subprocess.TimeoutExpired:
        if not runs_on:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"{command.line!r} did not finish: {out}{err}") from None
        process.terminate()
        out, err = process.communicate(timeout=REAL_LIMIT)
        if "--hold" in argv and not out.strip():
            raise AssertionError(f"{command.line!r} held nothing it printed: {err}") from None
        return subprocess.CompletedProcess(process.args, 0, out, err)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
