"""hakeeper.ha.actions.handover over FakeEtcd + FakePostgres: switchover and request rejection."""

from __future__ import annotations

import time

from hakeeper.core.cluster import Switchover, SwitchoverKind, SwitchoverStage
from hakeeper.ha.actions import handover
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision
from tests.support.sim import Sim


async def request(sim: Sim, candidate: str | None, *, force: bool = False) -> Switchover:
    sw = Switchover(
        SwitchoverKind.SWITCHOVER, leader="a", candidate=candidate, requested_at=time.time(), force=force
    )
    stored = await sim["a"].node.store.write_request(None, sw)
    assert stored is not None
    return stored


async def test_switchover_hands_the_key_to_a_caught_up_candidate(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    await request(cluster, "b")
    view, facts = await a.observe()
    d = decide(view, facts)
    assert (d.action, d.target) == (Action.SWITCHOVER, "b")
    term = view.leader.term if view.leader else None

    await handover.switchover(a.ctx, view, facts, d)

    stored = await cluster.read_view()
    assert stored.leader is None, "released to the candidate"
    assert stored.switchover is not None
    assert (stored.switchover.stage, stored.switchover.candidate) == (SwitchoverStage.HANDOVER, "b")
    assert not a.fence.armed and not a.node.state.needs_rewind
    assert a.pg.running and a.pg.in_recovery and a.pg.upstream is not None
    assert a.pg.upstream.port == b.pg.port
    assert b.pg.lsn > a.pg.checkpoint_lsn, "b received a's shutdown checkpoint"

    await cluster.run(2)  # b campaigns (it alone may), promotes; a follows without a rewind

    assert await cluster.leader() == "b" and cluster.world.promotions == [("b", 2)]
    new = await cluster.read_view()
    assert new.leader is not None and new.leader.term != term and new.switchover is None
    assert a.pg.upstream_primary() is b.pg and cluster["c"].pg.upstream_primary() is b.pg


async def test_switchover_aborts_without_force_when_the_candidate_did_not_catch_up(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    await request(cluster, "b")
    b.pg.receiving = False  # b's WAL receiver lost its connection to a
    a.pg.write(8192)
    view, facts = await a.observe()
    d = decide(view, facts)
    assert (d.action, d.target) == (Action.SWITCHOVER, "b")

    await handover.switchover(a.ctx, view, facts, d)

    stored = await cluster.read_view()
    assert stored.switchover is None, "the request is dropped"
    assert stored.leader is not None and stored.leader.name == "a"
    assert view.leader is not None and stored.leader.term == view.leader.term, "same term"
    assert not a.pg.running and not b.pg.writable and cluster.world.promotions == []

    await cluster.step()  # a still leads: it restarts its primary in place

    assert cluster.world.writable() == ["a"]


async def test_forced_switchover_hands_over_to_a_lagging_candidate_and_rewinds_later(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    await request(cluster, "b", force=True)
    b.pg.receiving = False
    a.pg.write(8192)
    view, facts = await a.observe()
    d = decide(view, facts)

    await handover.switchover(a.ctx, view, facts, d)

    stored = await cluster.read_view()
    assert stored.leader is None and stored.switchover is not None
    assert stored.switchover.stage == SwitchoverStage.HANDOVER
    assert a.node.state.needs_rewind, "a has WAL the candidate never received"


async def test_reject_switchover_deletes_the_request_under_our_term(cluster: Sim) -> None:
    a = cluster["a"]
    await request(cluster, "nobody")
    view, facts = await a.observe()
    d = decide(view, facts)
    assert d.action == Action.REJECT_SWITCHOVER and "not a member" in d.why

    await handover.reject_switchover(a.ctx, view, facts, d)

    assert (await cluster.read_view()).switchover is None


async def test_reject_switchover_keeps_the_request_once_our_term_is_over(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    sw = await request(cluster, "nobody")
    view, facts = await a.observe()  # a leads in this view
    await cluster.etcd.delete(cluster.keys.leader)
    assert await b.node.store.take_leader("b", b.node.lease.lease) is not None

    await handover.reject_switchover(a.ctx, view, facts, Decision(Action.REJECT_SWITCHOVER, "stale"))

    kept = (await cluster.read_view()).switchover
    assert kept is not None and kept.mod_revision == sw.mod_revision
