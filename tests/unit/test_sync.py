"""Synchronous and quorum replication: GUC rendering, candidate choice, and the quorum safety test
and planner against a brute-force definition.  (What decide() allows in these modes: the CASES of
tests/unit/ha/test_decide.py.)"""

from __future__ import annotations

import itertools

from hypothesis import assume, given
from hypothesis import strategies as st

from hakeeper.core.cluster import SyncState
from hakeeper.core.config import DynamicConfig
from hakeeper.ha.sync import Quorum, choose, quorum_step, quorum_transition_safe, sync_guc
from tests.support.builders import MB, primary, replica, view

SYNC = DynamicConfig(replication_mode="synchronous")


def test_guc_lists_exactly_the_sync_set_so_every_member_acknowledges_every_commit() -> None:
    assert sync_guc(SYNC, ("b", "c")) == 'FIRST 2 ("b", "c")'
    assert sync_guc(SYNC, ()) == ""
    assert sync_guc(DynamicConfig(replication_mode="synchronous", synchronous_strict=True), ()) == "*"
    assert sync_guc(DynamicConfig(), ("b",)) == ""
    assert sync_guc(SYNC, ('we"ird',)) == 'FIRST 1 ("we""ird")'


def test_a_new_primary_waits_for_any_standby_until_its_sync_set_forms() -> None:
    """The promotion guard: no commit of a new primary is acknowledged by it alone."""
    assert sync_guc(SYNC, (), guard=True) == "*"
    assert sync_guc(QUORUM, (), guard=True) == "*"
    assert sync_guc(SYNC, ("b",), guard=True) == 'FIRST 1 ("b")'  # a formed set replaces it
    assert sync_guc(DynamicConfig(), (), guard=True) == ""  # async mode never waits


def test_choose_prefers_sync_priority_then_lag_and_skips_nosync_and_laggards() -> None:
    cfg = DynamicConfig(replication_mode="synchronous", maximum_lag_on_syncnode=MB)
    v = view(
        primary("a"),
        replica("b", lag=100, sync_priority=1),
        replica("c", lag=10, sync_priority=1),
        replica("d", lag=0, sync_priority=5),
        replica("e", nosync=True),
        replica("f", lag=2 * MB),
        replica("g", lag=0),  # not streaming from us
        leader="a",
        config=cfg,
    )
    assert choose(v, {"b", "c", "d", "e", "f"}, "a") == ["d", "c", "b"]


# -- quorum mode: the GUC, the safety test, the planner -------------------------------------------------

QUORUM = DynamicConfig(replication_mode="quorum", synchronous_node_count=2)


def test_quorum_guc_is_any_k_over_the_voters() -> None:
    assert sync_guc(QUORUM, ("b", "c", "d"), 2) == 'ANY 2 ("b", "c", "d")'
    assert sync_guc(QUORUM, ("b",), 2) == 'ANY 1 ("b")'  # k never exceeds the voters
    assert sync_guc(QUORUM, ("b", "c"), 0) == 'ANY 2 ("b", "c")'  # 0: all (as FIRST mode left it)
    assert sync_guc(QUORUM, ()) == ""
    assert sync_guc(DynamicConfig(replication_mode="quorum", synchronous_strict=True), ()) == "*"


def test_sync_key_without_quorum_reads_as_first_mode() -> None:
    old = SyncState.from_json(b'{"leader": "a", "members": ["b", "c"], "term": 7}')
    assert old is not None and old.quorum == 2 and not old.is_quorum
    new = SyncState("a", ("b", "c"), 7, quorum=1)
    back = SyncState.from_json(new.to_json())
    assert back is not None and back.quorum == 1 and back.is_quorum
    assert SyncState("a", (), 7).quorum == 0


NAMES5 = ["a", "b", "c", "d", "e"]


def subsets(s: frozenset[str]) -> list[frozenset[str]]:
    items = sorted(s)
    return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]


def brute_force_safe(v_guc: frozenset[str], k_guc: int, v_key: frozenset[str], k_key: int) -> bool:
    """The definition: every set of standbys that can acknowledge a commit under the GUC meets
    every set of voters the key lets an election rely on."""
    acks = [a for a in subsets(v_guc) if len(a) >= k_guc]
    elections = [s for s in subsets(v_key) if len(s) >= len(v_key) - k_key + 1]
    return all(a & s for a in acks for s in elections)


@st.composite
def quorum(draw: st.DrawFn, *, valid: bool = False) -> Quorum:
    voters = frozenset(draw(st.sets(st.sampled_from(NAMES5))))
    if valid:  # as the agent writes them: 1..|V|, 0 for no voters
        k = draw(st.integers(1, len(voters))) if voters else 0
    else:
        k = draw(st.integers(0, len(voters) + 1))
    return Quorum(voters, k)


@given(guc=quorum(), key=quorum())
def test_quorum_transition_safe_is_the_brute_force_definition(guc: Quorum, key: Quorum) -> None:
    expected = brute_force_safe(guc.voters, guc.k, key.voters, key.k)
    assert quorum_transition_safe(guc.voters, guc.k, key.voters, key.k) == expected


def test_quorum_ordering_rules() -> None:
    bc1, b1, bc2 = Quorum.of("bc", 1), Quorum.of("b", 1), Quorum.of("bc", 2)
    assert quorum_step(b1, b1, bc1) == ("key", bc1)  # add a voter: the key first
    assert quorum_step(b1, bc1, bc1) == ("guc", bc1)  # ... then the GUC
    assert quorum_step(bc1, bc1, b1) == ("guc", b1)  # remove a voter: the GUC first
    assert quorum_step(b1, bc1, b1) == ("key", b1)  # ... then the key
    assert quorum_step(bc1, bc1, bc2) == ("guc", bc2)  # raise k: the GUC first
    assert quorum_step(bc2, bc2, bc1) == ("key", bc1)  # lower k: the key first
    assert not quorum_transition_safe("bc", 1, "b", 1)  # c alone may have acknowledged
    assert not quorum_transition_safe("bc", 1, "bc", 2)
    # Swapping a voter widens the key first: ANY 1 (b, c) -> ANY 1 (c, d).
    cd1 = Quorum.of("cd", 1)
    assert quorum_step(bc1, bc1, cd1) == ("key", Quorum.of("bcd", 1))
    assert quorum_step(Quorum.of("", 0), Quorum.of("", 0), bc1) == ("guc", bc1)  # a new term
    assert quorum_step(bc1, bc1, Quorum.of("", 0)) == ("key", Quorum.of("", 0))  # no voter left


@given(guc=quorum(valid=True), key=quorum(valid=True), target=quorum(valid=True))
def test_quorum_steps_keep_the_key_true_and_reach_the_target(
    guc: Quorum, key: Quorum, target: Quorum
) -> None:
    assume(guc.covers(key))
    for _ in range(3):
        step = quorum_step(guc, key, target)
        if step is None:
            break
        what, q = step
        if what == "guc":
            guc = q
        else:
            key = q
        assert brute_force_safe(guc.voters, guc.k, key.voters, key.k), (what, guc, key)
    assert quorum_step(guc, key, target) is None and guc == key == target
