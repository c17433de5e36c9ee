"""Small misbehaving servers the fault tests run in the lab's gateway namespace.

    python fault_servers.py pcp-refuse-announce ADDRESS PORT LOG WAN_IF
    python fault_servers.py pcp-port-zero ADDRESS PORT LOG
    python fault_servers.py ssdp-ephemeral ADDRESS PORT LOG LOCATION

``pcp-refuse-announce``: a PCP server (RFC 6887) that answers ANNOUNCE with
UNSUPP_OPCODE, as some routers do, but serves MAP. It grants the suggested
(or internal) port and installs the DNAT and forward rules itself in the lab's
nftables chains, so the mapping works from outside like miniupnpd's.

``pcp-port-zero``: a PCP server that answers every MAP with SUCCESS but
external port 0 (issue 7 §2.5: a grant no client can use).

``ssdp-ephemeral``: answers each unicast M-SEARCH from a *new* socket on a
random port, with LOCATION pointing at miniupnpd's real description. UDA 1.1
§1.3.3 has the reply sent from any port; the client must accept it.

Every request received is logged as one JSON line to LOG; "ready" is printed
on stdout once the socket is bound.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address

from portbroker.errors import PortBrokerError
from portbroker.wire import pcp

EXTERNAL = IPv4Address("11.0.0.1")


def log(path: str, **fields: object) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(fields, default=str) + "\n")


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def pcp_server(address: str, port: int, log_path: str, mode: str, wan_if: str | None) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    started = time.monotonic()
    installed: set[tuple[int, int]] = set()
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        epoch = int(time.monotonic() - started)
        try:
            request = pcp.decode_request(data)
        except PortBrokerError as exc:
            log(log_path, op="undecodable", error=str(exc))
            continue
        if request.opcode is pcp.Opcode.ANNOUNCE:
            log(log_path, op="ANNOUNCE", peer=peer)
            code = (
                pcp.ResultCode.UNSUPP_OPCODE
                if mode == "pcp-refuse-announce"
                else pcp.ResultCode.SUCCESS
            )
            reply = pcp.PcpResponse(pcp.Opcode.ANNOUNCE, code, 0, epoch)
            sock.sendto(pcp.encode_response(reply), peer)
            continue
        data_in = request.data
        if request.opcode is not pcp.Opcode.MAP or not isinstance(data_in, pcp.MapData):
            reply = pcp.PcpResponse(request.opcode, pcp.ResultCode.UNSUPP_OPCODE, 0, epoch)
            sock.sendto(pcp.encode_response(reply), peer)
            continue
        external_port = data_in.external_port or data_in.internal_port
        if mode == "pcp-port-zero":
            external_port = 0
        elif request.lifetime > 0 and (external_port, data_in.internal_port) not in installed:
            assert wan_if is not None
            installed.add((external_port, data_in.internal_port))
            nft(
                f"add rule inet filter prerouting_miniupnpd iifname {wan_if} "
                f"tcp dport {external_port} dnat ip to "
                f"{request.client_address}:{data_in.internal_port}\n"
                f"add rule inet filter miniupnpd iifname {wan_if} ip daddr "
                f"{request.client_address} tcp dport {data_in.internal_port} accept\n"
            )
        log(
            log_path,
            op="MAP",
            lifetime=request.lifetime,
            internal_port=data_in.internal_port,
            nonce=data_in.nonce.hex(),
            granted_port=external_port,
        )
        reply = pcp.PcpResponse(
            pcp.Opcode.MAP,
            pcp.ResultCode.SUCCESS,
            request.lifetime,
            epoch,
            pcp.MapData(
                data_in.nonce,
                data_in.protocol,
                data_in.internal_port,
                external_port,
                EXTERNAL if request.lifetime else data_in.external_address,
            ),
        )
        sock.sendto(pcp.encode_response(reply), peer)


def ssdp_server(address: str, port: int, log_path: str, location: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        text = data.decode("latin-1")
        if not text.startswith("M-SEARCH"):
            continue
        st = "upnp:rootdevice"
        for header in text.split("\r\n"):
            name, _, value = header.partition(":")
            if name.strip().lower() == "st":
                st = value.strip()
        reply = (
            "HTTP/1.1 200 OK\r\n"
            "CACHE-CONTROL: max-age=120\r\n"
            f"ST: {st}\r\n"
            f"USN: uuid:00000000-0000-0000-0000-00000000f417::{st}\r\n"
            "EXT:\r\n"
            "SERVER: fault-test/1.0 UPnP/1.1 test/1.0\r\n"
            f"LOCATION: {location}\r\n"
            "\r\n"
        ).encode()
        # A fresh socket per reply: the source port is whatever the kernel picks.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as answer:
            answer.bind((address, 0))
            answer.sendto(reply, peer)
            log(log_path, op="M-SEARCH", st=st, peer=peer, source_port=answer.getsockname()[1])


def main(argv: list[str]) -> None:
    mode, address, port, log_path = argv[0], argv[1], int(argv[2]), argv[3]
    if mode.startswith("pcp-"):
        pcp_server(address, port, log_path, mode, argv[4] if len(argv) > 4 else None)
    elif mode == "ssdp-ephemeral":
        ssdp_server(address, port, log_path, argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
