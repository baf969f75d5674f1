"""Permanent logical slots that survive failover (PostgreSQL 17 and 18), and what 15 does
instead (docs/slots.md).  Real etcd, real PostgreSQL of each major."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import psycopg
import pytest

from hakeeper.core.errors import Refused
from hakeeper.ha import requests
from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import hk_list, sql, wait_for
from tests.integration.test_switchover import run_request
from tests.support.cluster import crash_host, running_cluster
from tests.support.probe import writable_nodes

pytestmark = pytest.mark.integration

SLOT = "cdc"
LOGICAL = {"type": "logical", "database": "postgres", "plugin": "test_decoding"}
DYNAMIC: dict[str, Any] = {
    "postgresql": {"parameters": {"wal_level": "logical"}},
    "slots": {SLOT: LOGICAL},
}
_INSERT = re.compile(r"^table public\.t: INSERT: v\[integer\]:(\d+)$")


def consume(dsn: str, slot: str = SLOT) -> list[int]:
    """Read and confirm every pending change of ``slot`` (a consumer's round trip): the values
    inserted into ``t``, in commit order."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)
        ).fetchall()
    return [int(m.group(1)) for (data,) in rows if (m := _INSERT.match(str(data)))]


def slot_row(c: LocalCluster, name: str, slot: str = SLOT) -> tuple[Any, ...] | None:
    rows = sql(
        c,
        name,
        "SELECT failover, synced, confirmed_flush_lsn, pg_is_in_recovery() FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}'",
    )
    return rows[0] if rows else None


def synced_at_least(c: LocalCluster, name: str, lsn: str, slot: str = SLOT) -> bool:
    rows = sql(
        c,
        name,
        f"SELECT synced AND confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}' AND NOT temporary",
    )
    return bool(rows and rows[0][0])


def members(c: LocalCluster) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in hk_list(c)["members"]}


def events(c: LocalCluster, name: str) -> list[dict[str, Any]]:
    """The agent's log (JSON lines) of ``name``."""
    out = []
    for line in c.nodes[name].log_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def slotsync_pid(c: LocalCluster, name: str) -> int | None:
    rows = sql(c, name, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'slotsync worker'")
    return int(rows[0][0]) if rows else None


@pytest.mark.parametrize("pg_version", [17, 18])
def test_logical_consumer_resumes_on_the_new_primary_after_a_host_crash(pg_version: int) -> None:
    with running_cluster(nodes=3, pg_version=pg_version, dynamic=DYNAMIC) as c:
        old = c.primary()
        assert old is not None
        replicas = [n for n in c.names if n != old]
        # the primary creates the permanent slot with failover on
        wait_for(lambda: slot_row(c, old) is not None, 30, "the permanent slot on the primary")
        row = slot_row(c, old)
        assert row is not None and row[0] is True, row
        # every replica runs the slot sync worker with what it needs
        for r in replicas:
            assert sql(c, r, "SHOW sync_replication_slots")[0][0] == "on"
            assert sql(c, r, "SHOW hot_standby_feedback")[0][0] == "on"
            assert "dbname=postgres" in sql(c, r, "SHOW primary_conninfo")[0][0]
        # synchronized_standby_slots names both failover candidates' physical slots
        wait_for(
            lambda: (
                sorted(sql(c, old, "SHOW synchronized_standby_slots")[0][0].split(","))
                == sorted(r.replace("-", "_") for r in replicas)
            ),
            30,
            "synchronized_standby_slots on the primary",
        )

        sql(c, old, "CREATE TABLE t (v int)")
        sql(c, old, "INSERT INTO t SELECT generate_series(1, 10)")
        first = consume(c.write_dsn())
        assert first == list(range(1, 11))

        # The slot was created before the replicas were cloned: PostgreSQL syncs it only once the
        # consumer has moved its restart_lsn past the WAL a replica has (docs/slots.md, "the
        # first sync").  A consumer that keeps confirming does that; here it polls for nothing.
        def all_synced() -> bool:
            sql(c, old, "SELECT pg_log_standby_snapshot()")
            assert consume(c.write_dsn()) == []
            return all(
                bool(
                    sql(
                        c,
                        r,
                        f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SLOT}' "
                        "AND synced AND NOT temporary",
                    )
                )
                for r in replicas
            )

        wait_for(all_synced, 75, "the first sync of the slot on every replica", interval=1.0)
        confirmed = sql(
            c, old, f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        )[0][0]
        # committed, not consumed yet
        sql(c, old, "INSERT INTO t SELECT generate_series(11, 20)")
        for r in replicas:
            wait_for(lambda r=r: sql(c, r, "SELECT count(*) FROM t")[0][0] == 20, 30, f"rows on {r}")
            # the slot sync worker copies the slot (its nap grows to 30 s when idle)
            wait_for(lambda r=r: synced_at_least(c, r, confirmed), 75, f"{SLOT} synced on {r}")
        # what list and /cluster show about it
        wait_for(
            lambda: all(
                (members(c)[r].get("slots") or {}).get("summary") == "slots 1/1 synced" for r in replicas
            ),
            15,
            "list shows the slot synced on every replica",
        )

        t0 = time.monotonic()
        crash_host(c, old)

        def resumed() -> list[int] | None:
            w = [n for n in writable_nodes(c) if n != old]
            if len(w) != 1:
                return None
            return consume(c.write_dsn())

        got = wait_for(resumed, 90, "the consumer reconnects through the multi-host DSN")
        print(f"{pg_version}: consumer resumed {time.monotonic() - t0:.1f}s after the crash")
        # every change it had not confirmed, none it had, none skipped
        assert got == list(range(11, 21)), got
        new = writable_nodes(c)[0]
        sql(c, new, "INSERT INTO t VALUES (21)")
        assert consume(c.write_dsn()) == [21]

        # synchronized_standby_slots at work: while the remaining candidate receives nothing
        # (its WAL receiver stopped), the consumer gets nothing of what it has not flushed
        other = next(n for n in replicas if n != new)
        wait_for(
            lambda: sql(c, new, "SHOW synchronized_standby_slots")[0][0] == other.replace("-", "_"),
            60,
            f"the new primary waits for {other}'s slot",
        )
        receiver = wait_for(
            lambda: sql(c, other, "SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'"),
            60,
            f"{other} streams from {new}",
        )[0][0]
        os.kill(receiver, signal.SIGSTOP)
        try:
            sql(c, new, "INSERT INTO t VALUES (22)")
            with (
                psycopg.connect(c.write_dsn(), autocommit=True, connect_timeout=3) as conn,
                pytest.raises(psycopg.errors.QueryCanceled),
            ):
                conn.execute("SET statement_timeout = '3s'")
                conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (SLOT,))
        finally:
            os.kill(receiver, signal.SIGCONT)
        assert wait_for(lambda: consume(c.write_dsn()), 30, "the change once the standby has it") == [22]


@pytest.mark.parametrize("pg_version", [17, 18])
def test_switchover_refused_while_a_failover_slot_is_not_synced(pg_version: int) -> None:
    dynamic = {**DYNAMIC, "slots": {}}
    with running_cluster(nodes=2, pg_version=pg_version, dynamic=dynamic) as c:
        leader = c.primary()
        assert leader is not None
        cand = next(n for n in c.names if n != leader)
        # stop the candidate's slot sync worker, then declare the slot: it cannot be synced there
        pid = wait_for(lambda: slotsync_pid(c, cand), 30, "the slot sync worker on the replica")
        os.kill(pid, signal.SIGSTOP)
        try:
            cfg, _ = run_request(c, requests.patch_config, patch=DYNAMIC)
            assert SLOT in cfg.slots
            wait_for(
                lambda: (
                    [s["failover"] for s in (members(c)[leader].get("slots") or {}).get("items", [])]
                    == [True]
                ),
                30,
                "the leader publishes its failover slot",
            )
            with pytest.raises(Refused) as e:
                run_request(c, requests.request_switchover, leader=leader, candidate=cand)
            assert f"no synced copy of failover slot(s) {SLOT}" in e.value.message
            assert members(c)[cand]["slots"]["summary"] == "slots 0/1 synced"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(
            lambda: (members(c)[cand].get("slots") or {}).get("summary") == "slots 1/1 synced",
            75,
            "the slot synced on the candidate",
        )
        run_request(c, requests.request_switchover, leader=leader, candidate=cand)
        wait_for(lambda: writable_nodes(c) == [cand], 60, "the candidate leads")
        row = wait_for(lambda: slot_row(c, cand), 10, "the slot on the new primary")
        assert row[3] is False  # a primary now, the slot is there to consume from
        assert consume(c.write_dsn()) == []

        # the old leader's own copy (not synced) is replaced by a synced one, once the consumer
        # moves the slot past the old leader's restart point (the first sync, docs/slots.md)
        def old_leader_synced() -> bool:
            sql(c, cand, "SELECT pg_log_standby_snapshot()")
            assert consume(c.write_dsn()) == []
            return (members(c)[leader].get("slots") or {}).get("summary") == "slots 1/1 synced"

        wait_for(old_leader_synced, 75, "the slot synced on the old leader", interval=1.0)
        assert "stale_slot_dropped" in c.nodes[leader].log_path.read_text()


def test_on_15_a_logical_slot_is_created_without_failover_and_marked_unsafe() -> None:
    with running_cluster(nodes=2, pg_version=15, dynamic=DYNAMIC) as c:
        p = c.primary()
        assert p is not None
        wait_for(
            lambda: sql(c, p, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"), 30, "slot"
        )

        def shown() -> str | None:
            s = members(c)[p].get("slots") or {}
            return str(s.get("summary") or "") or None

        assert wait_for(shown, 15, "the slot in list") == "1 logical, not failover-safe (PG 15)"
        log = c.nodes[p].log_path.read_text()
        assert log.count("slot_not_failover_safe") == 1, log
        assert "no failover slots" in log
        other = next(n for n in c.names if n != p)
        assert not sql(c, other, "SELECT 1 FROM pg_replication_slots WHERE slot_type = 'logical'")
        # after a failover the new primary re-creates it at its own position, and says so
        time.sleep(1.5)  # the replica publishes its final position
        crash_host(c, p)
        wait_for(lambda: writable_nodes(c) == [other], 60, "the replica takes over")
        wait_for(
            lambda: sql(c, other, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SLOT}'"),
            30,
            "the slot re-created on the new primary",
        )
        log = c.nodes[other].log_path.read_text()
        assert "permanent_slot_recreated" in log and "are not delivered to its consumer" in log, log[-3000:]


def test_a_slot_removed_from_the_config_is_dropped_a_users_own_never() -> None:
    """Two permanent slots; one is removed with PATCH /config (what edit-config sends): the
    primary drops it within a few cycles, the replica's synced copy goes with it, and the other
    permanent slot and a user's own failover slot (created by SQL) stay everywhere."""
    dynamic = {**DYNAMIC, "slots": {SLOT: LOGICAL, "gone": LOGICAL}}
    with running_cluster(nodes=2, pg_version=17, dynamic=dynamic) as c:
        p = c.primary()
        assert p is not None
        r = next(n for n in c.names if n != p)
        slots = [SLOT, "gone", "mine"]

        def names(node: str, where: str = "") -> set[str]:
            q = f"SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical' {where}"
            return {str(row[0]) for row in sql(c, node, q)}

        wait_for(lambda: {SLOT, "gone"} <= names(p), 30, "both permanent slots on the primary")
        # a user's own failover slot, which hakeeper never managed
        sql(c, p, "SELECT pg_create_logical_replication_slot('mine', 'test_decoding', false, false, true)")

        # the replica syncs a slot once it moves past the replica's restart point (docs/slots.md,
        # "the first sync"): a consumer of each slot that keeps confirming does that
        def all_synced() -> bool:
            sql(c, p, "SELECT pg_log_standby_snapshot()")
            for s in slots:
                consume(c.write_dsn(), s)
            return names(r, "AND synced AND NOT temporary") == set(slots)

        wait_for(all_synced, 90, "every slot synced on the replica", interval=1.0)

        t0 = time.monotonic()
        cfg, _ = run_request(c, requests.patch_config, patch={"slots": {"gone": None}})
        assert set(cfg.slots) == {SLOT}
        wait_for(lambda: "gone" not in names(p), 30, "the removed slot dropped on the primary")
        print(f"dropped on the primary {time.monotonic() - t0:.1f}s after the config change")
        assert names(p) == {SLOT, "mine"}
        dropped = [e.get("slot") for e in events(c, p) if e.get("event") == "permanent_slot_dropped"]
        assert dropped == ["gone"], dropped
        # PostgreSQL's slot sync worker drops a synced copy whose slot is gone on the primary
        # (it naps up to 30 s when idle)
        wait_for(lambda: "gone" not in names(r), 75, "the synced copy dropped on the replica")
        print(f"dropped on the replica {time.monotonic() - t0:.1f}s after the config change")
        assert names(r, "AND synced") == {SLOT, "mine"}
        # and a few cycles later nothing else went: the user's slot is never hakeeper's to drop
        time.sleep(3)
        assert names(p) == {SLOT, "mine"}
        assert not [e for e in events(c, p) if e.get("slot") == "mine"]
