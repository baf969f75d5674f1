"""POST /reinitialize (Operator.reinitialize) over FakeEtcd + FakePostgres: it decides on a fresh
read of etcd and on the local server's own answer, never on the cached view alone; it runs in
the background and reports how it went (running, succeeded, failed) until the next one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.pgtypes import LocalState
from hakeeper.ha import operator as operator_module
from hakeeper.ha.operator import Operator
from hakeeper.ha.reinit import ReinitPhase, ReinitState, ReinitStatus
from tests.support.sim import Sim
from tests.unit.ha.test_replica_actions import move_leadership_to_b


async def test_reinitialize_refuses_on_a_new_leader_whose_cached_view_is_stale(cluster: Sim) -> None:
    b = cluster["b"]
    stale = b.node.state.view  # still names a as the leader
    assert stale.leader is not None and stale.leader.name == "a"
    await move_leadership_to_b(cluster)
    b.node.state.view = stale  # right after the promotion, before the next cycle refreshed it
    system_id = b.pg.system_id

    with pytest.raises(Refused) as e:
        await b.node.operator.reinitialize()

    assert e.value.kind is RefusalKind.CONFLICT and "leader" in e.value.message
    assert b.pg.running and b.pg.is_initialized() and b.pg.system_id == system_id


async def test_reinitialize_refuses_a_running_primary_that_lost_the_key(cluster: Sim) -> None:
    a = cluster["a"]
    await move_leadership_to_b(cluster)  # a still runs read-write (its fence has not fired yet)
    a.node.state.view = await a.node.store.read_view()
    assert a.node.state.view.leader is not None and a.node.state.view.leader.name == "b"
    system_id = a.pg.system_id

    with pytest.raises(Refused) as e:
        await a.node.operator.reinitialize()

    assert e.value.kind is RefusalKind.CONFLICT and "running primary" in e.value.message
    assert a.pg.running and not a.pg.in_recovery and a.pg.system_id == system_id


async def finished(op: Operator) -> ReinitStatus:
    """Let the background job run to its end; its final status."""
    await asyncio.gather(*op._tasks)
    job = op.reinit_status()
    assert job is not None and not job.running
    return job


async def test_reinitialize_clones_a_replica_again_and_clears_a_hold(cluster: Sim) -> None:
    c = cluster["c"]
    c.node.state.held = "pg_rewind from a failed: test"
    old = c.pg.system_id
    wiped: list[bool] = []
    real_remove = c.pg.remove_data_dir

    def remove() -> None:
        wiped.append(True)
        real_remove()

    c.pg.remove_data_dir = remove  # type: ignore[method-assign]

    handle = await c.node.operator.reinitialize()

    # The request is answered with the handle while the job runs on.
    assert handle.state is ReinitState.RUNNING and handle.member == "c" and handle.source == "a"
    assert handle.finished_at is None and handle.error is None
    job = await finished(c.node.operator)
    assert job.id == handle.id and job.state is ReinitState.SUCCEEDED and job.error is None
    assert job.phase is ReinitPhase.STREAMING and job.finished_at is not None
    assert wiped == [True]
    assert c.node.state.held is None and c.pg.system_id == old == cluster["a"].pg.system_id
    assert c.pg.upstream_primary() is cluster["a"].pg
    assert c.node.operator.reinit_status() == job  # kept after it ended


async def test_a_second_reinitialize_while_one_runs_is_refused_with_its_handle(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster["c"]
    release = asyncio.Event()
    clones = 0
    real_clone = c.pg.clone_from

    async def slow_clone(*args: Any, **kw: Any) -> None:
        nonlocal clones
        clones += 1
        await release.wait()
        await real_clone(*args, **kw)

    monkeypatch.setattr(c.pg, "clone_from", slow_clone)
    first = await c.node.operator.reinitialize()
    for _ in range(2000):  # until the job is inside the clone (bounded: fails below if never)
        running = c.node.operator.reinit_status()
        if clones and running is not None and running.phase is ReinitPhase.CLONING:
            break
        await asyncio.sleep(0)
    running = c.node.operator.reinit_status()
    assert running is not None and running.phase is ReinitPhase.CLONING and clones == 1

    with pytest.raises(Refused) as e:
        await c.node.operator.reinitialize()
    assert e.value.kind is RefusalKind.CONFLICT and "already running" in e.value.message
    assert e.value.facts["reinitialize"]["id"] == first.id
    with pytest.raises(Refused) as r:  # a restart would wait for the whole clone: refused too
        await c.node.operator.restart()
    assert r.value.kind is RefusalKind.CONFLICT and first.id in r.value.message

    release.set()
    job = await finished(c.node.operator)
    assert job.id == first.id and job.state is ReinitState.SUCCEEDED and clones == 1


async def test_a_failed_clone_ends_the_job_failed_with_the_reason(cluster: Sim) -> None:
    c = cluster["c"]
    c.pg.failing.add("clone")

    handle = await c.node.operator.reinitialize()

    job = await finished(c.node.operator)
    assert job.id == handle.id and job.state is ReinitState.FAILED
    assert job.phase is ReinitPhase.CLONING and job.error and "clone" in job.error
    # The next one may start (the failed one is kept until then).
    c.pg.failing.discard("clone")
    again = await c.node.operator.reinitialize()
    assert again.id != job.id
    assert (await finished(c.node.operator)).state is ReinitState.SUCCEEDED


async def test_a_copy_that_does_not_stream_in_time_ends_failed(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster["c"]
    monkeypatch.setattr(operator_module, "STREAMING_TIMEOUT", 0.0)
    c.pg.receiving = False  # the WAL receiver cannot reach the leader

    await c.node.operator.reinitialize()

    job = await finished(c.node.operator)
    assert job.state is ReinitState.FAILED and job.phase is ReinitPhase.STREAMING
    assert job.error and "did not stream from the leader" in job.error


async def test_stopping_the_agent_ends_a_running_reinitialize_failed(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster["c"]
    never = asyncio.Event()

    async def stuck_clone(*args: Any, **kw: Any) -> None:
        await never.wait()

    monkeypatch.setattr(c.pg, "clone_from", stuck_clone)
    await c.node.operator.reinitialize()
    for _ in range(20):
        await asyncio.sleep(0)

    await c.node.operator.close()

    job = c.node.operator.reinit_status()
    assert job is not None and job.state is ReinitState.FAILED and "stopping" in (job.error or "")
    assert not c.node.action_lock.locked()


async def test_reinitialize_refuses_while_the_local_server_cannot_say_what_it_is(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running but not answering (e.g. still starting up after a previous reinitialize): nothing
    is removed, and the answer is a conflict the caller may retry, not a server error."""
    c = cluster["c"]
    system_id = c.pg.system_id

    async def starting_up(*, timeout: float = 2.0) -> LocalState:
        return LocalState(True, None, None, None, None, None, None, (), "the database system is starting up")

    monkeypatch.setattr(c.pg, "probe", starting_up)
    with pytest.raises(Refused) as e:
        await c.node.operator.reinitialize()

    assert e.value.kind is RefusalKind.CONFLICT and "starting up" in e.value.message
    assert c.pg.running and c.pg.is_initialized() and c.pg.system_id == system_id
