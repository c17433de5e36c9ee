"""PCP and NAT-PMP faults against a real miniupnpd and a real kernel.

The in-process methods talk from a socket created in the lab's lan namespace
(nothing leaves the lab), so these tests check what the unit tests assume:
that a host firewall dropping 5351 makes ``send()`` fail with EPERM, and that
it becomes each method's outcome in words, never an ExceptionGroup.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from portbroker.errors import NoMethodAvailable
from portbroker.methods.natpmp import NatPmpMethod
from portbroker.methods.pcp import PcpMethod
from portbroker.probe import create_by_preference, probe_all
from portbroker.testing.lab import GATEWAY_ADDRESS, Lab
from portbroker.transport import Transport, UdpLink
from portbroker.types import MappingRequest

_FIREWALL = """\
table inet pb_hostfw {
  chain output {
    type filter hook output priority 0; policy accept;
    udp dport 5351 drop
  }
}
"""


@contextmanager
def host_firewall(lab: Lab) -> Iterator[None]:
    """A netfilter DROP for outgoing UDP 5351 in the lan namespace (a host firewall)."""
    nft = lab.exec_argv(lab.lan_ns, ["nft", "-f", "-"])
    subprocess.run(nft, input=_FIREWALL, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(
            lab.exec_argv(lab.lan_ns, ["nft", "delete", "table", "inet", "pb_hostfw"]),
            check=False,
            capture_output=True,
        )


async def _lan_link(lab: Lab) -> UdpLink:
    sock = trio.socket.from_stdlib_socket(lab.socket(lab.lan_ns, socket.AF_INET))
    await sock.connect((str(GATEWAY_ADDRESS), 5351))
    return UdpLink(sock, (GATEWAY_ADDRESS, 5351))


def test_a_host_firewall_is_each_methods_outcome_then_pcp_works(lab_pcp_natpmp_only: Lab) -> None:
    lab = lab_pcp_natpmp_only
    request = MappingRequest(23001, "udp", lifetime=120)

    async def main() -> None:
        link = await _lan_link(lab)
        transport = Transport(link)
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            pcp = PcpMethod(transport, GATEWAY_ADDRESS)
            natpmp = NatPmpMethod(transport, GATEWAY_ADDRESS)
            with host_firewall(lab):
                report = await probe_all(GATEWAY_ADDRESS, [pcp, natpmp], 2.0)
                with pytest.raises(NoMethodAvailable) as info:
                    await create_by_preference(GATEWAY_ADDRESS, [pcp, natpmp], request, 2.0)
            assert report.selected is None
            for outcome in report.outcomes:
                assert outcome.error is not None
                assert "Operation not permitted (EPERM); a host firewall may drop it" in (
                    outcome.error
                )
            assert type(info.value) is NoMethodAvailable
            assert str(info.value).count("(EPERM)") == 2
            assert transport.stats.link_errors >= 2
            print(f"\nhost firewall: {info.value}")
            # The same transport recovers once the rule is gone.
            lease, chosen = await create_by_preference(GATEWAY_ADDRESS, [pcp, natpmp], request, 2.0)
            assert chosen.selected == "pcp"
            assert lease.external_port != 0
            await pcp.delete(lease)
            nursery.cancel_scope.cancel()
        link.close()

    trio.run(main)


def test_the_kernel_reports_a_host_firewall_drop_as_eperm(lab_pcp_natpmp_only: Lab) -> None:
    """What the transport's EPERM handling is for (not a FakeGateway assumption)."""
    lab = lab_pcp_natpmp_only
    with host_firewall(lab), lab.socket(lab.lan_ns) as sock:
        sock.connect((str(GATEWAY_ADDRESS), 5351))
        with pytest.raises(PermissionError) as info:
            sock.send(b"\x00\x00")
    assert info.value.errno == errno.EPERM
