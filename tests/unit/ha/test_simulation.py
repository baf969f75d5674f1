"""Three real agents (HaLoop, WriteGuard, LeaseKeeper, SyncManager, PgConfigurator, wired by
hakeeper.node.Node) on one FakeEtcd and one World of FakePostgres, stepped on a virtual clock
(tests/support/sim.py).  After every fence tick and every HA cycle the simulation checks that at
most one PostgreSQL is writable (I1); the scenarios add their own invariants."""

from __future__ import annotations

import itertools
import random

import pytest

from hakeeper.core.config import DynamicConfig
from tests.support.sim import Sim

DYN = DynamicConfig()
TTL = DYN.ttl


def other_replica(sim: Sim, *gone: str) -> str:
    (name,) = set(sim.nodes) - set(gone)
    return name


@pytest.mark.parametrize("order", list(itertools.permutations("abc")), ids="".join)
async def test_bootstrap_one_node_initializes_and_the_others_clone_and_follow(
    monkeypatch: pytest.MonkeyPatch, order: tuple[str, ...]
) -> None:
    sim = Sim(monkeypatch)
    await sim.run(5, order=order)

    first = order[0]
    assert sim.world.initdbs == [first], "only the first to act initializes"
    assert await sim.leader() == first and sim.converged(first)
    stored = await sim.read_view()
    assert {pg.system_id for pg in sim.world.servers.values()} == {stored.initialized}
    assert [(h.reason, h.new_leader) for h in stored.history] == [("bootstrap", first)]
    assert sim.world.promotions == []


async def test_leader_host_dies_exactly_one_replica_is_promoted_and_the_other_follows(cluster: Sim) -> None:
    sim = cluster
    sim.kill("a")
    promoted_after: int | None = None
    for step in range(1, TTL + 12):
        await sim.step()
        if sim.world.promotions and promoted_after is None:
            promoted_after = step

    assert promoted_after is not None and promoted_after <= TTL + 3, "within ttl + a few steps"
    assert len(sim.world.promotions) == 1, sim.world.promotions
    new, timeline = sim.world.promotions[0]
    assert timeline == 2 and await sim.leader() == new
    assert sim.converged(new), "the other replica streams from the new leader"
    stored = await sim.read_view()
    follower = other_replica(sim, "a", new)
    assert stored.members[follower].streaming_from == sim[new].pg.address
    assert [(h.old_leader, h.new_leader, h.timeline) for h in stored.history][1:] == [("a", new, 2)]


async def test_replicas_campaigning_on_the_same_view_promote_only_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = Sim(monkeypatch, dcs={"candidate_grace": 0.0})  # the second best campaigns at once too
    assert await sim.bootstrap() == "a"
    sim.kill("a")
    for _ in range(TTL + 16):  # time enough for a loser that was ahead to notice and rewind
        await sim.step(lagging=("b", "c"))  # both act on the view etcd held when the step began

    assert len(sim.world.promotions) == 1, sim.world.promotions
    new = sim.world.promotions[0][0]
    assert await sim.leader() == new and sim.converged(new)
    assert {sim[n].pg.timeline for n in ("b", "c")} == {2}


@pytest.mark.parametrize("silent_watch", [False, True], ids=["mirror fails", "watch silent"])
async def test_leader_cut_off_from_etcd_stops_writing_by_its_fence_deadline(
    cluster: Sim, silent_watch: bool
) -> None:
    sim = cluster
    a = sim["a"]
    a.silent_watch = silent_watch
    a.link.cut = True  # its keepalives fail from now on; PostgreSQL runs on
    lease = a.node.lease
    deadline = lease.last_ok + lease.ttl - lease.margin  # I2: last keepalive sent + ttl - margin
    assert a.pg.writable and sim.clock.t < deadline

    def fenced_by_its_deadline(sim: Sim) -> None:
        assert not (a.pg.writable and sim.clock.t >= deadline), (
            f"a writable at t={sim.clock.t:.1f}, past its fence deadline {deadline:.1f}"
        )

    sim.invariants.append(fenced_by_its_deadline)
    for _ in range(TTL + 6):
        await sim.step()

    assert len(sim.world.promotions) == 1, sim.world.promotions
    new = sim.world.promotions[0][0]
    a_last_writable = max(t for t, writable in sim.writable_seen if "a" in writable)
    new_first_writable = min(t for t, writable in sim.writable_seen if new in writable)
    assert a_last_writable < deadline <= new_first_writable

    a.link.cut = False  # the partition heals: a rewinds and follows the new leader
    for _ in range(20):
        await sim.step()
        if sim.converged(new):
            break
    assert sim.converged(new) and len(sim.world.promotions) == 1
    assert a.pg.timeline == 2 and a.pg.upstream_primary() is sim[new].pg


@pytest.mark.parametrize("seed", range(40))
async def test_random_orders_timing_lag_and_victims_keep_one_writer_and_one_promotion(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    grace = rng.choice([0.0, DYN.candidate_grace])  # 0: every replica campaigns at once
    sim = Sim(monkeypatch, dcs={"candidate_grace": grace})
    names = sorted(sim.nodes)

    async def step() -> None:
        seconds = round(1.0 + rng.uniform(0.0, 0.5), 3)
        lagging = [n for n in names if rng.random() < 0.5]  # their watch delivers late this step
        await sim.step(seconds, order=rng.sample(names, len(names)), lagging=lagging)

    leader = None
    for _ in range(15):
        await step()
        leader = await sim.leader()
        if leader is not None and sim.converged(leader):
            break
    assert leader is not None and sim.converged(leader), f"seed {seed}: no steady cluster"
    stored = await sim.read_view()
    assert [h.reason for h in stored.history] == ["bootstrap"], "one initialize race won"
    assert {pg.system_id for pg in sim.world.servers.values()} == {stored.initialized}
    for _ in range(rng.randrange(3)):
        await step()

    victim = rng.choice(names)
    sim.kill(victim)
    promoted_after: int | None = None
    for i in range(1, TTL + 25):
        await step()
        if sim.world.promotions and promoted_after is None:
            promoted_after = i

    if victim == leader:
        assert len(sim.world.promotions) == 1, f"seed {seed}: {sim.world.promotions}"
        assert promoted_after is not None and promoted_after <= TTL + 3, f"seed {seed}: late"
    else:
        assert sim.world.promotions == [], f"seed {seed}: a replica died, yet {sim.world.promotions}"
    new = await sim.leader()
    assert new is not None and new != victim and sim.converged(new), f"seed {seed}: not converged"
