"""UPnP IGD: our own SSDP in trio, miniupnpc for the description and SOAP.

miniupnpc's own discovery waits out its whole search window (about a second);
ours sends a unicast M-SEARCH straight to the gateway (answered in one round
trip plus the device's reply delay, or refused at once by ICMP when nothing
listens on 1900) and, where allowed, a multicast one beside it, and takes the
first reply from the gateway. ``UPnP.selectigd(location)`` then reads the
description at that URL, and SOAP goes through the same ``miniupnpc.UPnP``
object, one per gateway, called only from :meth:`UpnpMethod._call` in a worker
thread under a lock (miniupnpc is blocking C and not thread-safe).

Safety: nothing is fetched from, or posted to, any host but the gateway. A
LOCATION naming another host in a reply *from the gateway* is rewritten to the
gateway (devices advertise stale or odd addresses, tailscale issue 5502); a
reply from anyone else is ignored; a control URL that leads away from the
gateway is refused.

Error codes: miniupnpc's Python binding raises plain ``Exception`` with
``strupnperror``'s text, so codes are recovered from that text (and codes it
has no name for, 728-733 among them, all read "UnknownError").
"""

from __future__ import annotations

import errno
import random
import socket
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv6Address, ip_address
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.epoch import EntryMissing, SignalSink
from portbroker.errors import (
    MalformedMessage,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    UpnpError,
)
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, TransportProtocol
from portbroker.wire import ssdp
from portbroker.wire._fields import to_address

__all__ = ["UpnpError", "UpnpMethod", "upnp_error_code"]

T = TypeVar("T")

# miniupnpc's strupnperror() texts, back to their codes (upnperrors.c).
_ERROR_CODES: Final = {
    "Invalid Action": 401,
    "Invalid Args": 402,
    "Action Failed": 501,
    "Argument Value Invalid": 600,
    "Argument Value Out of Range": 601,
    "Optional Action Not Implemented": 602,
    "Out of Memory": 603,
    "Human Intervention Required": 604,
    "String Argument Too Long": 605,
    "Action not authorized": 606,
    "SpecifiedArrayIndexInvalid": 713,
    "NoSuchEntryInArray": 714,
    "WildCardNotPermittedInSrcIP": 715,
    "WildCardNotPermittedInExtPort": 716,
    "ConflictInMappingEntry": 718,
    "SamePortValuesRequired": 724,
    "OnlyPermanentLeasesSupported": 725,
    "RemoteHostOnlySupportsWildcard": 726,
    "ExternalPortOnlySupportsWildcard": 727,
}
_CONFLICT: Final = 718
_PERMANENT_ONLY: Final = 725
_INVALID_ARGS: Final = 402
_SAME_PORT: Final = 724
_NO_SUCH_ENTRY: Final = 714
_INVALID_ACTION: Final = 401
# IGD v2 caps leases at a week and reads 0 as "the maximum" (protocols.md §4.5).
MAX_LEASE: Final = 604800


def upnp_error_code(message: str) -> int | None:
    """The UPnP error code behind a miniupnpc error text, if it has one."""
    return _ERROR_CODES.get(message.strip())


@attrs.define
class _Igd:
    location: str
    control_url: str
    boot_id: int | None
    upnp: Any  # miniupnpc.UPnP (untyped C extension)
    lan_address: IPAddress


def _search_schedule() -> Iterator[float]:
    # miniupnpd holds each SSDP reply 50-80 ms; resend after that, doubling.
    wait = 0.3
    while True:
        yield wait
        wait *= 2


class UpnpMethod:
    """UPnP IGD (WANIPConnection:1/2, WANPPPConnection:1) on one gateway."""

    name = "upnp"

    def __init__(
        self,
        gateway: IPAddress,
        *,
        ssdp_port: int = ssdp.PORT,
        multicast: bool = True,
        rng: random.Random | None = None,
        description: str = "portbroker",
        report: SignalSink | None = None,
    ) -> None:
        self.gateway = gateway
        self.report = report
        self.ssdp_port = ssdp_port
        # Multicast searches go to the whole link; loopback has no link to search.
        self.multicast = (
            multicast and not gateway.is_loopback and not isinstance(gateway, IPv6Address)
        )
        self._rng = rng or random.Random()
        self._igd: _Igd | None = None
        self._lock = threading.Lock()  # miniupnpc.UPnP is not thread-safe
        self.permanent_only = False
        self.last_uptime: int | None = None
        self.last_boot_id: int | None = None
        self.last_external_address: IPAddress | None = None

    # -- SSDP -----------------------------------------------------------------

    async def search(self) -> ssdp.SearchResponse:
        """Find the gateway's IGD: unicast M-SEARCH (and multicast, if allowed).

        Raises:
            MethodUnavailable: the gateway refused the search (nothing on its SSDP port).
        """
        family = socket.AF_INET6 if isinstance(self.gateway, IPv6Address) else socket.AF_INET
        unicast = trio.socket.socket(family, socket.SOCK_DGRAM)
        found: list[ssdp.SearchResponse] = []
        done = trio.Event()
        with unicast, collapse_single():
            await unicast.connect((str(self.gateway), self.ssdp_port))
            local = unicast.getsockname()[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, unicast, found, done)
                if self.multicast:
                    nursery.start_soon(self._multicast_search, local, found, done)
                try:
                    for wait in _search_schedule():
                        try:
                            for target in (ssdp.ST_IGD_V2, ssdp.ST_IGD_V1):
                                await unicast.send(
                                    ssdp.encode_msearch(
                                        target, host=self.gateway, port=self.ssdp_port, mx=None
                                    )
                                )
                        except OSError as exc:
                            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                                raise
                            # The ICMP error of an earlier search surfaces on send.
                            break
                        with trio.move_on_after(wait):
                            await done.wait()
                        if done.is_set():
                            break
                finally:
                    nursery.cancel_scope.cancel()
        if not found:
            raise MethodUnavailable(
                self.name, f"nothing listens on {self.gateway}:{self.ssdp_port}"
            )
        return found[0]

    async def _receive(
        self,
        sock: trio.socket.SocketType,
        found: list[ssdp.SearchResponse],
        done: trio.Event,
    ) -> None:
        while True:
            try:
                data, source = await sock.recvfrom(ssdp.MAX_MESSAGE_SIZE)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                    # ICMP port unreachable: no SSDP server on the gateway at all.
                    done.set()
                    return
                raise
            reply = self._accept(data, source[0])
            if reply is not None:
                found.append(reply)
                done.set()
                return

    async def _multicast_search(
        self, local: str, found: list[ssdp.SearchResponse], done: trio.Event
    ) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            # UDA 1.1 §1.3.2: TTL 2, from the interface that faces the gateway.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
            await sock.bind((local, 0))
            for target in (ssdp.ST_IGD_V2, ssdp.ST_IGD_V1):
                await sock.sendto(
                    ssdp.encode_msearch(target, mx=1), (str(ssdp.MULTICAST_V4), ssdp.PORT)
                )
            await self._receive(sock, found, done)

    def _accept(self, data: bytes, source: str) -> ssdp.SearchResponse | None:
        try:
            reply = ssdp.decode_response(data)
            sender = to_address(source.split("%")[0])
        except (MalformedMessage, ValueError):
            return None
        if sender != self.gateway:
            return None  # another device on the link is not our gateway
        location = self._location_at_gateway(reply.location)
        if location is None:
            return None
        return attrs.evolve(reply, location=location)

    def _location_at_gateway(self, location: str) -> str | None:
        """*location* if it names the gateway; rewritten to the gateway if it names
        another host; None if it is not an http URL we can use."""
        try:
            parts = urlsplit(location.strip())
            port = parts.port or 80
        except ValueError:
            return None
        if parts.scheme.lower() != "http" or not parts.hostname:
            return None
        host = f"[{self.gateway}]" if isinstance(self.gateway, IPv6Address) else str(self.gateway)
        return urlunsplit(("http", f"{host}:{port}", parts.path or "/", parts.query, ""))

    def _check_control_url(self, url: str) -> None:
        try:
            host = urlsplit(url).hostname
            address = to_address(ip_address(host or ""))
        except ValueError:
            address = None
        if address != self.gateway:
            raise MethodUnavailable(
                self.name, f"the IGD's control URL {url!r} leads away from the gateway; refused"
            )

    # -- miniupnpc ------------------------------------------------------------

    async def _call(self, action: str, fn: Callable[[], T]) -> T:
        """Run one blocking miniupnpc call in a worker thread, one at a time."""

        def locked() -> T:
            with self._lock:
                return fn()

        try:
            return await trio.to_thread.run_sync(locked, abandon_on_cancel=True)
        except Exception as exc:
            raise UpnpError(action, str(exc), upnp_error_code(str(exc))) from exc

    async def _ensure_igd(self) -> _Igd:
        if self._igd is not None:
            return self._igd
        reply = await self.search()
        import miniupnpc  # imported lazily: keeps `portbroker --help` quick

        upnp = miniupnpc.UPnP()
        try:
            control_url = await self._call("selectigd", lambda: upnp.selectigd(reply.location))
        except UpnpError as exc:
            raise MethodUnavailable(
                self.name, f"no usable IGD at {reply.location}: {exc.message}"
            ) from exc
        if urlsplit(str(control_url)).path in ("", "/"):
            # miniupnpc found no urn:schemas-upnp-org WANIPConnection or
            # WANPPPConnection service (seen: Huawei HG531's urn:dslforum-org
            # types, which miniupnpc does not read).
            raise MethodUnavailable(
                self.name,
                f"no WANIPConnection or WANPPPConnection service in {reply.location}",
            )
        self._check_control_url(str(control_url))
        lan = to_address(upnp.lanaddr or "0.0.0.0")
        self._igd = _Igd(reply.location, str(control_url), reply.boot_id, upnp, lan)
        previous_boot, self.last_boot_id = self.last_boot_id, reply.boot_id
        if previous_boot is not None and reply.boot_id not in (None, previous_boot):
            # UDA 1.1 §1.2.2: BOOTID goes up at every reboot. A hint only:
            # miniupnpd may keep leases across restarts (protocols.md §4.6).
            self._lost(f"BOOTID.UPNP.ORG changed {previous_boot} -> {reply.boot_id}")
        return self._igd

    def forget_igd(self) -> None:
        """Search and read the description again next time (after failures)."""
        self._igd = None

    def _lost(self, reason: str) -> None:
        # Interim: every UPnP loss is reported as one signal to the tracker.
        if self.report is not None:
            self.report(EntryMissing(reason, trio.current_time()))

    async def external_address(self) -> IPAddress:
        igd = await self._ensure_igd()
        text = await self._call("GetExternalIPAddress", igd.upnp.externalipaddress)
        try:
            address = to_address(str(text))
        except ValueError:
            address = None
        if address is None or address.is_unspecified or address.is_loopback:
            raise MethodUnavailable(
                self.name, f"the gateway reports no usable external address ({text!r})"
            )
        self.last_external_address = address
        return address

    async def probe(self) -> ProbeOutcome:
        started = trio.current_time()
        try:
            igd = await self._ensure_igd()
            address = await self.external_address()
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        except (NoAnswer, UpnpError) as exc:
            return ProbeOutcome(self.name, False, error=str(exc))
        return ProbeOutcome(
            self.name, True, trio.current_time() - started, address, epoch=igd.boot_id
        )

    async def _add(
        self, igd: _Igd, request: MappingRequest, external_port: int, client: str, lease: int
    ) -> None:
        proto = request.protocol.value.upper()
        await self._call(
            "AddPortMapping",
            lambda: igd.upnp.addportmapping(
                external_port, proto, client, request.internal_port, request.description, "", lease
            ),
        )

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        try:
            igd = await self._ensure_igd()
        except UpnpError as exc:
            raise MethodUnavailable(self.name, str(exc)) from exc
        client = str(request.internal_address or igd.lan_address)
        if previous is not None:
            await self._check_still_there(igd, previous)
            wanted = previous.external_port
        else:
            wanted = request.external_port or request.internal_port
        try:
            port, lease_seconds = await self._add_with_fallbacks(
                igd, request, wanted, client, exact=request.exact and previous is None
            )
        except UpnpError as exc:
            if exc.message.startswith("Miniupnpc"):
                # HTTP or parse failure, not a UPnP refusal: the gateway may
                # have restarted its HTTP server on another port. Look again.
                self.forget_igd()
                raise MethodUnavailable(self.name, str(exc)) from exc
            raise MappingError(
                self.name, exc.message, result_code=exc.code, retry_after=None
            ) from exc
        external = self.last_external_address or await self.external_address()
        if lease_seconds > 0:
            granted = lease_seconds  # AddPortMapping took our finite lease as sent
        else:
            # A permanent lease, or AddAnyPortMapping's 0 (a week on IGD v2):
            # read back what the gateway holds.
            granted = await self._granted_lease(igd, request, port, lease_seconds)
        return Lease(
            method=self.name,
            protocol=request.protocol,
            internal_address=client,
            internal_port=request.internal_port,
            external_address=external,
            external_port=port,
            lifetime=granted,
            granted_at=trio.current_time(),
            gateway=self.gateway,
            epoch=igd.boot_id,
            permanent=lease_seconds == 0,
        )

    async def _add_with_fallbacks(
        self, igd: _Igd, request: MappingRequest, port: int, client: str, *, exact: bool
    ) -> tuple[int, int]:
        """AddPortMapping, then the remedies of protocols.md §4.4. Returns (port, lease sent)."""
        lease = 0 if self.permanent_only else min(request.lifetime, MAX_LEASE)
        tried_any = False
        for _attempt in range(6):
            try:
                await self._add(igd, request, port, client, lease)
                return port, lease
            except UpnpError as exc:
                code = exc.code
                if code in (_PERMANENT_ONLY, _INVALID_ARGS) and lease != 0:
                    # 725, and 402 from routers that mean the same (tailscale
                    # issue 15223): only permanent leases. We then own the delete.
                    self.permanent_only = True
                    lease = 0
                    continue
                if code == _SAME_PORT and port != request.internal_port and not exact:
                    port = request.internal_port
                    continue
                if code != _CONFLICT or exact:
                    raise
                if not tried_any:
                    # IGD v2: let the gateway pick a free port.
                    tried_any = True
                    try:
                        reserved = await self._call(
                            "AddAnyPortMapping",
                            lambda port=port: igd.upnp.addanyportmapping(  # type: ignore[misc]
                                port,
                                request.protocol.value.upper(),
                                client,
                                request.internal_port,
                                request.description,
                                "",
                            ),
                        )
                        # miniupnpc's AddAnyPortMapping always sends lease 0,
                        # which an IGD v2 gateway reads as its one-week maximum.
                        return int(reserved), 0
                    except UpnpError as any_exc:
                        if any_exc.code not in (_INVALID_ACTION, None):
                            raise
                # IGD v1 (no AddAnyPortMapping): another port of our own choosing.
                port = self._rng.randrange(1024, 65536)
        raise UpnpError("AddPortMapping", "ConflictInMappingEntry", _CONFLICT)

    async def _granted_lease(
        self, igd: _Igd, request: MappingRequest, port: int, lease_sent: int
    ) -> int:
        """The lease the gateway actually holds, read back with GetSpecificPortMappingEntry."""
        proto = request.protocol.value.upper()
        try:
            entry = await self._call(
                "GetSpecificPortMappingEntry", lambda: igd.upnp.getspecificportmapping(port, proto)
            )
        except UpnpError:
            entry = None
        remaining = int(entry[4]) if entry else 0
        if remaining > 0:
            return remaining
        # Permanent (or unreadable): renew on our own schedule, which for UPnP
        # means checking the entry is still there and adding it again.
        return lease_sent if lease_sent > 0 else request.lifetime

    async def _check_still_there(self, igd: _Igd, previous: Lease) -> None:
        """At renewal: the UPnP analogue of the epoch check (protocols.md §4.6)."""
        proto = previous.protocol.value.upper()
        try:
            entry = await self._call(
                "GetSpecificPortMappingEntry",
                lambda: igd.upnp.getspecificportmapping(previous.external_port, proto),
            )
        except UpnpError:
            entry = None
        if entry is None or str(entry[0]) != str(previous.internal_address):
            self._lost(f"entry {previous.external_port}/{proto} vanished from the gateway")
        try:
            status = await self._call("GetStatusInfo", igd.upnp.statusinfo)
            uptime = int(status[1])
        except (UpnpError, TypeError, ValueError, IndexError):
            return
        if self.last_uptime is not None and uptime < self.last_uptime:
            self._lost(f"WAN uptime went down ({self.last_uptime} -> {uptime} s)")
        self.last_uptime = uptime

    async def delete(self, lease: Lease) -> None:
        igd = await self._ensure_igd()
        proto = TransportProtocol(lease.protocol).value.upper()
        try:
            await self._call(
                "DeletePortMapping",
                lambda: igd.upnp.deleteportmapping(lease.external_port, proto, ""),
            )
        except UpnpError as exc:
            if exc.code == _NO_SUCH_ENTRY:
                return  # already gone: the goal of a delete
            raise MappingError(
                self.name, f"delete refused: {exc.message}", result_code=exc.code
            ) from exc
