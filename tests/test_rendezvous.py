"""portbroker.rendezvous: names, TXT, the zeroconf seam under load, publish/browse.

Safety: no test here sends mDNS on this machine's interfaces. The pure tests
touch no socket; every test that starts zeroconf runs in a network namespace
of its own (tests/rendezvous_harness.py says why 127.0.0.1 alone is not enough).
"""

from __future__ import annotations

import ipaddress
import random
import threading
from typing import Any

import pytest
import trio

from portbroker import rendezvous as rendezvous_module
from portbroker.broker import open_broker
from portbroker.lifecycle import ExternalAddressChanged, Lost, Restored
from portbroker.rendezvous import (
    CACHE_FLUSH_DELAY,
    MAX_PEERS,
    Advert,
    Peer,
    RendezvousError,
    _PeerTable,
    advert_for,
    check_instance_name,
    check_service_type,
    check_txt,
    open_rendezvous,
    peer_from_txt,
)
from portbroker.testing.fake_gateway import FakeGateway
from portbroker.types import Lease, TransportProtocol
from tests.rendezvous_harness import LOOPBACK, run_isolated, until
from tests.rendezvous_harness import netns as netns  # the fixture

# -- names and TXT (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("_http._tcp.local.", "_http._tcp.local."),
        ("_http._tcp.local", "_http._tcp.local."),
        ("_http._tcp", "_http._tcp.local."),
        ("_HTTP._UDP", None),  # the protocol label is lower case (RFC 6763 §7)
        ("_p2p-chat._udp.local.", "_p2p-chat._udp.local."),
        ("_Game1._tcp.local.", "_game1._tcp.local."),
    ],
)
def test_service_types_are_normalised(given: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(RendezvousError, match=r"_name\._tcp\.local\."):
            check_service_type(given)
    else:
        assert check_service_type(given) == expected


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("http._tcp.local.", "is not of the form"),
        ("_http._sctp.local.", "is not of the form"),
        ("_http._tcp.example.com.", "is not of the form"),
        ("_a-very-long-service._tcp", "is not of the form"),  # 16 characters
        ("_123._tcp", "at least one letter"),
        ("_-ab._tcp", "no hyphen first"),
        ("_ab-._tcp", "no hyphen first"),
        ("_a--b._tcp", "single hyphens"),
        ("", "is not of the form"),
        (5, "must be a string"),
    ],
)
def test_bad_service_types_are_refused_with_the_rule(bad: object, why: str) -> None:
    with pytest.raises(RendezvousError, match=why):
        check_service_type(bad)


def test_instance_names_are_bounded_in_bytes_not_characters() -> None:
    assert check_instance_name("Kitchen printer (2)") == "Kitchen printer (2)"
    assert check_instance_name("é" * 31) == "é" * 31  # 62 bytes
    assert check_instance_name("a.b") == "a.b"  # dots are allowed (RFC 6763 §4.3)
    with pytest.raises(RendezvousError, match=r"1\.\.63 bytes.*got 64"):
        check_instance_name("é" * 32)
    with pytest.raises(RendezvousError, match=r"got 0"):
        check_instance_name("")
    with pytest.raises(RendezvousError, match="control characters"):
        check_instance_name("tab\there")
    with pytest.raises(RendezvousError, match="not valid Unicode"):
        check_instance_name("\udc80")


def test_extra_txt_keys_follow_rfc6763_and_cannot_take_ours() -> None:
    assert check_txt({"path": "/", "v": ""}) == {"path": "/", "v": ""}
    for bad, why in [
        ({"ext_addr": "1.2.3.4"}, "portbroker's own"),
        ({"STATE": "up"}, "portbroker's own"),
        ({"a=b": "x"}, "without spaces or '='"),
        ({"": "x"}, "without spaces or '='"),
        ({"a b": "x"}, "without spaces"),
        ({"verylongkey": "x"}, "longer than 9"),
        ({"k": "x" * 254}, "longer than 255"),
        ({"k": "x", "K": "y"}, "given twice"),
        ({"k": 1}, "must be strings"),
    ]:
        with pytest.raises(RendezvousError, match=why):
            check_txt(bad)  # type: ignore[arg-type]


def lease(external: str = "203.0.113.7", port: int = 8080, proto: str = "tcp") -> Lease:
    return Lease(
        method="pcp",
        protocol=TransportProtocol.parse(proto),
        internal_address="192.168.1.100",
        internal_port=8080,
        external_address=external,
        external_port=port,
        lifetime=7200,
        granted_at=0.0,
        gateway="192.168.1.1",
    )


def test_the_txt_record_says_where_the_mapping_leads_and_whether_it_is_public() -> None:
    advert = advert_for(lease("11.0.0.1"), "_http._tcp", "web", extra={"path": "/x"})
    assert advert.txt() == {
        "txtvers": "1",
        "ext_addr": "11.0.0.1",
        "ext_port": "8080",
        "public": "1",
        "method": "pcp",
        "state": "up",
        "rev": "0",
        "path": "/x",
    }
    # Behind a second NAT (RFC 6598 shared space, or private): not public.
    # (203.0.113.0/24 is documentation space, RFC 5737: not routable either.)
    for inner in ("100.64.1.2", "192.168.0.5", "10.1.1.1", "203.0.113.7"):
        assert advert_for(lease(inner), "_http._tcp", "web").txt()["public"] == "0"
    lost = Advert(**{**_fields(advert), "state": "lost"})
    assert "ext_addr" not in lost.txt()
    assert "ext_port" not in lost.txt()
    assert lost.txt()["state"] == "lost"


def _fields(advert: Advert) -> dict[str, Any]:
    return {
        "service_type": advert.service_type,
        "name": advert.name,
        "internal_address": advert.internal_address,
        "internal_port": advert.internal_port,
        "external_address": advert.external_address,
        "external_port": advert.external_port,
        "method": advert.method,
        "extra": advert.extra,
    }


def test_the_service_type_must_match_the_mappings_protocol() -> None:
    with pytest.raises(RendezvousError, match="is UDP, but the mapping is TCP"):
        advert_for(lease(), "_chat._udp", "x")
    assert advert_for(lease(proto="udp"), "_chat._udp", "x").service_type == "_chat._udp.local."


def test_a_txt_record_too_big_for_a_packet_is_refused() -> None:
    extra = {f"k{i}": "x" * 200 for i in range(7)}
    advert = advert_for(lease(), "_http._tcp", "web", extra=extra)
    with pytest.raises(RendezvousError, match="under 1300"):
        advert.txt()


def test_peers_are_parsed_from_records_and_bad_values_read_as_absent() -> None:
    peer = peer_from_txt(
        "web",
        "_http._tcp.local.",
        "h.local.",
        ["192.168.1.100", "fe80::1%2"],
        8080,
        {"ext_addr": "11.0.0.1", "ext_port": "9000", "method": "pcp", "public": "1"},
    )
    assert peer.internal == (
        (ipaddress.ip_address("192.168.1.100"), 8080),
        (ipaddress.ip_address("fe80::1"), 8080),
    )
    assert peer.external == (ipaddress.ip_address("11.0.0.1"), 9000)
    assert (peer.method, peer.public, peer.state) == ("pcp", True, None)
    for txt in (
        {"ext_addr": "nonsense", "ext_port": "9000"},
        {"ext_addr": "203.0.113.7", "ext_port": "99999"},
        {"ext_addr": "203.0.113.7"},
        {"ext_port": "9000"},
        {"ext_addr": None, "ext_port": None},
    ):
        assert peer_from_txt("x", "_a._tcp.local.", None, [], 1, txt).external is None


def test_a_hostile_peers_txt_gives_clean_values() -> None:
    # Any LAN host sends any TXT: what a Peer says is portbroker's values or
    # None, never a stranger's text (a terminal escape `browse` would print).
    def peer(**txt: str) -> Peer:
        return peer_from_txt("x", "_a._tcp.local.", None, [], 1, txt)

    hostile = peer(
        ext_addr="10.0.0.5", ext_port="9000", public="1", method="\x1b[2J", state="x" * 5000
    )
    assert hostile.external == (ipaddress.ip_address("10.0.0.5"), 9000)
    # A private address is not public whatever the peer claims.
    assert (hostile.method, hostile.state, hostile.public) == (None, None, False)
    assert hostile.txt["state"] == "x" * 5000  # the raw record is still there
    assert peer(public="1").public is None  # no external endpoint: nothing to say
    assert peer(state="lost", method="upnp").state == "lost"
    assert peer(state="lost", method="upnp").method == "upnp"
    # int() would read these as ports; they are not ASCII digits.
    for port in (" 80", "+80", "\u0668\u0660", "8_0", "0080000"):
        assert peer(ext_addr="11.0.0.1", ext_port=port).external is None, port
    # A host piling up address records for its SRV target: a few are kept.
    many = peer_from_txt(
        "x", "_a._tcp.local.", None, [f"10.0.{i // 256}.{i % 256}" for i in range(5000)], 80, {}
    )
    assert len(many.internal) == 16
    twice = peer_from_txt("x", "_a._tcp.local.", None, ["fe80::1%2", "fe80::1%3"], 80, {})
    assert twice.internal == ((ipaddress.ip_address("fe80::1"), 80),)
    # ipaddress keeps any text after '%' as an IPv6 zone: no zone is taken.
    assert peer(ext_addr="2001:db8::1%\x1b[2J", ext_port="80").external is None


def test_an_instance_name_with_an_empty_label_is_refused() -> None:
    # zeroconf registers "web." or "a..b" without complaint, but no browser
    # ever sees them (an empty label on the wire); one dot inside is fine.
    for name in ("web.", ".web", "a..b", "."):
        with pytest.raises(RendezvousError, match="may not start or end with"):
            check_instance_name(name)
    assert check_instance_name("a.b") == "a.b"


def test_thousands_of_txt_entries_are_refused_before_each_is_checked() -> None:
    # A 64 KiB daemon request holds ~7,000 of them; checking each against the
    # ones before took seconds of the daemon's only thread.
    class Counting(dict[str, str]):
        read = 0

        def items(self) -> Any:
            for item in super().items():
                Counting.read += 1
                yield item

    many = Counting({f"k{i}": "" for i in range(7000)})
    with pytest.raises(RendezvousError, match="at most 433 fit"):
        check_txt(many)
    assert Counting.read == 0
    assert len(check_txt({f"k{i}": "" for i in range(433)})) == 433


def test_txt_that_is_not_utf8_is_refused_in_words() -> None:
    # A lone surrogate: a JSON "\udcff" to the daemon, or `--txt k=$'\xff'`
    # (Python's surrogateescape reads the byte that way).
    with pytest.raises(RendezvousError, match="not valid UTF-8"):
        check_txt({"k": "\udcff"})
    with pytest.raises(RendezvousError, match="not valid UTF-8"):
        advert_for(lease(), "_http._tcp", "web", extra={"k": "a\ud800"})


def test_the_srv_target_is_unique_per_address() -> None:
    a = advert_for(lease(), "_http._tcp", "web")
    assert a.server().endswith("-192-168-1-100.local.")
    assert len(a.server().split(".")[0]) <= 63
    assert Advert("_a._tcp", "n", "10.0.0.1", 1, host="box").server() == "box."


# -- the seam's mailbox under a flood (threads, no network) --------------------------


def test_a_flood_of_callbacks_from_other_threads_coalesces_and_loses_no_final_state() -> None:
    """Four threads write 20,000 states for 300 names while trio reads: trio
    ends with each name's last state, at most one wake-up was pending at a
    time, and what waited for trio never exceeded one entry per name."""
    names = [f"peer-{i}" for i in range(300)]
    final: dict[str, Peer | None] = {}
    lock = threading.Lock()
    peak = 0

    def peer(name: str, n: int) -> Peer:
        return peer_from_txt(name, "_a._tcp.local.", None, ["10.0.0.1"], n % 65535 + 1, {})

    async def main() -> None:
        nonlocal peak
        token = trio.lowlevel.current_trio_token()
        table = _PeerTable(token)
        from portbroker.rendezvous import Browser

        browser = Browser(None, "_a._tcp.local.", table)  # type: ignore[arg-type]
        view: dict[str, Peer] = {}
        writers_done = trio.Event()

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            for n in range(5000):
                name = rng.choice(names)
                state = None if rng.random() < 0.2 else peer(name, seed * 100000 + n)
                with lock:  # the order of puts per name is the order recorded
                    table.put(name, state)
                    final[name] = state

        async def read() -> None:
            nonlocal peak
            async for change in browser.changes():
                peak = max(peak, table.pending())
                if change.kind == "removed":
                    del view[change.name]
                else:
                    assert change.peer is not None
                    view[change.name] = change.peer

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            async with trio.open_nursery() as writers:
                for seed in range(4):
                    writers.start_soon(trio.to_thread.run_sync, writer, seed)
            writers_done.set()
            with trio.fail_after(10):
                while view != {k: v for k, v in final.items() if v is not None}:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert table.pending() == 0
            table.close()
        assert table.wakeups < 20000  # coalesced: far fewer wake-ups than puts
        assert peak <= len(names)

    trio.run(main)


def test_past_max_peers_new_names_are_dropped_and_counted() -> None:
    async def main() -> None:
        table = _PeerTable(trio.lowlevel.current_trio_token(), limit=3)
        for i in range(5):
            table.put(f"n{i}", peer_from_txt(f"n{i}", "_a._tcp.local.", None, [], 1, {}))
        assert set(table.snapshot()) == {"n0", "n1", "n2"}
        assert table.dropped == 2
        table.put("n0", None)  # room again
        table.put("n9", peer_from_txt("n9", "_a._tcp.local.", None, [], 1, {}))
        assert "n9" in table.snapshot()

    trio.run(main)
    assert MAX_PEERS >= 1000


# -- real zeroconf, in a network namespace of its own ---------------------------------


def web(name: str = "web", external: str = "203.0.113.7", port: int = 8080) -> Advert:
    return advert_for(lease(external, port), "_pbtest._tcp", name)


def test_publish_update_lose_and_withdraw_are_seen_by_a_browser(netns: str) -> None:
    async def main() -> None:
        async with (
            open_rendezvous(LOOPBACK) as publisher,
            open_rendezvous(LOOPBACK) as seer,
            seer.browse("_pbtest._tcp") as browser,
        ):
            if True:
                publication = await publisher.publish_advert(web())
                await until(lambda: "web" in browser.snapshot())
                peer = browser.snapshot()["web"]
                assert peer.internal == ((ipaddress.ip_address("192.168.1.100"), 8080),)
                assert peer.external == (ipaddress.ip_address("203.0.113.7"), 8080)
                # 203.0.113.7 is documentation space (RFC 5737): not public.
                assert (peer.method, peer.public, peer.state) == ("pcp", False, "up")

                await publication.update_lease(lease("198.51.100.9", 9090))
                await until(
                    lambda: (
                        browser.snapshot()["web"].external
                        == (ipaddress.ip_address("198.51.100.9"), 9090)
                    )
                )
                await publication.mark_lost()
                await until(lambda: browser.snapshot()["web"].state == "lost")
                assert browser.snapshot()["web"].external is None
                assert browser.snapshot()["web"].internal  # still reachable on the LAN

                await publication.withdraw()
                # Goodbye packets (RFC 6762 §10.1): gone in about a second, not
                # after the 75 min TTL of the records.
                await until(lambda: "web" not in browser.snapshot(), limit=5)
                await publication.withdraw()  # idempotent
                with pytest.raises(RendezvousError, match="withdrawn"):
                    await publication.update(web())

    run_isolated(netns, main)


def test_the_change_iterator_reports_added_updated_removed(netns: str) -> None:
    async def main() -> None:
        async with (
            open_rendezvous(LOOPBACK) as publisher,
            open_rendezvous(LOOPBACK) as seer,
            seer.browse("_pbtest._tcp") as browser,
        ):
            if True:
                seen: list[tuple[str, Any]] = []

                async def watch() -> None:
                    async for change in browser:
                        ext = change.peer.external if change.peer else None
                        seen.append((change.kind, ext and str(ext[0])))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    publication = await publisher.publish_advert(web("iter"))
                    await until(lambda: ("added", "203.0.113.7") in seen)
                    await publication.update_lease(lease("198.51.100.1"))
                    await until(lambda: ("updated", "198.51.100.1") in seen)
                    await publication.withdraw()
                    await until(lambda: ("removed", None) in seen, limit=5)
                    nursery.cancel_scope.cancel()

    run_isolated(netns, main)


def test_a_name_in_use_on_the_network_is_refused_clearly(netns: str) -> None:
    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as one, open_rendezvous(LOOPBACK) as two:
            await one.publish_advert(web("taken"))
            with pytest.raises(RendezvousError, match="already in use on the network"):
                await two.publish_advert(web("taken", "198.51.100.2"))
            with pytest.raises(RendezvousError, match="published already"):
                await one.publish_advert(web("taken"))
            assert len(one.publications) == 1
            assert two.publications == ()

    run_isolated(netns, main)


def test_names_past_the_limit_are_not_resolved(netns: str, monkeypatch: Any) -> None:
    """A LAN host announcing more names than a browser keeps gets no query
    for the ones past the limit (10,000 names would be 10,000 queries and
    tasks), only a count in ``dropped``."""
    from zeroconf.asyncio import AsyncServiceInfo

    monkeypatch.setattr(_PeerTable.__init__, "__defaults__", (2,))  # limit=2
    asked: set[str] = set()
    real = AsyncServiceInfo.async_request

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked.add(self.name)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncServiceInfo, "async_request", counted)

    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as publisher:
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(publisher.publish_advert, web(f"n{i}"))
            async with open_rendezvous(LOOPBACK) as seer, seer.browse("_pbtest._tcp") as browser:
                await until(lambda: browser.dropped >= 3 and len(browser.snapshot()) == 2)
                await trio.sleep(CACHE_FLUSH_DELAY * 2)  # any resolve still to start has
                assert len(asked) == 2, asked

    run_isolated(netns, main)


def test_closing_is_bounded_when_zeroconfs_thread_hangs(
    netns: str, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A zeroconf thread stuck in a call (it never sees the stop) does not
    hold the close, nor a daemon's shutdown, forever."""
    monkeypatch.setattr(rendezvous_module, "CLOSE_TIMEOUT", 0.5)
    gate = threading.Event()
    # The test's own bound: the close waited for the thread (the fault) only
    # ends when this lets the thread go.
    safety = threading.Timer(60, gate.set)
    safety.start()
    stuck: list[bool] = []

    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as rendezvous:
            await rendezvous.publish_advert(web())

            def hang() -> None:
                gate.wait()

            rendezvous.thread.post(hang)
        stuck.append(not gate.is_set())  # the close returned, the thread still stuck

    try:
        run_isolated(netns, main)
    finally:
        gate.set()
        safety.cancel()
    assert stuck == [True]
    assert "did not stop" in caplog.text


def test_a_publish_cancelled_while_zeroconfs_thread_hangs_returns(
    netns: str, monkeypatch: Any
) -> None:
    """The withdraw after a cancelled publish is shielded but bounded: a
    stuck zeroconf thread does not hold the caller (a daemon's request, and
    so its shutdown) forever."""
    monkeypatch.setattr(rendezvous_module, "CLOSE_TIMEOUT", 0.5)
    gate = threading.Event()
    safety = threading.Timer(60, gate.set)  # the fault: only this ends the wait
    safety.start()
    returned: list[bool] = []

    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as rendezvous:

            def hang() -> None:
                gate.wait()

            rendezvous.thread.post(hang)
            with trio.move_on_after(0.5):
                await rendezvous.publish_advert(web())
            returned.append(not gate.is_set())
            assert rendezvous.publications == ()

    try:
        run_isolated(netns, main)
    finally:
        gate.set()
        safety.cancel()
    assert returned == [True]


def test_many_concurrent_publish_update_withdraw_lose_no_update(netns: str) -> None:
    """40 names, 25 updates each from concurrent tasks, every third name
    withdrawn: zeroconf's registry ends with exactly each name's last state,
    a browser converges to it, and closing leaves nothing registered, the
    thread gone, and the browser hearing every goodbye."""
    names = [f"svc{i}" for i in range(40)]

    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as seer, seer.browse("_pbtest._tcp") as browser:
            if True:
                publisher_cm = open_rendezvous(LOOPBACK)
                publisher = await publisher_cm.__aenter__()
                try:
                    last: dict[str, int] = {}
                    pubs: dict[str, Any] = {}

                    async def one(name: str, index: int) -> None:
                        pubs[name] = await publisher.publish_advert(web(name, port=1000))
                        async with trio.open_nursery() as updates:
                            for n in range(25):
                                port = 1000 + n + 1

                                async def update(port: int = port) -> None:
                                    await trio.sleep(random.random() * 0.2)
                                    await pubs[name].update_lease(lease(port=port))

                                updates.start_soon(update)
                        # Order among concurrent updates is the order they ran:
                        # the last applied is what the publication holds.
                        last[name] = pubs[name].advert.external_port
                        if index % 3 == 0:
                            await pubs[name].withdraw()

                    async with trio.open_nursery() as nursery:
                        for index, name in enumerate(names):
                            nursery.start_soon(one, name, index)
                    thread = publisher.thread
                    expected = {n: last[n] for i, n in enumerate(names) if i % 3 != 0}
                    registered = await thread.run(lambda _zc: _registry(thread))
                    assert registered == {
                        f"{n}._pbtest._tcp.local.": str(p) for n, p in expected.items()
                    }

                    def seen() -> dict[str, int]:
                        snap = browser.snapshot().items()
                        return {k: v.external[1] for k, v in snap if v.external}

                    try:
                        await until(lambda: seen() == expected, limit=20)
                    except trio.TooSlowError:
                        raise AssertionError((seen(), expected)) from None
                finally:
                    await publisher_cm.__aexit__(None, None, None)
                assert not publisher.thread._registered
                assert publisher.thread._thread is not None
                assert not publisher.thread._thread.is_alive()
                await until(lambda: not browser.snapshot(), limit=5)  # goodbyes at close

    run_isolated(netns, main)


async def _registry(thread: Any) -> dict[str, str]:
    return {
        key: info.decoded_properties.get("ext_port") for key, info in thread._registered.items()
    }


def test_a_publish_cancelled_while_probing_leaves_nothing_registered(netns: str) -> None:
    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as rv:
            with trio.move_on_after(0.05):  # probing takes 0.5 s or more (RFC 6762 §8.1)
                await rv.publish_advert(web("cancelled"))
            assert rv.publications == ()
            # The withdraw was queued behind the register on zeroconf's side.
            await until(lambda: not rv.thread._registered)
            info = await rv.thread.run(lambda zc: _registered_info(zc, "cancelled"))
            assert info is None
            # And the name is free again.
            await rv.publish_advert(web("cancelled"))

    run_isolated(netns, main)


async def _registered_info(zc: Any, name: str) -> Any:
    return zc.zeroconf.registry.async_get_info_name(f"{name}._pbtest._tcp.local.")


def test_closing_while_cancelled_still_unregisters(netns: str) -> None:
    async def main() -> None:
        async with open_rendezvous(LOOPBACK) as seer, seer.browse("_pbtest._tcp") as browser:
            with trio.CancelScope() as scope:
                async with open_rendezvous(LOOPBACK) as rv:
                    await rv.publish_advert(web("bye"))
                    await until(lambda: "bye" in browser.snapshot())
                    scope.cancel()
                    await trio.sleep_forever()
            await until(lambda: "bye" not in browser.snapshot(), limit=5)

    run_isolated(netns, main)


def test_a_published_mapping_follows_its_events(netns: str) -> None:
    """Through a broker on a FakeGateway: the external address changes
    (the NAT-PMP announcement, RFC 6886 §3.2.1), the gateway restarts (Lost,
    Restored), and the mapping is released: the browser sees each."""

    async def main() -> None:
        gateway = FakeGateway()
        async with (
            open_broker(
                "127.0.0.1",
                ("pcp", "natpmp"),  # the NAT-PMP announcement carries the address
                link_factory=gateway.link_factory(),
                announce_port=None,
                seed=1,
                recovery_delay=0.1,
            ) as broker,
            open_rendezvous(LOOPBACK) as rv,
            open_rendezvous(LOOPBACK) as seer,
            seer.browse("_pbtest._tcp") as browser,
        ):
            # NAT-PMP: its address announcement (RFC 6886 §3.2.1) moves the
            # lease at once; a PCP lease learns the new address at renewal.
            mapping = await broker.map(8080, "tcp", lifetime=600, via="natpmp")
            events = mapping.events()
            await rv.publish(mapping, "_pbtest._tcp", "mapped", txt={"path": "/"})
            await until(lambda: "mapped" in browser.snapshot())
            peer = browser.snapshot()["mapped"]
            assert peer.external == (ipaddress.ip_address("203.0.113.7"), mapping.external_port)
            assert peer.txt.get("path") == "/"

            await gateway.change_external_address("198.51.100.77")
            seen: list[Any] = []
            with trio.fail_after(10):
                async for event in events:
                    seen.append(event)
                    if isinstance(event, ExternalAddressChanged | Restored):
                        break
            await until(
                lambda: (
                    (browser.snapshot()["mapped"].external or (None,))[0]
                    == ipaddress.ip_address("198.51.100.77")
                )
            )
            with pytest.raises(RendezvousError, match="published already"):
                await rv.publish(mapping, "_pbtest._tcp", "mapped")

            # The gateway restarts: an epoch that goes back is a loss (RFC 6886
            # §3.6; beyond its 2 s tolerance). While the mapping is being
            # restored (the gateway answers slowly now), the record keeps the
            # internal endpoint and says state=lost; restored, it is up again.
            await trio.sleep(4)
            gateway.reset()
            await gateway.announce()
            with trio.fail_after(10):
                async for event in events:
                    if isinstance(event, Lost):
                        gateway.delay = 1.5
                        break
            await until(lambda: browser.snapshot()["mapped"].state == "lost", limit=5)
            assert browser.snapshot()["mapped"].external is None
            assert browser.snapshot()["mapped"].internal
            gateway.delay = 0.0
            await until(lambda: browser.snapshot()["mapped"].state == "up", limit=10)
            assert browser.snapshot()["mapped"].external is not None

            await mapping.release()
            await until(lambda: "mapped" not in browser.snapshot(), limit=5)
            assert rv.publications == ()

    run_isolated(netns, main)


def test_rendezvous_argument_errors_are_clear() -> None:
    async def main() -> None:
        with pytest.raises(RendezvousError, match="not an IP address"):
            async with open_rendezvous(["eth0"]):
                pass

    trio.run(main)


def test_a_flood_from_zeroconfs_own_thread_while_trio_publishes_then_close_mid_flood(
    netns: str,
) -> None:
    """zeroconf's loop writes 10,000 peer states (as its browse callbacks do)
    while trio publishes and updates through the same thread; trio keeps
    up, then the rendezvous closes with the flood still running: no
    deadlock, the thread is joined, nothing stays registered."""

    async def main() -> None:
        import asyncio

        names = [f"f{i}" for i in range(200)]
        stop_flood = threading.Event()
        flood_count = 0
        async with open_rendezvous(LOOPBACK) as rv:
            async with rv.browse("_pbflood._tcp") as browser:
                table = browser._table

                async def flood() -> None:
                    nonlocal flood_count
                    rng = random.Random(5)
                    n = 0
                    while not stop_flood.is_set():
                        name = rng.choice(names)
                        n += 1
                        peer = peer_from_txt(
                            name, "_pbflood._tcp.local.", None, [], n % 60000 + 1, {}
                        )
                        table.put(name, peer)
                        if n % 500 == 0:
                            await asyncio.sleep(0)  # let zeroconf's own work run too
                        if n == 10000:
                            flood_count = n
                    flood_count = n

                flooding = asyncio.run_coroutine_threadsafe(flood(), rv.thread._loop)  # type: ignore[arg-type]
                view: dict[str, int] = {}

                async def read() -> None:
                    async for change in browser:
                        assert change.peer is not None
                        view[change.name] = (change.peer.internal and 0) or 0

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    publications = [
                        await rv.publish_advert(web(f"pub{i}", port=2000)) for i in range(5)
                    ]
                    async with trio.open_nursery() as updates:
                        for i, publication in enumerate(publications):
                            for port in range(2001, 2011):
                                updates.start_soon(publication.update_lease, lease(port=port + i))
                    registered = await rv.thread.run(lambda _zc: _registry(rv.thread))
                    # trio runs a batch of new tasks in either order: the last
                    # to run is the one each publication holds, and zeroconf too.
                    assert registered == {
                        f"pub{i}._pbtest._tcp.local.": str(p.advert.external_port)
                        for i, p in enumerate(publications)
                    }
                    await until(lambda: flood_count >= 10000, limit=30)
                    assert table.pending() <= len(names)
                    nursery.cancel_scope.cancel()
            thread = rv.thread
        # Closed with the flood still going on zeroconf's loop.
        stop_flood.set()
        assert flooding.done()  # cancelled with the loop's other tasks
        assert thread._thread is not None
        assert not thread._thread.is_alive()
        assert not thread._registered

    run_isolated(netns, main)


def test_an_address_that_is_not_this_hosts_is_refused(netns: str) -> None:
    async def main() -> None:
        with pytest.raises(RendezvousError, match=r"192\.0\.2\.1.*an address of this host"):
            async with open_rendezvous(["192.0.2.1"]):
                pass

    run_isolated(netns, main)
