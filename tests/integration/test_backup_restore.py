"""Base backups, restore and point-in-time recovery against real PostgreSQL 15 servers.

WAL is archived through a staging directory and walpush's code in the test process (see
Stager) into a filesystem repository (SeaweedFS for the CLI test).  Every
restore starts the restored server and checks which rows it has, that it left recovery and
that it takes a write.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper.backup import walpush
from hakeeper.backup.basebackup import BackupError, Endpoint, create_backup
from hakeeper.backup.catalog import BackupRecord, RestoreRefused, Target, load_catalog
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreError, RestoreOptions, RestoreResult, restore, wal_config_path
from hakeeper.core.backup_config import RepositoryConfig, WalToolConfig
from hakeeper.core.config import Credentials, ParamValue, PostgresConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.pg import Postgres, Role, Upstream
from hakeeper.pg.clone import clone_from
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_pg_postgres import INITDB_ARGS, PARAMS
from tests.support.pg import PgArea, bin_dir_under_test
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration

SCOPE = "bk"
SU = Credentials(username="postgres", password="su-secret")
REPL = Credentials(username="replicator", password="repl-secret")
BIN = bin_dir_under_test()  # the major under test (TEST_PG_VERSION)
PART = 256 << 10  # small parts: every backup has several, fetched and stored in parallel


# --------------------------------------------------------------------------------- helpers


def sql(
    port: int, query: str, params: tuple[Any, ...] | None = None, password: str = "su-secret"
) -> list[tuple[Any, ...]]:
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    ) as c:
        cur = c.execute(query, params)
        return cur.fetchall() if cur.description else []


def batches(port: int, password: str = "su-secret") -> list[str]:
    return [r[0] for r in sql(port, "SELECT DISTINCT batch FROM t ORDER BY 1", password=password)]


def insert(port: int, batch: str, n: int = 100) -> None:
    sql(port, "INSERT INTO t (batch) SELECT %s FROM generate_series(1, %s)", (batch, n))


def lsn(port: int, what: str = "pg_current_wal_insert_lsn()") -> int:
    v = parse_lsn(sql(port, f"SELECT {what}::text")[0][0])
    assert v is not None
    return v


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


@dataclass
class Env:
    area: PgArea
    repo_cfg: RepositoryConfig
    walconf: Path
    scope: str = SCOPE
    servers: dict[str, PostgresConfig] = field(default_factory=dict)
    stager: Stager | None = None

    def port(self, name: str) -> int:
        return self.servers[name].listen_host_port[1]

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(name, "127.0.0.1", self.port(name))


def make_env(area: PgArea, repo_cfg: RepositoryConfig, scope: str = SCOPE) -> Env:
    walconf = area.root / f"walconf-{scope}.json"
    run_as = resolve_run_as(area.root / "x")
    walconf.write_text(WalToolConfig(scope=scope, repositories=[repo_cfg]).dump())
    os.chmod(walconf, 0o600)
    run_as.chown(walconf)
    return Env(area, repo_cfg, walconf, scope)


def fs_env(area: PgArea, scope: str = SCOPE) -> Env:
    root = area.root / "repo"
    ra = resolve_run_as(area.root / "x")
    for d in (root, root / scope, root / scope / "wal"):  # walpush runs as PostgreSQL's user
        d.mkdir(exist_ok=True)
        ra.chown(d)
    cfg = RepositoryConfig.model_validate({"name": "fs1", "type": "fs", "path": str(root)})
    return make_env(area, cfg, scope)


class Stager:
    """Archiving for these standalone servers.  PostgreSQL's OS user may not be able to run
    hakeeper's Python (CI: a checkout in a 0700 directory), so ``archive_command`` only copies
    the file into a staging directory, and a thread of the test process (root) pushes staged
    files into the repository with walpush's code (``put_unique``), then removes them.  The
    agent's archiver does the same hand-over with stronger guarantees; test_wal_archive tests it."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.dir = env.area.root / f"stage-{env.scope}"
        self.dir.mkdir(exist_ok=True)
        resolve_run_as(env.area.root / "x").chown(self.dir)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def command(self) -> str:
        d = shlex.quote(str(self.dir))
        return f"test ! -f {d}/%f && cp %p {d}/.%f.tmp && mv {d}/.%f.tmp {d}/%f"

    def _run(self) -> None:
        while not self.stop.is_set():
            for f in sorted(self.dir.iterdir(), key=lambda p: (not p.name.endswith(".history"), p.name)):
                if f.name.startswith("."):
                    continue
                code, _msg = asyncio.run(walpush.push(self.env.walconf, f, f.name))
                if code == 0:
                    f.unlink()
            self.stop.wait(0.05)


STAGERS: list[Stager] = []


def archive_params(env: Env) -> dict[str, ParamValue]:
    if env.stager is None:
        env.stager = Stager(env)
        STAGERS.append(env.stager)
    return {
        **PARAMS,
        "archive_mode": "on",
        "archive_command": env.stager.command(),
        "max_wal_size": "256MB",
    }


def start_primary(env: Env, name: str) -> PostgresConfig:
    cfg = env.area.node_config(name)

    async def go() -> None:
        pg = Postgres(cfg, member_name=name)
        try:
            await pg.initdb(INITDB_ARGS)
            await pg.write_config(archive_params(env), Role.PRIMARY, None, replication_password="repl-secret")
            await pg.start(timeout=60)
            await pg.create_roles(
                superuser_password="su-secret",
                replication_user="replicator",
                replication_password="repl-secret",
            )
        finally:
            await pg.session.close()

    asyncio.run(go())
    env.servers[name] = cfg
    sql(
        cfg.listen_host_port[1],
        "CREATE TABLE t (id serial, batch text, at timestamptz DEFAULT clock_timestamp())",
    )
    return cfg


def start_standby(env: Env, name: str, source: str) -> PostgresConfig:
    cfg = env.area.node_config(name)
    src = env.servers[source]
    up = Upstream(host="127.0.0.1", port=src.listen_host_port[1], slot_name=name)
    sql(up.port, "SELECT pg_create_physical_replication_slot(%s, true)", (name,))

    async def go() -> None:
        pg = Postgres(cfg, member_name=name)
        try:
            await clone_from(
                pg, up, replication_user="replicator", replication_password="repl-secret", timeout=120
            )
            await pg.write_config(archive_params(env), Role.REPLICA, up, replication_password="repl-secret")
            await pg.start(timeout=60)
        finally:
            await pg.session.close()

    asyncio.run(go())
    env.servers[name] = cfg
    return cfg


def backup(env: Env, source: str, primary: str | None = None, **kw: Any) -> BackupRecord:
    kw.setdefault("wal_timeout", 60)
    kw.setdefault("part_size", PART)
    stage = Path(tempfile.mkdtemp(prefix="hk-stage-"))
    kw.setdefault("staging_dir", stage)

    async def go() -> BackupRecord:
        async with make_repository(env.repo_cfg) as repo:
            return await create_backup(
                repo,
                scope=env.scope,
                source=env.endpoint(source),
                primary=env.endpoint(primary) if primary else None,
                superuser=SU,
                replication=REPL,
                bin_dir=BIN,
                **kw,
            )

    try:
        rec = asyncio.run(go())
        # compressed by the server unless asked otherwise or the server was built without zstd
        # (the PyPI build of 18 the tests use): then here, and the record says which
        server = kw.get("compress_on", "server") == "server" and server_has_zstd(env.port(source))
        assert (rec.layout == "zstd-stream") == server, (rec.layout, server)
        return rec
    finally:
        # the server-compressed stream passes through the staging directory and never stays
        left = os.listdir(stage)
        shutil.rmtree(stage, ignore_errors=True)
        assert left == [], left


def server_has_zstd(port: int) -> bool:
    """Whether the server was built with zstd (wal_compression lists it only then)."""
    rows = sql(port, "SELECT 'zstd' = ANY(enumvals) FROM pg_settings WHERE name = 'wal_compression'")
    return bool(rows[0][0])


def do_restore(
    env: Env,
    dest: Path,
    target: Target,
    *,
    primary: str | None = None,
    backup_id: str | None = None,
    start: bool = True,
) -> RestoreResult:
    port = free_ports(1)[0] if start else None
    opts = RestoreOptions(
        data_dir=dest,
        target=target,
        bin_dir=BIN,
        run_as=resolve_run_as(dest),
        superuser=SU,
        backup_id=backup_id,
        start=start,
        port=port,
        primary=env.endpoint(primary) if primary else None,
        wal_timeout=60,
        start_timeout=120,
        serve_wal=True,  # without --start these restores are never started (no walfetch needed)
    )

    async def go() -> RestoreResult:
        async with make_repository(env.repo_cfg) as repo:
            return await restore(repo, env.repo_cfg, env.scope, opts)

    return asyncio.run(go())


def check_restored(res: RestoreResult, expect: list[str]) -> int:
    """The restored server has exactly the batches ``expect``, left recovery and takes a write."""
    assert res.started and res.dsn
    port = int(res.dsn.split("port=")[1].split()[0])
    assert batches(port) == expect, (res.target, res.backup_id)
    assert sql(port, "SELECT pg_is_in_recovery()") == [(False,)]
    insert(port, "zz-after-restore", 1)
    assert sql(port, "SELECT count(*) FROM t WHERE batch = 'zz-after-restore'") == [(1,)]
    assert sql(port, "SHOW archive_mode") == [("off",)]
    return port


def stop_restored(area: PgArea, dest: Path) -> None:
    from tests.support.pg import kill_postmaster

    kill_postmaster(dest)


@pytest.fixture
def area() -> Iterator[PgArea]:
    a = PgArea()
    try:
        yield a
    finally:
        while STAGERS:
            st = STAGERS.pop()
            st.stop.set()
            st.thread.join(10)
        a.cleanup()


# --------------------------------------------------------------------------------- tests


@pytest.mark.matrix  # also run on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
def test_pitr_to_every_target_kind(area: PgArea) -> None:
    """Two backups; restores to a time, an LSN, an xid, a restore point and the latest state,
    each choosing the right backup, with the rows before the target and none after it."""
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a")
    b1 = backup(env, "p")
    assert b1.status == "complete" and b1.source is not None and b1.source.standby is False
    assert len(b1.parts) >= 2 and b1.manifest is not None and b1.wal_start and b1.wal_stop
    assert b1.system_identifier and b1.pg_version and b1.pg_version >= 150000
    insert(p, "b")
    t_target = sql(p, "SELECT clock_timestamp()")[0][0]
    time.sleep(0.3)
    insert(p, "c")
    insert(p, "d")
    l_target = lsn(p)
    insert(p, "e")
    b2 = backup(env, "p")
    assert b2.id > b1.id
    with psycopg.connect(
        host="127.0.0.1", port=p, user="postgres", password="su-secret", dbname="postgres"
    ) as c:
        c.execute("INSERT INTO t (batch) VALUES ('f')")
        xid = int(c.execute("SELECT txid_current()").fetchall()[0][0])
        c.commit()
    insert(p, "g")
    insert(p, "h")
    sql(p, "SELECT pg_create_restore_point('rp1')")
    insert(p, "i")

    # time: b1 (b2 ended after the target); rows of the commits before the target only
    r = do_restore(env, area.data_dir("r-time"), Target("time", time=t_target), primary="p")
    assert r.backup_id == b1.id and r.timeline == 1
    assert r.seconds_replay is not None and r.seconds_promote is not None and r.new_timeline == 2
    check_restored(r, ["a", "b"])
    # LSN: b1 again (b2 ends after the target)
    r = do_restore(env, area.data_dir("r-lsn"), Target("lsn", lsn=l_target), primary="p")
    assert r.backup_id == b1.id
    check_restored(r, ["a", "b", "c", "d"])
    # xid (inclusive): b2
    r = do_restore(env, area.data_dir("r-xid"), Target("xid", xid=xid), primary="p")
    assert r.backup_id == b2.id
    check_restored(r, ["a", "b", "c", "d", "e", "f"])
    # restore point
    r = do_restore(env, area.data_dir("r-name"), Target("name", name="rp1"), primary="p")
    assert r.backup_id == b2.id
    check_restored(r, ["a", "b", "c", "d", "e", "f", "g", "h"])
    # latest: the WAL switch on the primary brings in the last rows too
    r = do_restore(env, area.data_dir("r-latest"), Target("latest"), primary="p")
    assert r.backup_id == b2.id
    check_restored(r, ["a", "b", "c", "d", "e", "f", "g", "h", "i"])
    # an explicit backup before the target works too; one after it is refused before any copy
    r = do_restore(env, area.data_dir("r-lsn-b1"), Target("lsn", lsn=l_target), backup_id=b1.id, primary="p")
    check_restored(r, ["a", "b", "c", "d"])
    dest = area.data_dir("r-refused")
    with pytest.raises(RestoreRefused, match="after the target LSN"):
        do_restore(env, dest, Target("lsn", lsn=l_target), backup_id=b2.id, primary="p")
    assert not dest.exists()
    # restored copies promoted to timeline 2 but never archived into the repository
    names = sorted(os.listdir(Path(str(env.repo_cfg.path)) / SCOPE / "wal"))
    assert not [n for n in names if n.startswith("00000002")], names


def test_standby_backup_timeline_switch_and_abandoned_branch(area: PgArea) -> None:
    """A backup from a standby; the standby is promoted (timeline 2, archiving into the same
    repository) while the old primary goes on writing on timeline 1.  A PITR target on
    timeline 2 is reached from the timeline-1 backup; a target on the abandoned part of
    timeline 1 and a backup taken there are refused before anything is copied."""
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    start_standby(env, "s", "p")
    s = env.port("s")
    insert(p, "x1")
    wait(lambda: batches(s) == ["x1"], 30, "standby replays x1")
    b3 = backup(env, "s", primary="p")
    assert b3.source is not None and b3.source.standby is True and b3.status == "complete"
    assert "BACKUP FROM: standby" in (b3.backup_label or "")
    insert(p, "x2")
    wait(lambda: batches(s) == ["x1", "x2"], 30, "standby replays x2")
    fork = lsn(s, "pg_last_wal_replay_lsn()")
    sql(s, "SELECT pg_promote(true, 60)")
    assert sql(s, "SELECT pg_is_in_recovery()") == [(False,)]
    repo_wal = Path(str(env.repo_cfg.path)) / SCOPE / "wal"
    wait(lambda: (repo_wal / "00000002.history").exists(), 60, "00000002.history archived")
    insert(s, "y1")
    l2 = lsn(s)
    insert(s, "y2")
    # the old primary goes on alone on timeline 1 (split brain, for the test)
    insert(p, "z1")
    lz = lsn(p)
    assert lz > fork
    closed = sql(p, "SELECT pg_walfile_name(pg_switch_wal() - 1)")[0][0]  # basebackup.switch_wal says why
    wait(lambda: (repo_wal / closed).exists(), 60, "old primary archived its timeline-1 segment")
    b4 = backup(env, "p")  # on the abandoned branch of timeline 1
    assert b4.timeline == 1

    # LSN on timeline 2, reached from the timeline-1 backup across the switch
    r = do_restore(env, area.data_dir("r-tl2"), Target("lsn", lsn=l2), primary="s")
    assert r.backup_id == b3.id and r.timeline == 2 and r.new_timeline == 3
    check_restored(r, ["x1", "x2", "y1"])
    # latest prefers the backup on the newest timeline over the newer one on the abandoned branch
    r = do_restore(env, area.data_dir("r-latest"), Target("latest"), primary="s")
    assert r.backup_id == b3.id and r.timeline == 2
    check_restored(r, ["x1", "x2", "y1", "y2"])
    # a target on the abandoned part of timeline 1: refused before a byte is copied
    dest = area.data_dir("r-abandoned")
    dest.mkdir()
    with pytest.raises(RestoreRefused, match="abandoned") as e1:
        do_restore(env, dest, Target("lsn", lsn=lz, timeline=1), primary="s")
    assert os.listdir(dest) == []
    assert "timeline 2" in str(e1.value)
    # a backup that is not on timeline 2's history
    with pytest.raises(RestoreRefused, match="not on timeline 2") as e2:
        do_restore(env, dest, Target("latest", timeline=2), backup_id=b4.id, primary="s")
    assert os.listdir(dest) == []
    assert b4.id in str(e2.value)


def test_refusals_and_corrupted_part(area: PgArea) -> None:
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 20000)
    b = backup(env, "p")
    assert len(b.parts) >= 2
    # a non-empty directory, and one with a postmaster.pid
    full = area.data_dir("full")
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(RestoreRefused, match="not empty"):
        do_restore(env, full, Target("latest"), start=False)
    assert os.listdir(full) == ["something"]
    (full / "postmaster.pid").write_text("999999\n")
    with pytest.raises(RestoreRefused, match=r"postmaster\.pid"):
        do_restore(env, full, Target("latest"), start=False)
    # an explicit backup id that does not exist
    with pytest.raises(RestoreRefused, match="no backup 'nosuch'"):
        do_restore(env, area.data_dir("r0"), Target("latest"), backup_id="nosuch", start=False)
    # a flipped byte in a stored part: detected while copying, the object named, the directory emptied
    part = Path(str(env.repo_cfg.path)) / SCOPE / "backup" / b.id / b.parts[1].name
    blob = bytearray(part.read_bytes())
    pos = len(blob) // 3
    blob[pos] ^= 0x55
    part.write_bytes(bytes(blob))
    dest = area.data_dir("r-corrupt")
    with pytest.raises(RestoreError) as e:
        do_restore(env, dest, Target("latest"), primary="p", start=False)
    assert f"{SCOPE}/backup/{b.id}/{b.parts[1].name}" in str(e.value)
    assert not dest.exists() or os.listdir(dest) == []
    # put the byte back: the same backup restores fine
    blob[pos] ^= 0x55
    part.write_bytes(bytes(blob))
    r = do_restore(env, dest, Target("latest"), primary="p")
    assert r.backup_id == b.id
    check_restored(r, ["a"])
    # a target recovery never reaches: the server stops, its log lines are shown
    dest = area.data_dir("r-unreached")
    with pytest.raises(RestoreError, match="recovery ended before configured recovery target was reached"):
        do_restore(env, dest, Target("xid", xid=50_000_000), primary="p")


def test_backup_fails_when_wal_is_not_archived(area: PgArea) -> None:
    """A backup whose WAL never reaches the archive is marked failed, its parts removed."""
    env = fs_env(area)
    cfg = start_primary(env, "p")
    p = env.port("p")
    # archiving "succeeds" without storing anything
    sql(p, "ALTER SYSTEM SET archive_command = '/bin/true'")
    sql(p, "SELECT pg_reload_conf()")
    time.sleep(0.5)
    with pytest.raises(BackupError, match="did not reach the archive"):
        backup(env, "p", wal_timeout=3)
    del cfg

    async def records() -> list[BackupRecord]:
        async with make_repository(env.repo_cfg) as repo:
            return (await load_catalog(repo, SCOPE)).records

    (rec,) = asyncio.run(records())
    assert rec.status == "failed" and rec.error and "did not reach the archive" in rec.error
    left = sorted(os.listdir(Path(str(env.repo_cfg.path)) / SCOPE / "backup" / rec.id))
    assert left == ["backup.json"]


# --------------------------------------------------------------------------------- CLI


def node_yaml(env: Env, name: str, path: Path, retention: dict[str, Any] | None = None) -> Path:
    cfg = env.servers[name]
    repo = env.repo_cfg.model_dump(mode="json", exclude_none=True)
    if env.repo_cfg.secret_key is not None:
        repo["secret_key"] = env.repo_cfg.secret_key.get_secret_value()
    if retention:
        repo["retention"] = retention
    (dead,) = free_ports(1)  # no etcd: the CLI falls back to the node itself
    doc = {
        "scope": env.scope,
        "name": name,
        "etcd": {"hosts": [f"http://127.0.0.1:{dead}"]},
        "postgresql": {
            "data_dir": str(cfg.data_dir),
            "listen": cfg.listen,
            "superuser": {"username": "postgres", "password": "su-secret"},
            "replication": {"username": "replicator", "password": "repl-secret"},
            "bin_dir": str(cfg.bin_dir),
        },
        "backup": {"repositories": [repo]},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def hk(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def ok(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout) if res.stdout.lstrip().startswith(("{", "[")) else res.stdout


def test_cli_backup_and_restore_on_s3(area: PgArea) -> None:
    server = SeaweedS3(area.root / "seaweed")
    server.start()
    try:
        bucket_cfg = RepositoryConfig.model_validate(
            {
                "name": "s3",
                "type": "s3",
                "endpoint": server.endpoint,
                "bucket": "hk-backup-test",
                "prefix": "prod",
                "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY,
                "timeout": 20,
            }
        )

        async def init() -> None:
            async with make_repository(bucket_cfg) as r:
                await r.initialize()

        asyncio.run(init())
        env = make_env(area, bucket_cfg)
        start_primary(env, "p")
        p = env.port("p")
        insert(p, "a", 5000)
        conf = node_yaml(env, "p", area.root / "node.yml")
        created = ok(
            # --compress-on client: this end-to-end test keeps the parts-compressed-here layout covered
            hk(
                "backup",
                "create",
                "-c",
                str(conf),
                "--from",
                "local",
                "--part-size",
                "8",
                "--compress-on",
                "client",
                "-o",
                "json",
            )
        )
        assert created["status"] == "complete" and len(created["parts"]) >= 2
        bid = created["id"]
        insert(p, "b")
        listed = ok(hk("backup", "list", "-c", str(conf), "-o", "json"))
        assert [b["id"] for b in listed] == [bid] and listed[0]["status"] == "complete"
        info = ok(hk("backup", "info", bid, "-c", str(conf), "-o", "json"))
        assert info["wal_missing"] == [] and info["id"] == bid
        table = ok(hk("backup", "list", "-c", str(conf)))
        assert bid in table
        # usage errors: exit 2, no traceback
        bad = hk(
            "restore", "-c", str(conf), "--data-dir", str(area.root / "x"), "--latest", "--target-xid", "5"
        )
        assert bad.returncode == 2 and "exactly one" in bad.stderr and "Traceback" not in bad.stderr
        bad = hk("restore", "-c", str(conf), "--data-dir", str(area.root / "x"), "--target-time", "yesterday")
        assert bad.returncode == 2 and "ISO 8601" in bad.stderr
        # restore the very latest state: --include-current-wal switches WAL on the primary (the
        # node of -c) and waits for that segment (issue 16: plain --latest restores what is archived)
        dest = area.data_dir("restored")
        (port,) = free_ports(1)
        res = ok(
            hk(
                "restore",
                "-c",
                str(conf),
                "--data-dir",
                str(dest),
                "--latest",
                "--include-current-wal",
                "--start",
                "--port",
                str(port),
                "-o",
                "json",
            )
        )
        assert res["backup"] == bid and res["started"] is True and f"port={port}" in res["dsn"]
        assert res["seconds"]["fetch_decompress"] > 0
        assert batches(port) == ["a", "b"]
        assert sql(port, "SELECT pg_is_in_recovery()") == [(False,)]
        insert(port, "c", 1)
        # The restore_command's repository config (with the S3 secret) was never in PGDATA: it
        # lived beside it (0600) and recovery_end_command removed it once recovery had ended.
        # (This replaces the check that it was in PGDATA: that was issue 12's finding 6.)
        assert not (dest / "hakeeper-restore-wal.json").exists()
        # emptied (or removed, where the PostgreSQL user may write the parent) when recovery ended
        assert not wal_config_path(dest).exists() or wal_config_path(dest).stat().st_size == 0
        holding = [
            str(f)
            for f in dest.rglob("*")
            if f.is_file() and not f.is_symlink() and SECRET_KEY.encode() in f.read_bytes()
        ]
        assert holding == [], f"the S3 secret is in the restored PGDATA: {holding}"
        # a second restore into the same (now non-empty, running) directory is refused
        again = hk("restore", "-c", str(conf), "--data-dir", str(dest), "--latest")
        assert again.returncode == 1 and "postmaster.pid" in again.stderr
        expired = ok(hk("backup", "expire", "-c", str(conf), "--dry-run", "-o", "json"))
        assert expired[0]["backups"] == [] and expired[0]["kept"] == [bid]
    finally:
        server.stop()


def test_retention_expire(area: PgArea) -> None:
    """Three backups, keep 2: the oldest goes, with the WAL only it needed; the failed
    backup's record goes; history files stay; the newest backup always stays."""
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    wal_dir = Path(str(env.repo_cfg.path)) / SCOPE / "wal"
    ids = []
    for i in range(3):
        insert(p, f"b{i}")
        ids.append(backup(env, "p").id)
        time.sleep(1.0)  # one backup id per second
    # a failed backup record (as a crashed run leaves it, with its time in the past)
    failed = BackupRecord.model_validate(
        {
            "id": "20200101T000000Z",
            "label": "x",
            "status": "failed",
            "error": "test",
            "scope": SCOPE,
            "repository": "fs1",
            "start_time": "2020-01-01T00:00:00Z",
            "updated_at": "2020-01-01T00:00:00Z",
        }
    )
    fdir = Path(str(env.repo_cfg.path)) / SCOPE / "backup" / failed.id
    fdir.mkdir(parents=True)

    async def put_failed() -> None:
        async with make_repository(env.repo_cfg) as repo:
            await repo.put(f"{SCOPE}/backup/{failed.id}/backup.json", failed.to_json())

    asyncio.run(put_failed())
    conf = node_yaml(env, "p", area.root / "node.yml", retention={"full_count": 2})

    async def catalog_now() -> list[BackupRecord]:
        async with make_repository(env.repo_cfg) as repo:
            return (await load_catalog(repo, SCOPE)).records

    recs = {r.id: r for r in asyncio.run(catalog_now())}
    keep_from = recs[ids[1]].wal_start
    assert keep_from is not None
    wal_before = sorted(os.listdir(wal_dir))
    expected_wal = [n for n in wal_before if n[:24] < keep_from and not n.endswith(".history")]
    assert expected_wal, wal_before

    dry = ok(hk("backup", "expire", "-c", str(conf), "--dry-run", "-o", "json"))[0]
    assert dry["dry_run"] is True
    assert sorted(b["id"] for b in dry["backups"]) == sorted([ids[0], failed.id])
    assert sorted(n.rpartition("/")[2] for n in dry["wal"]) == expected_wal
    assert sorted(os.listdir(wal_dir)) == wal_before  # nothing removed yet
    text = ok(hk("backup", "expire", "-c", str(conf)))
    assert f"removed backup {ids[0]}" in text and f"removed backup {failed.id}" in text
    assert sorted(os.listdir(wal_dir)) == sorted(set(wal_before) - set(expected_wal))
    backup_dir = Path(str(env.repo_cfg.path)) / SCOPE / "backup"
    left = {f.relative_to(backup_dir).parts[0] for f in backup_dir.rglob("*") if f.is_file()}
    assert left == set(ids[1:])  # (the filesystem repository leaves empty directories behind)
    # keep 1: the newest stays, the middle one goes; then nothing more is ever removed
    conf1 = node_yaml(env, "p", area.root / "node1.yml", retention={"full_count": 1})
    gone = ok(hk("backup", "expire", "-c", str(conf1), "-o", "json"))[0]
    assert [b["id"] for b in gone["backups"]] == [ids[1]] and gone["kept"] == [ids[2]]
    again = ok(hk("backup", "expire", "-c", str(conf1), "-o", "json"))[0]
    assert again["backups"] == [] and again["wal"] == [] and again["kept"] == [ids[2]]
    # and the remaining backup restores
    r = do_restore(env, area.data_dir("r"), Target("latest"), primary="p")
    assert r.backup_id == ids[2]
    check_restored(r, ["b0", "b1", "b2"])


# --------------------------------------------------------------------------------- a real cluster


def test_cluster_backup_from_standby_and_pitr_across_a_switchover() -> None:
    """A 3-node hakeeper cluster whose agents archive WAL: ``backup create`` picks a
    streaming standby; after a switchover (timeline 2), ``restore --target-time`` stops on
    timeline 1's part of the history and ``restore --latest`` reaches the new primary's last
    commit (the CLI finds the leader in etcd and switches WAL there)."""
    from hakeeper.localcluster import prepare_fs_repository
    from tests.support.cluster import cluster_tmpdir, running_cluster

    repo_dir = cluster_tmpdir("hk-bk-repo-")
    restore_area = PgArea()
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(restore_area.root / "x"))
        backup_cfg = {"repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}]}
        with running_cluster(nodes=3, backup=backup_cfg, scope="bkc") as c:

            def q(node: str, query: str) -> list[tuple[Any, ...]]:
                with psycopg.connect(c.dsn(node), autocommit=True, connect_timeout=5) as conn:
                    cur = conn.execute(query)
                    return cur.fetchall() if cur.description else []

            old = c.primary()
            assert old is not None
            conf = str(c.nodes[old].config_path)
            q(old, "CREATE TABLE t (id serial, batch text)")
            q(old, "INSERT INTO t (batch) SELECT 'a' FROM generate_series(1, 1000)")

            def created() -> Any:
                # --from standby: `auto` would fall back to the primary while the replica has
                # not yet published its streaming state and lag (a race seen in CI).
                res = hk(
                    "backup", "create", "-c", conf, "--from", "standby", "--part-size", "8", "-o", "json"
                )
                if res.returncode != 0 and "no streaming standby" in res.stderr:
                    return None  # the replica's lag is not published yet
                return ok(res)

            doc = None
            deadline = time.monotonic() + 60
            while doc is None:
                assert time.monotonic() < deadline, "backup create never found the standby"
                doc = created()
                if doc is None:
                    time.sleep(1)
            new = doc["source"]["member"]
            assert doc["status"] == "complete" and new != old and doc["source"]["standby"] is True
            q(old, "INSERT INTO t (batch) VALUES ('b')")
            t_target = q(old, "SELECT clock_timestamp()")[0][0]
            time.sleep(0.3)
            q(old, "INSERT INTO t (batch) VALUES ('c')")
            sw = hk("switchover", "-c", conf, "--candidate", new, "--force")
            assert sw.returncode == 0, sw.stderr
            wait(lambda: c.node_state(new).role == "primary", 60, "new primary writable")
            q(new, "INSERT INTO t (batch) VALUES ('d')")

            # time target: before the switchover, on the history of timeline 2
            (port,) = free_ports(1)
            dest = restore_area.data_dir("r-time")
            res = ok(
                hk(
                    "restore",
                    "-c",
                    conf,
                    "-D",
                    str(dest),
                    "--target-time",
                    t_target.isoformat(),
                    "--start",
                    "--port",
                    str(port),
                    "-o",
                    "json",
                )
            )
            assert res["backup"] == doc["id"] and res["target_timeline"] == 2
            assert batches(port, c.superuser_password) == ["a", "b"]
            # latest: across the switchover, up to the new primary's last commit
            (port,) = free_ports(1)
            dest = restore_area.data_dir("r-latest")
            argv = ["restore", "-c", conf, "-D", str(dest), "--latest", "--include-current-wal", "--start"]
            res = ok(hk(*argv, "--port", str(port)))
            assert doc["id"] in res and "on timeline 2" in res
            assert batches(port, c.superuser_password) == ["a", "b", "c", "d"]
            assert sql(port, "SELECT pg_is_in_recovery()", password=c.superuser_password) == [(False,)]
            listed = ok(hk("backup", "list", "-c", conf, "-o", "json"))
            assert [b["id"] for b in listed] == [doc["id"]]
    finally:
        restore_area.cleanup()
        shutil.rmtree(repo_dir, ignore_errors=True)
