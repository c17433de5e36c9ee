"""FakeIgd: a UPnP IGD on 127.0.0.1 that serves a real device's description.

It answers unicast M-SEARCH on a UDP port, serves a root description (any
real one: its URLBase and control URLs are pointed at this server, as they
point at the device itself in the wild) and answers SOAP from a real mapping
table. Knobs make it behave like real routers (whose captures the tests
replay): only permanent leases (725), 402 for any finite lease, no
AddAnyPortMapping on v1 services, scripted raw replies (captured HTTP exchanges
replayed byte for byte), a BOOTID that changes; and like broken or hostile
ones: SSDP replies from an ephemeral port (UDA 1.1 §1.3.3 allows it), a
LOCATION naming a closed port, a description dripped a byte at a time or
without end, SOAP answers that never finish. With a description that has a
WANIPv6FirewallControl:1 service it also holds IPv6 pinholes (AddPinhole,
UpdatePinhole, DeletePinhole, GetFirewallStatus), as miniupnpd 2.3.1 does;
``address="::1"`` serves it over IPv6.

Usage::

    async with trio.open_nursery() as nursery:
        igd = FakeIgd(description=Path(".../pfSenseRootDescXML.xml").read_text())
        await nursery.start(igd.serve)
        # gateway 127.0.0.1, SSDP port igd.ssdp_port
"""

from __future__ import annotations

import re
import socket
import time
from collections import deque
from functools import partial
from typing import Final

import attrs
import trio

from portbroker.errors import MalformedMessage
from portbroker.wire import ssdp

__all__ = ["FakeIgd", "IgdEntry", "Pinhole", "soap_fault"]

_PINHOLE_ACTIONS: Final = frozenset(
    {"GetFirewallStatus", "AddPinhole", "UpdatePinhole", "DeletePinhole"}
)


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


_ACTION = re.compile(r'"?([^"#]+)#([A-Za-z]+)"?')
_ARG = re.compile(
    r"<(New[A-Za-z]+|UniqueID|RemoteHost|RemotePort|InternalClient|InternalPort|Protocol"
    r"|LeaseTime)>([^<]*)</\1>"
)
_NAME_BY_CODE: Final = {
    401: "Invalid Action",
    402: "Invalid Args",
    501: "Action Failed",
    606: "Action not authorized",
    714: "NoSuchEntryInArray",
    718: "ConflictInMappingEntry",
    725: "OnlyPermanentLeasesSupported",
    702: "FirewallDisabled",
    703: "InboundPinholeNotAllowed",
    704: "NoSuchEntry",
}


def soap_fault(code: int, description: str | None = None) -> bytes:
    """A UPnP SOAP fault body as miniupnpd writes it (HTTP 500)."""
    text = description or _NAME_BY_CODE.get(code, "Error")
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
    ).encode()


def _http(status: str, body: bytes, content_type: str = 'text/xml; charset="utf-8"') -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: FakeIgd UPnP/1.1\r\n\r\n"
    )
    return head.encode() + body


@attrs.define
class IgdEntry:
    client: str
    internal_port: int
    description: str
    lease: int  # as sent; 0 = permanent
    added_at: float


@attrs.define
class Pinhole:
    """An IPv6 pinhole (WANIPv6FirewallControl:1)."""

    client: str
    internal_port: int
    protocol: int
    lease: int
    added_at: float


@attrs.define(eq=False)
class FakeIgd:
    """See the module docstring. Times come from ``time.monotonic`` (miniupnpc runs in threads)."""

    description: str
    external_address: str = "203.0.113.7"
    boot_id: int = 1
    config_id: int = 1337

    # -- knobs --
    permanent_only: bool = False  # AddPortMapping with a lease -> 725
    invalid_args_for_lease: bool = False  # AddPortMapping with a lease -> 402 (tailscale #15223)
    fault_body: bytes | None = None  # the body sent with those faults (a real capture)
    conflict_ports: set[int] = attrs.Factory(set)  # external ports "another client" holds
    scripted: dict[str, deque[bytes]] = attrs.Factory(dict)  # action -> raw HTTP replies
    silent_ssdp: bool = False
    ssdp_from_ephemeral_port: bool = False  # reply from a fresh socket, not the one searched
    location_port: int | None = None  # advertise this HTTP port in LOCATION (e.g. a closed one)
    description_mode: str = "normal"  # "drip": a byte per drip_interval; "endless": no end
    drip_interval: float = 1.0
    drip_actions: set[str] = attrs.Factory(set)  # SOAP actions answered by a drip
    body_bytes_sent: int = 0  # bytes of dripped or endless bodies sent so far
    address: str = "127.0.0.1"  # where it serves ("::1": over IPv6)
    firewall_enabled: bool = True  # GetFirewallStatus FirewallEnabled
    inbound_pinholes_allowed: bool = True  # GetFirewallStatus InboundPinholeAllowed
    # The fault for an UpdatePinhole / DeletePinhole of an unknown UniqueID:
    # 704 per the spec, 402 as miniupnpd 2.3.1 answers (seen in the lab).
    pinhole_gone_code: int = 704
    pinholes: dict[int, Pinhole] = attrs.Factory(dict)
    _next_pinhole: int = 1
    # miniupnpd's secure_mode=yes: an AddPortMapping for a NewInternalClient
    # other than the requester (127.0.0.1 here) gets 718 (tests/data capture),
    # and a pinhole action on another host's pinhole (its InternalClient not
    # the requester, ``address`` here) gets 606 (upnpsoap.c PinholeVerification).
    secure_mode: bool = False

    entries: dict[tuple[int, str], IgdEntry] = attrs.Factory(dict)
    actions: list[tuple[str, dict[str, str]]] = attrs.Factory(list)
    http_port: int = 0
    ssdp_port: int = 0
    uptime_origin: float = attrs.Factory(time.monotonic)
    _served: str = ""

    @property
    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    @property
    def base(self) -> str:
        return f"http://{self._host}:{self.http_port}"

    @property
    def location(self) -> str:
        port = self.http_port if self.location_port is None else self.location_port
        return f"http://{self._host}:{port}/rootDesc.xml"

    def _prepare_description(self) -> str:
        text = self.description.replace("%s:%d", f"{self._host}:{self.http_port}")
        # The device's own address is this server: point URLBase and absolute
        # URLs at it, as they point at the device in the wild.
        text = re.sub(r"<URLBase>[^<]*</URLBase>", f"<URLBase>{self.base}</URLBase>", text)
        return re.sub(
            r"(<(controlURL|SCPDURL|eventSubURL)>)https?://[^/<]+", rf"\1{self.base}", text
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve SSDP (UDP) and HTTP (TCP) on ``address`` until cancelled."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        with udp:
            await udp.bind((self.address, self.ssdp_port))
            self.ssdp_port = udp.getsockname()[1]
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._handle_http, self.http_port, host=self.address)
                )
                self.http_port = listeners[0].socket.getsockname()[1]
                self._served = self._prepare_description()
                nursery.start_soon(self._serve_ssdp, udp)
                task_status.started()

    async def _serve_ssdp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, client = await sock.recvfrom(ssdp.MAX_MESSAGE_SIZE)
            try:
                search = ssdp.decode_msearch(data)
            except MalformedMessage:
                continue
            if self.silent_ssdp:
                continue
            st = search.st
            if st not in (ssdp.ST_IGD_V1, ssdp.ST_IGD_V2, "ssdp:all", "upnp:rootdevice"):
                continue
            reply = (
                "HTTP/1.1 200 OK\r\n"
                "CACHE-CONTROL: max-age=120\r\n"
                f"ST: {st}\r\n"
                f"USN: uuid:00000000-fake-4000-8000-000000000001::{st}\r\n"
                "EXT:\r\n"
                "SERVER: FakeIgd UPnP/1.1 portbroker/testing\r\n"
                f"LOCATION: {self.location}\r\n"
                f"BOOTID.UPNP.ORG: {self.boot_id}\r\n"
                f"CONFIGID.UPNP.ORG: {self.config_id}\r\n"
                "\r\n"
            )
            if self.ssdp_from_ephemeral_port:
                with trio.socket.socket(family_of(self.address), socket.SOCK_DGRAM) as other:
                    await other.bind((self.address, 0))
                    await other.sendto(reply.encode(), client)
            else:
                await sock.sendto(reply.encode(), client)

    async def _handle_http(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    request += chunk
                head, _, body = request.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "0") or 0)
                while len(body) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    body += chunk
            if b"\r\n\r\n" not in request:
                return
            method, _, rest = lines[0].partition(" ")
            path = rest.split(" ")[0]
            text = body.decode("utf-8", "replace")
            try:
                if method == "GET" and self.description_mode != "normal":
                    await self._send_endlessly(stream, self.description_mode == "drip")
                    return
                action = _ACTION.fullmatch(headers.get("soapaction", "").strip())
                if action is not None and action.group(2) in self.drip_actions:
                    self.actions.append((action.group(2), dict(_ARG.findall(text))))
                    await self._send_endlessly(stream, True)
                    return
                await stream.send_all(self._respond(method, path, headers, text))
            except trio.BrokenResourceError:
                return  # the client hung up

    async def _send_endlessly(self, stream: trio.SocketStream, drip: bool) -> None:
        """A body that never completes: a byte per drip_interval, or all it can send."""
        if drip:
            # A plausible length, so that only the pace is wrong.
            length = len(self._served.encode())
            head = f"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\n\r\n"
            await stream.send_all(head.encode())
            while True:
                await stream.send_all(b"<")
                self.body_bytes_sent += 1
                await trio.sleep(self.drip_interval)
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n<root>")
        block = b"<x>" * 5461
        while True:
            await stream.send_all(block)
            self.body_bytes_sent += len(block)

    def _respond(self, method: str, path: str, headers: dict[str, str], body: str) -> bytes:
        if method == "GET":
            if path.endswith("rootDesc.xml") or path == "/":
                return _http("200 OK", self._served.encode())
            return _http("404 Not Found", b"")
        match = _ACTION.fullmatch(headers.get("soapaction", "").strip())
        if method != "POST" or match is None:
            return _http("400 Bad Request", b"")
        service, action = match.group(1), match.group(2)
        args = dict(_ARG.findall(body))
        self.actions.append((action, args))
        queue = self.scripted.get(action)
        if queue:
            return queue.popleft()
        payload = self._soap(service, action, args)
        if isinstance(payload, bytes):
            return _http("500 Internal Server Error", payload)
        out = "".join(f"<{k}>{v}</{k}>" for k, v in payload.items())
        envelope = (
            '<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action}Response xmlns:u="{service}">{out}</u:{action}Response></s:Body></s:Envelope>\r\n'
        )
        return _http("200 OK", envelope.encode())

    def _fault(self, code: int) -> bytes:
        return soap_fault(code)

    def _soap(self, service: str, action: str, args: dict[str, str]) -> dict[str, str] | bytes:
        now = time.monotonic()
        self._expire(now)
        version2 = service.endswith(":2")
        try:
            if action == "GetExternalIPAddress":
                return {"NewExternalIPAddress": self.external_address}
            if action == "GetStatusInfo":
                return {
                    "NewConnectionStatus": "Connected",
                    "NewLastConnectionError": "ERROR_NONE",
                    "NewUptime": str(int(now - self.uptime_origin)),
                }
            if action in _PINHOLE_ACTIONS:
                return self._pinhole(action, args, now)
            if action in ("AddPortMapping", "AddAnyPortMapping"):
                if action == "AddAnyPortMapping" and not version2:
                    return self._fault(401)
                return self._add(action, args, now)
            key = (int(args["NewExternalPort"]), args["NewProtocol"].upper())
            if action == "DeletePortMapping":
                if self.entries.pop(key, None) is None:
                    return self._fault(714)
                return {}
            if action == "GetSpecificPortMappingEntry":
                entry = self.entries.get(key)
                if entry is None:
                    return self._fault(714)
                remaining = (
                    0 if entry.lease == 0 else max(1, int(entry.added_at + entry.lease - now))
                )
                return {
                    "NewInternalPort": str(entry.internal_port),
                    "NewInternalClient": entry.client,
                    "NewEnabled": "1",
                    "NewPortMappingDescription": entry.description,
                    "NewLeaseDuration": str(remaining),
                }
        except (KeyError, ValueError):
            return self._fault(402)
        return self._fault(401)

    def _add(self, action: str, args: dict[str, str], now: float) -> dict[str, str] | bytes:
        lease = int(args["NewLeaseDuration"] or 0)
        port = int(args["NewExternalPort"])
        proto = args["NewProtocol"].upper()
        client = args["NewInternalClient"]
        if self.secure_mode and client != "127.0.0.1":
            return self._fault(718)
        if action == "AddPortMapping" and lease != 0:
            if self.permanent_only:
                return self.fault_body or soap_fault(725)
            if self.invalid_args_for_lease:
                return self.fault_body or soap_fault(402)
        if action == "AddAnyPortMapping" and lease == 0:
            lease = 604800  # IGD v2: 0 means the maximum, one week
        taken = port in self.conflict_ports or (
            (port, proto) in self.entries and self.entries[(port, proto)].client != client
        )
        if taken:
            if action == "AddPortMapping":
                return self._fault(718)
            port = next(
                p
                for p in range(1024, 65536)
                if p not in self.conflict_ports and (p, proto) not in self.entries
            )
        self.entries[(port, proto)] = IgdEntry(
            client,
            int(args["NewInternalPort"]),
            args.get("NewPortMappingDescription", ""),
            lease,
            now,
        )
        if action == "AddAnyPortMapping":
            return {"NewReservedPort": str(port)}
        return {}

    def _pinhole(self, action: str, args: dict[str, str], now: float) -> dict[str, str] | bytes:
        """WANIPv6FirewallControl:1 as miniupnpd 2.3.1 answers it (seen in the lab)."""
        for uid in [u for u, p in self.pinholes.items() if p.added_at + p.lease <= now]:
            del self.pinholes[uid]
        if action == "GetFirewallStatus":
            return {
                "FirewallEnabled": str(int(self.firewall_enabled)),
                "InboundPinholeAllowed": str(int(self.inbound_pinholes_allowed)),
            }
        if not self.firewall_enabled:
            return self._fault(702)
        if not self.inbound_pinholes_allowed:
            return self._fault(703)
        if action == "AddPinhole":
            lease = int(args["LeaseTime"])
            if not 1 <= lease <= 86400:
                return self._fault(402)
            wanted = (args["InternalClient"], int(args["InternalPort"]), int(args["Protocol"]))
            for uid, hole in self.pinholes.items():
                # The same pinhole asked again: its UniqueID, lease updated.
                if (hole.client, hole.internal_port, hole.protocol) == wanted:
                    hole.lease, hole.added_at = lease, now
                    return {"UniqueID": str(uid)}
            uid = self._next_pinhole
            self._next_pinhole += 1
            self.pinholes[uid] = Pinhole(*wanted, lease=lease, added_at=now)
            return {"UniqueID": str(uid)}
        uid = int(args["UniqueID"])
        if uid not in self.pinholes:
            return self._fault(self.pinhole_gone_code)
        if self.secure_mode and self.pinholes[uid].client != self.address:
            return self._fault(606)
        if action == "UpdatePinhole":
            lease = int(args["NewLeaseTime"])
            if not 1 <= lease <= 86400:
                return self._fault(402)
            self.pinholes[uid].lease, self.pinholes[uid].added_at = lease, now
            return {}
        del self.pinholes[uid]  # DeletePinhole
        return {}

    def pinhole_for(self, client: str, internal_port: int, protocol: int) -> int | None:
        """The UniqueID of the pinhole for that endpoint, or None."""
        for uid, hole in self.pinholes.items():
            if (hole.client, hole.internal_port, hole.protocol) == (
                client,
                internal_port,
                protocol,
            ):
                return uid
        return None

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self.entries.items() if e.lease and e.added_at + e.lease <= now]:
            del self.entries[key]

    def reboot(self) -> None:
        """Lose every entry, bump BOOTID, restart the uptime."""
        self.entries.clear()
        self.pinholes.clear()
        self._next_pinhole = 1  # miniupnpd's UniqueIDs count from 1 again
        self.boot_id += 1
        self.uptime_origin = time.monotonic()
