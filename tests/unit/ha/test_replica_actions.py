"""hakeeper.ha.actions.replica over FakeEtcd + FakePostgres: demote, follow, rewind, clone."""

from __future__ import annotations

import contextlib

import pytest

from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.ha.actions import replica
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision
from hakeeper.pg.errors import PgError
from tests.support.sim import Sim, SimNode
from tests.unit.ha.conftest import steady_cluster


async def move_leadership_to_b(sim: Sim) -> None:
    """b takes the leader key and promotes (as after a failover) while a's PostgreSQL still runs
    read-write (as behind a partition, before its fence fired)."""
    b = sim["b"]
    assert b.pg.upstream_primary() is sim["a"].pg  # b has all of a's WAL so far
    await sim.etcd.delete(sim.keys.leader)
    assert await b.node.store.take_leader("b", b.node.lease.lease) is not None
    await b.pg.promote()
    await b.pg.ensure_slots({"a", "c"})
    await b.observe()  # b publishes itself as the running primary


async def test_demote_stops_postgres_and_marks_needs_rewind(cluster: Sim) -> None:
    a = cluster["a"]
    await move_leadership_to_b(cluster)
    view, facts = await a.observe()
    assert decide(view, facts).action == Action.DEMOTE

    await replica.demote(a.ctx, view, facts, Decision(Action.DEMOTE, "b holds the leader key"))

    assert not a.pg.running
    assert a.pg.cluster_state == "in production", "stopped immediately: no shutdown checkpoint"
    assert a.node.state.needs_rewind and not a.fence.armed
    assert a.ctx.wake.is_set(), "the next cycle (a rewind) runs at once"


async def test_follow_rewrites_the_config_only_when_the_upstream_changed(cluster: Sim) -> None:
    c = cluster["c"]
    view, facts = await c.observe()
    writes = c.pg.config_writes

    await replica.follow(c.ctx, view, facts, Decision(Action.FOLLOW, "following a", target="a"))

    assert c.pg.config_writes == writes, "same upstream: the files are not touched"
    assert c.pg.upstream_primary() is cluster["a"].pg

    await move_leadership_to_b(cluster)
    view, facts = await c.observe()
    await replica.follow(c.ctx, view, facts, Decision(Action.FOLLOW, "following b", target="b"))

    b = cluster["b"].pg
    assert c.pg.config_writes == writes + 1
    assert c.pg.role == Role.REPLICA and c.pg.upstream == Upstream(b.host, b.port, "c")
    assert c.pg.active_upstream == c.pg.upstream, "reloaded"
    assert c.pg.upstream_primary() is b and c.pg.timeline == 2


async def diverged_old_primary(sim: Sim) -> None:
    """a wrote WAL that b never received, then was demoted: it must rewind before following b."""
    a = sim["a"]
    await move_leadership_to_b(sim)
    a.pg.write(4096)
    view, facts = await a.observe()
    await replica.demote(a.ctx, view, facts, Decision(Action.DEMOTE, "b holds the leader key"))


async def test_rewind_brings_a_diverged_primary_back_as_a_replica_of_the_leader(cluster: Sim) -> None:
    a, b = cluster["a"], cluster["b"]
    await diverged_old_primary(cluster)
    view, facts = await a.observe()
    assert decide(view, facts) == Decision(
        Action.REWIND, "our data may have diverged from the leader", target="b"
    )

    await replica.rewind(a.ctx, view, facts, Decision(Action.REWIND, "diverged", target="b"))

    assert a.pg.running and a.pg.in_recovery and not a.node.state.needs_rewind
    assert a.pg.upstream_primary() is b.pg and a.pg.timeline == 2


@pytest.mark.parametrize("remove", [False, True], ids=["kept for an operator", "removed to re-clone"])
async def test_rewind_failure_keeps_the_data_directory_unless_configured_to_remove_it(
    monkeypatch: pytest.MonkeyPatch, remove: bool
) -> None:
    sim = await steady_cluster(monkeypatch, postgresql={"remove_data_directory_on_rewind_failure": remove})
    a = sim["a"]
    await diverged_old_primary(sim)
    system_id = a.pg.system_id
    a.pg.failing.add("rewind")
    view, facts = await a.observe()

    await replica.rewind(a.ctx, view, facts, Decision(Action.REWIND, "diverged", target="b"))

    assert not a.pg.running
    if remove:
        assert not a.pg.is_initialized() and a.node.state.system_identifier is None
        assert not a.node.state.needs_rewind, "the next cycle clones afresh"
        assert [sid for _, sid in a.pg.moved_aside] == [system_id], "moved aside, not deleted"
        assert a.node.state.held is None
    else:
        assert a.pg.is_initialized() and a.pg.system_id == system_id
        assert a.node.state.needs_rewind, "still diverged: never started as it is"
        assert a.pg.moved_aside == []
        held = a.node.state.held
        assert held is not None and "pg_rewind from b failed" in held and "hakeeper reinit a" in held
        # not retried every cycle: the node stays down until an operator acts
        a.pg.failing.discard("rewind")
        view, facts = await a.observe()
        await replica.rewind(a.ctx, view, facts, Decision(Action.REWIND, "diverged", target="b"))
        assert not a.pg.running and a.pg.system_id == system_id and a.node.state.held == held
        # and 'hakeeper list' shows why (the published member's ineligible_reason)
        record = await a.node.loop.publish_member(view)
        assert record is not None and not record.eligible and record.ineligible_reason == held


async def test_clone_retries_until_the_leader_has_our_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = await steady_cluster(monkeypatch)
    c = sim["c"]
    await c.pg.stop("fast")
    c.pg.remove_data_dir()
    sim["a"].pg.slots.discard("c")
    view, facts = await c.observe()
    assert decide(view, facts) == Decision(Action.CLONE, "empty data directory", target="a")

    await replica.clone(c.ctx, view, facts, Decision(Action.CLONE, "empty", target="a"))

    assert not c.pg.is_initialized(), "pg_basebackup refused: no slot on the leader yet"
    await sim.step()  # a's LEAD cycle recreates the slot for its member c; c clones
    await sim.step()
    assert c.pg.upstream_primary() is sim["a"].pg
    assert c.pg.system_id == sim["a"].pg.system_id


def record_disarms(monkeypatch: pytest.MonkeyPatch, node: SimNode) -> list[bool]:
    """Whether PostgreSQL still ran at each disarm of ``node``'s fence."""
    running_at_disarm: list[bool] = []
    disarm = node.fence.disarm

    def recording() -> None:
        running_at_disarm.append(node.pg.running)
        disarm()

    monkeypatch.setattr(node.fence, "disarm", recording)
    return running_at_disarm


async def test_rewind_disarms_the_fence_only_after_postgres_stopped(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster["a"]
    await move_leadership_to_b(cluster)  # a still runs read-write, its fence armed
    assert a.pg.writable and a.fence.armed
    running_at_disarm = record_disarms(monkeypatch, a)
    view, facts = await a.observe()

    await replica.rewind(a.ctx, view, facts, Decision(Action.REWIND, "diverged", target="b"))

    assert running_at_disarm and not any(running_at_disarm), "disarmed while postgres still ran"
    assert a.pg.running and a.pg.in_recovery and not a.fence.armed


async def test_rewind_keeps_the_fence_armed_when_postgres_does_not_stop(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = cluster["a"]
    await move_leadership_to_b(cluster)
    view, facts = await a.observe()

    async def stuck(*args: object, **kw: object) -> None:
        raise PgError("pg_ctl stop timed out")

    monkeypatch.setattr(a.pg, "stop", stuck)
    # a failed stop counts as a failed rewind; whether that raises depends on
    # remove_data_directory_on_rewind_failure (its immediate stop fails too): not the point here
    with contextlib.suppress(PgError):
        await replica.rewind(a.ctx, view, facts, Decision(Action.REWIND, "diverged", target="b"))

    assert a.pg.writable and a.fence.armed, "the fence must still stop a primary that did not stop"
    assert a.pg.is_initialized()
