"""Incremental base backups (PostgreSQL 17; the first test also on 18) on the paths the chain
test does not take, against real hakeeper clusters:

* an encrypted repository: a full and an incremental through the CLI (the parent's manifest is
  fetched and decrypted); a new member is seeded from the newest backup, which is an incremental
  (``replica_from_backup``: the chain is applied in place), and then streams;
* an incremental taken from that standby (``--from standby``: summarize_wal runs there too),
  restored to its end with exactly its rows; its chain copied (``backup copy``) into an
  unencrypted repository and restored from there;
* the primary's WAL summaries removed: ``--type incremental`` becomes a full, with pg_basebackup's
  reason printed and recorded; the next incremental chains on that full;
* schedules: a ``full`` and an ``incremental`` schedule on the same cluster fire (both back the
  standby up) and the incremental one chains on the full one's backup;
* a new cluster bootstrapped (``bootstrap.from_backup``) from the schedule's incremental."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.backup import catalog
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_bootstrap import FromBackupCluster, events, names, q, tail, wait
from tests.integration.test_backup_restore import hk, ok
from tests.integration.test_schedule import record
from tests.support.cluster import (
    cluster_tmpdir,
    encrypted_fs_repository,
    free_base_port,
    running_cluster,
    start_first_member,
)
from tests.support.pg import PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

VERSION = 17


def batches(dsn_port: int, password: str) -> dict[str, int]:
    with psycopg.connect(
        host="127.0.0.1",
        port=dsn_port,
        user="postgres",
        password=password,
        dbname="postgres",
        connect_timeout=5,
    ) as conn:
        rows = conn.execute("SELECT batch, count(*) FROM t GROUP BY 1 ORDER BY 1").fetchall()
    return {str(b): int(n) for b, n in rows}


@pytest.mark.parametrize("version", [17, 18])
def test_seed_from_an_incremental_standby_incremental_and_lost_summaries_on_an_encrypted_repository(
    version: int,
) -> None:
    repo_dir = cluster_tmpdir("hk-incrp-repo-")
    base = cluster_tmpdir()
    area = PgArea()
    try:
        ra = resolve_run_as(repo_dir / "x")
        doc = encrypted_fs_repository(repo_dir, ra)
        prepare_fs_repository(repo_dir / "plain", ra)
        c = LocalCluster(
            base,
            nodes=2,
            base_port=free_base_port(2),
            scope=f"incrp{version}",
            backup={
                "repositories": [doc, {"name": "plain", "type": "fs", "path": str(repo_dir / "plain")}],
                "replica_from_backup": True,
            },
            pg_version=version,
        )
        with c:
            start_first_member(c)
            conf = str(c.nodes["node1"].config_path)

            def insert(batch: str) -> None:
                q(c, "node1", f"INSERT INTO t (batch) SELECT '{batch}' FROM generate_series(1, 100)")

            def create(kind: str, source: str) -> dict[str, Any]:
                res = hk("backup", "create", "-c", conf, "--from", source, "--type", kind, "-o", "json")
                doc: dict[str, Any] = ok(res)
                assert doc["status"] == "complete", doc
                return doc

            q(c, "node1", "CREATE TABLE t (id serial, batch text)")
            insert("a")
            full = create("full", "primary")
            insert("b")
            inc1 = create("incremental", "primary")
            assert (inc1["kind"], inc1["parent"], inc1["became_full"]) == ("incremental", full["id"], None)
            insert("c")

            # a new member: seeded from the newest backup, the incremental (its chain combined)
            c.agents["node2"].start()

            def streaming() -> bool:
                return ("node2", "streaming") in q(
                    c, "node1", "SELECT application_name, state FROM pg_stat_replication"
                )

            wait(streaming, 120, "node2 streams", c)
            insert("d")
            wait(
                lambda: q(c, "node2", "SELECT count(*) FROM t WHERE batch = 'd'") == [(100,)],
                30,
                "d on node2",
                c,
            )
            ev2 = events(c.nodes["node2"].log_path)
            seeded = [e for e in ev2 if e.get("event") == "clone_from_backup_finished"]
            assert seeded, tail(c.nodes["node2"].log_path)
            assert seeded[0]["backup"] == inc1["id"] and seeded[0]["chain"] == [full["id"], inc1["id"]]
            assert "clone_started" not in names(c.nodes["node2"].log_path)  # no pg_basebackup clone
            assert q(c, "node2", "SHOW summarize_wal") == [("on",)]  # the agent sets it on standbys too

            # an incremental from the standby, against the primary's incremental: `--from standby`
            # picks from the member records in etcd, which show node2 streaming (with its lag) up to
            # a loop_wait after pg_stat_replication does -- wait for what the command reads
            def listed_streaming() -> bool:
                doc = ok(hk("list", "-c", conf, "-o", "json"))
                return any(
                    m["name"] == "node2" and m["state"] == "streaming" and m["lag"] is not None
                    for m in doc["members"]
                )

            wait(listed_streaming, 60, "node2 listed as a streaming standby", c)
            inc2 = create("incremental", "standby")
            assert inc2["source"]["member"] == "node2" and inc2["source"]["standby"] is True
            assert (inc2["kind"], inc2["parent"], inc2["chain_root"]) == (
                "incremental",
                inc1["id"],
                full["id"],
            ), str({k: v for k, v in inc2.items() if k not in ("parts", "backup_label")})
            insert("e")

            # its chain restored to its end: exactly the rows it holds (encrypted links decrypted)
            (port,) = free_ports(1)
            res = ok(
                hk(
                    "restore",
                    "-c",
                    conf,
                    "-D",
                    str(area.data_dir("standby-incr")),
                    "--backup",
                    inc2["id"],
                    "--target-lsn",
                    inc2["stop_lsn"],
                    "--start",
                    "--port",
                    str(port),
                    "-o",
                    "json",
                )
            )
            assert res["chain"] == [full["id"], inc1["id"], inc2["id"]], res
            assert res["combine_mode"] == "in-place", res
            assert batches(port, c.superuser_password) == {b: 100 for b in "abcd"}
            # copied into the unencrypted repository: the whole chain, restorable from there
            ok(hk("backup", "copy", inc2["id"], "-c", conf, "--to", "plain", "-o", "json"))
            copied = ok(hk("backup", "list", "-c", conf, "--repo", "plain", "-o", "json"))
            assert [(b["id"], b["parent"]) for b in copied] == [
                (full["id"], None),
                (inc1["id"], full["id"]),
                (inc2["id"], inc1["id"]),
            ], copied
            (port,) = free_ports(1)
            res = ok(
                hk(
                    "restore",
                    "-c",
                    conf,
                    "-D",
                    str(area.data_dir("copied-incr")),
                    "--repo",
                    "plain",
                    "--backup",
                    inc2["id"],
                    "--target-lsn",
                    inc2["stop_lsn"],
                    "--start",
                    "--port",
                    str(port),
                    "-o",
                    "json",
                )
            )
            assert res["chain"] == [full["id"], inc1["id"], inc2["id"]] and res["repository"] == "plain", res
            assert batches(port, c.superuser_password) == {b: 100 for b in "abcd"}

            # the primary's WAL summaries are gone: the incremental cannot reach its parent
            # (once they cover the parent's start: the summarizer goes on from where it is, so the
            # range from the parent's start to the next backup's start has no summary any more)
            # (a summary file ends at a checkpoint's redo point: CHECKPOINT closes the current one)
            q(c, "node1", "CHECKPOINT")
            end2 = inc2["stop_lsn"]
            wait(
                lambda: (
                    q(
                        c,
                        "node1",
                        f"SELECT max(end_lsn) > '{end2}'::pg_lsn FROM pg_available_wal_summaries()",
                    )
                    == [(True,)]
                ),
                60,
                "node1's WAL summaries past the standby incremental",
                c,
            )
            summaries = c.nodes["node1"].data_dir / "pg_wal" / "summaries"
            gone = [p for p in summaries.iterdir() if p.suffix == ".summary"]
            assert gone, "no WAL summaries on node1"
            for p in gone:
                p.unlink()
            run = hk("backup", "create", "-c", conf, "--from", "primary", "--type", "incremental")
            assert run.returncode == 0, (run.stdout, run.stderr)
            assert "Traceback" not in run.stderr
            assert (
                f"asked for incremental, taken as full: pg_basebackup --incremental against {inc2['id']}"
                in (run.stdout)
            ), run.stdout
            listed = ok(hk("backup", "list", "-c", conf, "--repo", "fs", "-o", "json"))
            became = ok(hk("backup", "info", listed[-1]["id"], "-c", conf, "-o", "json"))
            assert (became["kind"], became["parent"]) == ("full", None), became
            assert "WAL summar" in became["became_full"], became["became_full"]
            insert("f")
            inc3 = create("incremental", "primary")  # new summaries: a chain on the new full
            assert (inc3["kind"], inc3["parent"]) == ("incremental", became["id"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
        area.cleanup()


def complete_records(repo_dir: Path, scope: str) -> list[catalog.BackupRecord]:
    async def go() -> list[catalog.BackupRecord]:
        repo = FilesystemRepository(repo_dir, name="fs")
        try:
            cat = await catalog.load_catalog(repo, scope, histories=False)
        finally:
            await repo.close()
        return list(cat.complete())

    return asyncio.run(go())


def test_a_full_and_an_incremental_schedule_make_a_chain() -> None:
    repo_dir = cluster_tmpdir("hk-incrs-repo-")
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(repo_dir / "x"))
        backup = {
            "repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}],
            "schedules": [
                {"name": "weekly", "kind": "full", "cron": "* * * * * 0,30"},
                {"name": "daily", "kind": "full", "type": "incremental", "cron": "* * * * * 10,20,40,50"},
            ],
        }
        # two nodes: the schedules' source `auto` backs the standby up, with nothing written
        # between two runs (the case where a standby's restartpoint is still the parent's start)
        with running_cluster(nodes=2, backup=backup, scope="incrs", pg_version=VERSION) as c:
            node = c.primary()
            assert node is not None
            q(c, node, "CREATE TABLE t (id serial, batch text)")
            q(c, node, "INSERT INTO t (batch) SELECT 'a' FROM generate_series(1, 1000)")

            def chained() -> list[catalog.BackupRecord] | None:
                recs = {r.id: r for r in complete_records(repo_dir, c.scope)}
                for r in recs.values():
                    p = recs.get(r.parent or "")
                    # from the standby: a run in the first loop_wait after start may still take the
                    # primary (`auto` reads the member records, which list the standby a cycle late)
                    from_standby = r.source is not None and r.source.standby
                    if (
                        r.kind == "incremental"
                        and from_standby
                        and p is not None
                        and p.label.startswith("schedule weekly")
                    ):
                        return [p, r]
                return None

            parent, child = wait(chained, 150, "an incremental of the daily schedule on the weekly full", c)
            assert child.label.startswith("schedule daily") and parent.kind == "full"
            assert child.source is not None and child.source.standby, child.source
            assert child.chain_root == parent.id
            runs = [r for r in record(c, "daily").get("runs", []) if r["result"] == "ok"]
            detail = [r["details"]["repositories"]["fs"] for r in runs if "details" in r]
            # the run's details name the incremental and its parent, with the backup's phases
            assert any(
                (d.get("backup"), d.get("type"), d.get("parent")) == (child.id, "incremental", parent.id)
                and "copy" in d.get("phases", {})
                for d in detail
            ), runs

            # a new cluster bootstrapped from that incremental (bootstrap.from_backup): its chain
            # combined, recovered to the incremental's end, promoted
            base_b = cluster_tmpdir()
            try:
                b = FromBackupCluster(
                    base_b,
                    nodes=1,
                    base_port=free_base_port(1),
                    scope="incrb",
                    backup={"repositories": backup["repositories"]},
                    from_backup={"scope": c.scope, "backup": child.id, "target_lsn": child.stop_lsn},
                    pg_version=VERSION,
                )
                with b:
                    b.start()
                    b.wait_ready(180)
                    log_b = b.nodes["node1"].log_path
                    wait(lambda: "bootstrap_from_backup_done" in names(log_b), 30, "bootstrap done", b)
                    ev = events(log_b)
                    done = next(e for e in ev if e.get("event") == "bootstrap_from_backup_done")
                    assert done["backup"] == child.id, done
                    combined = [e for e in ev if e.get("event") == "restore_chain_applied"]
                    assert combined and combined[0]["chain"] == [parent.id, child.id], combined
                    assert combined[0]["mode"] == "in-place" and combined[0]["files_rebuilt"] > 0, combined
                    assert q(b, "node1", "SELECT batch, count(*) FROM t GROUP BY 1") == [("a", 1000)]
                    assert q(b, "node1", "SELECT pg_is_in_recovery()") == [(False,)]
            finally:
                shutil.rmtree(base_b, ignore_errors=True)
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
