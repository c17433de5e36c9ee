"""UPnP IGD: SSDP, the root description and SOAP, all in trio.

Discovery sends a unicast M-SEARCH straight to the gateway (answered in one
round trip plus the device's reply delay, or refused at once by ICMP when
nothing listens on its SSDP port) and, where allowed, a multicast one beside
it, and takes the first reply from the gateway's address, whatever port it
came from (UDA 1.1 §1.3.3). The root description is then fetched over HTTP
with a size cap and a deadline, and SOAP (UDA 1.1 §3.2) is posted the same
way, one connection per action. Every exchange has a deadline, nothing runs
in a thread, no lock is shared between requests, and nothing is written to
stderr: what went wrong is raised as a portbroker error and logged once.

The rules (which replies to believe, which service to use, SOAP bytes, error
remedies, leases) are plain functions in :mod:`portbroker.methods.upnp_rules`.

Safety: nothing is fetched from, or posted to, any host but the gateway. A
LOCATION naming another host in a reply *from the gateway* is rewritten to the
gateway; a reply from anyone else is ignored; a control URL that leads away
from the gateway is refused.

Signals, not decisions: the method reports what it sees through *report*
(``BootIdSeen`` for each SSDP reply with BOOTID.UPNP.ORG, ``UptimeSeen`` for
each GetStatusInfo uptime, ``EntryMissing`` when the gateway says our entry is
not there); the gateway's epoch tracker decides whether state was lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import socket
import sys
from collections.abc import Iterator, Sequence
from ipaddress import IPv6Address
from typing import Final
from urllib.parse import urlsplit

import attrs
import trio

from portbroker._util import collapse_single
from portbroker.epoch import BootIdSeen, EntryMissing, GatewaySignal, SignalSink, UptimeSeen
from portbroker.errors import (
    LinkError,
    MappingError,
    MethodUnavailable,
    NoAnswer,
    PortBrokerError,
    RequestUnsupported,
    UpnpError,
)
from portbroker.methods import upnp_rules as rules
from portbroker.methods.rules import filter_family_problem, unusable_address
from portbroker.methods.upnp_rules import MAX_LEASE, Remedy, upnp_error_code
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, TransportProtocol
from portbroker.wire import ssdp
from portbroker.wire._fields import to_address

__all__ = ["MAX_LEASE", "UpnpError", "UpnpMethod", "upnp_error_code"]

logger = logging.getLogger(__name__)

# Seconds one HTTP exchange (connect, request, whole response) may take.
# miniupnpd answers in milliseconds, 100-250 ms once nftables holds many rules.
HTTP_TIMEOUT: Final = 5.0
_USER_AGENT: Final = "portbroker UPnP/1.1"
# Linux reports ICMP errors on an unconnected UDP socket only with these on.
_RECVERR: Final = {
    socket.AF_INET: (socket.IPPROTO_IP, getattr(socket, "IP_RECVERR", 11)),
    socket.AF_INET6: (socket.IPPROTO_IPV6, getattr(socket, "IPV6_RECVERR", 25)),
}
# The gateway's own answers (not our stack's): its port is closed, or it
# dropped the connection.
_REFUSALS: Final = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT}
)


class _Unanswered(PortBrokerError):
    """An HTTP or SOAP exchange got no UPnP answer (refused, cut, late, unreadable).

    Proves nothing about the gateway's mappings. Internal: the public methods
    turn it into MethodUnavailable (no IGD to use) or NoAnswer (a renewal).
    """

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"{action}: {reason}")
        self.action = action
        self.reason = reason


@attrs.define
class _Igd:
    location: str
    service: rules.WanService
    boot_id: int | None
    lan_address: IPAddress
    uptime_read: bool = False
    # WANIPv6FirewallControl:1, for IPv6 pinholes (docs/ipv6.md); None on IGD v1.
    firewall: rules.WanService | None = None
    firewall_checked: bool = False


def _search_schedule() -> Iterator[float]:
    # miniupnpd holds each SSDP reply 50-80 ms; resend after that, doubling.
    wait = 0.3
    while True:
        yield wait
        wait *= 2


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UpnpMethod:
    """UPnP IGD (WANIPConnection:1/2, WANPPPConnection:1) on one gateway.

    An internal IPv6 address gets a firewall pinhole through the IGD's
    WANIPv6FirewallControl:1 service instead of a port mapping (docs/ipv6.md).
    """

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
        http_timeout: float = HTTP_TIMEOUT,
    ) -> None:
        self.gateway = gateway
        self.ssdp_port = ssdp_port
        # Multicast searches go to the whole link; loopback has no link to search.
        self.multicast = (
            multicast and not gateway.is_loopback and not isinstance(gateway, IPv6Address)
        )
        self._rng = rng or random.Random()
        self._report = report
        self.http_timeout = http_timeout
        self._igd: _Igd | None = None
        self._discovery = trio.Lock()  # concurrent cold requests share one discovery
        self.permanent_only = False
        self.last_external_address: IPAddress | None = None
        # External ports an AddPortMapping went out for, per (protocol,
        # internal port), whose caller was cancelled before the answer.
        self._unsettled: dict[tuple[TransportProtocol, int], set[int]] = {}
        # (protocol, internal port) -> the IPv6 client an AddPinhole went out
        # for, whose caller was cancelled before the answer.
        self._unsettled_pinholes: dict[tuple[TransportProtocol, int], IPv6Address] = {}

    def _signal(self, signal: GatewaySignal) -> None:
        if self._report is not None:
            self._report(signal)

    async def aclose(self) -> None:
        """Nothing to release: every exchange closes its own socket."""
        self._igd = None

    # -- SSDP -----------------------------------------------------------------

    async def search(self) -> ssdp.SearchResponse:
        """Find the gateway's IGD: unicast M-SEARCH (and multicast, if allowed).

        Raises:
            MethodUnavailable: the gateway refused the search (nothing on its
                SSDP port), or the local stack would not send it (a LinkError's
                words as the reason).
        """
        family = socket.AF_INET6 if isinstance(self.gateway, IPv6Address) else socket.AF_INET
        target = (str(self.gateway), self.ssdp_port)
        where = _target(*target)
        found: list[ssdp.SearchResponse] = []
        failures: list[PortBrokerError] = []
        done = trio.Event()
        # Not connected: a connected UDP socket drops replies from any port but
        # the one it sent to, and devices may answer from an ephemeral port.
        unicast = trio.socket.socket(family, socket.SOCK_DGRAM)
        with unicast, collapse_single():
            try:
                local = self._local_address(family, target)
                level, option = _RECVERR[family]
                if sys.platform.startswith("linux"):
                    # ICMP port unreachable then surfaces as ECONNREFUSED.
                    unicast.setsockopt(level, option, 1)
                await unicast.bind((local, 0))
            except OSError as exc:
                raise MethodUnavailable(self.name, str(LinkError("send to", where, exc))) from None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, unicast, where, found, failures, done)
                if self.multicast:
                    nursery.start_soon(self._multicast_search, local, found, done)
                try:
                    for wait in _search_schedule():
                        try:
                            for st in (ssdp.ST_IGD_V2, ssdp.ST_IGD_V1):
                                await unicast.sendto(
                                    ssdp.encode_msearch(
                                        st, host=self.gateway, port=self.ssdp_port, mx=None
                                    ),
                                    target,
                                )
                        except OSError as exc:
                            # ECONNREFUSED: the ICMP error of an earlier search.
                            if exc.errno != errno.ECONNREFUSED:
                                failures.append(
                                    MethodUnavailable(
                                        self.name, str(LinkError("send to", where, exc))
                                    )
                                )
                            break
                        with trio.move_on_after(wait):
                            await done.wait()
                        if done.is_set():
                            break
                finally:
                    nursery.cancel_scope.cancel()
        if found:
            return found[0]
        if failures:
            raise failures[0]
        raise MethodUnavailable(self.name, f"nothing listens on {where} (ICMP port unreachable)")

    @staticmethod
    def _local_address(family: int, target: tuple[str, int]) -> str:
        # The address that faces the gateway; connecting a UDP socket sends nothing.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])

    async def _receive(
        self,
        sock: trio.socket.SocketType,
        where: str,
        found: list[ssdp.SearchResponse],
        failures: list[PortBrokerError],
        done: trio.Event,
    ) -> None:
        while True:
            try:
                data, source = await sock.recvfrom(ssdp.MAX_MESSAGE_SIZE)
            except OSError as exc:
                # ECONNREFUSED: ICMP port unreachable, no SSDP server there.
                if exc.errno != errno.ECONNREFUSED:
                    failures.append(
                        MethodUnavailable(self.name, str(LinkError("receive from", where, exc)))
                    )
                done.set()
                return
            if self._take(data, source[0], found):
                done.set()
                return

    def _take(self, data: bytes, source: str, found: list[ssdp.SearchResponse]) -> bool:
        reply = rules.accept_search_reply(data, source, self.gateway)
        if reply is None:
            return False
        if reply.boot_id is not None:
            self._signal(BootIdSeen(reply.boot_id, trio.current_time()))
        found.append(reply)
        return True

    async def _multicast_search(
        self, local: str, found: list[ssdp.SearchResponse], done: trio.Event
    ) -> None:
        # Best effort beside the unicast search: its failure is not the method's.
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            try:
                # UDA 1.1 §1.3.2: TTL 2, from the interface that faces the gateway.
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
                await sock.bind((local, 0))
                for st in (ssdp.ST_IGD_V2, ssdp.ST_IGD_V1):
                    await sock.sendto(
                        ssdp.encode_msearch(st, mx=1), (str(ssdp.MULTICAST_V4), ssdp.PORT)
                    )
                while True:
                    data, source = await sock.recvfrom(ssdp.MAX_MESSAGE_SIZE)
                    if self._take(data, source[0], found):
                        done.set()
                        return
            except OSError as exc:
                logger.debug("multicast SSDP search from %s failed: %s", local, exc)

    # -- HTTP -----------------------------------------------------------------

    async def _exchange(
        self, action: str, url: str, request: bytes, cap: int
    ) -> tuple[rules.HttpResponse, IPAddress]:
        """One HTTP request and its whole response, within ``http_timeout``.

        Returns the response and our local address on the connection.

        Raises:
            _Unanswered: refused, cut off, late, too large or unreadable.
            MethodUnavailable: the local stack would not connect (LinkError's words).
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or 80
        where = _target(host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        with sock:
            try:
                with trio.fail_after(self.http_timeout):
                    try:
                        await sock.connect((host, port))
                    except OSError as exc:
                        raise self._socket_failure(action, "connect to", where, exc) from None
                    local = to_address(sock.getsockname()[0].split("%")[0])
                    stream = trio.SocketStream(sock)
                    reader = rules.HttpReader(cap)
                    try:
                        await stream.send_all(request)
                        while True:
                            data = await stream.receive_some(16384)
                            if not data:
                                return reader.close(), local
                            response = reader.feed(data)
                            if response is not None:
                                return response, local
                    except (OSError, trio.BrokenResourceError) as exc:
                        cause = exc if isinstance(exc, OSError) else exc.__cause__
                        if isinstance(cause, OSError):
                            raise self._socket_failure(action, "talk to", where, cause) from None
                        raise _Unanswered(action, f"{where} dropped the connection") from None
            except trio.TooSlowError:
                raise _Unanswered(
                    action, f"no complete answer from {where} within {self.http_timeout:g} s"
                ) from None
            except rules.ResponseTooLarge as exc:
                raise _Unanswered(action, f"{where} sent too much: {exc}; refused") from None
            except ValueError as exc:
                raise _Unanswered(action, f"unreadable answer from {where}: {exc}") from None

    def _socket_failure(self, action: str, verb: str, where: str, exc: OSError) -> PortBrokerError:
        if exc.errno in _REFUSALS:
            name = errno.errorcode.get(exc.errno or 0, "error")
            what = "refused the connection" if exc.errno == errno.ECONNREFUSED else "dropped it"
            return _Unanswered(action, f"{where} {what} ({name})")
        return MethodUnavailable(self.name, str(LinkError(verb, where, exc)))

    async def _soap(
        self,
        igd: _Igd,
        action: str,
        args: Sequence[tuple[str, str]],
        service: rules.WanService | None = None,
    ) -> dict[str, str]:
        """Post *action*; its out arguments, or UpnpError with the device's code.

        Raises:
            UpnpError: the device answered with a UPnP fault (``code`` set when given).
            _Unanswered: no UPnP answer at all.
        """
        service = service or igd.service
        body = rules.soap_envelope(service.service_type, action, args)
        request = rules.http_request(
            "POST",
            service.control_url,
            body=body,
            headers=[
                ("User-Agent", _USER_AGENT),
                ("Content-Type", 'text/xml; charset="utf-8"'),
                ("SOAPAction", f'"{service.service_type}#{action}"'),
            ],
        )
        response, _ = await self._exchange(
            action, service.control_url, request, rules.MAX_SOAP_RESPONSE
        )
        fault = rules.parse_soap_fault(response.body)
        if fault is not None:
            raise UpnpError(action, fault.description, fault.code)
        if response.status != 200:
            raise _Unanswered(
                action, f"HTTP {response.status} {response.reason} without a UPnP error"
            )
        try:
            return rules.parse_soap_response(action, response.body)
        except ValueError as exc:
            raise _Unanswered(action, f"HTTP 200 but {exc}") from None

    # -- the IGD --------------------------------------------------------------

    async def _ensure_igd(self) -> _Igd:
        if self._igd is not None:
            return self._igd
        async with self._discovery:
            if self._igd is None:
                self._igd = await self._discover()
            return self._igd

    async def _discover(self) -> _Igd:
        reply = await self.search()
        request = rules.http_request("GET", reply.location, headers=[("User-Agent", _USER_AGENT)])
        try:
            response, lan = await self._exchange(
                "description", reply.location, request, rules.MAX_DESCRIPTION
            )
        except _Unanswered as exc:
            raise MethodUnavailable(
                self.name, f"cannot read the IGD description at {reply.location}: {exc.reason}"
            ) from None
        if response.status != 200:
            raise MethodUnavailable(
                self.name,
                f"the IGD description at {reply.location} answered HTTP {response.status}",
            )
        service = rules.find_wan_service(response.body.decode("utf-8", "replace"), reply.location)
        if service is None:
            # Also Huawei HG531's urn:dslforum-org types, which are not IGD's.
            raise MethodUnavailable(
                self.name,
                f"no WANIPConnection or WANPPPConnection service in {reply.location}",
            )
        problem = rules.control_url_problem(service.control_url, self.gateway)
        if problem is not None:
            raise MethodUnavailable(self.name, problem)
        firewall = rules.find_firewall_service(
            response.body.decode("utf-8", "replace"), reply.location
        )
        if firewall is not None:
            why = rules.control_url_problem(firewall.control_url, self.gateway)
            if why is not None:
                logger.info("%s: no IPv6 pinholes: %s", self.gateway, why)
                firewall = None
        return _Igd(reply.location, service, reply.boot_id, lan, firewall=firewall)

    def forget_igd(self) -> None:
        """Search and read the description again next time (after failures)."""
        self._igd = None

    async def _external(self, igd: _Igd) -> IPAddress:
        values = await self._soap(igd, "GetExternalIPAddress", ())
        text = values.get("NewExternalIPAddress", "")
        try:
            address = to_address(text)
        except ValueError:
            address = None
        # The same rule as PCP's and NAT-PMP's (docs/result-codes.md, "Useless
        # grants"): link-local, multicast and reserved addresses reach nothing.
        why = "unreadable" if address is None else unusable_address(address)
        if address is None or why is not None:
            raise MethodUnavailable(
                self.name, f"the gateway reports no usable external address ({why}: {text!r})"
            )
        self.last_external_address = address
        return address

    async def external_address(self) -> IPAddress:
        try:
            return await self._external(await self._ensure_igd())
        except (_Unanswered, UpnpError) as exc:
            self.forget_igd()
            raise MethodUnavailable(self.name, str(exc)) from None

    async def probe(self) -> ProbeOutcome:
        started = trio.current_time()
        try:
            igd = await self._ensure_igd()
            address = await self._external(igd)
        except MethodUnavailable as exc:
            return ProbeOutcome(self.name, False, error=exc.reason)
        except (_Unanswered, UpnpError) as exc:
            self.forget_igd()
            return ProbeOutcome(self.name, False, error=str(exc))
        return ProbeOutcome(
            self.name, True, trio.current_time() - started, address, epoch=igd.boot_id
        )

    async def _read_uptime(self, igd: _Igd) -> None:
        """GetStatusInfo's uptime, reported as a signal; a failure proves nothing."""
        igd.uptime_read = True
        try:
            uptime = rules.uptime_of(await self._soap(igd, "GetStatusInfo", ()))
        except (UpnpError, _Unanswered) as exc:
            logger.debug("%s: no uptime from GetStatusInfo (%s)", self.gateway, exc)
            return
        if uptime is None:
            return
        self._signal(UptimeSeen(uptime, trio.current_time()))

    # -- mappings -------------------------------------------------------------

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        if request.remote is not None:
            # IGD's AddPortMapping is an inbound mapping; it has no outbound
            # binding to one remote peer (RFC 6887 §12 PEER has no UPnP twin).
            raise MethodUnavailable(self.name, "PEER needs PCP; UPnP IGD maps inbound ports only")
        key = (request.protocol, request.internal_port)
        try:
            lease = await self._create(request, previous)
        except _Unanswered as exc:
            self._unsettled.pop(key, None)
            # No UPnP answer: proves nothing about our entries. The next
            # attempt searches again (the gateway may have moved its HTTP port).
            self.forget_igd()
            logger.debug("%s: %s", self.gateway, exc)
            if previous is not None:
                raise NoAnswer(f"{self.name}: {exc}") from None
            raise MethodUnavailable(self.name, str(exc)) from None
        except Exception:
            self._unsettled.pop(key, None)
            self._unsettled_pinholes.pop(key, None)
            raise
        # Only a cancellation leaves the ports unsettled (see abandon).
        self._unsettled.pop(key, None)
        self._unsettled_pinholes.pop(key, None)
        return lease

    async def abandon(self, request: MappingRequest) -> None:
        """Delete what an interrupted create of *request* may have made.

        For each external port an AddPortMapping went out for, the entry is
        read back first (GetSpecificPortMappingEntry) and deleted only if it
        maps to our internal client and port: an entry someone else holds on
        that port is left alone.
        """
        pinhole_client = self._unsettled_pinholes.pop(
            (request.protocol, request.internal_port), None
        )
        if pinhole_client is not None:
            await self._abandon_pinhole(request, pinhole_client)
        if request.remote is not None:
            return  # a PEER request never reached UPnP (create refuses it)
        ports = self._unsettled.pop((request.protocol, request.internal_port), set())
        if not ports:
            return
        igd = await self._ensure_igd()
        client = request.internal_address or igd.lan_address
        for port in sorted(ports):
            try:
                entry = await self._get_entry(
                    igd, request.protocol, port, upnp_remote_host(request)
                )
            except (UpnpError, _Unanswered, ValueError):
                continue  # not there (714), or unreadable: nothing we can name
            if (str(entry.internal_client), entry.internal_port) != (
                str(client),
                request.internal_port,
            ):
                continue
            with contextlib.suppress(PortBrokerError):
                await self.delete(
                    Lease(
                        method=self.name,
                        protocol=request.protocol,
                        internal_address=client,
                        internal_port=request.internal_port,
                        external_address=igd.lan_address,
                        external_port=port,
                        lifetime=0,
                        granted_at=trio.current_time(),
                        gateway=self.gateway,
                        filters=request.filters,
                    )
                )

    async def _create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        remote_host = upnp_remote_host(request)  # before anything is sent
        igd = await self._ensure_igd()
        client = request.internal_address or igd.lan_address
        problem = filter_family_problem(client, request.filters)
        if problem is not None:
            raise MappingError(self.name, problem)  # nothing sent
        if isinstance(client, IPv6Address):
            return await self._create_pinhole(igd, request, previous, client)
        if previous is not None:
            await self._check_still_there(igd, previous)
            await self._read_uptime(igd)
            wanted = previous.external_port
        else:
            if not igd.uptime_read:
                await self._read_uptime(igd)  # the baseline the tracker compares with
            wanted = request.external_port or request.internal_port
        try:
            port, lease_sent = await self._add_with_fallbacks(
                igd,
                request,
                wanted,
                str(client),
                exact=request.exact and previous is None,
                third_party=client != igd.lan_address,
            )
        except UpnpError as exc:
            if client != igd.lan_address and exc.code in (rules.CONFLICT, NOT_AUTHORIZED):
                raise RequestUnsupported(
                    self.name,
                    third_party_refusal(client, igd.lan_address, exc.message),
                    result_code=exc.code,
                ) from None
            raise MappingError(
                self.name, exc.message, result_code=exc.code, retry_after=None
            ) from None
        # A renewal asks again: an ISP lease change moves the external address
        # with no signal UPnP would carry (seen in the lab: the cached address
        # stayed wrong for every renewal), and ExternalAddressChanged comes
        # from comparing this lease with the previous one.
        if previous is not None or self.last_external_address is None:
            external = await self._external(igd)
        else:
            external = self.last_external_address
        remaining = None
        if lease_sent == 0:
            # A permanent lease, or AddAnyPortMapping's 0 (a week on IGD v2):
            # read back what the gateway holds.
            remaining = await self._remaining_lease(igd, request.protocol, port)
        granted = rules.build_lease(
            request,
            client=client,
            external_address=external,
            external_port=port,
            lease_sent=lease_sent,
            lifetime=rules.granted_lifetime(remaining, lease_sent, request.lifetime),
            now=trio.current_time(),
            gateway=self.gateway,
            epoch=igd.boot_id,
        )
        # The one filter upnp_remote_host allowed went out as NewRemoteHost;
        # miniupnpd 2.3.1 turns it into a source-address match (seen in the lab).
        return attrs.evolve(granted, filters=request.filters) if remote_host else granted

    async def _add_with_fallbacks(
        self,
        igd: _Igd,
        request: MappingRequest,
        port: int,
        client: str,
        *,
        exact: bool,
        third_party: bool = False,
    ) -> tuple[int, int]:
        """AddPortMapping, then the remedies of :func:`upnp_rules.remedy_for`.

        Returns (external port, lease sent).
        """
        lease = 0 if self.permanent_only else min(request.lifetime, MAX_LEASE)
        proto = request.protocol.value.upper()
        tried_any = False
        unsettled = self._unsettled.setdefault((request.protocol, request.internal_port), set())
        for _attempt in range(6):
            try:
                unsettled.add(port)
                await self._soap(igd, "AddPortMapping", _add_args(request, port, client, lease))
                return port, lease
            except UpnpError as exc:
                if third_party and exc.code in (rules.CONFLICT, NOT_AUTHORIZED):
                    # miniupnpd with secure_mode=yes answers 718 to an
                    # AddPortMapping for another client (tests/data): other
                    # ports would only be refused the same way.
                    raise
                remedy = rules.remedy_for(
                    exc.code,
                    lease=lease,
                    port=port,
                    internal_port=request.internal_port,
                    exact=exact,
                    tried_any=tried_any,
                )
                if remedy is Remedy.GIVE_UP:
                    raise
                logger.debug(
                    "%s: AddPortMapping %s/%s: %s; %s", self.gateway, port, proto, exc, remedy.value
                )
            if remedy is Remedy.PERMANENT_LEASE:
                # Only permanent leases here: we then own the delete.
                self.permanent_only = True
                lease = 0
            elif remedy is Remedy.INTERNAL_PORT:
                port = request.internal_port
            elif remedy is Remedy.ANY_PORT:
                tried_any = True
                try:
                    values = await self._soap(
                        igd, "AddAnyPortMapping", _add_args(request, port, client, 0)
                    )
                    reserved = int(values["NewReservedPort"])
                    if not 1 <= reserved <= 65535:
                        # Port 0 reaches nothing (docs/result-codes.md, "Useless
                        # grants"); 99999 or -5 is no port at all.
                        raise ValueError(f"NewReservedPort {reserved}")
                    # Lease 0, which an IGD v2 gateway reads as its one-week maximum.
                    return reserved, 0
                except UpnpError as any_exc:
                    if any_exc.code not in (rules.INVALID_ACTION, 602, None):
                        raise
                except (KeyError, ValueError):
                    pass  # no usable NewReservedPort: pick a port ourselves
                port = self._rng.randrange(1024, 65536)
            else:
                # IGD v1 (no AddAnyPortMapping): another port of our own choosing.
                port = self._rng.randrange(1024, 65536)
        raise UpnpError("AddPortMapping", "ConflictInMappingEntry", rules.CONFLICT)

    async def _get_entry(
        self, igd: _Igd, protocol: TransportProtocol, port: int, remote_host: str = ""
    ) -> rules.PortMappingEntry:
        values = await self._soap(
            igd,
            "GetSpecificPortMappingEntry",
            [
                ("NewRemoteHost", remote_host),
                ("NewExternalPort", str(port)),
                ("NewProtocol", protocol.value.upper()),
            ],
        )
        return rules.parse_port_mapping_entry(values)

    async def _remaining_lease(
        self, igd: _Igd, protocol: TransportProtocol, port: int
    ) -> int | None:
        try:
            return (await self._get_entry(igd, protocol, port)).lease_remaining
        except (UpnpError, _Unanswered, ValueError) as exc:
            logger.debug("%s: cannot read back the lease of %s: %s", self.gateway, port, exc)
            return None

    async def _check_still_there(self, igd: _Igd, previous: Lease) -> None:
        """At renewal: is our entry still on the gateway? Reports EntryMissing if
        the gateway says it is not (WANIPConnection:2 §2.4.15, error 714).

        Raises:
            _Unanswered: no answer; the renewal fails and is retried.
        """
        protocol = TransportProtocol(previous.protocol)
        label = f"{previous.external_port}/{protocol.value.upper()}"
        try:
            entry = await self._get_entry(
                igd, protocol, previous.external_port, upnp_remote_host(previous)
            )
        except UpnpError as exc:
            if exc.code == rules.NO_SUCH_ENTRY:
                self._signal(
                    EntryMissing(
                        f"entry {label} vanished from the gateway (714 NoSuchEntryInArray)",
                        trio.current_time(),
                    )
                )
            else:
                # 401/602 (not implemented), 606...: proves nothing either way.
                logger.debug("%s: GetSpecificPortMappingEntry %s: %s", self.gateway, label, exc)
            return
        except ValueError as exc:
            logger.debug("%s: GetSpecificPortMappingEntry %s: %s", self.gateway, label, exc)
            return
        if entry.internal_client != str(previous.internal_address):
            self._signal(
                EntryMissing(
                    f"entry {label} now maps to {entry.internal_client}, "
                    f"not {previous.internal_address}",
                    trio.current_time(),
                )
            )

    async def delete(self, lease: Lease) -> None:
        if lease.pinhole_id is not None:
            await self._delete_pinhole(lease, lease.pinhole_id)
            return
        proto = TransportProtocol(lease.protocol).value.upper()
        try:
            igd = await self._ensure_igd()
            await self._soap(
                igd,
                "DeletePortMapping",
                [
                    # The entry's key is (RemoteHost, ExternalPort, Protocol)
                    # (WANIPConnection:2 §2.4.18).
                    ("NewRemoteHost", upnp_remote_host(lease)),
                    ("NewExternalPort", str(lease.external_port)),
                    ("NewProtocol", proto),
                ],
            )
        except UpnpError as exc:
            if exc.code == rules.NO_SUCH_ENTRY:
                return  # already gone: the goal of a delete
            raise MappingError(
                self.name, f"delete refused: {exc.message}", result_code=exc.code
            ) from None
        except _Unanswered as exc:
            self.forget_igd()
            raise NoAnswer(f"{self.name}: {exc}") from None

    # -- IPv6 pinholes (WANIPv6FirewallControl:1; docs/ipv6.md) -------------------

    def _no_pinholes(self, reason: str) -> PortBrokerError:
        # On an IPv6 gateway every request is a pinhole, so UPnP is no use
        # here; on an IPv4 one only this request is (its mappings still work).
        if isinstance(self.gateway, IPv6Address):
            return MethodUnavailable(self.name, reason)
        return MappingError(self.name, reason)

    async def _firewall(self, igd: _Igd) -> rules.WanService:
        """The IGD's WANIPv6FirewallControl service, its status checked once."""
        if igd.firewall is None:
            raise self._no_pinholes(
                "the IGD has no WANIPv6FirewallControl service (IGD v2): no IPv6 pinholes"
            )
        if not igd.firewall_checked:
            try:
                values = await self._soap(igd, "GetFirewallStatus", (), service=igd.firewall)
            except UpnpError as exc:
                # Not implemented (401, 602): AddPinhole's own answer will tell.
                logger.debug("%s: GetFirewallStatus: %s", self.gateway, exc)
            else:
                problem = rules.firewall_status_problem(values)
                if problem is not None:
                    raise self._no_pinholes(problem)
            igd.firewall_checked = True
        return igd.firewall

    async def _create_pinhole(
        self, igd: _Igd, request: MappingRequest, previous: Lease | None, client: IPv6Address
    ) -> Lease:
        """AddPinhole, or UpdatePinhole for a renewal of a pinhole we hold.

        A pinhole does not translate: its external endpoint is the internal
        one, so an exact request for another external port cannot be met.
        """
        if request.exact and request.external_port != request.internal_port:
            raise MappingError(
                self.name,
                f"an IPv6 pinhole keeps the internal port {request.internal_port};"
                f" external port {request.external_port} cannot be provided",
            )
        firewall = await self._firewall(igd)
        if previous is not None or not igd.uptime_read:
            await self._read_uptime(igd)  # the tracker's baseline, as for mappings
        # §2.5.4: LeaseTime 1..86400 s; the lifecycle renews before it ends.
        lease_time = min(request.lifetime, rules.MAX_PINHOLE_LEASE)
        if previous is not None and previous.pinhole_id is not None:
            try:
                await self._soap(
                    igd,
                    "UpdatePinhole",
                    [("UniqueID", str(previous.pinhole_id)), ("NewLeaseTime", str(lease_time))],
                    service=firewall,
                )
            except UpnpError as exc:
                # 606: the UniqueID names another host's pinhole. UniqueIDs
                # count from 1 again after a restart (miniupnpd), so ours may
                # now be someone else's, which miniupnpd's secure mode refuses
                # to touch: ours is gone all the same; add it again.
                if exc.code not in rules.PINHOLE_GONE and exc.code != NOT_AUTHORIZED:
                    raise MappingError(
                        self.name, f"UpdatePinhole refused: {exc.message}", result_code=exc.code
                    ) from None
                self._signal(
                    EntryMissing(
                        f"pinhole {previous.pinhole_id} vanished from the gateway"
                        f" ({exc.code} {exc.message})",
                        trio.current_time(),
                    )
                )
            else:
                return rules.build_pinhole_lease(
                    request,
                    client=client,
                    lease_time=lease_time,
                    pinhole_id=previous.pinhole_id,
                    now=trio.current_time(),
                    gateway=self.gateway,
                    epoch=igd.boot_id,
                )
        self._unsettled_pinholes[(request.protocol, request.internal_port)] = client
        try:
            values = await self._soap(
                igd,
                "AddPinhole",
                rules.pinhole_args(request, str(client), lease_time, upnp_remote_host(request)),
                firewall,
            )
        except UpnpError as exc:
            hint = ""
            if exc.code == 606 and client != igd.lan_address:
                # miniupnpd 2.3.1 (secure_mode, seen in the lab): a pinhole
                # only for the address the request comes from.
                hint = (
                    f" (the gateway opens pinholes only for the address that asks;"
                    f" this host asks from {igd.lan_address}: open the broker on the"
                    f" gateway's IPv6 address)"
                )
            raise MappingError(
                self.name, f"AddPinhole refused: {exc.message}{hint}", result_code=exc.code
            ) from None
        try:
            pinhole_id = rules.pinhole_id_of(values)
        except ValueError as exc:
            # A pinhole may exist that we cannot name: its lease (at most a
            # day) ends it.
            raise _Unanswered("AddPinhole", str(exc)) from None
        return rules.build_pinhole_lease(
            request,
            client=client,
            lease_time=lease_time,
            pinhole_id=pinhole_id,
            now=trio.current_time(),
            gateway=self.gateway,
            epoch=igd.boot_id,
        )

    async def _abandon_pinhole(self, request: MappingRequest, client: IPv6Address) -> None:
        """Delete a pinhole an interrupted AddPinhole may have made.

        AddPinhole of a pinhole that exists answers its UniqueID (miniupnpd
        2.3.1, seen in the lab), so asking again names it; then it is deleted.
        """
        igd = await self._ensure_igd()
        if igd.firewall is None:
            return
        with contextlib.suppress(PortBrokerError, ValueError):
            values = await self._soap(
                igd,
                "AddPinhole",
                rules.pinhole_args(request, str(client), 1, upnp_remote_host(request)),
                igd.firewall,
            )
            await self._soap(
                igd,
                "DeletePinhole",
                [("UniqueID", str(rules.pinhole_id_of(values)))],
                igd.firewall,
            )

    async def _delete_pinhole(self, lease: Lease, pinhole_id: int) -> None:
        try:
            igd = await self._ensure_igd()
            if igd.firewall is None:
                raise MappingError(
                    self.name,
                    f"delete of pinhole {pinhole_id} refused: the IGD offers no"
                    " WANIPv6FirewallControl service any more",
                )
            await self._soap(igd, "DeletePinhole", [("UniqueID", str(pinhole_id))], igd.firewall)
        except UpnpError as exc:
            if exc.code in rules.PINHOLE_GONE:
                return  # already gone: the goal of a delete
            raise MappingError(
                self.name, f"delete refused: {exc.message}", result_code=exc.code
            ) from None
        except _Unanswered as exc:
            self.forget_igd()
            raise NoAnswer(f"{self.name}: {exc}") from None


# UPnP's "Action not authorized" (WANIPConnection:2 §2.4.16).
NOT_AUTHORIZED: Final = 606


def upnp_remote_host(request: MappingRequest | Lease) -> str:
    """The NewRemoteHost for *request*'s filters: "" (anyone) or one host.

    UPnP IGD keys a mapping by one remote host, or the wildcard
    (WANIPConnection:2 §2.4.16): a prefix, several hosts or a remote port
    cannot be expressed, and mapping without them would open the port to
    everyone, so those requests are refused here, before anything is sent.

    Raises:
        MappingError: filters UPnP cannot express.
    """
    filters = request.filters
    if not filters:
        return ""
    problem = None
    if len(filters) > 1:
        problem = f"{len(filters)} filters"
    elif not filters[0].is_host:
        problem = f"the prefix {filters[0].network}"
    elif filters[0].port:
        problem = f"remote port {filters[0].port}"
    if problem is not None:
        raise RequestUnsupported(
            "upnp",
            f"UPnP IGD can restrict a mapping to one remote host (any port) only, not {problem};"
            " nothing was mapped (PCP FILTER can express it where the gateway enforces it)",
        )
    address = filters[0].network.network_address
    # ::ffff:11.0.0.2 (RFC 6887 §5's wire form of IPv4) is 11.0.0.2 to an IGD,
    # whose NewRemoteHost for an IPv4 mapping is a dotted quad.
    mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
    return str(mapped or address)


def third_party_refusal(client: IPAddress, own: IPAddress, message: str) -> str:
    """How a refused AddPortMapping for another host reads to the user."""
    return (
        f"the gateway refused to map for another host ({client}; this host is {own}): {message}"
        " (miniupnpd with secure_mode=yes allows a client to map only its own address;"
        " or the port is taken)"
    )


def _add_args(request: MappingRequest, port: int, client: str, lease: int) -> list[tuple[str, str]]:
    # The argument order of WANIPConnection:2 §2.4.16 (and of miniupnpc).
    return [
        ("NewRemoteHost", upnp_remote_host(request)),
        ("NewExternalPort", str(port)),
        ("NewProtocol", request.protocol.value.upper()),
        ("NewInternalPort", str(request.internal_port)),
        ("NewInternalClient", client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", request.description),
        ("NewLeaseDuration", str(lease)),
    ]
