"""Synchronous replication on a real cluster: the sync set, who may be promoted, double faults."""

from __future__ import annotations

import threading

import psycopg
import pytest

from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.ha import requests
from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import hk_list, sql, wait_for
from tests.integration.test_switchover import history, run_request
from tests.support.cluster import running_cluster
from tests.support.probe import writable_nodes, writable_throughout

pytestmark = pytest.mark.integration


def sync_set(c: LocalCluster) -> tuple[str, ...] | None:
    view = run_request(c, requests.read_view)
    if view.sync is None or view.leader is None or view.sync.term != view.leader.term:
        return None
    return tuple(view.sync.members)


@pytest.mark.matrix  # also run on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
def test_synchronous_mode_promotes_only_the_sync_standby_and_refuses_a_double_fault() -> None:
    with running_cluster(dynamic={"replication_mode": "synchronous"}) as c:
        first = c.primary()
        assert first is not None
        members = wait_for(lambda: s if (s := sync_set(c)) else None, 60, "a sync standby")
        assert len(members) == 1
        sync_standby = members[0]
        assert sql(c, first, "SHOW synchronous_standby_names") == [(f'FIRST 1 ("{sync_standby}")',)]
        rows = sql(c, first, "SELECT application_name, sync_state FROM pg_stat_replication ORDER BY 1")
        assert (sync_standby, "sync") in rows
        sql(c, first, "CREATE TABLE acked (v int)")
        sql(c, first, "INSERT INTO acked SELECT generate_series(1, 1000)")

        # 1. The primary dies: only the sync standby may take over, and it has every acked row.
        c.agents[first].kill()
        c.kill_postgres(first)
        wait_for(lambda: writable_nodes(c) == [sync_standby], 60, "the sync standby is promoted")
        other = next(n for n in c.names if n not in (first, sync_standby))
        # From its first writable moment the new primary waits for a standby ('*' until its own
        # sync set forms): nothing it acknowledges exists on it alone.
        assert sql(c, sync_standby, "SHOW synchronous_standby_names")[0][0] in ("*", f'FIRST 1 ("{other}")')
        assert sql(c, sync_standby, "SELECT count(*) FROM acked") == [(1000,)]
        wait_for(lambda: sync_set(c) == (other,), 60, "the new leader's sync set")

        # 2. Primary and sync standby lost together: nobody may be promoted, and it says why.
        c.agents[first].start()
        wait_for(lambda: c.node_state(first).role == "replica", 90, "the old primary rejoins")
        now_sync = wait_for(lambda: s if (s := sync_set(c)) else None, 60, "a sync standby")
        victim = now_sync[0]
        survivor = next(n for n in c.names if n not in (sync_standby, victim))
        c.agents[sync_standby].kill()
        c.kill_postgres(sync_standby)
        c.agents[victim].kill()
        c.kill_postgres(victim)
        writable_throughout(c, [], 15)  # at every moment until far past ttl
        listed = {m["name"]: m for m in hk_list(c)["members"]}
        assert "not a synchronous standby" in (listed[survivor]["reason"] or "")
        assert "could lose acknowledged writes" in c.tail_log(survivor, 300)

        # 3. An operator may accept the loss explicitly; the override is recorded.
        with pytest.raises(Refused) as e:
            run_request(c, requests.request_failover, candidate=survivor)
        assert e.value.kind == RefusalKind.PRECONDITION
        run_request(c, requests.request_failover, candidate=survivor, allow_data_loss=True)
        wait_for(lambda: writable_nodes(c) == [survivor], 60, "forced failover")
        assert history(c)[-1]["reason"].endswith("(data loss accepted)")


def test_strict_mode_blocks_commits_without_a_standby_and_resumes_when_one_returns() -> None:
    with running_cluster(dynamic={"replication_mode": "synchronous", "synchronous_strict": True}) as c:
        primary = c.primary()
        assert primary is not None
        wait_for(lambda: sync_set(c), 60, "a sync standby")
        sql(c, primary, "CREATE TABLE strict_t (v int)")
        replicas = [n for n in c.names if n != primary]
        for n in replicas:
            c.agents[n].stop()  # stops its PostgreSQL too
        wait_for(
            lambda: sql(c, primary, "SHOW synchronous_standby_names") == [("*",)], 30, "strict: wait for any"
        )
        # The commit waits for a standby (no timeout interrupts that wait): run it aside.
        done = threading.Event()

        def insert() -> None:
            with psycopg.connect(c.dsn(primary), autocommit=True) as conn:
                conn.execute("INSERT INTO strict_t VALUES (2)")
            done.set()

        t = threading.Thread(target=insert, daemon=True)
        t.start()
        assert not done.wait(3), "strict mode: a commit must wait while no standby is connected"
        c.agents[replicas[0]].start()
        assert done.wait(90), "the commit completes once a standby is back"
        assert sql(c, replicas[0], "SELECT v FROM strict_t WHERE v = 2", timeout=3) == [(2,)]
