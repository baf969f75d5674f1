"""Restore drills (``hakeeper verify``) against a real PostgreSQL 15 and a filesystem repository,
through the command line: a drill on a good backup passes with equal row counts and an RTO by
phase; a corrupted repository object makes the next drill fail and name it; every drill leaves
no server and no scratch directory behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper.backup.catalog import read_record, record_key
from hakeeper.backup.repos import make_repository
from tests.integration.test_backup_restore import (
    SCOPE,
    area,  # noqa: F401  (fixture)
    fs_env,
    hk,
    insert,
    node_yaml,
    ok,
    sql,
    start_primary,
)
from tests.support.pg import PgArea

pytestmark = pytest.mark.integration


def _db_sql(port: int, db: str, query: str) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", password="su-secret", dbname=db, autocommit=True
    ) as c:
        c.execute(query)


def _postgres_running_in(root: Path) -> list[str]:
    """Command lines of processes whose command line mentions ``root`` (a scratch server)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) in cmd and "postgres" in cmd:
            found.append(cmd)
    return found


def _verify(conf: Path) -> tuple[int, dict[str, Any]]:
    res = hk("verify", "-c", str(conf), "--latest", "-o", "json")
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


@pytest.mark.matrix  # also run on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
def test_drill_passes_on_a_good_backup_and_names_a_corrupted_object(area: PgArea) -> None:  # noqa: F811
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 5000)
    sql(p, "CREATE INDEX t_batch ON t (batch)")
    sql(p, "CREATE DATABASE shop")
    _db_sql(p, "shop", "CREATE TABLE items (id int PRIMARY KEY, sku text); CREATE INDEX ON items (sku)")
    _db_sql(p, "shop", "INSERT INTO items SELECT g, 'sku' || g FROM generate_series(1, 777) g")
    _db_sql(p, "shop", "CREATE UNLOGGED TABLE scratch AS SELECT 1 AS x")  # empty after a restore: not counted
    scratch = area.root / "verify-scratch"
    conf = node_yaml(env, "p", area.root / "node.yml")
    doc = yaml.safe_load(conf.read_text())
    doc["backup"]["verify"] = {"scratch_dir": str(scratch), "timeout": 120}
    conf.write_text(yaml.safe_dump(doc))

    ok(hk("dump", "create", "-c", str(conf), "--db", "shop", "--from", "local", "-o", "json"))
    rec = ok(hk("backup", "create", "-c", str(conf), "--from", "local", "--part-size", "1", "-o", "json"))
    counts = rec["row_counts"]
    assert counts["skipped"] is None and counts["exact"] is True, counts
    assert counts["restore_point"] == f"hakeeper-{rec['id']}"
    assert counts["tables"]["postgres"]["public.t"] == 5000
    assert counts["tables"]["shop"] == {"public.items": 777}
    # rows written after the backup: the drill restores to the counts' restore point, not past it
    insert(p, "b", 300)
    _db_sql(p, "shop", "DELETE FROM items WHERE id <= 10")

    code, res = _verify(conf)
    assert code == 0, res
    assert res["ok"] is True and res["error"] is None and res["failed_object"] is None
    assert res["backup_id"] == rec["id"] and res["repository"] == "fs1"
    assert res["target"].startswith("restore point") or rec["row_counts"]["restore_point"] in res["target"]
    checks = res["checks"]
    for name in ("restore", "pg_verifybackup", "row_counts", "pg_amcheck", "dump_restore"):
        assert checks[name]["ok"] is True, (name, checks[name])
    rows = res["row_counts"]
    assert rows["compared"] is True and rows["exact_expected"] is True and rows["differences"] == []
    assert rows["counts"]["postgres"]["public.t"] == 5000  # not the 300 rows of batch b
    assert rows["counts"]["shop"] == {"public.items": 777}
    dump = res["dump"]
    assert [(d["name"], d["tables"], d["rows"]) for d in dump["databases"]] == [("shop", 1, 777)], dump
    rto = res["rto"]
    for phase in ("plan", "fetch", "decompress", "wal_replay", "promote", "total"):
        assert isinstance(rto[phase], int | float) and rto[phase] >= 0, (phase, rto)
    assert rto["total"] >= rto["fetch"] + rto["decompress"] + rto["wal_replay"] + rto["promote"] - 0.01
    assert rto["wal_replay"] > 0
    stored = f"fs1:{SCOPE}/backup/{rec['id']}/verify-"
    assert any(s.startswith(stored) for s in res["stored"]), res["stored"]
    # cleaned up: no scratch directory, no server
    assert os.listdir(scratch) == []
    assert _postgres_running_in(scratch) == []
    # the report, without etcd: the drill stored with the backup, the dump's age and restore time
    rep = ok(hk("report", "-c", str(conf), "-o", "json"))
    rows = {r["scenario"]: r for r in rep["rows"]}
    assert rows["WAL archive + PITR"]["rto_seconds"] == rto["total"], rows
    assert rows["WAL archive + PITR"]["rpo_seconds"] is not None  # newest archived WAL's age
    assert rows["daily dump"]["rto_seconds"] == dump["seconds"], rows
    assert 0 <= rows["daily dump"]["rpo_seconds"] < 600
    assert rows["failover"]["rto"] == "not measured yet"
    assert any("etcd could not be read" in n for n in rep["notes"]), rep["notes"]
    # backup list shows the drill
    listed = ok(hk("backup", "list", "-c", str(conf), "-o", "json"))
    assert listed[0]["verified"]["ok"] is True and listed[0]["verified"]["id"] == res["id"]

    # one flipped byte in a stored part: the drill fails and names the object
    part = Path(str(env.repo_cfg.path)) / SCOPE / "backup" / rec["id"] / rec["parts"][0]["name"]
    blob = bytearray(part.read_bytes())
    pos = len(blob) // 2
    blob[pos] ^= 0x55
    part.write_bytes(bytes(blob))
    code, bad = _verify(conf)
    assert code == 1, bad
    key = f"{SCOPE}/backup/{rec['id']}/{rec['parts'][0]['name']}"
    assert bad["ok"] is False and bad["failed_object"] == key, bad
    assert key in bad["error"]
    assert bad["checks"]["restore"]["ok"] is False
    assert os.listdir(scratch) == []
    assert _postgres_running_in(scratch) == []
    listed = ok(hk("backup", "list", "-c", str(conf), "-o", "json"))
    assert listed[0]["verified"]["ok"] is False and listed[0]["verified"]["failed_object"] == key
    blob[pos] ^= 0x55
    part.write_bytes(bytes(blob))

    # counts that differ from the restored rows: a failure when they were exact, a report when not
    def set_recorded(exact: bool, items: int) -> None:
        async def go() -> None:
            async with make_repository(env.repo_cfg) as repo:
                r = await read_record(repo, SCOPE, rec["id"])
                assert r.row_counts is not None
                r.row_counts.exact = exact
                r.row_counts.inexact_reason = None if exact else "test: pretended commits in the window"
                r.row_counts.tables["shop"]["public.items"] = items
                await repo.put(record_key(SCOPE, rec["id"]), r.to_json())

        asyncio.run(go())

    set_recorded(True, 778)
    code, bad = _verify(conf)
    assert code == 1 and bad["checks"]["row_counts"]["ok"] is False, bad
    assert bad["row_counts"]["differences"] == [
        {"database": "shop", "table": "public.items", "recorded": 778, "restored": 777}
    ]
    assert bad["failed_object"] is None and "row_counts" in bad["error"]
    set_recorded(False, 778)
    code, res = _verify(conf)
    assert code == 0 and res["ok"] is True, res
    assert res["row_counts"]["exact_expected"] is False and len(res["row_counts"]["differences"]) == 1
    assert "not exact" in res["checks"]["row_counts"]["detail"]
    set_recorded(True, 777)

    # a corrupted manifest: the copy restores, pg_verifybackup cannot run, the manifest is named
    manifest = part.parent / "backup_manifest"
    good = manifest.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0x55
    manifest.write_bytes(bytes(blob))
    code, bad = _verify(conf)
    assert code == 1, bad
    assert bad["failed_object"] == f"{SCOPE}/backup/{rec['id']}/backup_manifest", bad
    assert bad["checks"]["pg_verifybackup"]["ok"] is False
    assert os.listdir(scratch) == []
    manifest.write_bytes(good)

    # Ctrl-C while the scratch server runs: it is stopped and the directory removed all the same
    proc = subprocess.Popen(
        [sys.executable, "-m", "hakeeper", "verify", "-c", str(conf), "--latest", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")},
    )
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("*/data/postmaster.pid")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the scratch server never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, errs = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, errs[-2000:])
    assert os.listdir(scratch) == []
    assert _postgres_running_in(scratch) == []

    # an indexed backup: its restore records what it wrote (hakeeper-restore-state.json), a file
    # the backup's manifest does not list, and pg_verifybackup still passes
    idx = ok(
        hk("backup", "create", "-c", str(conf), "--from", "local", "--compress-on", "client", "-o", "json")
    )
    assert idx["layout"] == "zstd-indexed", idx
    code, res = _verify(conf)
    assert code == 0 and res["backup_id"] == idx["id"], res
    assert res["checks"]["pg_verifybackup"]["ok"] is True, res["checks"]


# --------------------------------------------------------------------------- with etcd and agents


def test_drill_result_in_etcd_metrics_and_the_report_after_a_failover() -> None:
    """A 2-node cluster archiving into a directory: a drill's result goes to etcd and every
    agent's metrics; after a failover, `hakeeper report` shows the drill's RTO, the archive's
    RPO from the leader and the failover RTO the agent measured -- and nothing it did not measure."""
    import contextlib
    import re
    import shutil
    import threading
    import urllib.request

    from tests.integration.test_ha import sql as csql
    from tests.integration.test_ha import wait_for
    from tests.support.cluster import cluster_tmpdir, running_cluster

    repo_dir = cluster_tmpdir("hk-drill-repo-")
    backup = {
        "repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}],
        "schedules": [],
        "heartbeat_interval": 1,
    }
    stop = threading.Event()
    try:
        with running_cluster(nodes=2, backup=backup, scope="drill") as c:
            leader = c.primary()
            assert leader is not None
            other = next(n for n in c.names if n != leader)
            conf = str(c.nodes[leader].config_path)

            def metrics(node: str) -> str:
                with urllib.request.urlopen(c.nodes[node].api_url + "/metrics", timeout=5) as r:
                    return str(r.read().decode())

            def report(node: str) -> dict[str, Any]:
                res = ok(hk("report", "-c", str(c.nodes[node].config_path), "-o", "json"))
                return {r["scenario"]: r for r in res["rows"]}

            def switcher() -> None:  # archive_timeout's part (see test_schedule)
                while not stop.wait(2):
                    with contextlib.suppress(Exception):
                        csql(c, c.primary() or leader, "SELECT pg_switch_wal()")

            try:
                csql(c, leader, "CREATE TABLE t AS SELECT g FROM generate_series(1, 4321) g")
                before = report(leader)
                assert before["WAL archive + PITR"]["rto"] == "not measured yet"
                assert before["failover"]["rto"] == "not measured yet"
                rec = ok(hk("backup", "create", "-c", conf, "--from", "primary", "-o", "json"))
                assert rec["row_counts"]["tables"]["postgres"]["public.t"] == 4321
                res = hk("verify", "-c", conf, "--latest", "-o", "json")
                assert res.returncode == 0, res.stdout + res.stderr
                drill = json.loads(res.stdout)
                assert drill["ok"] is True, drill
                assert drill["row_counts"]["counts"]["postgres"]["public.t"] == 4321
                assert "etcd:/hakeeper/drill/verify/last" in drill["stored"], drill["stored"]
                assert "etcd:/hakeeper/drill/verify/last_success" in drill["stored"]
                for node in c.names:  # every agent exports what etcd holds
                    wait_for(
                        lambda n=node: "hakeeper_verify_last_result 1.0" in metrics(n),
                        30,
                        f"the drill's result in {node}'s metrics",
                    )
                m = metrics(other)
                total = float(re.findall(r'hakeeper_verify_rto_seconds\{phase="total"\} ([0-9.e+-]+)', m)[0])
                assert total == drill["rto"]["total"]
                # issue 16: the drill's throughput by phase, exported by an agent that did not run it
                copy = drill["phases"]["copy"]
                assert copy["bytes"] == drill["restore"]["size"] and copy["seconds"] > 0, drill["phases"]
                assert drill["phases"]["wal_replay"]["seconds"] > 0
                pat = r'hakeeper_backup_phase_{}\{{kind="drill",phase="copy",repository="fs"\}} ([0-9.e+-]+)'
                assert float(re.findall(pat.format("bytes"), m)[0]) == copy["bytes"]
                assert float(re.findall(pat.format("seconds"), m)[0]) == copy["seconds"]
                assert float(re.findall(pat.format("rate_bytes_per_second"), m)[0]) == copy["rate"]

                t = threading.Thread(target=switcher, daemon=True)
                t.start()
                c.agents[leader].kill()
                c.kill_postgres(leader)
                wait_for(lambda: c.primary() == other, 120, "failover to the other node")
                rows = wait_for(
                    lambda: (
                        (r := report(other))["WAL archive + PITR"]["rpo_seconds"] is not None
                        and r["failover"]["rto_seconds"] is not None
                        and r
                    ),
                    120,
                    "a report with the archive RPO and the failover RTO",
                )
                assert isinstance(rows, dict)
                pitr = rows["WAL archive + PITR"]
                assert pitr["rto_seconds"] == drill["rto"]["total"], pitr
                assert drill["id"] in pitr["source"] and "archive lag now" in pitr["source"]
                assert "restore phases: plan " in pitr["source"] and "; copy " in pitr["source"], pitr
                assert pitr["rpo_seconds"] < 60, pitr
                fo = rows["failover"]
                assert 0 < fo["rto_seconds"] < 120 and "measured by the agents" in fo["source"], fo
                assert rows["daily dump"]["rpo"] == "no complete dump"
                assert rows["daily dump"]["rto"] == "not measured yet"
                text = hk("report", "-c", str(c.nodes[other].config_path))
                assert text.returncode == 0 and "WAL archive + PITR" in text.stdout, text
            except BaseException:
                for n in c.names:
                    print(f"--- {n} agent log ---\n{c.tail_log(n, 60)}")
                raise
            finally:
                stop.set()
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def test_a_verify_schedule_runs_drills_on_the_leader() -> None:
    """backup.schedules kind verify: the leader runs a drill per slot; its result is in the
    schedule's record and in etcd's verify/last."""
    import shutil

    from tests.integration.test_ha import sql as csql
    from tests.integration.test_ha import wait_for
    from tests.integration.test_schedule import record
    from tests.support.cluster import cluster_tmpdir, running_cluster

    repo_dir = cluster_tmpdir("hk-drill-sched-")
    backup = {
        "repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}],
        "schedules": [{"name": "drill", "kind": "verify", "cron": "* * * * * */15"}],
    }
    try:
        with running_cluster(nodes=1, backup=backup, scope="vsched") as c:
            node = c.names[0]
            try:
                csql(c, node, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1234) g")
                # no backup yet: the run fails, saying so
                wait_for(
                    lambda: any(r["result"] == "failed" for r in record(c, "drill").get("runs", [])),
                    90,
                    "a failed run without a backup",
                )
                failed = next(r for r in record(c, "drill")["runs"] if r["result"] == "failed")
                assert "nothing to verify" in failed["error"], failed
                conf = str(c.nodes[node].config_path)
                ok(hk("backup", "create", "-c", conf, "--from", "primary", "-o", "json"))
                wait_for(
                    lambda: any(r["result"] == "ok" for r in record(c, "drill").get("runs", [])),
                    120,
                    "a successful drill run",
                )
                run = next(r for r in record(c, "drill")["runs"] if r["result"] == "ok")
                fs = run["details"]["repositories"]["fs"]
                assert fs["ok"] is True and fs["rto_seconds"] > 0, run
                rep = ok(hk("report", "-c", conf, "-o", "json"))
                pitr = next(r for r in rep["rows"] if r["scenario"] == "WAL archive + PITR")
                assert pitr["rto_seconds"] is not None and "drill V" in pitr["source"], pitr
            except BaseException:
                print(f"--- agent log ---\n{c.tail_log(node, 80)}")
                raise
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
