"""Incremental base backups (PostgreSQL 17 and 18) against real hakeeper clusters.

A chain full -> incremental -> incremental through the CLI; ``restore --latest`` and a
point-in-time restore rebuild it (in place, and with pg_combinebackup) and hold exactly the rows expected;
after a switchover (a new timeline) an incremental is taken as a full, with the reason; expire
keeps or removes whole chains.  On 15, ``--type incremental`` is refused with the reason."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_restore import hk, ok, wait
from tests.support.cluster import cluster_tmpdir, running_cluster
from tests.support.pg import PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration


def q(c: LocalCluster, node: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(node), autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def counts(port: int, password: str) -> dict[str, int]:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres", connect_timeout=5
    ) as conn:
        rows = conn.execute("SELECT batch, count(*) FROM t GROUP BY 1 ORDER BY 1").fetchall()
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        conn.execute("INSERT INTO t (batch) VALUES ('written after the restore')")
    return {str(b): int(n) for b, n in rows}


@pytest.fixture
def repo_and_area() -> Iterator[tuple[dict[str, Any], PgArea]]:
    repo_dir = cluster_tmpdir("hk-incr-repo-")
    area = PgArea()
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(area.root / "x"))
        cfg = {
            "repositories": [
                {"name": "fs", "type": "fs", "path": str(repo_dir), "retention": {"full_count": 1}}
            ]
        }
        yield cfg, area
    finally:
        area.cleanup()
        shutil.rmtree(repo_dir, ignore_errors=True)


def restore(conf: str, area: PgArea, name: str, *args: str) -> tuple[dict[str, Any], int]:
    (port,) = free_ports(1)
    dest = area.data_dir(name)
    res = ok(hk("restore", "-c", conf, "-D", str(dest), *args, "--start", "--port", str(port), "-o", "json"))
    return res, port


@pytest.mark.parametrize("version", [17, 18])
def test_incremental_chain_restore_pitr_promotion_expire(
    version: int, repo_and_area: tuple[dict[str, Any], PgArea]
) -> None:
    backup_cfg, area = repo_and_area
    with running_cluster(nodes=2, backup=backup_cfg, scope=f"incr{version}", pg_version=version) as c:
        old = c.primary()
        assert old is not None
        conf = str(c.nodes[old].config_path)
        assert q(c, old, "SHOW summarize_wal") == [("on",)]  # the agent turned it on

        def insert(batch: str, node: str | None = None) -> None:
            q(c, node or old, f"INSERT INTO t (batch) SELECT '{batch}' FROM generate_series(1, 100)")

        def create(kind: str) -> dict[str, Any]:
            doc: dict[str, Any] = ok(
                hk("backup", "create", "-c", conf, "--from", "primary", "--type", kind, "-o", "json")
            )
            assert doc["status"] == "complete"
            return doc

        q(c, old, "CREATE TABLE t (id serial, batch text)")
        insert("a")
        full = create("full")
        assert full["kind"] == "full" and full["parent"] is None
        insert("b")
        inc1 = create("incremental")
        assert (inc1["kind"], inc1["parent"], inc1["chain_root"]) == ("incremental", full["id"], full["id"])
        assert inc1["became_full"] is None
        insert("c")
        t_mid = q(c, old, "SELECT clock_timestamp()")[0][0]
        time.sleep(0.3)
        insert("d")
        inc2 = create("incremental")
        assert (inc2["parent"], inc2["chain_root"]) == (inc1["id"], full["id"])
        assert inc2["size"] < full["size"]  # only what changed (plus the small files)
        insert("e")

        listed = ok(hk("backup", "list", "-c", conf, "-o", "json"))
        assert [(b["id"], b["type"], b["parent"]) for b in listed] == [
            (full["id"], "full", None),
            (inc1["id"], "incremental", full["id"]),
            (inc2["id"], "incremental", inc1["id"]),
        ]
        table = ok(hk("backup", "list", "-c", conf))
        assert "incremental" in table and "Parent" in table
        info = ok(hk("backup", "info", inc2["id"], "-c", conf))
        assert f"parent     {inc1['id']} (chain {full['id']}" in info and "all in the archive" in info

        # the last incremental, up to the end of the archive: all five batches
        res, port = restore(conf, area, "latest", "--latest", "--include-current-wal")
        assert res["chain"] == [full["id"], inc1["id"], inc2["id"]]
        assert res["combine_mode"] == "in-place"  # the default: the links applied to the full
        assert counts(port, c.superuser_password) == {b: 100 for b in "abcde"}
        # a restore drill of the chain: pg_verifybackup of the combined copy, rows as recorded
        drill_run = hk("verify", "-c", conf, "--latest", "-o", "json")
        drill = json.loads(drill_run.stdout)
        assert drill_run.returncode == 0 and drill["ok"] is True, drill
        assert drill["backup_id"] == inc2["id"] and drill["checks"]["pg_verifybackup"]["ok"] is True
        # a time between the two incrementals: the first one's chain, replayed to the time
        # (rebuilt by pg_combinebackup, on request)
        res, port = restore(
            conf, area, "mid", "--target-time", t_mid.isoformat(), "--combine", "pg_combinebackup"
        )
        assert res["backup"] == inc1["id"] and res["chain"] == [full["id"], inc1["id"]]
        assert res["combine_mode"] == ("link" if version >= 18 else "copy-file-range")
        assert counts(port, c.superuser_password) == {b: 100 for b in "abc"}

        # a switchover: timeline 2; the next incremental cannot continue the chain
        new = next(n for n in c.nodes if n != old)
        sw = hk("switchover", "-c", conf, "--candidate", new, "--force")
        assert sw.returncode == 0, sw.stderr
        wait(lambda: c.node_state(new).role == "primary", 60, "new primary writable")
        insert("f", new)
        conf = str(c.nodes[new].config_path)
        after = create("incremental")
        assert after["kind"] == "full" and after["parent"] is None
        assert "timeline" in after["became_full"], after["became_full"]
        assert after["timeline"] == inc2["timeline"] + 1
        insert("g", new)
        inc3 = create("incremental")
        assert (inc3["kind"], inc3["parent"]) == ("incremental", after["id"])

        # retention full_count 1: the old chain goes whole, the new one stays whole
        plans = ok(hk("backup", "expire", "-c", conf, "-o", "json"))
        assert sorted(b["id"] for b in plans[0]["backups"]) == sorted([full["id"], inc1["id"], inc2["id"]])
        assert plans[0]["kept"] == [inc3["id"], after["id"]]
        res, port = restore(conf, area, "after-expire", "--latest", "--include-current-wal")
        assert res["chain"] == [after["id"], inc3["id"]]
        assert counts(port, c.superuser_password) == {b: 100 for b in "abcdefg"}


def test_incremental_refused_on_15(repo_and_area: tuple[dict[str, Any], PgArea]) -> None:
    backup_cfg, _area = repo_and_area
    with running_cluster(nodes=1, backup=backup_cfg, scope="incr15", pg_version=15) as c:
        node = next(iter(c.nodes))
        conf = str(c.nodes[node].config_path)
        res = hk("backup", "create", "-c", conf, "--type", "incremental")
        assert res.returncode != 0
        assert "incremental backups need PostgreSQL 17 or later" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert ok(hk("backup", "list", "-c", conf, "-o", "json")) == []  # nothing was started
        # the agent never set summarize_wal on 15 (the server would not have started)
        assert q(c, node, "SELECT count(*) FROM pg_settings WHERE name = 'summarize_wal'") == [(0,)]
