"""probe_all and create_by_preference: every method failure is that method's outcome.

Stub methods stand for bugs and socket failures a real method might raise, so
these tests pin what escapes the two nurseries: never an ExceptionGroup.
"""

from __future__ import annotations

import errno
import logging
from ipaddress import IPv4Address

import attrs
import pytest
import trio

from portbroker.errors import MappingError, MethodUnavailable, NoMethodAvailable
from portbroker.methods import Method
from portbroker.probe import create_by_preference, probe_all
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import IPAddress, Lease, MappingRequest, ProbeOutcome, TransportProtocol
from tests.method_harness import harness

GATEWAY = IPv4Address("192.168.1.1")
REQUEST = MappingRequest(7000, "tcp")


@attrs.define
class Stub:
    """A method whose probe and create do what the test says."""

    name: str
    probe_error: Exception | None = None
    create_error: Exception | None = None
    creates: int = 0

    async def probe(self) -> ProbeOutcome:
        await trio.sleep(0.01)
        if self.probe_error is not None:
            raise self.probe_error
        return ProbeOutcome(self.name, True, 0.01)

    async def create(self, request: MappingRequest, previous: Lease | None) -> Lease:
        await trio.sleep(0.01)
        self.creates += 1
        if self.create_error is not None:
            raise self.create_error
        return Lease(
            self.name,
            TransportProtocol.TCP,
            "192.168.1.100",
            request.internal_port,
            "203.0.113.7",
            request.internal_port,
            3600,
            trio.current_time(),
            GATEWAY,
        )

    async def delete(self, lease: Lease) -> None:
        await trio.lowlevel.checkpoint()

    async def abandon(self, request: MappingRequest) -> None:
        await trio.lowlevel.checkpoint()

    async def external_address(self) -> IPAddress:
        await trio.lowlevel.checkpoint()
        return IPv4Address("203.0.113.7")


def _methods(*stubs: Stub) -> list[Method]:
    return list(stubs)


async def test_a_bug_in_a_probe_is_that_methods_outcome_logged_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Stub("pcp", probe_error=KeyError("nonce"))
    report = await probe_all(GATEWAY, _methods(broken, Stub("natpmp")), 2.0)
    assert report.selected == "natpmp"
    outcome = report.outcome("pcp")
    assert outcome is not None
    assert outcome.error == "internal error: KeyError: 'nonce'"
    logged = [r for r in caplog.records if r.name == "portbroker" and r.exc_info]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert "pcp" in logged[0].getMessage()


async def test_a_socket_error_escaping_a_method_is_put_in_words(
    autojump_clock: trio.testing.MockClock,
) -> None:
    denied = Stub("upnp", probe_error=PermissionError(errno.EPERM, "Operation not permitted"))
    report = await probe_all(GATEWAY, _methods(denied), 2.0)
    assert report.selected is None
    outcome = report.outcome("upnp")
    assert outcome is not None
    assert outcome.error == (
        "cannot reach 192.168.1.1: Operation not permitted (EPERM); a host firewall may drop it"
    )


async def test_a_bug_in_the_first_create_moves_on_to_the_next_method(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = Stub("pcp", create_error=ZeroDivisionError("division by zero"))
    second = Stub("natpmp")
    lease, report = await create_by_preference(GATEWAY, _methods(first, second), REQUEST, 2.0)
    assert lease.method == "natpmp"
    outcome = report.outcome("pcp")
    assert outcome is not None
    assert outcome.error == "internal error: ZeroDivisionError: division by zero"


async def test_a_chosen_method_that_fails_its_create_hands_over_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """natpmp answered its probe, then its create said it cannot be used here
    (a port-0 grant, a server-scope result code): upnp gets the request."""
    first = Stub("pcp", create_error=MethodUnavailable("pcp", "port 5351 closed"))
    second = Stub("natpmp", create_error=MethodUnavailable("natpmp", "granted port 0; deleted it"))
    third = Stub("upnp")
    lease, report = await create_by_preference(
        GATEWAY, _methods(first, second, third), REQUEST, 2.0
    )
    assert lease.method == "upnp"
    assert report.selected == "upnp"
    errors = {o.method: o.error for o in report.outcomes}
    assert errors == {
        "pcp": "port 5351 closed",
        "natpmp": "granted port 0; deleted it",
        "upnp": None,
    }
    assert (first.creates, second.creates, third.creates) == (1, 1, 1)


async def test_when_everything_fails_the_error_is_one_no_method_available(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stubs = _methods(
        Stub("pcp", create_error=RuntimeError("boom")),
        Stub("natpmp", probe_error=OSError(errno.ENETUNREACH, "Network is unreachable")),
        Stub("upnp", create_error=ValueError("bad XML")),
    )
    with pytest.raises(NoMethodAvailable) as info:
        await create_by_preference(GATEWAY, stubs, REQUEST, 2.0)
    assert type(info.value) is NoMethodAvailable  # not an ExceptionGroup
    assert str(info.value) == (
        "all: pcp: internal error: RuntimeError: boom; "
        "natpmp: cannot reach 192.168.1.1: Network is unreachable (ENETUNREACH);"
        " no route to that network; "
        "upnp: internal error: ValueError: bad XML"
    )


async def test_a_refusal_by_the_chosen_method_stays_final(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = Stub("pcp", create_error=MethodUnavailable("pcp", "closed"))
    second = Stub("natpmp", create_error=MappingError("natpmp", "map refused", result_code=4))
    third = Stub("upnp")
    with pytest.raises(MappingError):
        await create_by_preference(GATEWAY, _methods(first, second, third), REQUEST, 2.0)
    assert third.creates == 0


async def test_rejected_replies_reach_the_probe_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PCP's own timeout would say "no answer within 2 s"; the outcome says
    what did come back (issue 7, item 8)."""
    async with harness(FakeGateway(wrong_nonce=True, natpmp_enabled=False)) as h:
        with pytest.raises(NoMethodAvailable) as info:
            await create_by_preference(h.gateway.address, [h.pcp], REQUEST, 2.0)
    text = str(info.value)
    assert text.startswith("all: pcp: no answer from 127.0.0.1:5351 (4 replies ignored: ")
    assert "nonce mismatch" in text
