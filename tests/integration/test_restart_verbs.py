"""pending_restart, `restart --pending` in a safe order and `flush restart` on a real 3-node
cluster (issue 13, item 7), through the CLI as an operator runs it."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster
from tests.integration.test_cli_ops import hk, wait_for
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as c:
        yield c


def listed(c: LocalCluster) -> dict[str, Any]:
    res = hk(c, "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def members(c: LocalCluster) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in listed(c)["members"]}


def sql(c: LocalCluster, name: str, query: str) -> Any:
    with psycopg.connect(c.dsn(name), connect_timeout=5, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


def started_at(c: LocalCluster, name: str) -> dt.datetime:
    value = sql(c, name, "SELECT pg_postmaster_start_time()")
    assert isinstance(value, dt.datetime)
    return value


def restarted_since(c: LocalCluster, name: str, since: dt.datetime) -> bool:
    """Whether ``name``'s postmaster started after ``since`` (False while it does not answer)."""
    try:
        return started_at(c, name) > since
    except psycopg.OperationalError:
        return False


def metric(c: LocalCluster, name: str, metric_name: str) -> float:
    with urllib.request.urlopen(c.nodes[name].api_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(metric_name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{metric_name} not in /metrics of {name}")


def settled(c: LocalCluster) -> bool:
    ms = members(c)
    states = sorted((m["role"], m["state"]) for m in ms.values())
    return states == [("primary", "running"), ("replica", "streaming"), ("replica", "streaming")]


def test_pending_restart_then_restart_pending_replicas_first_leader_last(cluster: LocalCluster) -> None:
    c = cluster
    wait_for(lambda: settled(c), 30, "1 primary running + 2 replicas streaming")
    doc = listed(c)
    leader = doc["leader"]
    assert leader is not None and doc["scope"] == c.scope and doc["system_identifier"]
    replicas = sorted(n for n in c.names if n != leader)
    history_before = len(json.loads(hk(c, "history", "-o", "json").stdout))
    assert all(m["pending_restart"] is False for m in doc["members"]), doc
    assert {n: metric(c, n, "hakeeper_postgres_pending_restart") for n in c.names} == dict.fromkeys(
        c.names, 0.0
    )
    before = {n: started_at(c, n) for n in c.names}
    new_max = int(sql(c, leader, "SHOW max_connections")) + 23

    res = hk(c, "edit-config", "--pg", f"max_connections={new_max}", "--force")
    assert res.returncode == 0, res.stdout + res.stderr

    def all_pending() -> bool:
        return all(m["pending_restart"] for m in members(c).values())

    wait_for(all_pending, 45, "every member shows pending_restart in `list -o json`")
    for n, m in members(c).items():
        assert "max_connections" in m["pending_restart_reasons"], (n, m)
        assert metric(c, n, "hakeeper_postgres_pending_restart") == 1.0, n
    table = hk(c, "list")
    assert table.returncode == 0 and "*" in table.stdout, table.stdout
    # nothing restarted by itself
    assert {n: started_at(c, n) for n in c.names} == before

    t0 = time.monotonic()
    res = hk(c, "restart", "--pending", "--force")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    progress = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("restarting ")]
    assert sorted(progress[:2]) == replicas and progress[2] == leader, res.stdout

    after = {n: started_at(c, n) for n in c.names}
    assert all(after[n] > before[n] for n in c.names), (before, after)
    # replicas one at a time, the leader last (the postmaster start times say so)
    first, second = sorted(replicas, key=lambda n: after[n])
    assert after[first] < after[second] < after[leader]
    assert [first, second] == progress[:2]
    # the leader restarted in place: same leader, no failover or switchover in the history
    doc = listed(c)
    assert doc["leader"] == leader
    assert len(json.loads(hk(c, "history", "-o", "json").stdout)) == history_before
    wait_for(
        lambda: not any(m["pending_restart"] for m in members(c).values()), 30, "pending_restart cleared"
    )
    for n in c.names:
        assert int(sql(c, n, "SHOW max_connections")) == new_max, n
        assert metric(c, n, "hakeeper_postgres_pending_restart") == 0.0, n
    wait_for(lambda: settled(c), 30, "settled after the restart")
    print(f"restart --pending of 3 members took {took:.1f} s")

    # nothing pending any more: --pending restarts nobody
    res = hk(c, "restart", "--pending", "--force")
    assert res.returncode == 0 and "nothing to restart" in res.stdout, res.stdout + res.stderr
    assert {n: started_at(c, n) for n in c.names} == after


def test_flush_cancels_a_scheduled_restart_and_the_other_one_happens(cluster: LocalCluster) -> None:
    c = cluster
    wait_for(lambda: settled(c), 30, "settled")
    leader = listed(c)["leader"]
    kept, flushed = sorted(n for n in c.names if n != leader)
    before = {n: started_at(c, n) for n in c.names}
    # far enough ahead for the CLI calls below on a loaded machine (each takes a second or more)
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=40)
    when = at.isoformat(timespec="seconds")
    res = hk(c, "restart", kept, flushed, "--scheduled", when, "--force")
    assert res.returncode == 0, res.stdout + res.stderr
    # each agent refuses a second schedule while one is pending (exit 1, reason shown)
    again = hk(c, "restart", kept, "--scheduled", when, "--force")
    assert again.returncode == 1 and "already scheduled" in again.stderr, again.stderr

    def shown() -> bool:
        ms = members(c)
        return ms[kept]["scheduled_restart"] is not None and ms[flushed]["scheduled_restart"] is not None

    wait_for(shown, 10, "`list -o json` shows both scheduled restarts")
    ext = hk(c, "list", "-e")
    assert ext.returncode == 0 and "Scheduled restart" in ext.stdout, ext.stdout

    res = hk(c, "flush", flushed, "restart")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: members(c)[flushed]["scheduled_restart"] is None, 10, "flushed schedule gone")
    # flushing it again: nothing scheduled there any more
    res = hk(c, "flush", flushed, "restart")
    assert res.returncode == 1 and "no restart is scheduled" in res.stderr, res.stderr

    assert dt.datetime.now(dt.UTC) < at, "the checks above took longer than the schedule allows"
    wait_for(lambda: restarted_since(c, kept, before[kept]), 75, f"scheduled restart of {kept} happened")
    assert started_at(c, kept) >= at - dt.timedelta(seconds=1)
    time.sleep(3)  # the flushed one was due at the same time
    assert started_at(c, flushed) == before[flushed]
    assert started_at(c, leader) == before[leader]
    wait_for(lambda: members(c)[kept]["scheduled_restart"] is None, 15, "done schedule cleared")
    assert listed(c)["leader"] == leader
