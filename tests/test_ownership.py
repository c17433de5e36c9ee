"""The daemon's ownership rules with plain values: no socket, no clock, no gateway."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portbroker.daemon.ownership import Hold, Ownership, Peer, Policy
from portbroker.daemon.protocol import ErrorCode, ProtocolError

ALICE = Peer(1000, 100)
ALICE2 = Peer(1000, 101)
BOB = Peer(1001, 200)
ROOT = Peer(0, 1)
KEY = ("tcp", 8080)


def code_of(error: pytest.ExceptionInfo[ProtocolError]) -> ErrorCode:
    return error.value.code


def make(owner: Ownership, conn: int, key: tuple[str, int] = KEY, **kw: object) -> None:
    """Claim and grant *key* for *conn* (external port = internal port)."""
    entry = owner.claim(
        conn,
        key,
        persist=bool(kw.get("persist", False)),
        external_port=kw.get("external_port"),  # type: ignore[arg-type]
        now=0.0,
    )
    if entry.creating:
        assert owner.created(key, object(), kw.get("granted", key[1])) is entry  # type: ignore[arg-type]


def test_the_owners_apps_share_one_mapping_and_it_ends_with_the_last_hold() -> None:
    owner = Ownership()
    a, a2 = owner.connect(ALICE), owner.connect(ALICE2)
    first = owner.claim(a, KEY, persist=False, external_port=None, now=0)
    assert first.creating
    owner.created(KEY, "mapping", 8080)
    joined = owner.claim(a2, KEY, persist=False, external_port=None, now=0)
    assert joined is first
    assert not joined.creating
    assert len(joined.holds) == 2
    entry, released = owner.unmap(a, KEY)
    assert not released
    assert len(entry.holds) == 1
    entry, released = owner.unmap(a2, KEY)
    assert released
    assert KEY not in owner.entries
    assert owner.mappings_of(1000) == 0


def test_another_user_learns_only_that_the_endpoint_is_in_use() -> None:
    owner = Ownership()
    a, b = owner.connect(ALICE), owner.connect(BOB)
    make(owner, a, external_port=9999, granted=9999)
    with pytest.raises(ProtocolError) as same_endpoint:
        owner.claim(b, KEY, persist=False, external_port=None, now=0)
    assert code_of(same_endpoint) is ErrorCode.CONFLICT
    with pytest.raises(ProtocolError) as same_external:
        owner.claim(b, ("tcp", 7000), persist=False, external_port=9999, now=0)
    assert code_of(same_external) is ErrorCode.CONFLICT
    for error in (same_endpoint, same_external):
        # Neither alice's uid nor her other port (the internal 8080 for the
        # external-port clash, the external 9999 for the endpoint clash).
        assert "1000" not in error.value.message
    assert "9999" not in same_endpoint.value.message
    assert "8080" not in same_external.value.message
    # Alice herself is told which of her mappings has that external port.
    a2 = owner.connect(ALICE2)
    with pytest.raises(ProtocolError) as own:
        owner.claim(a2, ("tcp", 7000), persist=False, external_port=9999, now=0)
    assert "8080/tcp" in own.value.message
    # And another user's mapping is absent to unmap.
    with pytest.raises(ProtocolError) as absent:
        owner.unmap(b, KEY)
    assert code_of(absent) is ErrorCode.NOT_FOUND


def test_privileged_ports_are_roots_unless_the_policy_says_otherwise() -> None:
    owner = Ownership()
    b, r = owner.connect(BOB), owner.connect(ROOT)
    for port in (22, 53, 1023):
        with pytest.raises(ProtocolError) as refused:
            owner.claim(b, ("tcp", port), persist=False, external_port=None, now=0)
        assert code_of(refused) is ErrorCode.PRIVILEGED_PORT
        assert "--allow-privileged-ports" in refused.value.message
    make(owner, b, ("tcp", 1024))
    make(owner, r, ("tcp", 22))
    # Allowed for everyone, or for members of a group.
    everyone = Ownership(Policy(allow_privileged_ports=True))
    make(everyone, everyone.connect(BOB), ("udp", 53))
    by_group = Ownership(Policy(privileged_gids=frozenset({500})))
    member = by_group.connect(Peer(1001, 200, frozenset({100, 500})))
    stranger = by_group.connect(Peer(1002, 300, frozenset({100})))
    make(by_group, member, ("tcp", 80))
    with pytest.raises(ProtocolError):
        by_group.claim(stranger, ("tcp", 81), persist=False, external_port=None, now=0)


def test_quotas_per_user_do_not_touch_other_users() -> None:
    owner = Ownership(Policy(max_mappings=2, max_connections=2, max_holds=3))
    a = owner.connect(ALICE)
    owner.connect(ALICE)
    with pytest.raises(ProtocolError) as connections:
        owner.connect(ALICE2)
    assert code_of(connections) is ErrorCode.TOO_MANY_CONNECTIONS
    b = owner.connect(BOB)  # bob is not alice
    make(owner, a, ("tcp", 2000))
    make(owner, a, ("tcp", 2001))
    with pytest.raises(ProtocolError) as mappings:
        owner.claim(a, ("tcp", 2002), persist=False, external_port=None, now=0)
    assert code_of(mappings) is ErrorCode.TOO_MANY_MAPPINGS
    make(owner, b, ("tcp", 3000))
    # Holds: joining her own mapping again and again is bounded too.
    make(owner, a, ("tcp", 2000))
    with pytest.raises(ProtocolError) as holds:
        owner.claim(a, ("tcp", 2001), persist=False, external_port=None, now=0)
    assert code_of(holds) is ErrorCode.TOO_MANY_HOLDS
    # Unmapping frees the quota.
    owner.unmap(a, ("tcp", 2001))
    make(owner, a, ("tcp", 2002))


def test_grace_then_release_on_one_deadline_and_reclaim_within_it() -> None:
    owner = Ownership(Policy(grace=10))
    a = owner.connect(ALICE)
    make(owner, a)
    make(owner, a, ("udp", 5000))
    owner.disconnect(a, now=100)
    assert owner.next_deadline() == 110
    assert owner.expire(109.9) == []
    # The app restarts and claims 8080 again within the grace period.
    a2 = owner.connect(ALICE2)
    again = owner.claim(a2, KEY, persist=False, external_port=None, now=105)
    assert not again.creating
    assert again.holds[0].conn == a2
    assert again.holds[0].pid == 101
    released = owner.expire(110)
    assert [e.key for e in released] == [("udp", 5000)]
    assert KEY in owner.entries
    assert owner.next_deadline() is None


def test_persisted_holds_outlive_connections_and_are_unmapped_from_another() -> None:
    owner = Ownership(Policy(grace=1))
    a = owner.connect(ALICE)
    make(owner, a, persist=True)
    owner.disconnect(a, now=0)
    assert owner.expire(100) == []
    assert KEY in owner.entries
    later = owner.connect(ALICE2)
    _entry, released = owner.unmap(later, KEY)
    assert released


def test_unmap_from_another_connection_spares_a_running_app() -> None:
    owner = Ownership()
    app, cli = owner.connect(ALICE), owner.connect(ALICE2)
    make(owner, app)
    with pytest.raises(ProtocolError) as busy:
        owner.unmap(cli, KEY)
    assert code_of(busy) is ErrorCode.CONFLICT
    root = owner.connect(ROOT)
    _, released = owner.unmap(root, KEY)  # root may end any mapping
    assert released


def test_a_map_whose_requester_left_is_rolled_back() -> None:
    owner = Ownership()
    a = owner.connect(ALICE)
    entry = owner.claim(a, KEY, persist=True, external_port=None, now=0)
    assert entry.creating
    owner.disconnect(a, now=1)  # the client timed out and left
    assert owner.created(KEY, "mapping", 8080) is None
    assert KEY not in owner.entries
    assert owner.mappings_of(1000) == 0
    # A request still queued when its connection closed is refused outright.
    with pytest.raises(ProtocolError) as gone:
        owner.claim(a, KEY, persist=False, external_port=None, now=2)
    assert code_of(gone) is ErrorCode.GONE


def test_a_failed_create_frees_the_key_and_the_quota() -> None:
    owner = Ownership(Policy(max_mappings=1))
    a = owner.connect(ALICE)
    owner.claim(a, KEY, persist=False, external_port=None, now=0)
    assert owner.creating(KEY)
    owner.create_failed(KEY)
    assert not owner.creating(KEY)
    assert KEY not in owner.entries
    make(owner, a, ("tcp", 9000))


def test_restored_entries_give_live_apps_their_grace() -> None:
    owner = Ownership(Policy(grace=5))
    holds = [Hold(1000, 100, persist=False, conn=None), Hold(1000, 0, persist=True, conn=None)]
    owner.restored(KEY, 1000, holds, handle="m", external_port=8080, now=50)
    assert owner.next_deadline() == 55
    assert owner.expire(55) == []  # the persisted hold keeps it
    entry = owner.entries[KEY]
    assert [h.persist for h in entry.holds] == [True]
    assert owner.mappings_of(1000) == 1


def test_root_sees_all_and_users_their_own() -> None:
    owner = Ownership()
    a, b, r = owner.connect(ALICE), owner.connect(BOB), owner.connect(ROOT)
    make(owner, a, ("tcp", 2000))
    make(owner, b, ("tcp", 3000))
    assert [e.id for e in owner.visible(1000)] == ["2000/tcp"]
    assert sorted(e.id for e in owner.visible(0)) == ["2000/tcp", "3000/tcp"]
    del r


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["connect", "claim", "unmap", "disconnect", "expire", "fail"]),
            st.integers(0, 3),  # which peer / connection
            st.integers(0, 2),  # which key
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_indexes_stay_true_whatever_happens(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    # Quotas are computed from indexes kept on the side; after any sequence of
    # operations they must equal a recount from the entries themselves.
    owner = Ownership(Policy(grace=1, max_mappings=2, max_connections=3, max_holds=4))
    peers = [ALICE, ALICE2, BOB, ROOT]
    keys = [("tcp", 2000), ("tcp", 2001), ("udp", 2000)]
    conns: list[int] = []
    now = 0.0
    for op, who, which, flag in steps:
        now += 0.4
        key = keys[which]
        try:
            if op == "connect":
                conns.append(owner.connect(peers[who]))
            elif op == "claim" and conns:
                entry = owner.claim(
                    conns[who % len(conns)], key, persist=flag, external_port=None, now=now
                )
                if entry.creating:
                    owner.created(key, None, key[1])
            elif op == "unmap" and conns:
                owner.unmap(conns[who % len(conns)], key)
            elif op == "disconnect" and conns:
                owner.disconnect(conns.pop(who % len(conns)), now)
            elif op == "expire":
                owner.expire(now)
            elif op == "fail" and conns and not owner.creating(key) and key not in owner.entries:
                owner.claim(conns[who % len(conns)], key, persist=flag, external_port=None, now=now)
                owner.create_failed(key)
        except ProtocolError:
            pass
        for uid in {p.uid for p in peers}:
            expected = {
                k
                for k, e in owner.entries.items()
                if e.owner_uid == uid or any(h.uid == uid for h in e.holds)
            }
            assert owner.mappings_of(uid) == len(expected)
            holds = sum(1 for e in owner.entries.values() for h in e.holds if h.uid == uid)
            assert owner._holds[uid] == holds
        for entry in owner.entries.values():
            assert entry.holds or entry.creating, "an entry nobody holds was kept"
