"""hakeeper.ha.actions.bootstrap over FakeEtcd + FakePostgres: the initialize race."""

from __future__ import annotations

import asyncio

import pytest

from hakeeper.ha.actions import bootstrap
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision
from hakeeper.pg.errors import PgError
from tests.support.sim import Sim, capture_events

INITIALIZE = Decision(Action.INITIALIZE, "cluster not initialized")


async def test_initialize_race_has_one_winner_and_the_loser_removes_its_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = Sim(monkeypatch, names=("a", "b"))
    await sim.pass_time(1)  # both agents hold a lease
    a, b = sim["a"], sim["b"]
    seen = [await n.observe() for n in (a, b)]
    assert [decide(view, facts).action for view, facts in seen] == [Action.INITIALIZE] * 2

    events = capture_events(monkeypatch, bootstrap)
    # both decided on an empty cluster; their initializations interleave at every etcd call
    await asyncio.gather(*(bootstrap.initialize(n.ctx, *seen[i], INITIALIZE) for i, n in enumerate((a, b))))

    stored = await sim.read_view()
    winner, loser = (a, b) if stored.leader is not None and stored.leader.name == "a" else (b, a)
    assert stored.leader is not None and stored.leader.name == winner.name
    assert stored.leader.lease == winner.node.lease.lease
    assert stored.initialized == winner.pg.system_id == winner.node.state.system_identifier
    assert winner.pg.writable and winner.pg.roles_created and winner.fence.armed
    assert [(h.reason, h.new_leader, h.timeline) for h in stored.history] == [("bootstrap", winner.name, 1)]
    outcomes = sorted(e["event"] for e in events if e["event"].startswith("initialize_"))
    assert outcomes == ["initialize_lost", "initialize_won"], "both ran initdb and raced for the keys"
    assert not loser.pg.is_initialized() and not loser.pg.running
    assert loser.node.state.system_identifier is None and not loser.fence.armed


async def test_initialize_without_a_lease_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim(monkeypatch, names=("a",))
    await sim.pass_time(1)
    a = sim["a"]
    view, facts = await a.observe()
    events = capture_events(monkeypatch, bootstrap)
    a.link.cut = True

    await bootstrap.initialize(a.ctx, view, facts, INITIALIZE)

    assert [e["event"] for e in events] == ["initialize_refused"]
    assert not a.pg.is_initialized()
    a.link.cut = False
    stored = await sim.read_view()
    assert stored.initialized is None and stored.leader is None


async def test_a_failed_initdb_leaves_no_data_directory_and_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim(monkeypatch, names=("a",))
    await sim.pass_time(1)
    a = sim["a"]
    a.pg.failing.add("initdb")
    view, facts = await a.observe()

    with pytest.raises(PgError, match="initdb fails"):
        await bootstrap.initialize(a.ctx, view, facts, INITIALIZE)

    assert not a.pg.is_initialized()
    stored = await sim.read_view()
    assert stored.initialized is None and stored.leader is None
    a.pg.failing.clear()
    await sim.run(2)  # the next cycles try again
    assert (await sim.read_view()).initialized == a.pg.system_id is not None
