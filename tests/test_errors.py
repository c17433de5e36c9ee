"""Errors read as words: what failed, and the errno's name when there is one."""

from __future__ import annotations

import socket

from portbroker.errors import LinkError, NoAnswer, PortBrokerError, UpnpError


def test_link_error_words_without_an_errno() -> None:
    text = str(
        LinkError("resolve", "gw.example:5351", socket.gaierror(-2, "Name or service not known"))
    )
    assert text == "cannot resolve gw.example:5351: Name or service not known"
    text = str(LinkError("send to", "192.0.2.1:5351", OSError("weird")))
    assert "errno" not in text
    assert "weird" in text
    eperm = str(LinkError("send to", "192.0.2.1:5351", PermissionError(1, "x")))
    assert eperm == (
        "cannot send to 192.0.2.1:5351: Operation not permitted (EPERM);"
        " a host firewall may drop it"
    )


def test_no_answer_names_what_it_ignored() -> None:
    assert str(NoAnswer("no answer", ignored={"nonce mismatch": 12})) == (
        "no answer (12 replies ignored: nonce mismatch)"
    )
    assert str(NoAnswer("x", ignored={"nonce mismatch": 1, "wrong source port": 2})) == (
        "x (3 replies ignored: 1 nonce mismatch, 2 wrong source port)"
    )
    assert str(NoAnswer("x")) == "x"


def test_every_error_a_user_sees_is_a_portbroker_error() -> None:
    assert issubclass(UpnpError, PortBrokerError)
    assert issubclass(LinkError, PortBrokerError)
