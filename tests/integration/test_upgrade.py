"""``hakeeper upgrade`` of a running 3-node cluster, real servers of both majors (issue 15).

Under a light write load through the multi-host DSN: every acknowledged row is on every node
afterwards (table checksums compared), every node runs the new major and streams, a host-crash
failover works, a new base backup of the new major exists, and ``history`` records the upgrade.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

from hakeeper.core.cluster import Upgrade
from hakeeper.core.keys import Keys
from hakeeper.dcs.store import ClusterStore
from hakeeper.localcluster import LocalCluster
from hakeeper.localcluster.layout import REPLICATION_USER
from hakeeper.util.proc import resolve_run_as
from tests.support.cluster import cluster_tmpdir, crash_host, encrypted_fs_repository, running_cluster
from tests.support.load import RowWriter

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


def wait_for(cond: Any, timeout: float, what: str, c: LocalCluster) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{c.tail_log(n, 30)}" for n in c.names)
            raise AssertionError(f"{what} not within {timeout:.0f} s\n{logs}")
        time.sleep(0.5)


def settled(c: LocalCluster, timeout: float = 60) -> None:
    """Until every member's record (what the preflight reads) says running or streaming: the
    cluster being ready by SQL comes a cycle before the records say so."""

    def done() -> bool:
        res = hk(c, "list", "-o", "json")
        ms = json.loads(res.stdout)["members"] if res.returncode == 0 else []
        return len(ms) == len(c.names) and all(m["state"] in ("running", "streaming") for m in ms)

    wait_for(done, timeout, "every member record running or streaming", c)


def majors(c: LocalCluster) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for n in c.names:
        try:
            out[n] = int(sql(c, n, "SHOW server_version_num")[0][0]) // 10000
        except psycopg.Error:
            out[n] = None
    return out


@pytest.mark.parametrize(("old", "new", "method"), [(17, 18, "link"), (15, 17, "copy")])
def test_upgrade_of_a_running_cluster_under_load(old: int, new: int, method: str) -> None:
    repo_dir = cluster_tmpdir("hk-upg-repo-")
    repo = encrypted_fs_repository(repo_dir, resolve_run_as(repo_dir / "x"))
    try:
        with running_cluster(nodes=3, pg_version=old, backup={"repositories": [repo]}) as c:
            upgrade_under_load(c, old, new, method)
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def upgrade_under_load(c: LocalCluster, old: int, new: int, method: str) -> None:
    primary = c.primary()
    assert primary is not None
    sql(c, primary, "CREATE TABLE t (id int PRIMARY KEY)")
    res = hk(c, "backup", "create", "-o", "json")
    assert res.returncode == 0, res.stderr
    old_backup = json.loads(res.stdout)

    settled(c)
    res = hk(c, "upgrade", "--to-version", str(new), "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no problem found" in res.stdout

    writer = RowWriter(c.write_dsn())
    writer.start()
    time.sleep(2)
    res = hk(c, "upgrade", "--to-version", str(new), "--method", method, "--force")
    time.sleep(2)
    writer.stop.set()
    writer.join(10)
    logs = "\n".join(f"--- {n}\n{c.tail_log(n, 40)}" for n in c.names)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}"
    assert "write downtime" in res.stdout and "upgrade key removed" in res.stdout

    assert majors(c) == dict.fromkeys(c.names, new)
    primary = c.wait_ready(120)  # one primary, every other node streaming from it
    old_dir = c.nodes[primary].data_dir.with_name(f"data.{old}.old")
    assert (old_dir / "PG_VERSION").read_text().strip() == str(old)
    # --link moved the old cluster's control file aside (it must not start again); --copy did not
    assert (old_dir / "global" / "pg_control").exists() == (method == "copy")
    acked = writer.ids
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

    # the backup taken after the upgrade restores (a drill: restore, pg_verifybackup, row counts)
    new_backup = next(b["id"] for b in items if b["pg_major"] == new)
    res = hk(c, "verify", "--backup", new_backup, "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr

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


def upgrade_key(c: LocalCluster) -> Any:
    async def read() -> Any:
        client = c.etcd_client()
        try:
            return (await ClusterStore(client, Keys(f"/hakeeper/{c.scope}")).read_view()).upgrade
        finally:
            await client.close()

    return asyncio.run(read())


def test_check_lists_an_unreplicated_replica_and_missing_binaries_and_changes_nothing() -> None:
    with running_cluster(nodes=3, pg_version=17) as c:
        primary = c.primary()
        assert primary is not None
        replica = next(n for n in c.names if n != primary)
        # no PostgreSQL 16 anywhere: every member says so, with the fix
        res = hk(c, "upgrade", "--to-version", "16", "--check", "-o", "json")
        assert res.returncode == 1, res.stdout + res.stderr
        found = json.loads(res.stdout)["problems"]
        missing = {p["member"] for p in found if p["check"] == "binaries"}
        assert missing == set(c.names), found
        assert all("postgresql.bin_dirs.16" in (p["fix"] or "") for p in found if p["check"] == "binaries")

        # a replica that cannot stream: its walsender ended, its password no longer valid
        sql(c, primary, f"ALTER ROLE {REPLICATION_USER} PASSWORD 'not-the-one-they-have'")
        try:
            sql(
                c,
                primary,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_replication "
                f"WHERE application_name = '{replica}'",
            )

            def not_streaming() -> bool:
                res = hk(c, "list", "-o", "json")
                ms = {m["name"]: m for m in json.loads(res.stdout)["members"]}
                return ms[replica]["state"] != "streaming"

            wait_for(not_streaming, 60, f"{replica} not streaming", c)
            res = hk(c, "upgrade", "--to-version", "18", "--check")
            assert res.returncode == 1, res.stdout + res.stderr
            assert replica in res.stdout and "does not stream" in res.stdout, res.stdout
            assert "nothing was changed" in res.stdout
            assert majors(c) == dict.fromkeys(c.names, 17) and upgrade_key(c) is None
        finally:
            sql(c, primary, f"ALTER ROLE {REPLICATION_USER} PASSWORD '{c.replication_password}'")
        c.wait_ready(120)


def test_a_failing_pg_upgrade_leaves_the_old_cluster_running_and_writable() -> None:
    """pgcrypto is in 17's build and not in 18's: pg_upgrade stops at its library check.  The
    preflight finds it; an interrupted upgrade continued (its key already in etcd, so no
    preflight) runs into it: the agent rolls back, the old primary takes writes again, the
    replicas follow it, nothing is lost."""
    with running_cluster(nodes=3, pg_version=17) as c:
        primary = c.primary()
        assert primary is not None
        sql(c, primary, "CREATE EXTENSION pgcrypto; CREATE TABLE t (id int PRIMARY KEY)")
        sql(c, primary, "INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        settled(c)
        res = hk(c, "upgrade", "--to-version", "18", "--check")
        assert res.returncode == 1 and "pgcrypto" in res.stdout, res.stdout + res.stderr

        async def interrupted() -> None:
            client = c.etcd_client()
            try:
                rec = Upgrade("interrupted1", 17, 18, "link", time.time(), by="test")
                assert await ClusterStore(client, Keys(f"/hakeeper/{c.scope}")).upgrades.write(None, rec)
            finally:
                await client.close()

        asyncio.run(interrupted())
        res = hk(c, "upgrade", "--to-version", "18", "--force")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "rolled back" in res.stderr and "pg_upgrade" in res.stderr, res.stderr
        assert upgrade_key(c) is None
        assert c.wait_ready(120) == primary  # the same primary, every replica streaming again
        assert majors(c) == dict.fromkeys(c.names, 17)
        sql(c, primary, "INSERT INTO t VALUES (0)")
        want = sql(c, primary, CHECKSUM_SQL)
        assert want[0][0] == 1001
        wait_for(lambda: all(sql(c, n, CHECKSUM_SQL) == want for n in c.names), 60, "equal tables", c)
        left = [p.name for p in c.nodes[primary].data_dir.parent.iterdir() if ".upgrade-18" in p.name]
        assert left and all("-logs-" in n for n in left), left  # pg_upgrade's logs kept, nothing else


SLOT_DYNAMIC: dict[str, Any] = {
    "postgresql": {"parameters": {"wal_level": "logical"}},
    "slots": {"cdc": {"type": "logical", "database": "postgres", "plugin": "test_decoding"}},
}


def test_a_consumed_logical_slot_is_carried_over_from_17_and_refused_from_15() -> None:
    """pg_upgrade carries logical slots over from 17 (the new cluster gets wal_level and the slot
    limits of the old one for its checks); from 15 the preflight lists them with the fix."""
    with running_cluster(nodes=2, pg_version=17, dynamic=SLOT_DYNAMIC) as c:
        primary = c.primary()
        assert primary is not None
        wait_for(lambda: bool(sql(c, primary, SLOT_SQL)), 30, "the permanent slot", c)
        sql(c, primary, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        sql(c, primary, "SELECT count(*) FROM pg_logical_slot_get_changes('cdc', NULL, NULL)")
        settled(c)
        res = hk(c, "upgrade", "--to-version", "18", "--force")
        assert res.returncode == 0, res.stdout + res.stderr
        primary = c.wait_ready(120)
        assert majors(c) == dict.fromkeys(c.names, 18)
        assert sql(c, primary, SLOT_SQL) == [("cdc", "logical")]
        sql(c, primary, "INSERT INTO t VALUES (2)")
        changes = [
            r[0] for r in sql(c, primary, "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, NULL)")
        ]
        assert any("INSERT: id[integer]:2" in str(ch) for ch in changes), changes
    with running_cluster(nodes=1, pg_version=15, dynamic=SLOT_DYNAMIC) as c:
        primary = c.primary()
        assert primary is not None
        wait_for(lambda: bool(sql(c, primary, SLOT_SQL)), 30, "the permanent slot", c)
        res = hk(c, "upgrade", "--to-version", "17", "--check")
        assert res.returncode == 1 and "logical replication slots" in res.stdout and "cdc" in res.stdout, (
            res.stdout
        )


SLOT_SQL = "SELECT slot_name, slot_type FROM pg_replication_slots WHERE slot_name = 'cdc'"
