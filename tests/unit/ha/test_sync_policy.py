"""The pure planning of synchronous and quorum replication (hakeeper/ha/policy/sync.py):
candidate choice, the quorum safety test and planner against a brute-force definition, and the
FIRST-mode step planner.  (What decide() allows in these modes: the CASES of test_decide.py; the
GUC text: tests/unit/test_pg_conf.py.)"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hakeeper.core.cluster import SyncState
from hakeeper.core.config import DynamicConfig
from hakeeper.ha.policy.sync import (
    FirstStep,
    Quorum,
    choose,
    first_step,
    guc_quorum,
    quorum_step,
    quorum_transition_safe,
)
from hakeeper.pg.postgres import ReplicaInfo
from tests.support.builders import MB, primary, replica, view


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


# -- quorum mode: the safety test, the planner -------------------------------------------------


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


@given(names=st.lists(st.sampled_from(NAMES5), unique=True), quorum=st.integers(-1, 7))
def test_guc_quorum_clamps_k_to_the_names(names: list[str], quorum: int) -> None:
    k = guc_quorum(names, quorum)
    assert k == (quorum if 1 <= quorum <= len(names) else len(names))
    assert Quorum.of(names, k).k == (k if names else 0)


# -- synchronous mode (FIRST): first_step ----------------------------------------------------------------


def rep(name: str, sync_state: str = "sync", flush: int | None = None) -> ReplicaInfo:
    """A pg_stat_replication row as the probe reports it."""
    return ReplicaInfo(name, "streaming", sync_state, None, None, flush, None, None)


@dataclass(frozen=True, slots=True)
class FirstCase:
    name: str
    key: tuple[str, ...]
    names: tuple[str, ...]
    pending: tuple[str, int] | None
    healthy: tuple[str, ...]
    rows: tuple[ReplicaInfo, ...]
    node_count: int
    expected: FirstStep


FIRST_CASES = [
    FirstCase(
        "a key member turned unhealthy: the key first, then the GUC",
        key=("b", "c"),
        names=("b", "c"),
        pending=None,
        healthy=("c",),
        rows=(),
        node_count=2,
        expected=FirstStep(
            key=("c",),
            names=("c",),
            event="sync_standby_removed",
            level="warning",
            facts={"standbys": ["b"], "sync_set": ["c"]},
        ),
    ),
    FirstCase(
        "every key member unhealthy: an empty key, the GUC keeps only the others",
        key=("b",),
        names=("b", "d"),
        pending=("d", 5),
        healthy=(),
        rows=(),
        node_count=1,
        expected=FirstStep(
            key=(),
            names=("d",),
            event="sync_standby_removed",
            level="warning",
            facts={"standbys": ["b"], "sync_set": []},
        ),
    ),
    FirstCase(
        "a joining standby turned unhealthy: dropped from the GUC only, the join forgotten",
        key=("b",),
        names=("b", "c"),
        pending=("c", 100),
        healthy=("b",),
        rows=(),
        node_count=2,
        expected=FirstStep(names=("b",), clear_pending=True),
    ),
    FirstCase(
        "the set is full: the GUC lists exactly the key",
        key=("b",),
        names=("b", "c"),
        pending=("c", 5),
        healthy=("b", "c"),
        rows=(),
        node_count=1,
        expected=FirstStep(names=("b",)),
    ),
    FirstCase(
        "a joining standby acknowledges and has flushed past its mark: it enters the key",
        key=("b",),
        names=("b", "c"),
        pending=("c", 100),
        healthy=("b", "c"),
        rows=(rep("b"), rep("c", flush=100)),
        node_count=2,
        expected=FirstStep(
            key=("b", "c"),
            clear_pending=True,
            event="sync_standby_added",
            facts={"standby": "c", "sync_set": ["b", "c"]},
        ),
    ),
    FirstCase(
        "a joining standby not yet synchronous: wait",
        key=("b",),
        names=("b", "c"),
        pending=("c", 100),
        healthy=("b", "c"),
        rows=(rep("c", "potential", flush=200),),
        node_count=2,
        expected=FirstStep(),
    ),
    FirstCase(
        "a joining standby not flushed to its mark: wait",
        key=("b",),
        names=("b", "c"),
        pending=("c", 100),
        healthy=("b", "c"),
        rows=(rep("c", flush=99),),
        node_count=2,
        expected=FirstStep(),
    ),
    FirstCase(
        "a joining standby without a replication row: wait",
        key=(),
        names=("c",),
        pending=("c", 100),
        healthy=("c",),
        rows=(rep("d", flush=500),),
        node_count=1,
        expected=FirstStep(),
    ),
    FirstCase(
        "no healthy standby outside the key: the GUC lists the key, the join forgotten",
        key=("b",),
        names=("b",),
        pending=("x", 5),
        healthy=("b",),
        rows=(),
        node_count=2,
        expected=FirstStep(names=("b",), clear_pending=True),
    ),
    FirstCase(
        "a short set: the best healthy standby joins, the GUC first",
        key=(),
        names=(),
        pending=None,
        healthy=("d", "c"),
        rows=(),
        node_count=1,
        expected=FirstStep(names=("d",), join="d", event="sync_standby_joining", facts={"standby": "d"}),
    ),
    FirstCase(
        "a pending join whose standby is no longer in the GUC starts over",
        key=("b",),
        names=("b",),
        pending=("c", 100),
        healthy=("b", "c"),
        rows=(rep("c", flush=500),),
        node_count=2,
        expected=FirstStep(names=("b", "c"), join="c", event="sync_standby_joining", facts={"standby": "c"}),
    ),
]


@pytest.mark.parametrize("case", FIRST_CASES, ids=[c.name for c in FIRST_CASES])
def test_first_step(case: FirstCase) -> None:
    step = first_step(case.key, case.names, case.pending, case.healthy, case.rows, case.node_count)
    assert step == case.expected


@dataclass
class FirstShell:
    """The I/O half of FIRST mode as a model: applies steps the way manage_sync does."""

    key: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    pending: tuple[str, int] | None = None

    def apply(self, step: FirstStep, rows: list[ReplicaInfo], write_ok: bool, lsn: int | None) -> None:
        if step.key is not None:
            # The FIRST invariant: the key only names standbys that acknowledge every commit,
            # i.e. that the GUC lists at the moment the key is written ...
            assert set(step.key) <= set(self.names), (step, self)
            # ... and a standby enters it only once it is synchronous and has flushed past the
            # WAL position read after the GUC named it.
            for joined in set(step.key) - set(self.key):
                assert self.pending is not None and joined == self.pending[0]
                row = next(r for r in rows if r.application_name == joined)
                assert row.sync_state == "sync" and (row.flush_lsn or 0) >= self.pending[1]
            if not write_ok:
                return
            self.key = step.key
        if step.names is not None:
            self.names = step.names
        if step.clear_pending:
            self.pending = None
        if step.join is not None:
            assert step.join in self.names and step.join not in self.key
            if lsn is None:
                return
            self.pending = (step.join, lsn)
        assert set(self.key) <= set(self.names)


SYNC_STATES = ["sync", "potential", "async"]
CYCLE = st.tuples(
    st.lists(st.sampled_from(NAMES5[1:]), unique=True),  # healthy standbys, best first
    # replication rows: sync_state, flush_lsn
    st.dictionaries(st.sampled_from(NAMES5[1:]), st.tuples(st.sampled_from(SYNC_STATES), st.integers(0, 9))),
    st.booleans(),  # the key write succeeds
    st.one_of(st.none(), st.integers(0, 9)),  # the WAL position after a reload
)


@given(node_count=st.integers(1, 3), cycles=st.lists(CYCLE, max_size=25))
def test_first_steps_never_put_a_standby_in_the_key_that_the_guc_does_not_list(
    node_count: int, cycles: list[tuple[list[str], dict[str, tuple[str, int]], bool, int | None]]
) -> None:
    shell = FirstShell()  # a new term: empty key, and nothing in the GUC yet
    for healthy, states, write_ok, lsn in cycles:
        rows = [rep(n, s, flush) for n, (s, flush) in states.items()]
        step = first_step(shell.key, shell.names, shell.pending, healthy, rows, node_count)
        shell.apply(step, rows, write_ok, lsn)
        assert len(shell.key) <= node_count


@settings(max_examples=500)
@given(
    key=st.lists(st.sampled_from(NAMES5[1:]), unique=True, max_size=3),
    extra=st.lists(st.sampled_from(NAMES5[1:]), unique=True, max_size=3),
    pending=st.one_of(st.none(), st.tuples(st.sampled_from(NAMES5[1:]), st.integers(0, 9))),
    others_healthy=st.lists(st.sampled_from(NAMES5[1:]), unique=True, max_size=3),
    key_healthy=st.booleans(),
    extra_healthy=st.booleans(),
    pending_row=st.one_of(st.none(), st.tuples(st.sampled_from(SYNC_STATES), st.integers(0, 9))),
    write_ok=st.booleans(),
    lsn=st.one_of(st.none(), st.integers(0, 9)),
    node_count=st.integers(1, 4),
)
def test_any_first_step_from_a_valid_state_keeps_the_key_inside_the_guc(
    key: list[str],
    extra: list[str],
    pending: tuple[str, int] | None,
    others_healthy: list[str],
    key_healthy: bool,
    extra_healthy: bool,
    pending_row: tuple[str, int] | None,
    write_ok: bool,
    lsn: int | None,
    node_count: int,
) -> None:
    names = (*key, *(n for n in extra if n not in key))  # the invariant holds before the step
    # Often a healthy GUC, so that the later branches (joins) are reached too.
    healthy = list(key if key_healthy else key[1:])
    healthy += [n for n in (*(names if extra_healthy else ()), *others_healthy) if n not in healthy]
    rows = [rep(n) for n in healthy]
    if pending is not None and pending_row is not None:
        rows = [r for r in rows if r.application_name != pending[0]] + [rep(pending[0], *pending_row)]
    shell = FirstShell(tuple(key), names, pending)
    step = first_step(shell.key, shell.names, pending, healthy, rows, node_count)
    shell.apply(step, rows, write_ok, lsn)
