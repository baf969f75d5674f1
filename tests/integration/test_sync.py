"""Synchronous replication on a real cluster: the sync set, who may be promoted, double faults."""

from __future__ import annotations

import time

import pytest

from hakeeper.demo import LocalCluster
from hakeeper.ha import ops
from tests.integration.test_ha import hk_list, sql, wait_for, writable_nodes
from tests.integration.test_switchover import history, run_ops
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration


def sync_set(c: LocalCluster) -> tuple[str, ...] | None:
    view = run_ops(c, ops.read_view)
    if view.sync is None or view.leader is None or view.sync.term != view.leader.term:
        return None
    return tuple(view.sync.members)


def test_synchronous_mode_promotes_only_the_sync_standby_and_refuses_a_double_fault() -> None:
    with running_cluster(dynamic={"replication_mode": "synchronous"}) as c:
        first = c.primary()
        assert first is not None
        members = wait_for(lambda: s if (s := sync_set(c)) else None, 60, "a sync standby")
        assert len(members) == 1  # type: ignore[arg-type]
        sync_standby = members[0]  # type: ignore[index]
        assert sql(c, first, "SHOW synchronous_standby_names") == [(f'FIRST 1 ("{sync_standby}")',)]
        rows = sql(c, first, "SELECT application_name, sync_state FROM pg_stat_replication ORDER BY 1")
        assert (sync_standby, "sync") in rows
        sql(c, first, "CREATE TABLE acked (v int)")
        sql(c, first, "INSERT INTO acked SELECT generate_series(1, 1000)")

        # 1. The primary dies: only the sync standby may take over, and it has every acked row.
        c.kill_agent(first)
        c.kill_postgres(first)
        wait_for(lambda: writable_nodes(c) == [sync_standby], 60, "the sync standby is promoted")
        assert sql(c, sync_standby, "SELECT count(*) FROM acked") == [(1000,)]
        other = next(n for n in c.names if n not in (first, sync_standby))
        wait_for(lambda: sync_set(c) == (other,), 60, "the new leader's sync set")

        # 2. Primary and sync standby lost together: nobody may be promoted, and it says why.
        c.start_agent(first)
        wait_for(lambda: c.node_state(first).role == "replica", 90, "the old primary rejoins")
        now_sync = wait_for(lambda: s if (s := sync_set(c)) else None, 60, "a sync standby")
        victim = now_sync[0]  # type: ignore[index]
        survivor = next(n for n in c.names if n not in (sync_standby, victim))
        c.kill_agent(sync_standby)
        c.kill_postgres(sync_standby)
        c.kill_agent(victim)
        c.kill_postgres(victim)
        time.sleep(15)  # far past ttl
        assert writable_nodes(c) == []
        listed = {m["name"]: m for m in hk_list(c)["members"]}  # type: ignore[union-attr]
        assert "not a synchronous standby" in (listed[survivor]["reason"] or "")
        assert "could lose acknowledged writes" in c.tail_log(survivor, 300)

        # 3. An operator may accept the loss explicitly; the override is recorded.
        with pytest.raises(ops.OperationError) as e:
            run_ops(c, ops.request_failover, candidate=survivor)
        assert e.value.status == 412
        run_ops(c, ops.request_failover, candidate=survivor, force=True)
        wait_for(lambda: writable_nodes(c) == [survivor], 60, "forced failover")
        assert history(c)[-1]["reason"].endswith("(forced)")
