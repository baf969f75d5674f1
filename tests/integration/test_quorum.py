"""Quorum commit (``replication_mode: quorum``, ``ANY k``) on a real 3-node cluster: the voter
set, commits that do not wait for a lost voter, a lagging voter swapped out, a switchover to a
voter, failover to the most advanced voter without loss, and the refusal when too few voters
are left (until forced)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.ha import requests
from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import hk_list, sql, wait_for
from tests.integration.test_switchover import Writer, history, run_request
from tests.support.cluster import running_cluster
from tests.support.probe import writable_nodes, writable_throughout

pytestmark = pytest.mark.integration

MB = 1024 * 1024


def quorum_key(c: LocalCluster) -> tuple[tuple[str, ...], int] | None:
    """(voters, quorum) of the current leader's ``sync`` key."""
    view = run_request(c, requests.read_view)
    if view.sync is None or view.leader is None or view.sync.term != view.leader.term:
        return None
    return tuple(sorted(view.sync.members)), view.sync.quorum


def guc(c: LocalCluster, name: str) -> str:
    return str(sql(c, name, "SHOW synchronous_standby_names")[0][0])


def any1(*names: str) -> str:
    return "ANY 1 (" + ", ".join(f'"{n}"' for n in sorted(names)) + ")"


def timed_commits(c: LocalCluster, name: str, n: int) -> float:
    """Seconds that n single-row commits took.  A commit waiting for a standby is not cut by
    statement_timeout (PostgreSQL only warns), so a blocked commit shows as >= 10 s here."""
    t0 = time.monotonic()
    for i in range(n):
        sql(c, name, f"INSERT INTO acked VALUES ({i})", timeout=10)
    return time.monotonic() - t0


@pytest.mark.timeout(900)
def test_quorum_commit_fails_over_to_a_voter_and_refuses_with_too_few_voters() -> None:
    dynamic = {"replication_mode": "quorum", "synchronous_node_count": 1, "maximum_lag_on_syncnode": 4 * MB}
    with running_cluster(dynamic=dynamic) as c:
        first = c.primary()
        assert first is not None
        replicas = tuple(sorted(n for n in c.names if n != first))
        wait_for(lambda: quorum_key(c) == (replicas, 1), 90, "both replicas as voters, quorum 1")
        wait_for(lambda: guc(c, first) == any1(*replicas), 30, "ANY 1 over both replicas")
        rows = sql(c, first, "SELECT application_name, sync_state FROM pg_stat_replication ORDER BY 1")
        assert rows == [(replicas[0], "quorum"), (replicas[1], "quorum")]
        sql(c, first, "CREATE TABLE acked (v int)")
        sql(c, first, "CREATE TABLE w (v int)")

        # 1. One voter's PostgreSQL stops: commits do not wait for it (ANY 1), and it is removed.
        kept, down = replicas
        c.agents[down].stop()  # stops its PostgreSQL too
        assert timed_commits(c, first, 20) < 8
        wait_for(lambda: quorum_key(c) == ((kept,), 1), 60, "the stopped voter is removed")
        wait_for(lambda: guc(c, first) == any1(kept), 30, "the GUC without it")
        c.agents[down].start()
        wait_for(lambda: quorum_key(c) == (replicas, 1), 120, "it votes again")
        wait_for(lambda: guc(c, first) == any1(*replicas), 30, "ANY 1 over both again")

        # 2. A voter that stops receiving WAL falls behind maximum_lag_on_syncnode and is swapped
        # out while commits go on; once it catches up it votes again.
        receiver = int(sql(c, down, "SELECT pid FROM pg_stat_wal_receiver")[0][0])
        os.kill(receiver, signal.SIGSTOP)
        try:
            sql(
                c,
                first,
                "CREATE TABLE big AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 12000)",
                timeout=60,
            )
            wait_for(lambda: quorum_key(c) == ((kept,), 1), 60, "the lagging voter is swapped out")
            assert timed_commits(c, first, 5) < 8
        finally:
            os.kill(receiver, signal.SIGCONT)
        wait_for(lambda: quorum_key(c) == (replicas, 1), 120, "the caught-up voter votes again")

        # 3. A switchover goes to a voter; the old primary becomes one.
        run_request(c, requests.request_switchover, leader=first, candidate=kept)
        new = run_request(c, requests.wait_for_new_leader, old_leader=first, candidate=kept, timeout=60)
        assert new == kept
        wait_for(lambda: writable_nodes(c) == [kept], 60, "only the chosen voter is writable")
        old = kept
        replicas = tuple(sorted(n for n in c.names if n != old))
        wait_for(lambda: quorum_key(c) == (replicas, 1), 120, "the new leader's voters")
        assert history(c)[-1]["reason"] == f"switchover from {first}"

        # 4. kill -9 of the primary (agent and postmaster) with both voters up: the more advanced
        # voter takes over, with every acknowledged row.
        with Writer(c.write_dsn()) as w:
            time.sleep(2)
            c.agents[old].kill()
            c.kill_postgres(old)

            def new_leader() -> str | None:
                up = writable_nodes(c)
                return up[0] if len(up) == 1 and up[0] != old else None

            new = str(wait_for(new_leader, 90, "a voter is promoted"))
            time.sleep(1)
        assert new in replicas
        assert w.acks, "the writer got no acknowledgement before the kill"
        have = {r[0] for r in sql(c, new, "SELECT v FROM w")}
        lost = {i for _, i in w.acks} - have
        assert not lost, f"acknowledged rows lost: {sorted(lost)[:10]}"
        assert history(c)[-1]["new_leader"] == new

        # 5. The old primary rejoins as a voter.  Then the new primary and that voter are lost
        # together: ANY 1 of 2 voters means a commit may be on the lost voter only, so the last
        # voter must not be promoted automatically, and says why.
        other = next(n for n in replicas if n != new)
        c.agents[old].start()
        voters = tuple(sorted((old, other)))
        wait_for(lambda: quorum_key(c) == (voters, 1), 150, "the old primary votes")
        for name in (new, old):
            c.agents[name].kill()
            c.kill_postgres(name)

        def refusal() -> str | None:
            m = {m["name"]: m for m in hk_list(c)["members"]}.get(other)
            reason = str((m or {}).get("reason") or "")
            return reason if "quorum voters reachable" in reason else None

        reason = str(wait_for(refusal, 60, "the refusal in hakeeper list"))
        assert "could lose acknowledged writes" in reason
        writable_throughout(c, [], 5)  # until well past the election it would otherwise have won
        assert "could lose acknowledged writes" in c.tail_log(other, 300)

        # 6. An operator may accept the loss explicitly; the override is recorded.
        with pytest.raises(Refused) as e:
            run_request(c, requests.request_failover, candidate=other)
        assert e.value.kind == RefusalKind.PRECONDITION
        run_request(c, requests.request_failover, candidate=other, allow_data_loss=True)
        wait_for(lambda: writable_nodes(c) == [other], 60, "forced failover")
        assert history(c)[-1]["reason"].endswith("(data loss accepted)")
