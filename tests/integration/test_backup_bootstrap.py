"""Bootstrap a new cluster from a backup (``bootstrap.from_backup``) and create replicas from a
backup (``backup.replica_from_backup``), with real PostgreSQL 15, etcd and agents; the fallback to
pg_basebackup when the backup is unusable."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.backup import catalog, layout
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_restore import hk, ok
from tests.support.cluster import cluster_tmpdir, free_base_port, start_first_member

pytestmark = pytest.mark.integration


class FromBackupCluster(LocalCluster):
    """A LocalCluster whose nodes bootstrap from a backup."""

    def __init__(self, *args: Any, from_backup: dict[str, Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.from_backup = from_backup

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        cfg.setdefault("bootstrap", {})["from_backup"] = self.from_backup
        return cfg


def q(c: LocalCluster, node: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(node), autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def wait(pred: Callable[[], Any], timeout: float, what: str, c: LocalCluster | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except psycopg.Error:
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            logs = ""
            if c is not None:
                logs = "\n".join(
                    f"--- {n.log_path}:\n{tail(n.log_path)}" for n in c.nodes.values() if n.log_path.exists()
                )
            raise AssertionError(f"timed out: {what}\n{logs}")
        time.sleep(0.3)


def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def names(path: Path) -> list[str]:
    return [str(e.get("event")) for e in events(path)]


def wal_of(rc: RepositoryConfig, scope: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        repo = make_repository(rc)
        try:
            cat = await catalog.load_catalog(repo, scope, histories=False)
            return dict(cat.wal)
        finally:
            await repo.close()

    return asyncio.run(go())


def switch_and_wait_archived(c: LocalCluster, node: str, rc: RepositoryConfig, scope: str) -> str:
    seg = str(q(c, node, "SELECT pg_walfile_name(pg_switch_wal() - 1)")[0][0])  # as switch_wal: every major
    wait(lambda: seg in wal_of(rc, scope), 60, f"{seg} archived under {scope}", c)
    return seg


@contextmanager
def repository() -> Iterator[tuple[Path, RepositoryConfig, dict[str, Any]]]:
    repo_dir = cluster_tmpdir("hk-bb-repo-")
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(repo_dir / "x"))
        doc = {"name": "fs", "type": "fs", "path": str(repo_dir)}
        yield repo_dir, RepositoryConfig.model_validate(doc), {"repositories": [doc]}
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def test_new_cluster_bootstrapped_from_another_clusters_backup_to_a_time() -> None:
    """Cluster A (scope srca): rows a, a backup, rows b, time T, rows c.  Cluster B (scope dstb,
    its own etcd, ports and passwords, same repository) with ``from_backup: {scope: srca,
    target_time: T}`` comes up as a writable primary holding exactly a and b, on a new
    timeline, with B's passwords, and archives its own WAL under dstb only."""
    with repository() as (_repo_dir, rc, backup_cfg):
        base_a, base_b = cluster_tmpdir(), cluster_tmpdir()
        try:
            a = LocalCluster(base_a, nodes=1, base_port=free_base_port(1), scope="srca", backup=backup_cfg)
            with a:
                a.start()
                a.wait_ready(120)
                q(a, "node1", "CREATE TABLE t (id serial, batch text)")
                q(a, "node1", "INSERT INTO t (batch) SELECT 'a' FROM generate_series(1, 500)")
                conf = str(a.nodes["node1"].config_path)
                bk = ok(hk("backup", "create", "-c", conf, "--part-size", "8", "-o", "json"))
                assert bk["status"] == "complete"
                q(a, "node1", "INSERT INTO t (batch) VALUES ('b')")
                t_target = q(a, "node1", "SELECT clock_timestamp()")[0][0]
                time.sleep(0.3)
                q(a, "node1", "INSERT INTO t (batch) VALUES ('c')")
                # B's etcd does not know A, so B cannot switch WAL on A: do it here.
                switch_and_wait_archived(a, "node1", rc, "srca")
                a_wal_before = set(wal_of(rc, "srca"))

                b = FromBackupCluster(
                    base_b,
                    nodes=1,
                    base_port=free_base_port(1),
                    scope="dstb",
                    backup=backup_cfg,
                    from_backup={"scope": "srca", "target_time": t_target.isoformat()},
                )
                assert b.superuser_password != a.superuser_password
                with b:
                    b.start()
                    b.wait_ready(180)
                    log_b = b.nodes["node1"].log_path
                    # wait_ready sees the server once writable; the agent logs a moment later
                    wait(lambda: "bootstrap_from_backup_done" in names(log_b), 30, "bootstrap done", b)
                    ev = names(log_b)
                    assert "postgres_initdb_start" not in ev
                    # recovery to the time took its WAL from the agent's handover, which says how
                    (served,) = [e for e in events(log_b) if e.get("event") == "seed_recovery_wal"]
                    assert served["wal_requests"] >= 1, served
                    assert 0 <= served["wal_prefetch_hits"] <= served["wal_requests"], served
                    rows = q(b, "node1", "SELECT batch, count(*) FROM t GROUP BY 1 ORDER BY 1")
                    assert rows == [("a", 500), ("b", 1)]
                    assert q(b, "node1", "SELECT pg_is_in_recovery()") == [(False,)]
                    q(b, "node1", "INSERT INTO t (batch) VALUES ('x')")
                    tli = int(q(b, "node1", "SELECT timeline_id FROM pg_control_checkpoint()")[0][0])
                    new_tli = int(
                        str(q(b, "node1", "SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0])[:8], 16
                    )
                    assert new_tli >= 2, (tli, new_tli)
                    # same system as A (a PITR copy), B's keys in B's etcd
                    sys_a = q(a, "node1", "SELECT system_identifier::text FROM pg_control_system()")
                    assert q(b, "node1", "SELECT system_identifier::text FROM pg_control_system()") == sys_a
                    # recovery settings are gone, archive_mode is on
                    auto = (b.nodes["node1"].data_dir / "postgresql.auto.conf").read_text()
                    assert "recovery_target" not in auto and "restore_command" not in auto, auto
                    assert q(b, "node1", "SHOW archive_mode") == [("on",)]
                    assert not (b.nodes["node1"].data_dir / "hakeeper-restore-wal.json").exists()
                    # the replication role has B's password (create_roles over the socket)
                    with psycopg.connect(
                        host="127.0.0.1",
                        port=b.nodes["node1"].pg_port,
                        user="replicator",
                        password=b.replication_password,
                        dbname="postgres",
                        connect_timeout=5,
                    ):
                        pass
                    # B archives its own WAL under dstb, starting with its timeline's history
                    seg = switch_and_wait_archived(b, "node1", rc, "dstb")
                    b_wal = wal_of(rc, "dstb")
                    assert layout.history_name(new_tli) in b_wal, sorted(b_wal)
                    assert int(seg[:8], 16) == new_tli
                    # and nothing of B went to A's scope
                    a_new = set(wal_of(rc, "srca")) - a_wal_before
                    assert not any(int(n[:8], 16) == new_tli for n in a_new), sorted(a_new)
                    hist = ok(hk("history", "-c", str(b.nodes["node1"].config_path), "-o", "json"))
                    assert any("bootstrap from backup" in str(h.get("reason")) for h in hist), hist

                # a target recovery never reaches: the bootstrap fails after winning the race,
                # removes the data directory and its etcd keys, and the retry starts clean
                base_c = cluster_tmpdir()
                try:
                    c = FromBackupCluster(
                        base_c,
                        nodes=1,
                        base_port=free_base_port(1),
                        scope="dstc",
                        backup=backup_cfg,
                        from_backup={"scope": "srca", "target_xid": 4000000},
                    )
                    with c:
                        c.start()
                        log_c = c.nodes["node1"].log_path

                        def failed_twice() -> bool:
                            ev = events(log_c)
                            fails = [e for e in ev if e.get("event") == "bootstrap_from_backup_failed"]
                            starts = [e for e in ev if e.get("event") == "bootstrap_from_backup_started"]
                            return len(fails) >= 2 and len(starts) >= 2

                        wait(failed_twice, 120, "two failed bootstrap attempts", c)
                        fail = next(
                            e for e in events(log_c) if e.get("event") == "bootstrap_from_backup_failed"
                        )
                        assert fail["stage"] == "recovery", fail
                        assert "recovery ended before configured recovery target was reached" in fail["error"]
                        assert "keys deleted" in fail["action"]
                        assert "initialize_won" in names(log_c)
                finally:
                    shutil.rmtree(base_c, ignore_errors=True)
        finally:
            shutil.rmtree(base_a, ignore_errors=True)
            shutil.rmtree(base_b, ignore_errors=True)


def test_replica_created_from_backup_then_streams_and_falls_back_when_corrupt() -> None:
    """node1 alone, a backup, more rows; node2 added: restored from the backup (no pg_basebackup),
    then streams (pg_stat_replication on node1).  A part of the backup corrupted; node3 added:
    the restore fails, the directory is removed and pg_basebackup clones it instead."""
    with repository() as (repo_dir, _rc, backup_cfg):
        base = cluster_tmpdir()
        try:
            c = LocalCluster(base, nodes=3, base_port=free_base_port(3), scope="rfb", backup=backup_cfg)
            with c:
                start_first_member(c)
                q(c, "node1", "CREATE TABLE t (id serial, batch text)")
                q(c, "node1", "INSERT INTO t (batch) SELECT 'a' FROM generate_series(1, 500)")
                conf = str(c.nodes["node1"].config_path)
                bk = ok(hk("backup", "create", "-c", conf, "--part-size", "8", "-o", "json"))
                assert bk["status"] == "complete"
                q(c, "node1", "INSERT INTO t (batch) VALUES ('b')")

                def streaming(node: str) -> bool:
                    rows = q(c, "node1", "SELECT application_name, state FROM pg_stat_replication")
                    return (node, "streaming") in rows

                def has_rows(node: str, want: list[str]) -> bool:
                    got = [r[0] for r in q(c, node, "SELECT DISTINCT batch FROM t ORDER BY 1")]
                    return got == want

                c.agents["node2"].start()
                wait(lambda: streaming("node2"), 120, "node2 streams", c)
                q(c, "node1", "INSERT INTO t (batch) VALUES ('c')")
                wait(lambda: has_rows("node2", ["a", "b", "c"]), 30, "node2 has every row", c)
                ev2 = names(c.nodes["node2"].log_path)
                assert "clone_from_backup_finished" in ev2, tail(c.nodes["node2"].log_path)
                assert "clone_started" not in ev2 and "postgres_clone_start" not in ev2
                wait(
                    lambda: "clone_from_backup_settings_removed" in names(c.nodes["node2"].log_path),
                    30,
                    "node2 drops restore_command once streaming",
                    c,
                )
                auto = (c.nodes["node2"].data_dir / "postgresql.auto.conf").read_text()
                assert "restore_command" not in auto and "archive_mode" not in auto, auto

                # corrupt the middle of the first part (its stored trailer stays valid)
                part = repo_dir / catalog.object_key("rfb", bk["id"], catalog.part_name(0))
                data = bytearray(part.read_bytes())
                mid = len(data) // 2
                data[mid : mid + 64] = bytes(64)
                part.write_bytes(bytes(data))

                c.agents["node3"].start()
                wait(lambda: streaming("node3"), 120, "node3 streams", c)
                wait(lambda: has_rows("node3", ["a", "b", "c"]), 30, "node3 has every row", c)
                ev3 = events(c.nodes["node3"].log_path)
                failed = [e for e in ev3 if e.get("event") == "clone_from_backup_failed"]
                assert failed and failed[0]["fallback"] == "pg_basebackup", tail(c.nodes["node3"].log_path)
                assert "corrupt" in failed[0]["error"], failed[0]
                n3 = [str(e.get("event")) for e in ev3]
                assert "clone_started" in n3 and "clone_from_backup_finished" not in n3
        finally:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------- no server


def test_seed_settings_replace_the_restore_block(tmp_path: Path) -> None:
    """The restore's block (archive_mode off, its port, ...) goes; only the seed's settings are
    appended; dropping them leaves the source's own ALTER SYSTEM lines."""
    from hakeeper.backup import seed
    from hakeeper.util.proc import RunAs

    auto = tmp_path / "postgresql.auto.conf"
    auto.write_text(
        "# Do not edit this file manually!\nwork_mem = '8MB'\n"
        "# hakeeper restore of backup X from repository fs at 2026-01-01T00:00:00Z\n"
        "restore_command = 'fetch %f %p'\narchive_mode = 'off'\nport = '5999'\n"
        "recovery_target_time = '2026-01-01 00:00:00+00:00'\n"
    )
    from hakeeper.backup.restore import wal_config_path

    wal_config_path(tmp_path).write_text("{}")  # beside the data directory, never in it
    seed.set_seed_settings(tmp_path, RunAs(), {"restore_command": "fetch %f %p"}, recovery_signal=True)
    text = auto.read_text()
    assert "archive_mode" not in text and "port" not in text and "recovery_target_time" not in text
    assert text.endswith(f"{seed.SEED_HEADER}\nrestore_command = 'fetch %f %p'\n"), text
    assert "work_mem = '8MB'" in text and (tmp_path / "recovery.signal").exists()
    assert seed.has_seed_settings(tmp_path)
    seed.drop_seed_settings(tmp_path, RunAs())
    assert auto.read_text() == "# Do not edit this file manually!\nwork_mem = '8MB'\n"
    assert not seed.has_seed_settings(tmp_path)


def test_from_backup_config() -> None:
    import pytest
    from pydantic import ValidationError

    from hakeeper.backup import seed
    from hakeeper.core.config import FromBackupConfig

    assert seed.target_of(FromBackupConfig()).kind == "latest"
    t = seed.target_of(FromBackupConfig(target_time="2026-11-24T07:15:00Z", exclusive=True))
    assert t.kind == "time" and t.time is not None and t.time.hour == 7 and not t.inclusive
    assert seed.target_of(FromBackupConfig(target_lsn="0/3000148", target_timeline=2)).timeline == 2
    for bad in (
        {"target_time": "yesterday"},
        {"target_lsn": "300"},
        {"target_xid": 1},
        {"target_time": "2026-11-24T07:15:00Z", "latest": True},
        {"scope": "a/b"},
        {"target_timeline": 0},
    ):
        with pytest.raises(ValidationError):
            FromBackupConfig.model_validate(bad)
