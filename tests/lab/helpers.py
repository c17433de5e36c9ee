"""Small helpers for lab tests: prove a mapping with a real TCP connection."""

from __future__ import annotations

import socket

from portbroker.testing.lab import EXTERNAL_ADDRESS, LAN_ADDRESS, Lab


def listen_in_lan(lab: Lab, port: int) -> socket.socket:
    listener = lab.socket(lab.lan_ns, kind=socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(LAN_ADDRESS), port))
    listener.listen()
    listener.settimeout(5)
    return listener


def connect_from_wan(lab: Lab, listener: socket.socket, external_port: int) -> bytes:
    """Connect from the wan side to 11.0.0.1:*external_port*; return what the lan side sent.

    Raises ConnectionRefusedError when the gateway has no mapping for the port
    (it answers the SYN with a reset).
    """
    outside = lab.socket(lab.wan_ns, kind=socket.SOCK_STREAM)
    with outside:
        outside.settimeout(5)
        outside.connect((str(EXTERNAL_ADDRESS), external_port))
        inside, _peer = listener.accept()
        with inside:
            inside.sendall(b"inside says hello")
            return outside.recv(100)


def udp_to_gateway(lab: Lab, port: int) -> socket.socket:
    from portbroker.testing.lab import GATEWAY_ADDRESS

    sock = lab.socket(lab.lan_ns)
    sock.connect((str(GATEWAY_ADDRESS), port))
    return sock
