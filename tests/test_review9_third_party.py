"""Review of issue 9's THIRD_PARTY and FILTER surface: a hostile local user, a careless admin.

Each test failed on the code before its fix (the review's report names them).
"""

from __future__ import annotations

import argparse
import json
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from portbroker.cli import Failure, _check_daemon_host, _describe_peer, _third_party
from portbroker.client import open_client
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.server import _third_party_params, describe
from portbroker.p2p import interface_addresses
from portbroker.state import RecordError, check_lease_record, lease_record
from portbroker.testing import FakeGateway
from portbroker.types import Lease, MappingRequest, RemoteFilter, TransportProtocol
from portbroker.wire import pcp
from tests.test_cli import GatewayThread, cli
from tests.test_daemon_policy import as_user
from tests.test_daemon_processes import start_daemon, stop
from tests.test_daemon_restore import (
    mock_time,
    record,
    requests_for,
    running,
    short_dir,
    write_state,
)
from tests.test_daemon_third_party import Users, users
from tests.test_daemon_third_party import pytestmark as needs_users

__all__ = ["mock_time", "short_dir", "users"]  # fixtures, re-used

CAMERAS = ("192.168.77.3", "192.168.77.4")


@pytest.fixture
def served() -> Iterator[GatewayThread]:
    gateway = GatewayThread()
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _held(served: GatewayThread, port: int) -> set[str]:
    return served.call(
        lambda: {
            str(m.internal_address)
            for m in served.gateway.mappings.values()
            if m.internal_port == port
        }
    )


def test_two_cameras_and_this_host_on_one_port_each_keep_a_record_and_unmap(
    served: GatewayThread, tmp_path: Path
) -> None:
    # Two cameras both serve RTSP on 554 (mapped above 1023 here), beside this
    # host's own: three mappings on the gateway. The CLI's state file kept one
    # record per port, the last one made, so unmap could delete only that one.
    state = tmp_path / "state.json"
    cli("map", "8554/tcp", server_port=served.port, state=state, check_rc=0)
    for camera in CAMERAS:
        cli(
            "map",
            "8554/tcp",
            "--third-party",
            camera,
            server_port=served.port,
            state=state,
            check_rc=0,
        )
    assert _held(served, 8554) == {"127.0.0.1", *CAMERAS}
    assert len(json.loads(state.read_text())["mappings"]) == 3
    # Without --third-party: this host's own, whichever was made last.
    done = cli("unmap", "8554/tcp", server_port=served.port, state=state, check_rc=0)
    assert "127.0.0.1:8554/tcp" in done.stdout
    assert _held(served, 8554) == set(CAMERAS)
    again = cli("unmap", "8554/tcp", server_port=served.port, state=state, check_rc=1)
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1, again.stderr
    assert f"for other hosts ({', '.join(CAMERAS)}): name one with --third-party" in lines[0]
    done = cli(
        "unmap",
        "8554/tcp",
        "--third-party",
        CAMERAS[0],
        server_port=served.port,
        state=state,
        check_rc=0,
    )
    assert f"deleted {CAMERAS[0]}:8554/tcp" in done.stdout
    # The one record left is for the other camera: unmap means that one.
    done = cli("unmap", "8554/tcp", server_port=served.port, state=state, check_rc=0)
    assert f"deleted {CAMERAS[1]}:8554/tcp" in done.stdout
    assert _held(served, 8554) == set()
    assert json.loads(state.read_text())["mappings"] == []


class _Lister:
    def __init__(self, mappings: list[dict[str, object]]) -> None:
        self.mappings = mappings

    async def list(self) -> list[dict[str, object]]:
        return self.mappings


def test_unmap_third_party_through_the_daemon_leaves_another_hosts_mapping() -> None:
    # The daemon holds one mapping per port, whichever host: `unmap 8554/tcp
    # --third-party CAMERA` must not end this host's own 8554 instead.
    own = _Lister([{"id": "8554/tcp", "internal_address": "192.168.77.2"}])
    with pytest.raises(
        Failure, match=r"is for 192\.168\.77\.2, not 192\.168\.77\.3; left in place"
    ):
        trio.run(_check_daemon_host, own, 8554, "tcp", CAMERAS[0])
    camera = _Lister([{"id": "8554/tcp", "internal_address": CAMERAS[0]}])
    trio.run(_check_daemon_host, camera, 8554, "tcp", CAMERAS[0])


# -- the daemon's restore ---------------------------------------------------------------


async def test_a_restored_record_not_marked_third_party_is_mapped_for_this_host(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # A user's own mapping, recorded while this host was 192.168.1.50 (DHCP
    # has moved it to .100 since, and .50 may be another machine now), or a
    # record edited by hand. It is not marked "third_party", so no policy
    # check applied: restored with internal_address .50, it went out as a
    # THIRD_PARTY MAP for that other host, for a user who may not map for
    # other hosts. It is this host's own: mapped for this host, no THIRD_PARTY.
    stranger = 4242  # not root, in no --third-party-group
    write_state(
        short_dir,
        [
            record(
                7300,
                internal_address="192.168.1.50",
                owner_uid=stranger,
                holds=[{"uid": stranger, "pid": 1, "persist": True}],
            )
        ],
    )
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        sent = requests_for(gateway, 7300)
        assert sent
        assert not any(isinstance(o, pcp.ThirdParty) for r in sent for o in r.options)
        live = gateway.mapping_for("tcp", 7300)
        assert live is not None
        assert str(live.internal_address) == "192.168.1.100"  # this host (the memory link's)
        assert describe(daemon.shared[("tcp", 7300)])["state"] == "active"


# -- spellings of an address ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # Dual-stack sockets spell IPv4 so: the loopback check must see it.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_no_spelling_of_a_non_host_passes_as_another_host(text: str, reason: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"is no lan host to map for.*{reason}"):
        _third_party(text)
    with pytest.raises(ProtocolError, match=f"names no lan host.*{reason}") as caught:
        _third_party_params(Request("map", 1, {"port": 8554, "internal_address": text}))
    assert caught.value.code is ErrorCode.BAD_REQUEST


def test_an_ipv4_mapped_camera_address_is_the_ipv4_address() -> None:
    # What the library maps it as (MappingRequest normalises it), and prints.
    assert _third_party("::ffff:192.168.77.3") == CAMERAS[0]


def test_an_ipv4_mapped_filter_is_an_ipv4_filter() -> None:
    assert RemoteFilter.parse("::ffff:11.0.0.2") == RemoteFilter.parse("11.0.0.2")
    assert str(RemoteFilter.parse("[::ffff:11.0.0.0/120]:443")) == "11.0.0.0/24:443"
    with pytest.raises(ValueError, match="admits every remote host"):
        RemoteFilter.parse("::ffff:0.0.0.0/96")  # every IPv4 host: the /0 refused
    with pytest.raises(ValueError, match="the same filter is given twice"):
        MappingRequest(8443, "tcp", filters=["11.0.0.2", "::ffff:11.0.0.2"])


def test_a_filter_port_in_other_digits_is_refused_in_words() -> None:
    # SUPERSCRIPT TWO, and 5000 in ARABIC-INDIC DIGITs: str.isdigit() says yes.
    for text in ("11.0.0.2:\u00b2", "11.0.0.2:\u0665\u0660\u0660\u0660"):
        with pytest.raises(ValueError, match=r"the remote port must be 1\.\.65535"):
            RemoteFilter.parse(text)


# -- peer and unmap --remote --------------------------------------------------------------


def test_unmap_remote_finds_the_peer_in_the_spelling_peer_was_given(
    served: GatewayThread, tmp_path: Path
) -> None:
    # `peer` records the library's 11.0.0.2; `unmap --remote` looked for
    # ::ffff:b00:2, found nothing, and the PEER stayed until it lapsed.
    state = tmp_path / "state.json"
    remote = ("--remote", "[::ffff:11.0.0.2]:7000")
    cli("peer", "5200/udp", *remote, server_port=served.port, state=state, check_rc=0)
    assert served.call(lambda: len(served.gateway.peers)) == 1
    done = cli("unmap", "5200/udp", *remote, server_port=served.port, state=state, check_rc=0)
    assert "deleted 127.0.0.1:5200/udp" in done.stdout
    assert served.call(lambda: len(served.gateway.peers)) == 0
    missing = cli(
        "unmap",
        "5200/udp",
        "--remote",
        "[2001:db8::2]:7000",
        server_port=served.port,
        state=state,
        check_rc=1,
    )
    assert "no record of 5200/udp to [2001:db8::2]:7000 on" in missing.stderr


def test_a_peer_line_brackets_ipv6_endpoints() -> None:
    lease = Lease(
        method="pcp",
        protocol=TransportProtocol.UDP,
        internal_address="fd77::2",
        internal_port=5000,
        external_address="fd77::2",
        external_port=5000,
        lifetime=600,
        granted_at=0.0,
        gateway="fd77::1",
        remote=("fd11::2", 7000),
    )
    assert _describe_peer(lease) == (
        "[fd77::2]:5000/udp to [fd11::2]:7000 leaves as [fd77::2]:5000 via pcp (lifetime 600 s)"
    )


# -- the privileged-port rule and this host's own addresses -------------------------------


def _own_address() -> str:
    own = [
        str(e.address) for e in interface_addresses() if not e.loopback and e.address.version == 4
    ]
    if not own:
        pytest.skip("this host has no IPv4 address but the loopback")
    return own[0]


@needs_users
def test_naming_this_hosts_own_address_keeps_the_privileged_port_rule(
    short_dir: Path, users: Users, gateway_port: int
) -> None:
    # A --third-party-group member is let map other hosts' ports, below 1024
    # too (a camera's 554). Naming this host's own address as the "other
    # host" mapped this host's sshd for her all the same, past the
    # privileged-port rule she is not exempt from.
    own = _own_address()
    short_dir.chmod(0o755)  # her client must reach the socket inside
    sock = short_dir / "pb.sock"
    daemon = start_daemon(
        short_dir,
        gateway_port,
        "--group",
        users.sock_group,
        "--third-party-group",
        users.third_group,
    )
    try:
        carol = as_user(
            users.carol,
            sock,
            ("map", {"port": 22, "internal_address": own}),
            ("map", {"port": 554, "internal_address": CAMERAS[0]}),  # still hers to map
            ("map", {"port": 8622, "internal_address": own}),  # this host, above 1023
        )
        assert carol[0].get("code") == "privileged_port", carol
        assert carol[1]["ok"], carol
        assert carol[2]["ok"], carol
    finally:
        stop(daemon)


@needs_users
async def test_a_restored_third_party_record_of_this_hosts_own_port_22_is_deleted(
    short_dir: Path, users: Users, mock_time: trio.testing.MockClock
) -> None:
    # The same rule at a restart: her record "for another host" that names
    # this host's address and port 22 is not renewed for her.
    carol = pwd.getpwnam(users.carol).pw_uid
    own = _own_address()
    holds = [{"uid": carol, "pid": 1, "persist": True}]
    write_state(
        short_dir,
        [
            record(22, internal_address=own, third_party=True, owner_uid=carol, holds=holds),
            record(
                554, internal_address=CAMERAS[0], third_party=True, owner_uid=carol, holds=holds
            ),
        ],
    )
    gateway = FakeGateway()
    async with running(short_dir, gateway, third_party_groups=(users.third_group,)) as daemon:
        await daemon.restored.wait()
        assert ("tcp", 22) not in daemon.shared
        assert describe(daemon.shared[("tcp", 554)])["state"] == "active"
        deletes = [r for r in requests_for(gateway, 22) if r.lifetime == 0]
        assert deletes  # deleted on the gateway, not only forgotten


async def test_mapping_this_hosts_port_does_not_cancel_the_retried_delete_of_a_cameras(
    short_dir: Path, mock_time: trio.testing.MockClock
) -> None:
    # The camera's 8554 is unmapped while the gateway drops deletes: the
    # broker retries it. Then this host's own 8554 is mapped, and the broker
    # ended that retry (a new mapping "takes its place": lifecycle rule 10),
    # though the camera's mapping is another gateway entry: it stayed open
    # to the internet, and off the state file, until its lease ran out.
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon, open_client(short_dir / "pb.sock") as client:
        await client.map(8554, "tcp", internal_address=CAMERAS[0], lifetime=7200)
        gateway.silent_deletes = True
        await client.unmap(8554, "tcp")
        assert _gateway_holds(gateway, 8554) == {
            CAMERAS[0],
        }
        gateway.silent_deletes = False
        await client.map(8554, "tcp", lifetime=7200)
        with trio.fail_after(3600):
            while CAMERAS[0] in _gateway_holds(gateway, 8554):  # noqa: ASYNC110
                await trio.sleep(1)
        assert _gateway_holds(gateway, 8554) == {"192.168.1.100"}  # this host's, kept
        await daemon.synced()


def _gateway_holds(gateway: FakeGateway, port: int) -> set[str]:
    return {str(m.internal_address) for m in gateway.mappings.values() if m.internal_port == port}


# -- state-file records -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "address"),
    [("upnp", "192.168.1.100"), ("pcp", "fd77::2"), ("natpmp", "192.168.1.100")],
)
def test_a_pinhole_id_on_a_record_that_is_no_upnp_pinhole_is_refused(
    method: str, address: str
) -> None:
    # Its lease would be deleted by DeletePinhole (UPnP), whose "no such
    # pinhole" answer counts as deleted: the port mapping would stay open
    # and its record go. Refused in words instead, like any damaged record.
    good = lease_record(
        Lease(
            method=method,
            protocol=TransportProtocol.TCP,
            internal_address=address,
            internal_port=8080,
            external_address="203.0.113.7",
            external_port=8080,
            lifetime=600,
            granted_at=0.0,
            gateway="192.168.1.1",
            nonce=b"\x01" * 12 if method == "pcp" else None,
        )
    )
    check_lease_record(good)
    with pytest.raises(RecordError, match="'pinhole_id' is only for a UPnP IPv6 pinhole"):
        check_lease_record({**good, "pinhole_id": 7})


def test_more_filters_than_a_pcp_message_holds_are_a_usage_error(
    served: GatewayThread, tmp_path: Path
) -> None:
    # 60 --filter options made a PCP message of 1,504 bytes: the encoder's
    # "internal error in method pcp" and a usage line, two lines, no limit named.
    many = [arg for i in range(60) for arg in ("--filter", f"11.0.{i}.1")]
    done = cli("map", "5460/tcp", *many, server_port=served.port, state=tmp_path / "s", check_rc=2)
    assert "at most 32 remote-peer filters, not 60" in done.stderr
    assert "internal error" not in done.stderr
    assert served.call(lambda: len(served.gateway.requests)) == 0  # nothing sent
    with pytest.raises(ValueError, match="at most 32 remote-peer filters"):
        MappingRequest(8080, "tcp", filters=[f"11.0.{i}.1" for i in range(33)])
