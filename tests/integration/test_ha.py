"""HA core against real etcd and real PostgreSQL 15: bootstrap, failover, fencing, rejoin."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster
from tests.support.cluster import cluster_tmpdir, etcd_gateway, free_base_port, running_cluster
from tests.support.probe import writable_nodes, writable_throughout

pytestmark = pytest.mark.integration


T = TypeVar("T")


def wait_for(pred: Callable[..., T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """The first truthy value ``pred()`` returns, polling for up to ``timeout`` seconds.

    ``Callable[...]``: predicates in loops bind the loop variable as a default
    (``lambda n=n: ...``), a lambda mypy cannot check against ``Callable[[], T]``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # the cluster is in flux; keep polling
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def sql(c: LocalCluster, name: str, query: str, timeout: float = 3) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(name), connect_timeout=int(timeout), autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def try_write(c: LocalCluster, name: str, value: int) -> bool:
    try:
        sql(c, name, f"INSERT INTO probe VALUES ({value})", timeout=1)
        return True
    except psycopg.Error:
        return False


def hk_list(c: LocalCluster) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "hakeeper", "list", "--etcd", c.etcd.url, "--scope", c.scope, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, **c.etcd_env()},
    )
    return json.loads(out.stdout)


def roles(c: LocalCluster) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["role"], m["state"]) for m in hk_list(c)["members"]}


def new_primary(c: LocalCluster, old: str) -> str:
    def pick() -> str | None:
        w = [n for n in writable_nodes(c) if n != old]
        return w[0] if len(w) == 1 else None

    return str(wait_for(pick, 60, "a new writable primary"))


def etcd_puts(c: LocalCluster) -> float:
    """etcd's count of put operations so far (its Prometheus metrics)."""
    import urllib.request

    ctx = c.etcd_security.ssl_context() if c.etcd_security is not None else None
    with urllib.request.urlopen(c.etcd.url + "/metrics", timeout=5, context=ctx) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_mvcc_put_total "):
                return float(line.split()[1])
    raise AssertionError("etcd_mvcc_put_total not in etcd's metrics")


@pytest.mark.matrix  # also run on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
def test_bootstrap_gives_one_primary_and_streaming_replicas_with_slots() -> None:
    with running_cluster(dynamic={"member_slots_ttl": 3}) as c:
        primary = c.primary()
        assert primary is not None
        replicas = [n for n in c.names if n != primary]
        slots = wait_for(
            lambda: (
                rows
                if len(rows := sql(c, primary, "SELECT slot_name FROM pg_replication_slots WHERE active"))
                == 2
                else None
            ),
            30,
            "two active slots",
        )
        assert sorted(r[0] for r in slots) == sorted(replicas)
        apps = sql(c, primary, "SELECT application_name, state FROM pg_stat_replication ORDER BY 1")
        assert apps == [(r, "streaming") for r in sorted(replicas)]
        assert sql(c, primary, "SHOW data_checksums") == [("on",)]

        def settled() -> dict[str, tuple[str, str]] | None:
            r = roles(c)
            return r if sorted(v[0] for v in r.values()) == ["primary", "replica", "replica"] else None

        listed = wait_for(settled, 30, "list shows 1 primary + 2 replicas")
        assert listed[primary] == ("primary", "running")
        # An idle cluster writes to etcd about once per loop_wait per agent: agents that woke
        # each other on every member put once made ~285 puts/s (and burnt CPU) here.
        p0, t0 = etcd_puts(c), time.monotonic()
        time.sleep(5)
        rate = (etcd_puts(c) - p0) / (time.monotonic() - t0)
        assert rate < 20, f"{rate:.0f} etcd puts/s on an idle cluster"
        # No password reaches etcd (every key, read as etcd's root).
        raw = etcd_gateway(c, "/v3/kv/range", {"key": "Lw==", "range_end": "MA=="}, user="root")
        import base64

        values = " ".join(base64.b64decode(kv["value"]).decode() for kv in raw["kvs"])
        assert c.superuser_password not in values and c.replication_password not in values
        # ... nor any log line.
        for n in c.names:
            text = c.nodes[n].log_path.read_text()
            assert c.superuser_password not in text and c.replication_password not in text
        # A member gone longer than member_slots_ttl loses its slot; the others keep theirs.
        gone = replicas[0]
        c.agents[gone].stop()
        wait_for(
            lambda: (
                [r[0] for r in sql(c, primary, "SELECT slot_name FROM pg_replication_slots")] == [replicas[1]]
            ),
            30,
            f"slot of {gone} dropped after member_slots_ttl",
        )


@pytest.mark.matrix  # also run on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
def test_failover_after_kill9_then_old_primary_rejoins_with_new_rows() -> None:
    with running_cluster() as c:
        old = c.primary()
        assert old is not None
        sql(c, old, "CREATE TABLE probe (v int)")
        sql(c, old, "INSERT INTO probe SELECT generate_series(1, 100)")
        time.sleep(1.5)  # let the replicas publish their final positions
        t0 = time.monotonic()
        c.agents[old].kill()
        c.kill_postgres(old)
        new = new_primary(c, old)
        assert try_write(c, new, 1000)
        took = time.monotonic() - t0
        sql(c, new, "INSERT INTO probe SELECT generate_series(101, 200)")
        other = next(n for n in c.names if n not in (old, new))
        wait_for(
            lambda: sql(c, other, "SELECT count(*) FROM probe")[0][0] == 201, 60, "the other replica follows"
        )
        # the old primary comes back by hand, rewinds, and streams from the new primary
        c.agents[old].start()
        wait_for(
            lambda: roles(c).get(old) == ("replica", "streaming"), 90, "old primary rejoins as a replica"
        )
        assert sql(c, old, "SELECT count(*) FROM probe")[0][0] == 201
        assert sql(c, old, "SELECT pg_is_in_recovery()")[0][0] is True
        assert writable_nodes(c) == [new]
        hist = subprocess.run(
            [
                sys.executable,
                "-m",
                "hakeeper",
                "history",
                "--etcd",
                c.etcd.url,
                "--scope",
                c.scope,
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env={**os.environ, **c.etcd_env()},
        )
        entries = json.loads(hist.stdout)
        assert entries[-1]["new_leader"] == new and entries[-1]["timeline"] == 2
        assert entries[-1]["lsn"] is not None
        print(f"failover took {took:.2f}s")
        assert took < 30


def test_postgres_crash_on_primary_restarts_in_place() -> None:
    with running_cluster() as c:
        old = c.primary()
        assert old is not None
        sql(c, old, "CREATE TABLE probe (v int)")
        c.kill_postgres(old)
        wait_for(lambda: try_write(c, old, 1), 60, "the primary restarted in place")
        assert writable_nodes(c) == [old]
        assert sql(c, old, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0] == 1


def test_etcd_outage_longer_than_ttl_demotes_primary_then_recovers_without_loss() -> None:
    with running_cluster() as c:
        old = c.primary()
        assert old is not None
        sql(c, old, "CREATE TABLE probe (v int)")
        sql(c, old, "INSERT INTO probe SELECT generate_series(1, 50)")
        etcd_pid = c.etcd.pid
        assert etcd_pid is not None
        os.kill(etcd_pid, signal.SIGKILL)
        t0 = time.monotonic()
        # fence deadline = last keepalive + ttl (5) - margin (1.5): writes stop within ~5 s
        wait_for(lambda: not try_write(c, old, -1), 15, "the primary stops accepting writes")
        fenced_after = time.monotonic() - t0
        assert fenced_after < 8, fenced_after
        # Nobody may write while etcd is down: every node asked every 0.5 s for 5 s (a node that
        # cannot be asked fails the check instead of counting as read-only).
        writable_throughout(c, [], 5)
        # ... but the fenced node serves reads again (restarted read-only)
        wait_for(
            lambda: sql(c, old, "SELECT count(*) FROM probe WHERE v > 0")[0][0] == 50, 20, "read-only service"
        )
        c.etcd.start()
        new = wait_for(lambda: w[0] if len(w := writable_nodes(c)) == 1 else None, 90, "a primary again")
        got = sql(c, str(new), "SELECT count(*) FROM probe WHERE v > 0")[0][0]
        assert got == 50
        c.wait_ready(90)


@dataclass
class Timeline:
    ok: dict[str, list[float]] = field(default_factory=dict)


def test_sigstopped_agent_stops_primary_writes_before_a_replica_is_promoted() -> None:
    with running_cluster() as c:
        old = c.primary()
        assert old is not None
        sql(c, old, "CREATE TABLE probe (v int)")
        # an open session on the old primary, as an application would hold
        session = psycopg.connect(c.dsn(old), autocommit=True)
        session.execute("INSERT INTO probe VALUES (0)")
        writes: dict[str, list[float]] = {n: [] for n in c.names}
        stop = threading.Event()

        def prober() -> None:
            i = 1
            while not stop.is_set():
                for n in c.names:
                    if try_write(c, n, i):
                        writes[n].append(time.monotonic())
                    i += 1
                time.sleep(0.05)

        t = threading.Thread(target=prober, daemon=True)
        t.start()
        agent_pid = c.agents[old].pid
        assert agent_pid is not None
        time.sleep(1)
        os.kill(agent_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            new = new_primary(c, old)
            wait_for(lambda: writes[new], 30, "writes acknowledged by the new primary")
            session_failed_at = None
            try:
                session.execute("INSERT INTO probe VALUES (-1)")
            except psycopg.Error:
                session_failed_at = time.monotonic()
        finally:
            os.kill(agent_pid, signal.SIGCONT)
            stop.set()
            t.join(10)
            session.close()
        last_old = max(writes[old])
        first_new = min(writes[new])
        assert session_failed_at is not None, "the open session must not write after the fence"
        assert last_old < first_new, "old primary acknowledged a write after the new one started"
        assert last_old - stopped_at < 5.0
        print(
            f"old primary last write +{last_old - stopped_at:.2f}s, new first +{first_new - stopped_at:.2f}s"
        )
        # after SIGCONT, the old agent finds its lease gone and rejoins as a replica
        wait_for(lambda: roles(c).get(old) == ("replica", "streaming"), 90, "old primary rejoins")
        assert writable_nodes(c) == [new]


def test_lagging_and_nofailover_replicas_are_never_promoted() -> None:
    base = cluster_tmpdir()
    c = LocalCluster(base, base_port=free_base_port(3), tags={"node2": {"nofailover": True}})
    try:
        with c:
            _lagging_and_nofailover(c)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _lagging_and_nofailover(c: LocalCluster) -> None:
    # node1 bootstraps alone, so it is the primary; node2 (nofailover) and node3 join after
    c.check_ports()
    c.write_configs()
    c.etcd.start()
    c.agents["node1"].start()
    wait_for(lambda: c.primary() == "node1", 120, "node1 primary")
    c.agents["node2"].start()
    c.agents["node3"].start()
    c.wait_ready(180)
    old = "node1"
    # freeze node3's WAL receiver so it falls behind
    pid = int(sql(c, "node3", "SELECT pid FROM pg_stat_wal_receiver")[0][0])
    os.kill(pid, signal.SIGSTOP)
    try:
        sql(
            c,
            old,
            "CREATE TABLE big AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 40000) g",
        )
        wait_for(
            lambda: any(m["name"] == "node3" and (m["lag"] or 0) > 1048576 for m in hk_list(c)["members"]),
            30,
            "node3 lag is published",
        )
        c.agents[old].kill()
        c.kill_postgres(old)
        # Nobody is promoted, at any moment until well past ttl + candidate grace.
        writable_throughout(c, [], 15)
        members = {m["name"]: m for m in hk_list(c)["members"]}
        assert hk_list(c)["leader"] is None
        assert "nofailover" in (members["node2"]["reason"] or "")
        assert "maximum_lag_on_failover" in (members["node3"]["reason"] or "")
        assert "maximum_lag_on_failover" in c.tail_log("node3", 400)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_kill9_of_primary_agent_alone_fences_postgres_and_fails_over() -> None:
    with running_cluster() as c:
        old = c.primary()
        assert old is not None
        sql(c, old, "CREATE TABLE probe (v int)")
        c.agents[old].kill()  # PostgreSQL keeps running: only the fencer can stop it now
        new = new_primary(c, old)
        assert try_write(c, new, 1)
        assert c.postmaster_pid(old) is None, "the orphaned primary must have been fenced"
        assert writable_nodes(c) == [new]
        c.agents[old].start()
        wait_for(lambda: roles(c).get(old) == ("replica", "streaming"), 90, "old primary rejoins")
        assert writable_nodes(c) == [new]
