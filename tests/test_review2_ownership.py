"""Adversarial review 2 (issue 8): what one user's requests cost the daemon."""

from __future__ import annotations

import pytest

from portbroker.daemon import ownership
from portbroker.daemon.ownership import Hold, Ownership, Peer, Policy


def test_a_users_list_looks_only_at_that_users_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    # `list` went through every mapping on the host to pick a user's own:
    # with 100,000 records restored (docs: they load in seconds), a user
    # pipelining lists on its 64 connections (64 requests each) made the
    # event loop walk 400 million entries, and every other user waited.
    owner = Ownership(Policy(max_mappings=100_000))
    for n in range(5000):
        owner.restored(
            ("tcp", 10000 + n),
            0,
            [Hold(0, 1, True, None)],
            handle=object(),
            external_port=None,
            now=0.0,
        )
    mine = owner.connect(Peer(1000, 42))
    for port in (2002, 2001):
        entry = owner.claim(mine, ("tcp", port), persist=False, external_port=None, now=0.0)
        assert entry.creating
        owner.created(("tcp", port), object(), port)
    looked = 0
    may_see = Ownership._may_see

    def counting(uid: int, entry: ownership.Entry) -> bool:
        nonlocal looked
        looked += 1
        return may_see(uid, entry)

    monkeypatch.setattr(Ownership, "_may_see", staticmethod(counting))
    assert [e.id for e in owner.visible(1000)] == ["2001/tcp", "2002/tcp"]
    assert looked <= 10, f"looked at {looked} mappings to list 2"
    assert len(list(owner.visible(0))) == 5002  # root sees them all
