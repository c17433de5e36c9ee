"""Adversarial review of the ownership rules (issue 8): plain values, no I/O.

Each test is a way a hostile user, a slow gateway or a restarting app could
break a rule of portbroker/daemon/ownership.py; see docs/daemon-protocol.md,
"Who may map what" and "Limits".
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portbroker.daemon.ownership import Hold, Ownership, Peer, Policy
from portbroker.daemon.protocol import ErrorCode, ProtocolError

ALICE = Peer(1000, 100)
ALICE2 = Peer(1000, 101)
BOB = Peer(1001, 200)


def test_a_restarting_app_at_its_hold_limit_reclaims_its_holds() -> None:
    # An app holding as many mappings as the hold limit allows restarts
    # within the grace period: taking back its own holds adds none, so the
    # limit must not refuse it (it would lose every mapping it had).
    owner = Ownership(Policy(grace=10, max_holds=2))
    app = owner.connect(ALICE)
    keys = [("tcp", 2000), ("tcp", 2001)]
    for key in keys:
        entry = owner.claim(app, key, persist=False, external_port=None, now=0)
        owner.created(key, object(), key[1])
    assert owner._holds[ALICE.uid] == 2
    owner.disconnect(app, now=1)
    restarted = owner.connect(ALICE2)
    for key in keys:
        entry = owner.claim(restarted, key, persist=False, external_port=None, now=2)
        assert not entry.creating
        assert [h.conn for h in entry.holds] == [restarted]
    assert owner._holds[ALICE.uid] == 2
    # A hold beyond the limit is still refused.
    with pytest.raises(ProtocolError) as over:
        owner.claim(restarted, keys[0], persist=False, external_port=None, now=3)
    assert over.value.code is ErrorCode.TOO_MANY_HOLDS


def test_grace_expiry_leaves_a_mapping_being_created_to_its_outcome() -> None:
    # The client hung up while its map was in flight (a slow gateway: the
    # broker spends up to RELEASE_TIMEOUT undoing it), and the grace period is
    # shorter than that. The reservation has no mapping yet: expiry must not
    # hand it to the caller for release (the daemon would assert on a
    # mapping-less entry in its nursery and stop), nor drop it so that the
    # gateway's late answer finds no entry.
    owner = Ownership(Policy(grace=0.3))
    app = owner.connect(ALICE)
    key = ("tcp", 7400)
    owner.claim(app, key, persist=False, external_port=None, now=0)
    owner.disconnect(app, now=1)
    assert owner.expire(5) == []
    assert owner.creating(key)
    # The gateway's answer arrives: nobody is left to own it, roll it back.
    assert owner.created(key, object(), 7400) is None
    assert key not in owner.entries
    assert owner.mappings_of(ALICE.uid) == 0
    assert owner._holds[ALICE.uid] == 0
    assert owner.next_deadline() is None
    # Or the broker's undo finished first: the reservation simply goes.
    other = owner.connect(ALICE2)
    owner.claim(other, key, persist=False, external_port=None, now=6)
    owner.disconnect(other, now=7)
    assert owner.expire(8) == []
    owner.create_failed(key)
    assert key not in owner.entries
    assert owner.mappings_of(ALICE.uid) == 0


def test_an_external_port_being_requested_is_not_given_to_another_user_meanwhile() -> None:
    # Bob races alice for her external port: both requests in flight at once
    # must not both pass the check that no two mappings share an external
    # port (with UPnP the later AddPortMapping for the same host would take
    # over alice's rule).
    owner = Ownership()
    a, b = owner.connect(ALICE), owner.connect(BOB)
    owner.claim(a, ("tcp", 8080), persist=False, external_port=9999, now=0)
    with pytest.raises(ProtocolError) as raced:
        owner.claim(b, ("tcp", 7000), persist=False, external_port=9999, now=0)
    assert raced.value.code is ErrorCode.CONFLICT
    assert "8080" not in raced.value.message
    assert "1000" not in raced.value.message
    # Once alice's request is over (refused), the port is free again.
    owner.create_failed(("tcp", 8080))
    entry = owner.claim(b, ("tcp", 7000), persist=False, external_port=9999, now=1)
    assert entry.creating
    # And the granted port, not the one asked for, is what counts afterwards.
    owner.created(("tcp", 7000), object(), 12345)
    assert owner.entries[("tcp", 7000)].external_port == 12345
    owner.claim(a, ("tcp", 8081), persist=False, external_port=9999, now=2)


PEERS = [ALICE, ALICE2, BOB, Peer(0, 1)]
KEYS = [("tcp", 2000), ("tcp", 2001), ("udp", 2000), ("tcp", 80)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["connect", "claim", "grant", "fail", "unmap", "disconnect", "expire", "restore"]
            ),
            st.integers(0, 3),
            st.integers(0, 3),
            st.booleans(),
            st.sampled_from([None, 9000, 9001]),
        ),
        max_size=80,
    )
)
# Found by hand; random search rarely meets them: two users racing for one
# external port, and a grace period that ends while the map is in flight.
@example(
    [
        ("connect", 0, 0, False, None),
        ("connect", 2, 0, False, None),
        ("claim", 0, 0, False, 9000),
        ("claim", 1, 1, False, 9000),
        ("grant", 0, 0, False, None),
        ("grant", 0, 1, False, None),
    ]
)
@example(
    [
        ("connect", 0, 0, False, None),
        ("claim", 0, 0, False, None),
        ("disconnect", 0, 0, False, None),
    ]
    + [("expire", 0, 0, False, None)] * 5
    + [("grant", 0, 0, False, None)]
)
def test_the_rules_hold_whatever_happens(
    steps: list[tuple[str, int, int, bool, int | None]],
) -> None:
    # Beyond the indexes (tests/test_ownership.py): with reservations left
    # open across other operations, restores and root in the mix, nobody but
    # the owner and root ever holds a mapping, no two mappings share an
    # external port, every hold is bound to an open connection, persisted,
    # or in a grace period the timer will see, and quotas hold.
    policy = Policy(grace=1, max_mappings=2, max_connections=3, max_holds=4)
    owner = Ownership(policy)
    conns: list[int] = []
    asked: dict[tuple[str, int], int | None] = {}  # reservations in flight: the port asked
    now = 0.0
    for op, who, which, flag, external in steps:
        now += 0.3
        key = KEYS[which]
        try:
            if op == "connect":
                conns.append(owner.connect(PEERS[who]))
            elif op == "claim" and conns and not owner.creating(key):
                conn = conns[who % len(conns)]
                entry = owner.claim(conn, key, persist=flag, external_port=external, now=now)
                if entry.creating:
                    asked[key] = external
            elif op == "grant" and key in asked:
                # The gateway grants the port asked for (or one of its own).
                owner.created(key, object(), asked.pop(key) or key[1] + 10000)
            elif op == "fail" and key in asked:
                del asked[key]
                owner.create_failed(key)
            elif op == "unmap" and conns:
                owner.unmap(conns[who % len(conns)], key)
            elif op == "disconnect" and conns:
                owner.disconnect(conns.pop(who % len(conns)), now)
            elif op == "expire":
                owner.expire(now)
            elif op == "restore" and key not in owner.entries:
                uid = PEERS[who].uid
                owner.restored(
                    key,
                    uid,
                    [Hold(uid, 5, flag, None)],
                    handle=object(),
                    external_port=key[1] + 20000,
                    now=now,
                )
        except ProtocolError:
            pass
        for key in asked:
            assert owner.creating(key), "a reservation ended before the gateway answered"
        ports = [
            (e.protocol, e.external_port)
            for e in owner.entries.values()
            if e.external_port is not None and not e.creating
        ]
        assert len(ports) == len(set(ports)), "two mappings share an external port"
        deadline = owner.next_deadline()
        for entry in owner.entries.values():
            assert entry.holds or entry.creating
            for hold in entry.holds:
                assert hold.uid in (entry.owner_uid, 0), "another user holds a mapping"
                if hold.conn is not None:
                    assert owner.is_open(hold.conn), "a hold bound to a closed connection"
                    assert not hold.persist
                elif not hold.persist:
                    assert hold.grace_until is not None
                    if not entry.creating:
                        assert deadline is not None
                        assert deadline <= hold.grace_until
        for uid in {p.uid for p in PEERS}:
            assert owner.connections(uid) <= policy.max_connections
            assert owner._holds[uid] <= policy.max_holds
            held = {
                k
                for k, e in owner.entries.items()
                if e.owner_uid == uid or any(h.uid == uid for h in e.holds)
            }
            assert owner.mappings_of(uid) == len(held)
