"""Backup schedules and the archive RPO against real etcd, agents and PostgreSQL 15.

* A `full` schedule every 20 s (the cron's sixth field is seconds) on a 2-node cluster: it runs
  on the leader only, once per slot, keeps the newest 2 backups (its retention), and after the
  leader is killed in the middle of a run the record says the run was interrupted by the
  failover and the new leader carries the schedule on.
* The archive RPO of a repository that is blocked rises while the other one's stays low, and
  falls again once the repository is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup import catalog
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import sql, wait_for
from tests.support.cluster import cluster_tmpdir, running_cluster

pytestmark = pytest.mark.integration


def schedules(c: LocalCluster, node: str) -> dict[str, dict[str, Any]]:
    """`hakeeper schedule list -o json` with that node's config."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "hakeeper",
            "schedule",
            "list",
            "-c",
            str(c.nodes[node].config_path),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return {d["name"]: d for d in json.loads(res.stdout)}


def record(c: LocalCluster, name: str) -> dict[str, Any]:
    """The raw etcd record of a schedule."""

    async def go() -> dict[str, Any]:
        client = c.etcd_client(timeout=2)
        try:
            kv = await client.get(f"/hakeeper/{c.scope}/schedules/{name}")
        finally:
            await client.close()
        return json.loads(kv.value) if kv is not None else {}

    return asyncio.run(go())


def complete_backups(repo_dir: Path, scope: str) -> list[str]:
    async def go() -> list[str]:
        repo = FilesystemRepository(repo_dir, name="fs")
        try:
            cat = await catalog.load_catalog(repo, scope, histories=False)
        finally:
            await repo.close()
        return [b.id for b in cat.complete()]

    return asyncio.run(go())


def metrics(c: LocalCluster, node: str) -> str:
    with urllib.request.urlopen(c.nodes[node].api_url + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_a_schedule_runs_once_per_slot_on_the_leader_keeps_its_retention_and_moves_with_a_failover() -> None:
    repo_dir = cluster_tmpdir("hk-sched-repo-")
    repo2_dir = cluster_tmpdir("hk-sched-repo2-")
    scope = "sched"
    backup = {
        "repositories": [
            {"name": "fs", "type": "fs", "path": str(repo_dir)},
            {"name": "fs2", "type": "fs", "path": str(repo2_dir), "offsite": True},
        ],
        "schedules": [
            {"name": "quick", "kind": "full", "cron": "* * * * * */20", "retention": {"count": 2}},
            {"name": "nightly-dump", "kind": "dump", "cron": "0 2 * * *"},
        ],
    }
    try:
        with running_cluster(nodes=2, backup=backup, scope=scope) as c:
            try:
                leader = c.primary()
                assert leader is not None
                other = next(n for n in c.names if n != leader)
                sql(c, leader, "CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")

                def ok_runs() -> list[dict[str, Any]]:
                    return [r for r in record(c, "quick").get("runs", []) if r["result"] == "ok"]

                wait_for(lambda: len(ok_runs()) >= 3, 300, "three successful runs of the schedule")
                runs = record(c, "quick")["runs"]
                keys = [(r["slot"], r["attempt"]) for r in runs]
                assert len(keys) == len(set(keys)), runs  # never the same slot twice
                assert {r["leader"] for r in runs} == {leader}, runs
                # retention count 2, applied after each run: at most 2 (+ one being taken)
                assert len(complete_backups(repo_dir, scope)) <= 2 + 1
                wait_for(lambda: len(complete_backups(repo_dir, scope)) <= 2, 120, "retention applied")
                # one backup per run, copied (same id) into the second repository, retention there too
                wait_for(
                    lambda: complete_backups(repo2_dir, scope) == complete_backups(repo_dir, scope),
                    120,
                    "the same backups in both repositories",
                )
                listed = schedules(c, other)  # any node's config and etcd tell the same
                q = listed["quick"]
                assert q["last_leader"] == leader and q["next_run"] is not None
                nightly = listed["nightly-dump"]
                assert nightly["available"] is True and nightly["next_run"].endswith("T02:00:00Z")
                m = metrics(c, leader)
                assert re.search(r'hakeeper_schedule_runs_total\{result="ok",schedule="quick"\} [3-9]', m), m
                assert 'hakeeper_schedule_last_success_timestamp_seconds{schedule="quick"}' in m
                # issue 16: the backup's phases in the run's details (the repository it was taken
                # into; the copy's has none), exported by every agent -- here the one not leading
                taken = ok_runs()[-1]["details"]["repositories"]
                copy = taken["fs"]["phases"]["copy"]
                assert copy["bytes"] > 0 and copy["seconds"] > 0 and "phases" not in taken["fs2"], taken
                wait_for(
                    lambda: (
                        'hakeeper_backup_phase_bytes{kind="backup",phase="copy",repository="fs"}'
                        in metrics(c, other)
                    ),
                    30,
                    "the scheduled backup's phases in the other agent's metrics",
                )

                # kill the leader while it runs a slot: the new leader marks it interrupted
                wait_for(
                    lambda: record(c, "quick")["runs"][-1]["result"] == "running", 120, "a run in progress"
                )
                running = record(c, "quick")["runs"][-1]
                killed_at = time.time()
                c.agents[leader].kill()
                wait_for(lambda: c.primary() == other, 120, "failover to the other node")

                def interrupted() -> dict[str, Any] | None:
                    for r in record(c, "quick")["runs"]:
                        if r["slot"] == running["slot"] and r["attempt"] == running["attempt"]:
                            return r if r["result"] == "interrupted" else None
                    return None

                marked = wait_for(interrupted, 120, "the killed leader's run marked interrupted")
                assert (
                    isinstance(marked, dict) and "failover" in marked["error"] and leader in marked["error"]
                )
                wait_for(
                    lambda: any(
                        r["leader"] == other and r["result"] == "ok" for r in record(c, "quick")["runs"]
                    ),
                    300,
                    "a successful run on the new leader",
                )
                runs = record(c, "quick")["runs"]
                keys = [(r["slot"], r["attempt"]) for r in runs]
                assert len(keys) == len(set(keys)), runs
                assert all(r["attempt"] <= 2 for r in runs), runs
                assert all(r["started_at"] <= killed_at for r in runs if r["leader"] == leader), runs
                assert "schedule_run_interrupted" in c.tail_log(other, 3000)
            except BaseException:
                for n in c.names:
                    print(f"--- {n} agent log ---\n{c.tail_log(n, 60)}")
                raise
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
        shutil.rmtree(repo2_dir, ignore_errors=True)


def dumps(repo_dir: Path, scope: str) -> list[dict[str, Any]]:
    """Every dump record in the repository (``DumpRecord`` as JSON), oldest first."""
    from hakeeper.backup.dump import load_dumps

    async def go() -> list[dict[str, Any]]:
        repo = FilesystemRepository(repo_dir, name=repo_dir.name)
        try:
            cat = await load_dumps(repo, scope)
        finally:
            await repo.close()
        return [r.model_dump(mode="json") for r in cat.records]

    return asyncio.run(go())


def test_dump_schedules_dump_on_the_primary_and_expire_only_their_own_dumps() -> None:
    """Two dump schedules of the same databases, like the classic daily dump and monthly export,
    with different retention, and a dump taken by hand: each schedule's retention removes only
    its own dumps; every scheduled dump is copied to the second repository."""
    dirs = {n: cluster_tmpdir(f"hk-dsched-{n}-") for n in ("a", "b")}
    scope = "dsched"
    backup = {
        "repositories": [{"name": n, "type": "fs", "path": str(p)} for n, p in dirs.items()],
        "schedules": [
            {"name": "often", "kind": "dump", "cron": "* * * * * */10", "retention": {"count": 1}},
            {
                "name": "seldom",
                "kind": "dump",
                "cron": "* * * * * 5,25,45",
                "retention": {"count": 10},
                "databases": ["app"],
                "format": "directory",
            },
        ],
    }
    try:
        with running_cluster(nodes=1, backup=backup, scope=scope) as c:
            node = c.names[0]
            try:
                sql(c, node, "CREATE DATABASE app")
                cli = [
                    sys.executable,
                    "-m",
                    "hakeeper",
                    "dump",
                    "create",
                    "-c",
                    str(c.nodes[node].config_path),
                ]
                manual = []
                for _ in range(2):  # two of app by hand: a count of 1 over them would remove one
                    res = subprocess.run(
                        [*cli, "--db", "app", "--repo", "a", "--label", "by hand", "-o", "json"],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                    assert res.returncode == 0, res.stderr
                    manual.append(json.loads(res.stdout))
                assert all(m["schedule"] is None and m["label"] == "by hand" for m in manual)

                def ok(name: str) -> list[dict[str, Any]]:
                    return [r for r in record(c, name).get("runs", []) if r["result"] == "ok"]

                wait_for(lambda: len(ok("often")) >= 4 and len(ok("seldom")) >= 3, 240, "dump runs")
                for name in ("often", "seldom"):
                    runs = record(c, name)["runs"]
                    assert all(r["result"] in ("ok", "running") for r in runs), runs
                for r in ok("often"):
                    d = r["details"]["repositories"]
                    assert d["b"]["copied_from"] == "a" and d["b"]["dump"] == d["a"]["dump"], r
                expired = {i for r in ok("often") for i in r["details"]["repositories"]["a"]["expired_dumps"]}
                assert expired, ok("often")  # four runs with count 1: the often schedule expired some
                assert all(i.startswith("D") for i in expired)

                for repo in dirs.values():
                    recs = dumps(repo, scope)
                    by = {
                        n: [r for r in recs if r["schedule"] == n and r["status"] == "complete"]
                        for n in ("often", "seldom")
                    }
                    # count 1, plus at most one just taken whose expire has not run yet
                    assert 1 <= len(by["often"]) <= 2, recs
                    assert all(r["id"] not in expired for r in recs), (expired, recs)
                    # the other schedule's dumps (of app, like the manual ones), all there
                    assert len(by["seldom"]) >= 2
                    assert {r["id"] for r in by["seldom"]} >= {
                        x["details"]["repositories"]["a"]["dump"] for x in ok("seldom")
                    }
                    assert all(r["dump_format"] == "directory" for r in by["seldom"])
                    assert all([d["name"] for d in r["databases"]] == ["app"] for r in by["seldom"])
                    assert all(r["all_databases"] for r in by["often"])
                    assert all(r["source"]["member"] == node and not r["source"]["standby"] for r in recs)
                # the manual dumps, older than every run, are never touched by a schedule
                assert {m["id"] for m in manual} <= {r["id"] for r in dumps(dirs["a"], scope)}
                listed = schedules(c, node)
                assert listed["seldom"]["databases"] == ["app"] and listed["seldom"]["format"] == "directory"
            except BaseException:
                print(f"--- agent log ---\n{c.tail_log(node, 80)}")
                raise
    finally:
        for p in dirs.values():
            shutil.rmtree(p, ignore_errors=True)


def rpo(c: LocalCluster, node: str) -> dict[str, float]:
    m = metrics(c, node)
    return {
        k: float(v)
        for k, v in re.findall(r'hakeeper_archive_rpo_seconds\{repository="(\w+)"\} ([0-9.e+]+)', m)
    }


def test_archive_rpo_rises_while_a_repository_is_blocked_and_falls_when_it_is_back() -> None:
    dirs = {n: cluster_tmpdir(f"hk-rpo-{n}-") for n in ("a", "b")}
    backup = {
        "repositories": [{"name": n, "type": "fs", "path": str(p), "timeout": 5} for n, p in dirs.items()],
        "archive": {"repo_timeout": 5},
        "schedules": [],
        "heartbeat_interval": 1,
    }
    # segments are closed by archive_timeout alone (the heartbeat writes): no pg_switch_wal()
    dynamic = {"postgresql": {"parameters": {"archive_timeout": "3s"}}}
    try:
        with running_cluster(nodes=1, backup=backup, scope="rpo", dynamic=dynamic) as c:
            node = c.names[0]
            try:
                # the heartbeat: a row of the leader, fresh
                wait_for(
                    lambda: sql(c, node, "SELECT now() - ts < interval '10 s' FROM hakeeper.heartbeat")[0][0],
                    60,
                    "a fresh heartbeat row",
                )
                wait_for(lambda: set(rpo(c, node)) == {"a", "b"}, 60, "an RPO for both repositories")
                wait_for(lambda: max(rpo(c, node).values()) < 15, 60, "both RPOs low")
                blocked = dirs["b"]
                aside = blocked.with_name(blocked.name + ".aside")
                os.rename(blocked, aside)
                blocked.write_text("not a directory: the repository is blocked")
                try:
                    wait_for(lambda: rpo(c, node)["b"] > 30, 120, "the blocked repository's RPO rising")
                    assert rpo(c, node)["a"] < 15
                    st = json.loads(
                        urllib.request.urlopen(c.nodes[node].api_url + "/status", timeout=5).read()
                    )
                    repos = {r["name"]: r for r in st["archive"]["repositories"]}
                    assert repos["b"]["rpo_seconds"] > 30 and repos["a"]["rpo_seconds"] < 15
                    assert st["archive"]["heartbeat"]["beats"] > 0
                finally:
                    blocked.unlink()
                    os.rename(aside, blocked)
                wait_for(lambda: rpo(c, node)["b"] < 15, 120, "the RPO falling once the repository is back")
            except BaseException:
                print(f"--- agent log ---\n{c.tail_log(c.names[0], 80)}")
                raise
    finally:
        for p in dirs.values():
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(p.with_name(p.name + ".aside"), ignore_errors=True)
