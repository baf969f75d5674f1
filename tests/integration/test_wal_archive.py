"""Continuous WAL archiving against real PostgreSQL 15 servers, a filesystem repository and a
real SeaweedFS.

Two kinds of set-up:

* a standalone primary (``hakeeper.pg.Postgres``) whose ``archive_command`` is the archiver's
  hand-over script, with the :class:`~hakeeper.backup.archive.archiver.Archiver` running in the test's
  event loop: completeness and byte equality, the duplicate policy through PostgreSQL, one
  repository down (SeaweedFS stopped) while the other goes on, and the pg_wal cap;
* a 2-node hakeeper cluster (``running_cluster(backup=...)``): the agent's wiring, a switchover
  (the new primary's ``.history`` first, no segment missing across the switch) and the demoted
  old primary pushing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup import layout
from hakeeper.backup.archive.archiver import Archiver
from hakeeper.backup.archive.metrics import latency_quantiles
from hakeeper.backup.catalog import RestoreRefused
from hakeeper.backup.errors import NotFound
from hakeeper.backup.repo import FilesystemRepository, Repository
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import python_command
from hakeeper.core.backup_config import ArchiveConfig, RepositoryConfig, WalToolConfig
from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.core.errors import Refused
from hakeeper.core.lsn import parse_lsn
from hakeeper.ha import requests
from hakeeper.localcluster import pg_program
from hakeeper.pg import Postgres, Role
from hakeeper.pg.postgres import SOCKET_SUBDIR
from hakeeper.util.proc import proc_cmdline, run
from tests.integration.test_ha import sql, wait_for
from tests.integration.test_switchover import run_request
from tests.support.cluster import cluster_tmpdir, running_cluster
from tests.support.pg import DEFAULT_PARAMS, PgArea
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration

SCOPE = "arch"
SEG = 16 << 20


# ---------------------------------------------------------------------------------- helpers


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def s3_config(server: SeaweedS3, bucket: str, name: str = "s3") -> RepositoryConfig:
    return RepositoryConfig.model_validate(
        {
            "name": name,
            "type": "s3",
            "endpoint": server.endpoint,
            "bucket": bucket,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "timeout": 5,
        }
    )


class Primary:
    """A standalone PostgreSQL 15 primary archiving through an in-process Archiver."""

    def __init__(self, area: PgArea) -> None:
        self.area = area
        self.pg = Postgres(area.node_config("p1"), member_name="p1")
        self.spool = self.pg.data_dir.parent / "spool"
        self.archiver: Archiver | None = None
        self.task: asyncio.Task[None] | None = None
        self.allowed = True

    @property
    def pg_wal(self) -> Path:
        return self.pg.data_dir / "pg_wal"

    def make_archiver(self, repos: list[Repository], **cfg: Any) -> Archiver:
        return Archiver(
            scope=SCOPE,
            pg_wal=self.pg_wal,
            spool_dir=self.spool,
            repositories=repos,
            cfg=ArchiveConfig(**{"timeout": 3, **cfg}),
            may_archive=lambda: self.allowed,
            refusal_reason=lambda: None if self.allowed else "test: not allowed",
            run_as=self.pg.run_as,
            node="p1",
        )

    async def start(self, repos: list[Repository], **cfg: Any) -> Archiver:
        await self.pg.initdb(["--encoding=UTF8", "--locale=C"])
        a = await self.start_archiver(repos, **cfg)
        params: dict[str, ParamValue] = {
            **DynamicConfig().cluster_parameters(),
            **DEFAULT_PARAMS,
            "checkpoint_timeout": "1h",  # no checkpoint: archived segments stay in pg_wal to compare
            "max_wal_size": "4GB",
            "archive_mode": "on",
            "archive_command": a.archive_command(),
        }
        await self.pg.write_config(params, Role.PRIMARY, None, replication_password=None)
        await self.pg.start(timeout=60)
        await self.pg.session.execute("CREATE TABLE t (v text)")
        return a

    async def start_archiver(self, repos: list[Repository], **cfg: Any) -> Archiver:
        self.archiver = self.make_archiver(repos, **cfg)
        self.archiver.prepare()
        self.task = asyncio.create_task(self.archiver.run())
        return self.archiver

    async def stop_archiver(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.archiver is not None:
            await self.archiver.close()
        self.task = None

    async def switch(self, rows: int = 2000) -> str:
        """Write a little, switch to a new segment; the name of the segment just completed."""
        await self.pg.session.execute(f"INSERT INTO t SELECT md5(g::text) FROM generate_series(1, {rows}) g")
        rows_ = await self.pg.session.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")
        await self.pg.session.execute("SELECT pg_switch_wal()")
        return str(rows_[0][0])

    async def stat_archiver(self) -> tuple[int, str | None, int]:
        r = await self.pg.session.execute(
            "SELECT archived_count, last_archived_wal, failed_count FROM pg_stat_archiver"
        )
        return int(r[0][0]), r[0][1], int(r[0][2])

    def ready_files(self) -> list[str]:
        return sorted(p.name[: -len(".ready")] for p in (self.pg_wal / "archive_status").glob("*.ready"))


@pytest.fixture
async def primary() -> AsyncIterator[Primary]:
    area = PgArea()
    p = Primary(area)
    try:
        yield p
    finally:
        await p.stop_archiver()
        await p.pg.session.close()
        area.cleanup()


async def fs_repo(primary: Primary, name: str) -> FilesystemRepository:
    path = primary.area.root / f"repo-{name}"
    r = FilesystemRepository(path, name=name)
    await r.initialize()
    return r


async def s3_repo(server: SeaweedS3, bucket: str) -> Repository:
    r = make_repository(s3_config(server, bucket))
    await r.initialize()
    return r


def segment_range(first: str, last: str) -> list[str]:
    a, b = layout.parse_segment_name(first), layout.parse_segment_name(last)
    assert a is not None and b is not None and a[0] == b[0]
    return [layout.segment_name(a[0], s) for s in range(a[1], b[1] + 1)]


# ---------------------------------------------------------------------------------- standalone primary


async def test_every_segment_reaches_every_repository_intact(primary: Primary, seaweed: SeaweedS3) -> None:
    fs = await fs_repo(primary, "fs")
    s3 = await s3_repo(seaweed, "hk-complete")
    a = await primary.start([fs, s3], parallel=4)
    names = [await primary.switch() for _ in range(6)]
    await until(lambda: _archived_at_least(primary, names[-1]), 60, "PostgreSQL saw every segment archived")
    first = (await fs.list_objects(f"{SCOPE}/wal/"))[0].name.rsplit("/", 1)[1]
    expected = segment_range(first, names[-1])
    assert layout.parse_segment_name(first) == (1, 1)  # from the very first segment
    for repo in (fs, s3):
        got = sorted(e.name.rsplit("/", 1)[1] for e in await repo.list_objects(f"{SCOPE}/wal/"))
        assert [n for n in got if layout.parse_segment_name(n)] == expected, repo.name  # contiguous
        for n in expected:
            assert await repo.get(layout.wal_key(SCOPE, n)) == (primary.pg_wal / n).read_bytes(), (
                repo.name,
                n,
            )
    st = a.status()
    assert st["last_error"] is None and st["pending_files"] == 0
    assert all(r["failures"] == 0 and r["up"] for r in st["repositories"])
    lat = latency_quantiles(a.latencies, (0.99,))["p99"]
    assert lat is not None and lat < 2.0, lat

    # identical re-push (as after a crash between the copy and PostgreSQL's bookkeeping): success
    again = names[2]
    status_dir = primary.pg_wal / "archive_status"
    (status_dir / f"{again}.done").rename(status_dir / f"{again}.ready")
    count0, _, failed0 = await primary.stat_archiver()
    await primary.switch()  # wakes PostgreSQL's archiver up
    await until(lambda: _no_ready(primary), 30, "the re-pushed segment handed back again")
    count1, _, failed1 = await primary.stat_archiver()
    assert count1 == count0 + 2 and failed1 == failed0
    for repo in (fs, s3):
        assert await repo.list_objects("quarantine/") == []


async def _archived_at_least(p: Primary, name: str) -> bool:
    _, last, _ = await p.stat_archiver()
    return last is not None and last >= name


async def _no_ready(p: Primary) -> bool:
    return not p.ready_files()


async def test_a_conflicting_object_is_quarantined_never_overwritten_nor_reported_archived(
    primary: Primary,
) -> None:
    good, bad = await fs_repo(primary, "good"), await fs_repo(primary, "bad")
    a = await primary.start([good, bad])
    await primary.switch()
    await primary.pg.session.execute("INSERT INTO t VALUES ('x')")  # not on a segment boundary any more
    upcoming = str((await primary.pg.session.execute("SELECT pg_walfile_name(pg_current_wal_lsn())"))[0][0])
    foreign = os.urandom(SEG)  # "another cluster" wrote this name already
    await bad.put_unique(layout.wal_key(SCOPE, upcoming), foreign)
    assert await primary.switch() == upcoming
    await until(lambda: _stored(good, upcoming), 30, "the good repository has the segment")
    await until(lambda: _true(upcoming in a.status()["conflicted_files"]), 30, "the conflict is reported")
    # archive_command times out (3 s here) and PostgreSQL counts a failure, keeps the file
    await until(lambda: _failed_at_least(primary, 1), 20, "PostgreSQL saw archive_command fail")
    assert upcoming in primary.ready_files()
    _, last, _ = await primary.stat_archiver()
    assert last is None or last < upcoming
    assert await bad.get(layout.wal_key(SCOPE, upcoming)) == foreign  # never overwritten
    (q,) = await bad.list_objects("quarantine/")
    assert await bad.get(q.name) == (primary.pg_wal / upcoming).read_bytes()
    assert a.status()["recent_conflicts"][0]["quarantined"] == q.name


async def _failed_at_least(p: Primary, n: int) -> bool:
    return (await p.stat_archiver())[2] >= n


async def _stored(repo: Repository, name: str) -> bool:
    try:
        await repo.stat(layout.wal_key(SCOPE, name))
    except NotFound:
        return False
    return True


async def _true(v: bool) -> bool:
    return v


async def test_one_repository_down_archiving_goes_on_and_it_catches_up(
    primary: Primary, tmp_path: Path
) -> None:
    server = SeaweedS3(tmp_path / "seaweed")
    await asyncio.to_thread(server.start)
    try:
        fs = await fs_repo(primary, "fs")
        s3 = await s3_repo(server, "hk-down")
        a = await primary.start([fs, s3])
        before = [await primary.switch() for _ in range(2)]
        await until(lambda: _archived_at_least(primary, before[-1]), 30, "archived while both are up")
        await asyncio.to_thread(server.stop)
        t_down = time.time()
        during = []
        for _ in range(6):
            during.append(await primary.switch())
            await asyncio.sleep(0.4)
        await until(lambda: _archived_at_least(primary, during[-1]), 30, "archived with SeaweedFS down")
        lat = dict(a.latencies)
        # the first file meets the failure (refused connections, retried by botocore); after that
        # the repository is known down and files are queued for it at once
        assert max(lat[n] for n in during[1:]) < 2.0, {n: round(lat[n], 3) for n in during}
        assert all([await _stored(fs, n) for n in during])
        assert a.queue.files_for("s3") == during
        await until(lambda: _true(not a.repos["s3"].up), 30, "SeaweedFS known to be down")
        s3_status = next(r for r in a.status()["repositories"] if r["name"] == "s3")
        assert s3_status["queued_files"] == len(during) and s3_status["failures"] >= 1
        print(f"latency with one repository down: {[round(lat[n], 3) for n in during]}, down at {t_down}")

        await asyncio.to_thread(server.start)  # same data directory and ports
        await until(lambda: _true(not a.queue.entries), 60, "the queue drained into SeaweedFS", 0.5)
        for n in before + during:
            assert await s3.get(layout.wal_key(SCOPE, n)) == (primary.pg_wal / n).read_bytes(), n
        assert next(r for r in a.status()["repositories"] if r["name"] == "s3")["up"]
    finally:
        await primary.stop_archiver()
        await asyncio.to_thread(server.stop)


async def test_pg_wal_grows_by_default_and_the_cap_gives_up_with_a_gap_record(primary: Primary) -> None:
    repo = await fs_repo(primary, "only")
    a = await primary.start([repo])
    first = await primary.switch()
    await until(lambda: _archived_at_least(primary, first), 30, "the first segment archived")
    away = repo.root.with_name("repo-only-away")
    repo.root.rename(away)  # the repository is gone (an unmounted disk)
    stuck = [await primary.switch() for _ in range(4)]
    await asyncio.sleep(3)
    # default (max_pg_wal_bytes auto: 25% of the filesystem, far above 4 segments): nothing is
    # given up, PostgreSQL keeps every segment
    assert primary.ready_files() == stuck
    assert a.status()["given_up_files"] == 0 and a.status()["pending_files"] == 4
    assert not list((primary.spool / "gaps").glob("*.json"))

    # the same node with a cap of two segments: the two oldest are given up, recorded as a gap
    await primary.stop_archiver()
    a = await primary.start_archiver([FilesystemRepository(repo.root, name="only")], max_pg_wal_bytes=2 * SEG)
    await until(lambda: _true(a.status()["given_up_files"] == 2), 30, "two files given up")
    gaps = await _gap_records(primary)  # one record per give-up pass
    assert {(g["reason"], tuple(g["repositories"])) for g in gaps} == {("pg_wal_cap", ("only",))}
    assert sorted(n for g in gaps for n in g["files"]) == stuck[:2]  # the oldest
    # PostgreSQL's archiver sleeps after three failures in a row; a reload wakes it up (a new
    # segment would too, but that would be one more to give up)
    await primary.pg.session.execute("SELECT pg_reload_conf()")
    await until(lambda: _true(not set(stuck[:2]) & set(primary.ready_files())), 30, "given-up files taken")
    ready_bytes = sum((primary.pg_wal / n).stat().st_size for n in primary.ready_files())
    assert ready_bytes <= 2 * SEG
    assert a.status()["given_up_files"] == 2

    away.rename(repo.root)  # the repository comes back: archiving resumes, the gap is published
    a.repos["only"].next_probe = 0  # not the whole back-off
    await until(lambda: _no_ready(primary), 60, "everything else archived")
    for n in stuck[2:]:
        assert await _stored(repo, n)
    for n in stuck[:2]:
        assert not await _stored(repo, n)
    published = [json.loads(await repo.get(o.name)) for o in await repo.list_objects(f"{SCOPE}/wal-gaps/")]
    assert sorted(published, key=lambda g: g["files"]) == sorted(gaps, key=lambda g: g["files"])


async def _gap_records(p: Primary) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((p.spool / "gaps").glob("*.json"))]


async def test_recovery_from_the_archive_takes_prefetched_segments(primary: Primary) -> None:
    """A base backup without WAL, restored with walfetch as restore_command: every segment comes
    from the archive, most of them from the prefetch directory; the data is all there; no
    prefetch worker outlives the recovery."""
    ra = primary.pg.run_as
    try:
        walfetch = python_command("hakeeper.backup.walfetch", ra)
    except RestoreRefused:
        # e.g. CI: a checkout in a 0700 directory, where PostgreSQL's OS user cannot run it
        # (hakeeper restore then serves the WAL itself: test_backup_restore).  Play PostgreSQL's
        # part instead: the same calls, in recovery's order, as root.
        await _walfetch_called_like_recovery(primary)
        return
    repo = await fs_repo(primary, "fs")
    await primary.start([repo])
    restored = primary.area.data_dir("restored")
    ra.chown(restored.parent)  # pg_basebackup runs as PostgreSQL's OS user
    sock = str(primary.pg.data_dir / SOCKET_SUBDIR)
    basebackup = [pg_program("pg_basebackup"), "-h", sock, "-p", str(primary.pg.port), "-U", "postgres"]
    # no WAL in the backup: recovery gets all of it from the archive
    await run([*basebackup, "-D", str(restored), "-X", "none", "-c", "fast"], run_as=ra, timeout=120)
    for _ in range(12):
        await primary.switch(rows=30000)
    last = await primary.switch(rows=1)
    expected = (
        await primary.pg.session.execute("SELECT count(*), md5(string_agg(v, ',' ORDER BY v)) FROM t")
    )[0]
    await until(lambda: _archived_at_least(primary, last), 60, "everything archived")

    for d, _, files in os.walk(repo.root):  # restore_command runs as PostgreSQL's OS user
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    conf = primary.area.root / "restored" / "walfetch.json"
    conf.write_text(WalToolConfig(scope=SCOPE, repositories=[s3_free_fs_config(repo.root)]).dump())
    os.chmod(conf, 0o600)
    ra.chown(conf)
    (port,) = free_ports(1)
    cfg = primary.area.node_config("restored", port=port)
    pg2 = Postgres(cfg, member_name="restored")
    try:
        params: dict[str, ParamValue] = {
            **DynamicConfig().cluster_parameters(),
            **DEFAULT_PARAMS,
            "archive_mode": "off",
            "restore_command": f"{walfetch} --config {conf} %f %p",
            "recovery_target_action": "promote",
        }
        await pg2.write_config(params, Role.PRIMARY, None, replication_password=None)
        signal = restored / "recovery.signal"
        signal.touch()
        ra.chown(signal)
        await pg2.start(timeout=300)

        async def promoted() -> bool:
            try:
                return (await pg2.session.execute("SELECT NOT pg_is_in_recovery()"))[0][0] is True
            except Exception:
                return False

        await until(promoted, 300, "recovery to the end of the archive", 0.5)
        got = (await pg2.session.execute("SELECT count(*), md5(string_agg(v, ',' ORDER BY v)) FROM t"))[0]
        assert got == expected
        hits = [
            ln
            for f in (restored / "pg_wal" / ".hakeeper-prefetch").glob("*/hits")
            for ln in f.read_text().split()
        ]
        fetched_segments = 12 + 2  # about: the load's segments plus the backup's
        assert len(hits) >= fetched_segments // 2, hits  # most segments were prefetched
        assert len(set(hits)) == len(hits)
        print(f"segments served from the prefetch directory: {len(hits)}")

        def workers() -> list[int]:
            return [
                pid
                for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if str(conf) in " ".join(proc_cmdline(pid))
            ]

        await until(lambda: _true(not workers()), 30, "no prefetch worker left")
        left = [
            p.name
            for p in (restored / "pg_wal" / ".hakeeper-prefetch").glob("*/*")
            if layout.parse_segment_name(p.name)
        ]
        assert left == []  # the worker removed what it had fetched ahead
    finally:
        await pg2.session.close()


async def _walfetch_called_like_recovery(primary: Primary) -> None:
    """walfetch asked for every archived segment in order, as recovery would: each arrives
    intact, most from the prefetch directory; a missing file is "not found" (exit 1); the worker
    leaves once recovery is over (recovery.signal gone) and removes what it fetched ahead."""
    import sys

    repo = await fs_repo(primary, "fs")
    await primary.start([repo])
    for _ in range(12):
        await primary.switch(rows=30000)
    last = await primary.switch(rows=1)
    await until(lambda: _archived_at_least(primary, last), 60, "everything archived")
    data = primary.area.data_dir("walfetch-direct")
    (data / "pg_wal").mkdir(parents=True)
    (data / "recovery.signal").touch()
    conf = primary.area.root / "walfetch-direct.json"
    conf.write_text(WalToolConfig(scope=SCOPE, repositories=[s3_free_fs_config(repo.root)]).dump())
    names = sorted(
        e.name.rsplit("/", 1)[1]
        for e in await repo.list_objects(layout.wal_prefix(SCOPE))
        if layout.parse_segment_name(e.name.rsplit("/", 1)[1])
    )
    assert len(names) >= 12
    dest = data / "pg_wal" / "RECOVERYXLOG"

    async def call(fname: str) -> int:
        argv = [sys.executable, "-m", "hakeeper.backup.walfetch", "--config", str(conf), fname, str(dest)]
        return (await run(argv, timeout=60, check=False)).returncode

    for name in names:
        assert await call(name) == 0, name
        assert dest.read_bytes() == await repo.get(layout.wal_key(SCOPE, name)), name
        await asyncio.sleep(0.2)  # recovery replays the segment meanwhile
    parsed = layout.parse_segment_name(names[-1])
    assert parsed is not None
    assert await call(layout.segment_name(1, parsed[1] + 50)) == 1
    assert await call("00000009.history") == 1
    pdir = data / "pg_wal" / ".hakeeper-prefetch"
    hits = [ln for f in pdir.glob("*/hits") for ln in f.read_text().split()]
    assert len(hits) >= len(names) // 2, hits
    (data / "recovery.signal").unlink()

    def workers() -> list[int]:
        return [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if str(conf) in " ".join(proc_cmdline(pid))
        ]

    await until(lambda: _true(not workers()), 60, "no prefetch worker left")
    assert [p.name for p in pdir.glob("*/*") if layout.parse_segment_name(p.name)] == []


def s3_free_fs_config(path: Path) -> RepositoryConfig:
    return RepositoryConfig(name="fs", type="fs", path=path)


# ---------------------------------------------------------------------------------- hakeeper cluster


def api_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


def test_cluster_archives_across_a_switchover_and_the_demoted_node_pushes_nothing() -> None:
    repo_dir = cluster_tmpdir("hk-arch-repo-")
    backup = {"repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}]}
    repo = FilesystemRepository(repo_dir, name="fs")
    try:
        with running_cluster(nodes=2, backup=backup, scope=SCOPE) as c:
            try:
                old = c.primary()
                assert old is not None
                new = next(n for n in c.names if n != old)
                settings = dict(
                    sql(c, old, "SELECT name, setting FROM pg_settings WHERE name LIKE 'archive_%'")
                )
                assert settings["archive_mode"] == "on" and settings["archive_timeout"] == "60"
                assert settings["archive_command"].endswith('archive_command.sh "%p" "%f"')
                assert dict(
                    sql(c, new, "SELECT name, setting FROM pg_settings WHERE name = 'archive_mode'")
                ) == {"archive_mode": "on"}
                sql(c, old, "CREATE TABLE t (v text)")
                for _ in range(3):
                    sql(c, old, "INSERT INTO t SELECT md5(g::text) FROM generate_series(1, 5000) g")
                    sql(c, old, "SELECT pg_switch_wal()")

                def request() -> bool:  # once the replica's published lag allows it
                    try:
                        run_request(c, requests.request_switchover, leader=old, candidate=new)
                    except Refused as e:
                        if "not eligible" in str(e):
                            return False
                        raise
                    return True

                def caught_up() -> bool:
                    primary_lsn = parse_lsn(str(sql(c, old, "SELECT pg_current_wal_lsn()")[0][0]))
                    replayed = parse_lsn(str(sql(c, new, "SELECT pg_last_wal_replay_lsn()")[0][0]))
                    return primary_lsn is not None and replayed is not None and replayed >= primary_lsn

                # The leader checks the candidate's lag again when it executes the request and
                # refuses a lagging one: ask once it has caught up, and again if it was refused.
                for _ in range(3):
                    wait_for(caught_up, 60, "the candidate caught up")
                    time.sleep(1.5)  # its member record shows that
                    wait_for(request, 30, "switchover accepted")
                    led = run_request(
                        c, requests.wait_for_new_leader, old_leader=old, candidate=new, timeout=30
                    )
                    if led == new:
                        break
                else:
                    raise AssertionError(f"no switchover to {new}")
                t_switched = time.time()
                wait_for(lambda: c.node_state(new).role == "primary", 30, "new primary writable")
                for _ in range(2):
                    sql(c, new, "INSERT INTO t SELECT md5(g::text) FROM generate_series(1, 5000) g")
                    sql(c, new, "SELECT pg_switch_wal()")
                last_lsn = parse_lsn(str(sql(c, new, "SELECT pg_current_wal_lsn()")[0][0]))
                assert last_lsn is not None
                open_segment = layout.segment_name(2, layout.segno_of(last_lsn))  # not complete: not archived
                history_name = layout.history_name(2)
                wal = repo_dir / SCOPE / "wal"

                def archived() -> list[str]:
                    return sorted(os.listdir(wal)) if wal.is_dir() else []

                wait_for(lambda: history_name in archived(), 60, "the new primary's history file archived")
                hist = layout.parse_history(
                    asyncio.run(repo.get(layout.wal_key(SCOPE, history_name))).decode()
                )
                # every segment recovery reads from the first one to the last complete one on timeline
                # 2, across the switch, reaches the archive
                wanted = layout.wal_segments(layout.segment_start_lsn(1), last_lsn, 2, hist)
                assert wanted[-1] == open_segment and wanted[0] == "000000010000000000000001"
                assert any(n.startswith("00000002") for n in wanted[:-1])
                wait_for(
                    lambda: [n for n in wanted[:-1] if n not in archived()] == [],
                    60,
                    "no segment missing across the switch",
                )
                names = archived()
                # the old timeline's last, partial segment is kept too, and history came first
                assert any(n.endswith(".partial") and n.startswith("00000001") for n in names), names
                hist_mtime = (wal / history_name).stat().st_mtime
                tl2 = [n for n in names if n.startswith("00000002") and layout.parse_segment_name(n)]
                assert tl2 and all((wal / n).stat().st_mtime >= hist_mtime for n in tl2)

                # who wrote what: nothing from the old primary after the switchover
                for n in names:
                    st = asyncio.run(repo.stat(layout.wal_key(SCOPE, n)))
                    if st.meta.get("node") == old:
                        assert st.modified.timestamp() <= t_switched + 0.5, (n, st.modified)

                # the demoted node is a replica now: a .ready file planted in its pg_wal is refused
                wait_for(lambda: c.node_state(old).role == "replica", 60, "old primary follows")
                planted = "0000000100000000000000F0"
                old_wal = c.nodes[old].data_dir / "pg_wal"
                (old_wal / planted).write_bytes(os.urandom(1024) + bytes(SEG - 1024))
                (old_wal / "archive_status" / f"{planted}.ready").touch()
                try:
                    time.sleep(3)
                    assert planted not in archived()
                    st_old = api_get(c.nodes[old].api_url + "/status")["archive"]
                    assert st_old["active"] is False
                    assert st_old["refused_reason"] == "not a primary (in recovery)"
                    assert "archive_refused" in c.tail_log(old, 400)
                finally:
                    (old_wal / "archive_status" / f"{planted}.ready").unlink(missing_ok=True)
                    (old_wal / planted).unlink(missing_ok=True)

                st_new = api_get(c.nodes[new].api_url + "/status")["archive"]
                assert st_new["active"] is True and st_new["last_error"] is None
                # the promotion's check of the old timeline's WAL up to the switch point
                check = st_new["switch_check"]
                assert check is not None and check["timeline"] == 2, check
                assert check["repositories"]["fs"]["missing"] == 0, check
                assert check["repositories"]["fs"]["from"] == "000000010000000000000001", check
                assert "archive_complete_before_switch" in c.tail_log(new, 400)
                metrics = api_get(c.nodes[new].api_url + "/metrics")
                assert 'hakeeper_archive_files_total{repo="fs"}' in metrics
                assert "hakeeper_archive_active 1.0" in metrics
            except BaseException:  # what the agents said, for the failure report
                for n in c.names:
                    print(f"--- {n} agent log ---\n{c.tail_log(n, 80)}")
                raise
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
