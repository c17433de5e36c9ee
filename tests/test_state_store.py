"""The state store shared by the CLI and the daemon (portbroker/state.py): records that fail
validation are set aside, never fatal, never lost; files already on disk still load."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from portbroker.client import open_client
from portbroker.daemon.server import describe
from portbroker.testing import FakeGateway
from tests.test_cli import cli, fake_gateway  # noqa: F401 - the fixture
from tests.test_daemon_restore import (
    mock_time,  # noqa: F401 - the fixture
    record,
    running,
    short_dir,  # noqa: F401 - the fixture
    state_records,
    write_state,
)


def _without(name: str) -> Any:
    def change(r: dict[str, Any]) -> None:
        del r[name]

    return change


def _set(name: str, value: Any) -> Any:
    def change(r: dict[str, Any]) -> None:
        r[name] = value

    return change


def _hold(name: str, value: Any) -> Any:
    def change(r: dict[str, Any]) -> None:
        r["holds"][0][name] = value

    return change


BAD = {
    "internal port 0": (_set("internal_port", 0), "'internal_port' must be 1..65535"),
    "internal port too big": (_set("internal_port", 70000), "'internal_port' must be 1..65535"),
    "port as text": (_set("internal_port", "7601"), "'internal_port' must be an integer"),
    "port as bool": (_set("external_port", True), "'external_port' must be an integer"),
    "no external port": (_without("external_port"), "'external_port' must be an integer"),
    "lifetime 0 (not permanent)": (_set("lifetime", 0), "'lifetime' must be 1.."),
    "negative lifetime": (_set("lifetime", -5), "'lifetime' must be 1.."),
    "requested lifetime too long": (_set("lifetime_requested", 10**9), "'lifetime_requested'"),
    "requested lifetime 0": (_set("lifetime_requested", 0), "'lifetime_requested'"),
    "bad address": (_set("external_address", "not-an-ip"), "'external_address' must be an IP"),
    "address as number": (_set("internal_address", 17), "'internal_address' must be an IP"),
    "unknown method": (_set("method", "carrier-pigeon"), "'method' must be one of"),
    "unknown protocol": (_set("protocol", "sctp"), "'protocol' must be tcp or udp"),
    "bad nonce": (_set("nonce", "zz"), "'nonce' must be 12 bytes"),
    "pcp without nonce": (_set("nonce", None), "'nonce' must be 12 bytes in hex (PCP needs it)"),
    "expiry as text": (_set("expires_at_unix", "soon"), "'expires_at_unix' must be a number"),
    "holds not a list": (_set("holds", "everyone"), "'holds' must be a list"),
    "hold without persist": (_hold("persist", "yes"), "a hold must be"),
    "negative pid": (_hold("pid", -1), "a hold's 'pid'"),
    "owner as bool": (_set("owner_uid", True), "'owner_uid' must be an integer"),
    "owner missing": (_without("owner_uid"), "'owner_uid' must be an integer"),
    "pending_delete as text": (_set("pending_delete", "yes"), "'pending_delete' must be"),
    "permanent as text": (_set("permanent", "no"), "'permanent' must be true or false"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_record_is_set_aside_and_the_good_ones_load(
    case: str,
    short_dir: Path,  # noqa: F811
    mock_time: trio.testing.MockClock,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    change, reason = BAD[case]
    bad = record(7601)
    change(bad)
    write_state(short_dir, [record(7600), bad, record(7602)])
    gateway = FakeGateway()
    async with running(short_dir, gateway) as daemon:
        await daemon.restored.wait()
        await daemon.synced()
        async with open_client(short_dir / "pb.sock") as client:
            listed = {m["id"]: m["state"] for m in await client.list()}
        assert listed == {"7600/tcp": "active", "7602/tcp": "active"}
    (aside,) = short_dir.glob("state.json.rejected-*")
    assert json.loads(aside.read_text()) == {"version": 1, "mappings": [bad]}  # nothing lost
    (line,) = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert reason in line
    assert str(aside) in line
    assert set(state_records(short_dir)) == {7600, 7602}


async def test_records_that_are_not_objects_and_duplicates_are_set_aside(
    short_dir: Path,  # noqa: F811
    mock_time: trio.testing.MockClock,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    junk: list[Any] = ["8080/tcp", [1, 2], None, record(7610)]
    write_state(short_dir, [record(7610), *junk])
    async with running(short_dir, FakeGateway()) as daemon:
        await daemon.restored.wait()
        assert set(daemon.shared) == {("tcp", 7610)}
    (aside,) = short_dir.glob("state.json.rejected-*")
    assert json.loads(aside.read_text())["mappings"] == junk
    lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(lines) == len(junk)
    assert "a second record of 7610/tcp" in lines[-1]


async def test_a_record_written_before_pending_delete_and_lifetime_requested_loads(
    short_dir: Path,  # noqa: F811
    mock_time: trio.testing.MockClock,  # noqa: F811
) -> None:
    # The daemon's file as e07f31d wrote it, minus the later optional field.
    old = record(7620)
    del old["lifetime_requested"]
    write_state(short_dir, [old])
    async with running(short_dir, FakeGateway()) as daemon:
        await daemon.restored.wait()
        assert describe(daemon.shared[("tcp", 7620)])["state"] == "active"
    assert not list(short_dir.glob("state.json.rejected-*"))


def test_the_cli_sets_aside_a_file_it_cannot_read_instead_of_overwriting_it(
    fake_gateway: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    newer = {"version": 2, "mappings": [{"what": "a later portbroker's record"}]}
    state.write_text(json.dumps(newer))
    done = cli("map", "6001/udp", server_port=fake_gateway, state=state, check_rc=0)
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert json.loads(aside.read_text()) == newer
    assert str(aside) in done.stderr
    assert [r["internal_port"] for r in json.loads(state.read_text())["mappings"]] == [6001]


def test_the_cli_unmaps_from_a_file_an_older_cli_wrote(
    fake_gateway: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    cli("map", "6002/udp", server_port=fake_gateway, state=state, check_rc=0)
    (written,) = json.loads(state.read_text())["mappings"]
    # e07f31d's CLI wrote exactly these fields.
    assert set(written) == {
        "method",
        "protocol",
        "internal_address",
        "internal_port",
        "external_address",
        "external_port",
        "lifetime",
        "gateway",
        "permanent",
        "expires_at_unix",
        "epoch",
        "nonce",
    }
    assert written["expires_at_unix"] > time.time()
    cli("unmap", "6002/udp", server_port=fake_gateway, state=state, check_rc=0)
    assert json.loads(state.read_text()) == {"version": 1, "mappings": []}
