"""POST /reinitialize (Operator.reinitialize) over FakeEtcd + FakePostgres: it decides on a fresh
read of etcd and on the local server's own answer, never on the cached view alone."""

from __future__ import annotations

import pytest

from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.pgtypes import LocalState
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


async def test_reinitialize_clones_a_replica_again_and_clears_a_hold(cluster: Sim) -> None:
    c = cluster["c"]
    c.node.state.held = "pg_rewind from a failed: test"
    old = c.pg.system_id

    answer = await c.node.operator.reinitialize()

    assert answer == "reinitialized from a"
    assert c.node.state.held is None and c.pg.system_id == old == cluster["a"].pg.system_id
    assert c.pg.upstream_primary() is cluster["a"].pg


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
