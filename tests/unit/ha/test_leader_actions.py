"""hakeeper.ha.actions.leader over FakeEtcd + FakePostgres: campaign, takeover, release, restart."""

from __future__ import annotations

import pytest

from hakeeper.ha import guard as guard_module
from hakeeper.ha.actions import leader
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision
from hakeeper.pg.errors import PgError
from tests.support.sim import Sim, capture_events
from tests.unit.ha.test_replica_actions import record_disarms

CAMPAIGN = Decision(Action.CAMPAIGN, "no leader and we are the best candidate")


async def leaderless(sim: Sim) -> None:
    """The leader's host dies once b and c have all its WAL (so b, first by name, is the best
    candidate), and its lease expires: b and c run as replicas with no leader key."""
    for name in ("b", "c"):
        assert sim[name].pg.upstream_primary() is sim["a"].pg
    sim.kill("a")
    await sim.pass_time(sim["a"].node.cfg.bootstrap.dcs.ttl + 1)
    assert await sim.leader() is None


async def test_campaign_takes_the_leader_key_once_and_promotes(cluster: Sim) -> None:
    await leaderless(cluster)
    b = cluster["b"]
    view, facts = await b.observe()
    assert decide(view, facts).action == Action.CAMPAIGN

    await leader.campaign(b.ctx, view, facts, CAMPAIGN)

    kv = await cluster.etcd.get(cluster.keys.leader)
    assert kv is not None and kv.value == b"b"
    assert kv.lease == b.node.lease.lease and kv.version == 1, "created once, on b's lease"
    assert cluster.world.promotions == [("b", 2)]
    assert b.pg.writable and b.fence.armed
    stored = await cluster.read_view()
    last = stored.history[-1]
    assert (last.timeline, last.old_leader, last.new_leader) == (2, "a", "b")
    assert last.lsn == b.pg.history[-1].start_lsn, "the switch point read from the timeline history"
    assert stored.status.term == kv.create_revision and stored.status.timeline == 2


async def test_a_lost_campaign_touches_nothing(cluster: Sim) -> None:
    await leaderless(cluster)
    b, c = cluster["b"], cluster["c"]
    view_b, facts_b = await b.observe()
    view_c, facts_c = await c.observe()  # c decided on the same leaderless view
    await leader.campaign(b.ctx, view_b, facts_b, CAMPAIGN)
    before = (c.pg.config_writes, c.pg.upstream, c.pg.timeline, c.pg.in_recovery)

    await leader.campaign(c.ctx, view_c, facts_c, CAMPAIGN)

    kv = await cluster.etcd.get(cluster.keys.leader)
    assert kv is not None and kv.value == b"b" and kv.version == 1
    assert cluster.world.promotions == [("b", 2)]
    assert (c.pg.config_writes, c.pg.upstream, c.pg.timeline, c.pg.in_recovery) == before
    assert c.pg.running and not c.fence.armed


async def test_campaign_without_a_fresh_lease_refuses_and_does_nothing(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    await leaderless(cluster)
    b = cluster["b"]
    view, facts = await b.observe()
    events = capture_events(monkeypatch, guard_module)
    b.link.cut = True  # the keepalive that must precede going read-write fails

    await leader.campaign(b.ctx, view, facts, CAMPAIGN)

    assert [e["event"] for e in events] == ["read_write_refused"]
    assert await cluster.leader() is None
    assert cluster.world.promotions == []
    assert b.pg.running and b.pg.in_recovery and not b.fence.armed


async def test_promote_makes_the_key_holder_writable(cluster: Sim) -> None:
    await leaderless(cluster)
    b = cluster["b"]
    assert await b.node.store.take_leader("b", b.node.lease.lease) is not None
    view, facts = await b.observe()
    assert decide(view, facts).action == Action.PROMOTE

    await leader.promote(b.ctx, view, facts, Decision(Action.PROMOTE, "we hold the key"))

    assert b.pg.writable and b.fence.armed
    assert cluster.world.promotions == [("b", 2)]
    assert (await cluster.read_view()).history[-1].new_leader == "b"


async def test_takeover_reattaches_our_key_under_its_term_after_an_agent_restart(cluster: Sim) -> None:
    before = await cluster.etcd.get(cluster.keys.leader)
    assert before is not None
    a = await cluster.restart_agent("a")  # postgres keeps running; the key lives on the old lease
    await a.node.lease.renew()
    view, facts = await a.observe()
    assert decide(view, facts).action == Action.TAKEOVER

    await leader.takeover(a.ctx, view, facts, Decision(Action.TAKEOVER, "key under an earlier lease"))

    after = await cluster.etcd.get(cluster.keys.leader)
    assert after is not None and after.value == b"a"
    assert after.lease == a.node.lease.lease != before.lease
    assert after.create_revision == before.create_revision, "same term"
    assert a.fence.armed, "postgres is writable: the fence follows the new lease"


@pytest.mark.parametrize("successor", ["b", "a"], ids=["another member", "ourselves, in a later term"])
async def test_takeover_never_touches_a_key_of_another_term(cluster: Sim, successor: str) -> None:
    a = await cluster.restart_agent("a")
    await a.node.lease.renew()
    view, facts = await a.observe()  # names a under the old term
    await cluster.etcd.delete(cluster.keys.leader)
    holder = cluster[successor].node.lease
    term = await cluster[successor].node.store.take_leader(successor, holder.lease)
    assert term is not None

    await leader.takeover(a.ctx, view, facts, Decision(Action.TAKEOVER, "key under an earlier lease"))

    kv = await cluster.etcd.get(cluster.keys.leader)
    assert kv is not None
    assert (kv.value.decode(), kv.create_revision, kv.lease) == (successor, term, holder.lease)
    assert not a.fence.armed


async def test_release_stops_postgres_before_deleting_the_key(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster["a"]
    view, facts = await a.observe()
    running_when_key_gone: list[bool] = []
    txn = a.link.txn

    async def watching_txn(*args: object, **kw: object) -> object:
        result = await txn(*args, **kw)  # type: ignore[arg-type]
        if await cluster.leader() is None and not running_when_key_gone:
            running_when_key_gone.append(a.pg.running)
        return result

    monkeypatch.setattr(a.link, "txn", watching_txn)

    await leader.release(a.ctx, view, facts, Decision(Action.RELEASE, "cannot run a primary"))

    assert running_when_key_gone == [False], "the key went only after postgres had stopped"
    assert not a.pg.running and not a.fence.armed
    assert await cluster.leader() is None


async def test_release_never_deletes_a_successors_key(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    view, facts = await a.observe()  # a leads in this view
    await cluster.etcd.delete(cluster.keys.leader)
    assert await b.node.store.take_leader("b", b.node.lease.lease) is not None

    await leader.release(a.ctx, view, facts, Decision(Action.RELEASE, "cannot run a primary"))

    assert await cluster.leader() == "b"
    assert not a.pg.running


async def test_start_primary_refuses_without_a_fresh_lease(cluster: Sim) -> None:
    a = cluster["a"]
    a.pg.crash()
    view, facts = await a.observe()
    assert decide(view, facts).action == Action.START_PRIMARY
    a.link.cut = True

    await leader.start_primary(a.ctx, view, facts, Decision(Action.START_PRIMARY, "down on the leader"))

    assert not a.pg.running

    a.link.cut = False
    await leader.start_primary(a.ctx, view, facts, Decision(Action.START_PRIMARY, "down on the leader"))

    assert a.pg.writable and a.fence.armed


async def test_lead_never_drops_a_slot_hakeeper_did_not_make(cluster: Sim) -> None:
    a = cluster["a"]
    a.pg.slots.add("user_tool")  # e.g. made by a user for an external WAL receiver
    a.node.state.slot_seen["gone"] = -1e9  # a member a saw long ago: its slot expired
    a.pg.slots.add("gone")
    view, facts = await a.observe()

    await leader.lead(a.ctx, view, facts, Decision(Action.LEAD, "we hold the leader key"))

    assert "user_tool" in a.pg.slots, "not ours: never dropped"
    assert "gone" not in a.pg.slots, "ours, past member_slots_ttl: dropped"
    assert {"b", "c"} <= a.pg.slots


async def test_release_disarms_the_fence_only_after_postgres_stopped(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster["a"]
    assert a.pg.writable and a.fence.armed
    running_at_disarm = record_disarms(monkeypatch, a)
    view, facts = await a.observe()

    await leader.release(a.ctx, view, facts, Decision(Action.RELEASE, "cannot run a primary"))

    assert running_at_disarm == [False], "disarmed while postgres still ran"


async def test_release_keeps_the_fence_armed_and_the_key_when_postgres_does_not_stop(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster["a"]
    view, facts = await a.observe()

    async def stuck(*args: object, **kw: object) -> None:
        raise PgError("pg_ctl stop timed out")

    monkeypatch.setattr(a.pg, "stop", stuck)
    with pytest.raises(PgError):
        await leader.release(a.ctx, view, facts, Decision(Action.RELEASE, "cannot run a primary"))

    assert a.pg.writable and a.fence.armed, "the fence must still stop a primary that did not stop"
    assert await cluster.leader() == "a", "nobody may be elected while we still accept writes"
