"""``hakeeper reinit MEMBER --delta`` on a real cluster (issue 16, item 2): the replica's own old
copy is brought to the newest (indexed) backup block by block -- only part of the bytes written
-- then replays the archive and streams with every row; when the newest backup has no file index
the agent says why and falls back to what a plain reinit does (remove, then a full copy)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_cli_ops import hk
from tests.support.cluster import cluster_tmpdir, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    repo_dir = cluster_tmpdir("hk-reinit-delta-repo-")
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(repo_dir / "x"))
        backup = {"repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}]}
        with running_cluster(nodes=2, scope="rdelta", backup=backup) as c:
            yield c
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def sql(c: LocalCluster, name: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(name), connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def count(c: LocalCluster, name: str) -> int | None:
    try:
        return int(sql(c, name, "SELECT count(*) FROM rd_rows")[0][0])
    except psycopg.Error:
        return None


def backup(c: LocalCluster, compress_on: str) -> dict[str, Any]:
    res = hk(c, "backup", "create", "--compress-on", compress_on, "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    assert doc["status"] == "complete", doc
    return doc


def events(log: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if f'"{name}"' in line:
            try:
                out.append(json.loads(line[line.index("{") :]))
            except ValueError:
                continue
    return out


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def reinit_delta(c: LocalCluster, rep: str) -> tuple[str, str]:
    """``reinit REP --delta --force --wait``; returns (its stdout, the agent log it wrote meanwhile)."""
    logp = c.nodes[rep].log_path
    start = logp.stat().st_size
    res = hk(c, "reinit", rep, "--delta", "--force", "--wait", node=rep)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout, log_since(logp, start)


def test_reinit_delta_writes_only_what_differs_and_falls_back_to_a_clone_without_an_index(
    cluster: LocalCluster,
) -> None:
    c = cluster
    prim = c.primary()
    assert prim is not None
    rep = next(n for n in c.names if n != prim)
    # ~60 MB of rows, so that what a delta leaves alone is most of the copy
    sql(c, prim, "CREATE TABLE rd_rows (id int PRIMARY KEY, pad text)")
    sql(c, prim, "INSERT INTO rd_rows SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 150000) g")
    sql(c, prim, "CHECKPOINT")
    backup(c, "client")  # indexed (file index with block hashes)
    # after the backup: new rows and a few updated ones, replayed from the archive / the stream
    sql(c, prim, "INSERT INTO rd_rows SELECT g, 'after' FROM generate_series(150001, 151000) g")
    sql(c, prim, "UPDATE rd_rows SET pad = 'changed' WHERE id <= 100")
    deadline = time.monotonic() + 60
    while count(c, rep) != 151000:
        assert time.monotonic() < deadline, "rows not replicated before the reinit"
        time.sleep(0.3)
    pid = c.postmaster_pid(rep)

    out, log = reinit_delta(c, rep)

    assert f"of {rep}: succeeded (delta), streaming from {prim}" in out, out
    done = events(log, "clone_from_backup_finished")
    assert len(done) == 1 and done[0]["delta"] is True, log[-3000:]
    written, total = done[0]["bytes_written"], done[0]["bytes_total"]
    assert isinstance(written, int) and isinstance(total, int) and total > 50_000_000
    assert written < total / 2, (written, total)  # the old copy was mostly the backup already
    assert '"clone_started"' not in log  # no pg_basebackup
    assert c.postmaster_pid(rep) != pid
    sql(c, prim, "INSERT INTO rd_rows VALUES (151001, 'after the reinit')")
    deadline = time.monotonic() + 60
    while count(c, rep) != 151001:
        assert time.monotonic() < deadline, f"rows on the delta copy: {count(c, rep)}"
        time.sleep(0.3)
    assert sql(c, rep, "SELECT count(*) FROM rd_rows WHERE pad = 'changed'") == [(100,)]
    status = json.loads(hk(c, "reinit", rep, "--status", "-o", "json", node=rep).stdout)
    assert (status["state"], status["delta"], status["method"]) == ("succeeded", True, "delta")

    # The newest backup has no file index (compressed by the server): said, then a clone.
    backup(c, "server")
    out, log = reinit_delta(c, rep)
    assert f"of {rep}: succeeded (clone), streaming from {prim}" in out, out
    skipped = events(log, "clone_from_backup_skipped")
    assert skipped and re.search(r"index", skipped[0]["reason"]), log[-3000:]
    # then what a plain reinit does: the old copy removed, a full copy (this cluster seeds new
    # replicas from its backups: replica_from_backup) -- nothing of the delta
    names = [json.loads(x[x.index("{") :]).get("event") for x in log.splitlines() if "{" in x]
    assert names.index("reinitialize_delta_fell_back") < names.index("postgres_data_dir_removed"), names
    assert names.index("postgres_data_dir_removed") < names.index("clone_finished"), names
    assert all(e["delta"] is False for e in events(log, "clone_from_backup_finished")), log[-3000:]
    sql(c, prim, "INSERT INTO rd_rows VALUES (151002, 'after the clone')")
    deadline = time.monotonic() + 60
    while count(c, rep) != 151002:
        assert time.monotonic() < deadline, f"rows on the clone: {count(c, rep)}"
        time.sleep(0.3)
