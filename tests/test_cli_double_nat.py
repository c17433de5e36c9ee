"""The command's double-NAT output and options against a FakeGateway process on
127.0.0.1 (docs/double-nat.md). FakeGateway's 203.0.113.7 is a documentation
address: not publicly reachable."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import portbroker.cli as cli_module
from portbroker.cli import Failure
from portbroker.wire import pcp
from tests.broker_harness import wait_for
from tests.test_cli import cli
from tests.test_nested import OUTER, TwoNats


def test_probe_and_map_say_not_publicly_reachable(gateway_port: int, tmp_path: Path) -> None:
    state = tmp_path / "s"
    probe = cli("probe", server_port=gateway_port, state=state, check_rc=0)
    lines = probe.stdout.splitlines()
    natpmp = next(i for i, line in enumerate(lines) if line.strip().startswith("natpmp"))
    assert "external 203.0.113.7" in lines[natpmp]
    assert lines[natpmp + 1].strip() == (
        "not publicly reachable: 203.0.113.7 is a documentation address (RFC 5737),"
        " not an address the Internet can reach"
    )
    assert "PCP server" not in probe.stdout  # the gateway itself
    mapped = cli("map", "7301/udp", server_port=gateway_port, state=state, check_rc=0)
    first, second = mapped.stdout.splitlines()
    assert first.endswith("-> 203.0.113.7:7301 via pcp (lifetime 7200 s)")
    assert second.strip().startswith("not publicly reachable: 203.0.113.7")
    cli("unmap", "7301/udp", server_port=gateway_port, state=state, check_rc=0)


def test_dhcp_leases_in_the_cli(gateway_port: int, tmp_path: Path) -> None:
    """A real process may send only to 127.0.0.1, which a lease may not name
    (RFC 7291 §4.2: loopback is discarded): the gateway is used. That a lease's
    server is used is tests/test_pcp_discovery.py's, on memory links."""
    lease = tmp_path / "dhclient.eth0.leases"
    lease.write_text('lease {\n  interface "eth0";\n  option unknown-158 4:7f:0:0:1;\n}\n')
    done = cli(
        "probe",
        "--json",
        "--dhcp-leases",
        str(lease),
        server_port=gateway_port,
        state=tmp_path / "s",
        check_rc=0,
    )
    server = json.loads(done.stdout)["pcp_server"]
    assert server == {"address": "127.0.0.1", "source": "the gateway"}
    # --pcp-server wins over the lease.
    done = cli(
        "probe",
        "--json",
        "--dhcp-leases",
        str(lease),
        "--pcp-server",
        "127.0.0.1",
        server_port=gateway_port,
        state=tmp_path / "s",
        check_rc=0,
    )
    assert json.loads(done.stdout)["pcp_server"]["source"] == "configured (--pcp-server)"


def test_outer_gateway_usage(tmp_path: Path) -> None:
    done = cli("map", "7302/tcp", "--outer-gateway", "127.0.0.1", server_port=9, state=tmp_path)
    assert done.returncode == 2
    assert "--outer-gateway needs --hold" in done.stderr
    done = cli(
        "map", "7302/tcp", "--hold", "--outer-gateway", "nowhere", server_port=9, state=tmp_path
    )
    assert done.returncode == 2
    assert "--outer-gateway: 'nowhere' is not an IP address" in done.stderr
    assert "Traceback" not in done.stderr
    # Options a nested mapping does not carry are refused, not dropped: a
    # --filter ignored would leave the port open to every remote host.
    done = cli(
        "map",
        "7302/tcp",
        "--hold",
        "--outer-gateway",
        "127.0.0.1",
        "--filter",
        "11.0.0.2/32",
        "--third-party",
        "192.168.1.50",
        server_port=9,
        state=tmp_path,
    )
    assert done.returncode == 2
    assert (
        "--filter, --third-party cannot go with --outer-gateway: a mapping through two NATs"
        " does not support them"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_an_outer_server_that_sees_another_address_fails_clearly(
    gateway_port: int, tmp_path: Path
) -> None:
    """The "outer" server here is the gateway itself: our requests reach it from
    127.0.0.1, not from the inner mapping's 203.0.113.7, so it answers
    ADDRESS_MISMATCH (RFC 6887 §8.1). One line, and the inner mapping deleted."""
    state = tmp_path / "s"
    done = cli(
        "map",
        "7303/tcp",
        "--hold",
        "--json",
        "--outer-gateway",
        "127.0.0.1",
        server_port=gateway_port,
        state=state,
    )
    assert done.returncode == 1, done.stdout
    assert "ADDRESS_MISMATCH" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # Nothing left: mapping 7303 again with a fresh nonce is not refused
    # as another client's (PCP NOT_AUTHORIZED) by the fake.
    again = cli("map", "7303/tcp", "--json", server_port=gateway_port, state=state, check_rc=0)
    assert json.loads(again.stdout)["method"] == "pcp"
    cli("unmap", "7303/tcp", server_port=gateway_port, state=state, check_rc=0)


def _nested_args(port: int) -> Any:
    import argparse

    return argparse.Namespace(
        spec=(port, "tcp"),
        server_port=5351,
        ssdp_port=1900,
        timeout=2.0,
        outer_gateway=str(OUTER),
        lifetime=7200,
        external_port=None,
        via=None,
        json=False,
    )


@pytest.fixture
def two_nats(monkeypatch: pytest.MonkeyPatch) -> TwoNats:
    """map --hold --outer-gateway's code in this process, both NATs on memory
    links: the outer broker it opens gets the link factory (nothing is sent)."""
    import portbroker.broker
    import portbroker.nested

    nats = TwoNats()
    real = portbroker.broker.open_broker

    def outer_broker(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **{**kwargs, "link_factory": nats.link})

    monkeypatch.setattr(portbroker.nested, "open_broker", outer_broker)
    monkeypatch.setattr(cli_module, "_hold_signals", lambda: (signal.SIGUSR1,))
    return nats


async def test_hold_nested_ends_when_the_inner_mapping_fails_for_good(
    two_nats: TwoNats, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """As map --hold does: a mapping failed for good ends the command with one
    line (and both deleted), rather than holding an outer mapping for nothing."""
    async with two_nats.broker() as inner, trio.open_nursery() as nursery:

        async def fail_the_inner() -> None:
            await wait_for(lambda: two_nats.outer.mappings != {})
            two_nats.inner.forced_result = pcp.ResultCode.NOT_AUTHORIZED
            two_nats.inner.forced_natpmp_result = 2
            two_nats.inner.reset()

        nursery.start_soon(fail_the_inner)
        with trio.fail_after(6 * 3600), pytest.raises(Failure) as failure:
            await cli_module._hold_nested(inner, _nested_args(8086))
    assert str(failure.value).startswith("map failed: the inner mapping could not be kept:")
    assert two_nats.outer.mappings == {}
    assert two_nats.inner.mappings == {}
    assert "inner: Failed" in capsys.readouterr().out


async def test_hold_nested_interrupted_before_the_mappings_are_made(
    two_nats: TwoNats, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal while the outer NAT is asked: nothing left on either, and the
    command says it was interrupted (not "deleted both mappings", exit 0)."""
    two_nats.outer.delay = 1.0
    async with two_nats.broker() as inner:
        async with trio.open_nursery() as nursery:

            async def interrupt() -> None:
                await wait_for(lambda: two_nats.inner.mappings != {})
                os.kill(os.getpid(), signal.SIGUSR1)

            nursery.start_soon(interrupt)
            with trio.fail_after(60), pytest.raises(Failure, match="interrupted before"):
                await cli_module._hold_nested(inner, _nested_args(8087))
        await trio.sleep(30)  # a grant that was on its way is deleted too
    assert two_nats.outer.mappings == {}
    assert two_nats.inner.mappings == {}
    assert "deleted both mappings" not in capsys.readouterr().out
