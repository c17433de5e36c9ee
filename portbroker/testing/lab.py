"""A real NAT gateway in network namespaces: miniupnpd + nftables.

The only honest proof that a port mapping works is a packet from outside that
arrives inside. :class:`Lab` builds three network namespaces (see the
project's netlab notes)::

    lan ns  192.168.77.2  <->  gw ns 192.168.77.1 | 11.0.0.1  <->  wan ns 11.0.0.2
                                 miniupnpd (PCP + NAT-PMP on 5351, UPnP IGD)
                                 nftables forward + DNAT chains

A test maps a port from the lan namespace, then connects from the wan
namespace to ``11.0.0.1:<external port>``.

Safety: everything stays inside the namespaces. The wan side is 11.0.0.0/24
because miniupnpd 2.3.1 refuses to map behind a private or reserved external
address; while a lab is up a blackhole route for 11.0.0.0/24 in the root
namespace makes sure nothing addressed there can leave the machine. Names get
a random suffix so parallel or leftover labs never collide; teardown runs in
``finally``; only processes the lab started are stopped, by pid.

Needs Linux, root, iproute2 (``ip``, ``ss``), nftables (``nft``) and
miniupnpd with the nftables backend (Debian: ``miniupnpd-nftables``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final, TypeVar

import attrs

from portbroker.errors import PortBrokerError

__all__ = [
    "EXTERNAL_ADDRESS",
    "GATEWAY_ADDRESS",
    "HTTP_PORT",
    "LAN_ADDRESS",
    "WAN_ADDRESS",
    "Lab",
    "LabError",
    "Variant",
    "lab_unavailable_reason",
    "main",
    "open_lab",
]

LAN_ADDRESS: Final = IPv4Address("192.168.77.2")
GATEWAY_ADDRESS: Final = IPv4Address("192.168.77.1")
EXTERNAL_ADDRESS: Final = IPv4Address("11.0.0.1")
WAN_ADDRESS: Final = IPv4Address("11.0.0.2")
WAN_NETWORK: Final = "11.0.0.0/24"
HTTP_PORT: Final = 2189  # miniupnpd's UPnP HTTP port, fixed so tests know it

_CLONE_NEWNET: Final = 0x40000000
_READY_TIMEOUT: Final = 10.0

T = TypeVar("T")


class LabError(PortBrokerError):
    """The lab could not be built or driven; the message says which step failed."""


class Variant(enum.Enum):
    """Which services the lab's gateway runs."""

    FULL = "full"  # PCP + NAT-PMP + UPnP IGD
    UPNP_ONLY = "upnp-only"
    PCP_NATPMP_ONLY = "pcp-natpmp-only"
    NONE = "none"  # no mapping service: 5351 and 1900 answer ICMP port unreachable

    @property
    def natpmp(self) -> bool:
        return self in (Variant.FULL, Variant.PCP_NATPMP_ONLY)

    @property
    def upnp(self) -> bool:
        return self in (Variant.FULL, Variant.UPNP_ONLY)


def lab_unavailable_reason() -> str | None:
    """Why a lab cannot be built on this machine, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "ss", "nft", "miniupnpd") if _which(tool) is None]
    if missing:
        return (
            f"the lab needs {', '.join(missing)}: apt-get install iproute2 nftables "
            "miniupnpd-nftables"
        )
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(argv: Sequence[str], *, input_text: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run *fn* on a fresh thread that has joined network namespace *netns*.

    setns(2) with CLONE_NEWNET changes only the calling thread, so the rest of
    the process stays where it was. Sockets created by *fn* stay in *netns*
    for their whole life, whichever thread uses them later.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


_NFT_RULESET = """\
table inet filter {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{lan_if}" accept
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    oifname "{wan_if}" masquerade
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""

_MINIUPNPD_CHAINS: Final = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")


@attrs.define
class Lab:
    """A built lab. Create it with :func:`open_lab`; everything here is live."""

    variant: Variant
    suffix: str
    workdir: Path
    lan_ns: str = attrs.field(init=False)
    gw_ns: str = attrs.field(init=False)
    wan_ns: str = attrs.field(init=False)
    lan_if: str = attrs.field(init=False)  # in lan ns
    gw_lan_if: str = attrs.field(init=False)  # in gw ns, towards lan
    gw_wan_if: str = attrs.field(init=False)  # in gw ns, towards wan
    wan_if: str = attrs.field(init=False)  # in wan ns
    miniupnpd_pid: int | None = None
    restarts: int = 0
    _process: subprocess.Popen[bytes] | None = None
    _own_blackhole: bool = False
    _created_ns: list[str] = attrs.Factory(list)
    _log_handle: object | None = None
    extra_config: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        s = self.suffix
        self.lan_ns, self.gw_ns, self.wan_ns = f"pb-lan-{s}", f"pb-gw-{s}", f"pb-wan-{s}"
        # Interface names are at most 15 characters and must be unique in the
        # root namespace, where the veth pairs are born.
        self.lan_if, self.gw_lan_if = f"pb{s}l", f"pb{s}g"
        self.gw_wan_if, self.wan_if = f"pb{s}x", f"pb{s}w"

    # -- paths ------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "miniupnpd.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "miniupnpd.conf"

    def log_text(self) -> str:
        """miniupnpd's output so far (empty for the NONE variant)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- building ---------------------------------------------------------

    def _build(self) -> None:
        for ns in (self.lan_ns, self.gw_ns, self.wan_ns):
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
        _run(["ip", "link", "add", self.lan_if, "type", "veth", "peer", "name", self.gw_lan_if])
        _run(["ip", "link", "set", self.lan_if, "netns", self.lan_ns])
        _run(["ip", "link", "set", self.gw_lan_if, "netns", self.gw_ns])
        _run(["ip", "link", "add", self.gw_wan_if, "type", "veth", "peer", "name", self.wan_if])
        _run(["ip", "link", "set", self.gw_wan_if, "netns", self.gw_ns])
        _run(["ip", "link", "set", self.wan_if, "netns", self.wan_ns])
        for ns, dev, cidr in (
            (self.lan_ns, self.lan_if, f"{LAN_ADDRESS}/24"),
            (self.gw_ns, self.gw_lan_if, f"{GATEWAY_ADDRESS}/24"),
            (self.gw_ns, self.gw_wan_if, f"{EXTERNAL_ADDRESS}/24"),
            (self.wan_ns, self.wan_if, f"{WAN_ADDRESS}/24"),
        ):
            _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        for ns in (self.lan_ns, self.gw_ns, self.wan_ns):
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.lan_ns, "route", "add", "default", "via", str(GATEWAY_ADDRESS)])
        _run(["ip", "netns", "exec", self.gw_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ruleset = _NFT_RULESET.format(lan_if=self.gw_lan_if, wan_if=self.gw_wan_if)
        _run(["ip", "netns", "exec", self.gw_ns, "nft", "-f", "-"], input_text=ruleset)
        self._add_blackhole()
        if self.variant is not Variant.NONE:
            self._write_config()
            self._start_miniupnpd()

    def _add_blackhole(self) -> None:
        # netlab.md: nothing addressed to the lab's "public" range may leave
        # the machine from the root namespace. Another lab may own the route
        # already; then it is not ours to remove.
        done = subprocess.run(
            ["ip", "route", "add", "blackhole", WAN_NETWORK],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            self._own_blackhole = True
        elif "File exists" not in done.stderr:
            raise LabError(f"ip route add blackhole {WAN_NETWORK}: {done.stderr.strip()}")

    def _write_config(self) -> None:
        yes_no = {True: "yes", False: "no"}
        self.config_path.write_text(
            "\n".join(
                [
                    f"ext_ifname={self.gw_wan_if}",
                    f"listening_ip={self.gw_lan_if}",
                    f"http_port={HTTP_PORT}",
                    f"enable_natpmp={yes_no[self.variant.natpmp]}",
                    f"enable_upnp={yes_no[self.variant.upnp]}",
                    "ipv6_disable=yes",
                    "secure_mode=yes",
                    # The epoch counts from daemon start, so a restart resets it.
                    "system_uptime=no",
                    "notify_interval=60",
                    f"uuid={uuid.uuid4()}",
                    "allow 1024-65535 192.168.77.0/24 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    *self.extra_config,
                    "",
                ]
            )
        )

    def _start_miniupnpd(self) -> None:
        argv = self.exec_argv(
            self.gw_ns,
            [
                _which("miniupnpd") or "miniupnpd",
                "-d",  # foreground, log to stderr
                "-f",
                str(self.config_path),
                "-P",
                str(self.workdir / "miniupnpd.pid"),
            ],
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        # `ip netns exec` execs miniupnpd in place, so this pid is miniupnpd's.
        self.miniupnpd_pid = self._process.pid
        self._wait_ready()

    def _listening(self) -> tuple[set[int], set[int]]:
        udp = _run(["ip", "netns", "exec", self.gw_ns, "ss", "-H", "-uln"])
        tcp = _run(["ip", "netns", "exec", self.gw_ns, "ss", "-H", "-tln"])

        def ports(text: str) -> set[int]:
            found = set()
            for line in text.splitlines():
                fields = line.split()
                if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
                    found.add(int(fields[3].rpartition(":")[2]))
            return found

        return ports(udp), ports(tcp)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise LabError(
                    f"miniupnpd exited with {self._process.returncode} at start; its log:\n"
                    + self.log_text()
                )
            udp, tcp = self._listening()
            ready = (not self.variant.natpmp or 5351 in udp) and (
                not self.variant.upnp or (1900 in udp and HTTP_PORT in tcp)
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"miniupnpd not listening after {_READY_TIMEOUT:.0f} s; its log:\n"
                    + self.log_text()
                )
            time.sleep(0.02)

    # -- driving ----------------------------------------------------------

    def stop_miniupnpd(self) -> None:
        """Stop the lab's miniupnpd (by its pid) and wait for it."""
        process, self._process = self._process, None
        self.miniupnpd_pid = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart_miniupnpd(self) -> None:
        """Simulate a gateway reboot: stop miniupnpd, drop every rule it made, start it again.

        A restarted miniupnpd forgets its mappings but the nftables rules it
        inserted stay, so the three miniupnpd chains are flushed in between.
        Its epoch starts again from 0 (``system_uptime=no``).
        """
        if self.variant is Variant.NONE:
            raise LabError("this lab runs no miniupnpd to restart")
        self.stop_miniupnpd()
        for chain in _MINIUPNPD_CHAINS:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.gw_ns,
                    "nft",
                    "flush",
                    "chain",
                    "inet",
                    "filter",
                    chain,
                ]
            )
        self.restarts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n===== portbroker lab: restart {self.restarts} =====\n")
        self._start_miniupnpd()

    def nft_rules(self) -> str:
        """The gateway's nftables ruleset as text (to see miniupnpd's rules)."""
        return _run(["ip", "netns", "exec", self.gw_ns, "nft", "list", "ruleset"])

    def nft(self, netns: str, script: str) -> str:
        """Run an nft script (``nft -f -``) in *netns*: how fault tests drop or count packets.

        Whatever it adds dies with the namespace at teardown.
        """
        return _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input_text=script)

    def socket(
        self, netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
    ) -> socket.socket:
        """A new socket that lives in *netns* (use ``lab.lan_ns`` and friends)."""
        return in_netns(netns, lambda: socket.socket(family, kind))

    def exec_argv(self, netns: str, argv: Sequence[str]) -> list[str]:
        """*argv* prefixed to run inside *netns*."""
        return ["ip", "netns", "exec", netns, *argv]

    # -- teardown ---------------------------------------------------------

    def close(self) -> None:
        """Stop miniupnpd, delete the namespaces (and their veths) and the route.

        Idempotent, and safe on a half-built lab.
        """
        errors: list[str] = []
        try:
            self.stop_miniupnpd()
        except Exception as exc:  # noqa: BLE001 - report it, but finish tearing down
            errors.append(f"stopping miniupnpd: {exc}")
        while self._created_ns:
            ns = self._created_ns.pop()
            done = subprocess.run(
                ["ip", "netns", "delete", ns], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                errors.append(f"ip netns delete {ns}: {done.stderr.strip()}")
        # A veth whose peer never moved would stay in the root namespace.
        for dev in (self.lan_if, self.gw_wan_if):
            subprocess.run(["ip", "link", "delete", dev], capture_output=True, check=False)
        if self._own_blackhole:
            self._own_blackhole = False
            subprocess.run(
                ["ip", "route", "del", "blackhole", WAN_NETWORK], capture_output=True, check=False
            )
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))


@contextlib.contextmanager
def open_lab(
    variant: Variant = Variant.FULL,
    *,
    workdir: Path | None = None,
    extra_config: Sequence[str] = (),
) -> Iterator[Lab]:
    """Build a lab, yield it, and tear it down whatever happens.

    *workdir* receives miniupnpd's config and log (a fresh temporary
    directory by default, removed afterwards). *extra_config* lines are
    appended to miniupnpd's config (``min_lifetime=10`` lets a test see PCP
    renewals within seconds; miniupnpd's default floor is 120 s).

    Raises:
        LabError: the machine cannot host a lab (see
            :func:`lab_unavailable_reason`) or a build step failed.
    """
    reason = lab_unavailable_reason()
    if reason is not None:
        raise LabError(reason)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pb-lab-")))
        lab = Lab(variant, secrets.token_hex(3), workdir, extra_config=tuple(extra_config))
        try:
            lab._build()
            yield lab
        finally:
            lab.close()


# -- the demo -----------------------------------------------------------------


def _demo(variant: Variant, internal_port: int) -> int:
    """Build the lab, ``portbroker map`` from the lan side, connect in from the wan side."""
    import json
    import tempfile

    with open_lab(variant) as lab, tempfile.TemporaryDirectory() as state_dir:
        print(f"lab up: lan {lab.lan_ns}, gateway {lab.gw_ns} (miniupnpd pid {lab.miniupnpd_pid})")
        state = str(Path(state_dir) / "state.json")
        portbroker = [sys.executable, "-m", "portbroker.cli"]
        common = ["--gateway", str(GATEWAY_ADDRESS), "--state-file", state]
        listener = lab.socket(lab.lan_ns, kind=socket.SOCK_STREAM)
        with listener:
            listener.bind((str(LAN_ADDRESS), internal_port))
            listener.listen()
            argv = [*portbroker, "map", f"{internal_port}/tcp", "--json", *common]
            print("$ " + " ".join(["ip netns exec", lab.lan_ns, "portbroker", *argv[3:]]))
            done = subprocess.run(
                lab.exec_argv(lab.lan_ns, argv), capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                print(done.stderr.strip(), file=sys.stderr)
                return 1
            print(done.stdout.strip())
            mapped = json.loads(done.stdout)
            external = (mapped["external_address"], mapped["external_port"])
            outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
            with outside:
                outside.settimeout(5)
                outside.connect(external)
                inside, peer = listener.accept()
                with inside:
                    inside.sendall(b"hello from inside\n")
                    greeting = outside.recv(100)
            print(
                f"connection from {peer[0]}:{peer[1]} (wan side) arrived at {LAN_ADDRESS}:{internal_port}"
            )
            if greeting != b"hello from inside\n":
                print("the connection carried the wrong bytes", file=sys.stderr)
                return 1
            print(
                f"external endpoint {external[0]}:{external[1]} via {mapped['method']}: inbound connection OK"
            )
            argv = [*portbroker, "unmap", f"{internal_port}/tcp", *common]
            print("$ " + " ".join(["ip netns exec", lab.lan_ns, "portbroker", *argv[3:]]))
            done = subprocess.run(
                lab.exec_argv(lab.lan_ns, argv), capture_output=True, text=True, check=False
            )
            print((done.stdout or done.stderr).strip())
            if done.returncode != 0:
                return 1
    print("lab torn down")
    return 0


def exchange(sock: socket.socket, payload: bytes, decode: Callable[[bytes], T]) -> T:
    """Send *payload* on a connected UDP socket and decode the first answer.

    Retransmits on the RFC 6886 schedule (250 ms doubling), four tries;
    undecodable datagrams are skipped. For the lab and tests, not the broker.

    Raises:
        TimeoutError: no decodable answer.
        ConnectionRefusedError: the gateway answered ICMP port unreachable.
    """
    from portbroker.errors import MalformedMessage

    wait = 0.25
    for _ in range(4):
        sock.send(payload)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            with contextlib.suppress(MalformedMessage):
                return decode(data)
        wait *= 2
    raise TimeoutError("no answer from the gateway")


def main(argv: Sequence[str] | None = None) -> int:
    """``portbroker-lab``: build the lab and prove an inbound connection."""
    parser = argparse.ArgumentParser(
        prog="portbroker-lab",
        description="Build a NAT gateway (miniupnpd + nftables) in network namespaces, "
        "run `portbroker map` on the lan side, connect in from the wan side, unmap, "
        "tear down. Needs root.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="`portbroker map` a port in the lab and prove an inbound connection"
    )
    demo.add_argument("--port", type=int, default=8080, help="internal TCP port (default 8080)")
    demo.add_argument(
        "--variant",
        choices=[v.value for v in Variant if v is not Variant.NONE],
        default=Variant.FULL.value,
        help="which services the gateway runs (default full: PCP, NAT-PMP, UPnP)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1..65535, got {args.port}")
    try:
        return _demo(Variant(args.variant), args.port)
    except (LabError, OSError) as exc:
        print(f"portbroker-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
