"""The daemon's ``publish`` / ``unpublish`` ops (docs/daemon-protocol.md, docs/dnssd.md).

A daemon on a FakeGateway (memory links) publishes through zeroconf bound to
127.0.0.1, and a browser in the test watches; all of it in a network
namespace of its own (tests/rendezvous_harness.py).
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from portbroker.client import BlockingClient, DaemonRequestError, open_client
from portbroker.daemon.protocol import ErrorCode, ProtocolError, Request
from portbroker.daemon.server import Client, Daemon
from portbroker.rendezvous import Browser, open_rendezvous
from portbroker.testing import FakeGateway
from tests.rendezvous_harness import LOOPBACK, run_isolated, until
from tests.rendezvous_harness import netns as netns  # the fixture
from tests.test_daemon import running

TYPE = "_pbtest._tcp"


def with_daemon(
    netns: str,
    body: Callable[[Daemon, Any, Browser, FakeGateway, Path], Awaitable[None]],
    **changes: Any,
) -> None:
    async def main() -> None:
        directory = Path(tempfile.mkdtemp(prefix="pbp-"))
        gateway = FakeGateway()
        try:
            async with (
                running(directory, gateway, publish_interfaces=tuple(LOOPBACK), **changes) as d,
                open_client(directory / "pb.sock") as client,
                open_rendezvous(LOOPBACK) as seer,
                seer.browse(TYPE) as browser,
            ):
                await body(d, client, browser, gateway, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    run_isolated(netns, main)


async def code_of(work: Awaitable[Any]) -> str:
    with pytest.raises(DaemonRequestError) as info:
        await work
    return info.value.code


def test_publish_then_unmap_withdraws(netns: str) -> None:
    async def body(
        daemon: Daemon, client: Any, browser: Browser, gateway: FakeGateway, directory: Path
    ) -> None:
        mapping = await client.map(8080, "tcp", lifetime=600)
        published = await client.publish(
            8080, "tcp", service_type=TYPE, name="web", txt={"path": "/"}
        )
        assert published["mapping"] == "8080/tcp"
        assert (published["type"], published["name"]) == ("_pbtest._tcp.local.", "web")
        assert published["txt"]["ext_port"] == str(mapping["external_port"])
        assert published["txt"]["path"] == "/"
        await until(lambda: "web" in browser.snapshot())
        peer = browser.snapshot()["web"]
        assert peer.external == (
            ipaddress.ip_address(mapping["external_address"]),
            mapping["external_port"],
        )
        assert [p for _, p in peer.internal] == [8080]

        # The blocking client says the same (from a thread: it blocks).
        def blocking() -> dict[str, Any]:
            with BlockingClient(directory / "pb.sock") as other:
                published = other.publish(8080, "tcp", service_type=TYPE, name="web2")
                assert other.unpublish(8080, "tcp", service_type=TYPE, name="web2")["name"] == (
                    "web2"
                )
                return published

        assert (await trio.to_thread.run_sync(blocking))["name"] == "web2"

        await client.unmap(8080, "tcp")
        await until(lambda: "web" not in browser.snapshot(), limit=5)  # goodbyes
        assert daemon.publishing.count(0) == 0

    with_daemon(netns, body)


def test_publish_refusals_are_clear(netns: str) -> None:
    async def body(
        daemon: Daemon, client: Any, browser: Browser, gateway: FakeGateway, _d: Path
    ) -> None:
        # Not a mapping of this user (none at all here).
        assert await code_of(client.publish(9000, "tcp", service_type=TYPE, name="x")) == (
            "not_found"
        )
        await client.map(8080, "tcp", lifetime=600)
        await client.map(8081, "tcp", lifetime=600)
        await client.map(8082, "udp", lifetime=600)
        for bad in (
            {"service_type": "http", "name": "x"},
            {"service_type": TYPE, "name": "x" * 64},
            {"service_type": TYPE, "name": "x", "txt": {"ext_addr": "6.6.6.6"}},
        ):
            assert await code_of(client.publish(8080, "tcp", **bad)) == "bad_request"
        # The service type's protocol is the mapping's.
        with pytest.raises(DaemonRequestError, match="is TCP, but the mapping is UDP"):
            await client.publish(8082, "udp", service_type=TYPE, name="x")
        assert await code_of(client.request("publish", port=8080, name="x")) == "bad_request"
        assert (
            await code_of(client.request("publish", port=8080, type=TYPE, name="x", txt={"a": 1}))
            == "bad_request"
        )

        # Another user's mapping is not found, never described (the daemon's
        # rule for every op): a client of uid 4242 asks, in-process.
        stranger = Client(4242, 1, None, None, None)  # type: ignore[arg-type]
        for op in ("publish", "unpublish"):
            request = Request(op, 1, {"port": 8080, "type": TYPE, "name": "x"})
            with pytest.raises(ProtocolError) as refused:
                await daemon.handle(stranger, request)
            assert refused.value.code is ErrorCode.NOT_FOUND
            assert "of yours" in refused.value.message

        await client.publish(8080, "tcp", service_type=TYPE, name="one")
        assert await code_of(client.publish(8081, "tcp", service_type=TYPE, name="one")) == (
            "conflict"
        )
        await client.publish(8081, "tcp", service_type=TYPE, name="two")
        # max_publications=2 for this daemon.
        assert await code_of(client.publish(8080, "tcp", service_type=TYPE, name="three")) == (
            "too_many_publications"
        )
        unpublished = await client.unpublish(8080, "tcp", service_type=TYPE, name="one")
        assert unpublished["name"] == "one"
        assert await code_of(client.unpublish(8080, "tcp", service_type=TYPE, name="one")) == (
            "not_found"
        )
        await client.publish(8080, "tcp", service_type=TYPE, name="three")  # room again
        await until(lambda: set(browser.snapshot()) == {"two", "three"}, limit=5)

    with_daemon(netns, body, max_publications=2)


def test_a_publication_follows_an_address_change_and_goes_with_the_grace(netns: str) -> None:
    async def body(
        daemon: Daemon, client: Any, browser: Browser, gateway: FakeGateway, directory: Path
    ) -> None:
        async with open_client(directory / "pb.sock") as app:
            # NAT-PMP: the gateway's address announcement moves the lease at once.
            await app.map(7000, "tcp", lifetime=600, via="natpmp")
            await app.publish(7000, "tcp", service_type=TYPE, name="moving")
            await until(lambda: "moving" in browser.snapshot())
            await gateway.change_external_address("198.51.100.44")
            await until(
                lambda: (
                    (browser.snapshot()["moving"].external or (None,))[0]
                    == ipaddress.ip_address("198.51.100.44")
                )
            )
        # The app's connection closed: after the grace period (0.3 s here) the
        # mapping is released and its publication withdrawn.
        await until(lambda: "moving" not in browser.snapshot(), limit=10)
        assert daemon.shared == {}

    with_daemon(netns, body)
