"""Restore drills (``hakeeper verify``, issue 6 part 4; docs/verify.md).

A drill proves that a base backup restores, and measures how long that takes:

1. It picks a backup (``--backup ID``, the newest complete one, or the newest before
   ``--target-time``) and a target: the restore point recorded with the backup's row counts
   (:func:`hakeeper.backup.basebackup.record_row_counts`), else the time given, else the end of
   the archive.
2. It restores into a scratch data directory below ``backup.verify.scratch_dir`` with
   :func:`hakeeper.backup.restore.restore` (archiving off, a free port, the WAL served by this
   process), and, once the copy is complete and before PostgreSQL starts, runs
   ``pg_verifybackup --no-parse-wal`` against the backup's manifest (recovery verifies the WAL);
   an incremental backup is restored by pg_combinebackup of its chain and verified against the
   manifest pg_combinebackup wrote.
3. It starts the copy and waits until it has left recovery (paused at the target, promoted).
4. On the running copy: row counts of every table compared with those recorded with the
   backup (equality required when they were exact), ``pg_amcheck --all --heapallindexed``, and
   the newest complete logical dump of the repository restored into a scratch database.
5. It always stops the copy and removes the scratch directory, also after a failure or Ctrl-C;
   the directory (and server) of a drill whose process was killed is removed by the next drill.

The result (:class:`DrillResult`) goes next to the backup (``<scope>/backup/<id>/verify-<time>.json``)
and into etcd (``<prefix>/verify/last`` and, for a success, ``<prefix>/verify/last_success``),
where the agent exports it as metrics (:func:`metric_values`).  A corrupt repository object
fails the drill, and ``failed_object`` names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hakeeper.backup import catalog, layout
from hakeeper.backup.basebackup import (
    DATABASES_SQL,
    USER_TABLES_SQL,
    BackupError,
    Endpoint,
    count_tables,
)
from hakeeper.backup.catalog import COMBINE_TOOL, BackupRecord, RestoreRefused, Target
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.fileindex import STATE_FILE
from hakeeper.backup.phases import PhaseStats
from hakeeper.backup.repo import ListEntry, Repository
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreError, RestoreOptions, RestoreResult, restore
from hakeeper.core import timefmt
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.config import secret_value
from hakeeper.core.keys import Keys
from hakeeper.pg.conf import build_conninfo, first_socket_dir
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, dirs_of_dead_processes, pid_alive, postmaster_pid, resolve_run_as, run

if TYPE_CHECKING:
    from hakeeper.core.config import NodeConfig
    from hakeeper.dcs.etcd import EtcdClient

log = get_logger(__name__)

FORMAT_VERSION = 1
VERIFY_PREFIX = "verify-"
ID_FORMAT = "V%Y%m%dT%H%M%SZ"
ProgressFn = Callable[[str, int, int | None], None]
StepFn = Callable[[str], None]

__all__ = ["DrillError", "DrillResult", "run_drill"]


class DrillError(Exception):
    """The drill could not start (no repository, no such backup): nothing was restored."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Check(_Model):
    """One check of a drill: ``ok`` None when it was skipped (``detail`` says why)."""

    ok: bool | None
    detail: str = ""
    seconds: float | None = None


class TableDiff(_Model):
    database: str
    table: str
    recorded: int | None  # None: not in the backup's counts
    restored: int | None  # None: not in the restored copy


class RowCheck(_Model):
    """Row counts of the restored copy, and how they compare with the recorded ones."""

    compared: bool  # counts were recorded with the backup and the restore went to their point
    exact_expected: bool  # the recorded counts were exact: every difference is a failure
    restore_point: str | None = None
    tables: int = 0
    rows: int = 0
    differences: list[TableDiff] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)


class DumpDatabaseCheck(_Model):
    name: str
    scratch_database: str
    tables: int
    rows: int
    seconds: float


class DumpCheck(_Model):
    dump_id: str
    repository: str
    format: str
    taken_at: dt.datetime | None = None
    databases: list[DumpDatabaseCheck] = Field(default_factory=list)
    seconds: float = 0.0  # fetch + pg_restore of every database


class Rto(_Model):
    """Seconds from the start of the restore to a writable server, by phase.

    ``fetch``: the copy waited for the repository (the next part was not fetched yet);
    ``decompress``: the rest of the copy (zstd and tar, and flushing the files to disk);
    ``wal_replay``: PostgreSQL start to the end of replay (at the target); ``promote``: from
    there to ``pg_is_in_recovery()`` false.  ``total`` adds ``plan`` (choosing the backup,
    checking the WAL and the parts); the drill's own checks are not part of it."""

    plan: float
    fetch: float
    decompress: float
    wal_replay: float | None
    promote: float | None
    total: float


class DrillResult(_Model):
    format: int = FORMAT_VERSION
    id: str
    ok: bool = False
    scope: str
    repository: str | None = None
    backup_id: str | None = None
    target: str | None = None
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    seconds: float = 0.0
    error: str | None = None
    failed_object: str | None = None
    checks: dict[str, Check] = Field(default_factory=dict)
    row_counts: RowCheck | None = None
    dump: DumpCheck | None = None
    rto: Rto | None = None
    # seconds/bytes/rate per phase of the drill's restore (backup/phases.py); in etcd's summary
    phases: dict[str, PhaseStats] = Field(default_factory=dict)
    restore: dict[str, Any] | None = None  # RestoreResult.to_dict() of the restore
    stored: list[str] = Field(default_factory=list)  # where this result was written
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What goes into etcd and ``backup list``: no per-table counts."""
        doc = self.model_dump(mode="json", exclude={"restore", "stored"})
        if doc.get("row_counts"):
            doc["row_counts"].pop("counts", None)
            diffs = doc["row_counts"]["differences"]
            doc["row_counts"]["differences_total"] = len(diffs)
            doc["row_counts"]["differences"] = diffs[:20]  # an etcd value stays small
        return doc

    def fail(self, error: str, obj: str | None = None) -> None:
        self.ok = False
        if self.error is None:
            self.error = error
        if obj is not None and self.failed_object is None:
            self.failed_object = obj


# ============================================================================ keys


def drill_key(scope: str, backup_id: str, drill_id: str) -> str:
    return layout.backup_prefix(scope, backup_id) + f"{VERIFY_PREFIX}{drill_id[1:]}.json"


def is_drill_object(name: str) -> bool:
    base = name.rpartition("/")[2]
    return base.startswith(VERIFY_PREFIX) and base.endswith(".json")


async def last_drills(
    repo: Repository, cat: catalog.Catalog, objects: Mapping[str, list[ListEntry]] | None = None
) -> dict[str, DrillResult]:
    """The newest drill result stored with each backup of ``cat`` (backup id -> result);
    unreadable ones are left out."""
    newest: dict[str, str] = {}
    for bid, entries in (objects or cat.objects).items():
        names = sorted(e.name for e in entries if is_drill_object(e.name))
        if names:
            newest[bid] = names[-1]
    out: dict[str, DrillResult] = {}

    async def one(bid: str, key: str) -> None:
        with contextlib.suppress(RepoError, ValidationError, ValueError):
            out[bid] = DrillResult.model_validate_json(await repo.get(key))

    await asyncio.gather(*(one(b, k) for b, k in newest.items()))
    return out


# ============================================================================ the drill


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _corrupt_name(e: BaseException | None) -> str | None:
    """The object a failure names: a CorruptObject (or a missing object) in its cause chain."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, CorruptObject):
            return e.name
        if isinstance(e, NotFound):
            return e.name
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _pick_backup(
    cat: catalog.Catalog, backup_id: str | None, target_time: dt.datetime | None
) -> BackupRecord | None:
    if backup_id is not None:
        return cat.get(backup_id)
    for rec in cat.complete():
        # A backup of a cluster a major upgrade replaced needs the old major's binaries and
        # proves nothing about today's cluster: drilled only when named (--backup).
        if not cat.lineage.is_current(rec.system_identifier):
            continue
        if target_time is None or (rec.stop_time is not None and rec.stop_time <= target_time):
            return rec
    return None


def _target_for(rec: BackupRecord, target_time: dt.datetime | None) -> tuple[Target, bool]:
    """The drill's target, and whether the restore goes to the point the counts were taken at."""
    if target_time is not None:
        return Target("time", time=target_time), False
    rc = rec.row_counts
    if rc is not None and rc.restore_point and not rc.skipped:
        return Target("name", name=rc.restore_point), True
    return Target("latest"), False


def compare_counts(
    recorded: Mapping[str, Mapping[str, int]], restored: Mapping[str, Mapping[str, int]]
) -> list[TableDiff]:
    """Every table whose count differs, or that is on one side only (databases too)."""
    diffs: list[TableDiff] = []
    for db in sorted(set(recorded) | set(restored)):
        a, b = recorded.get(db, {}), restored.get(db, {})
        for t in sorted(set(a) | set(b)):
            if a.get(t) != b.get(t):
                diffs.append(TableDiff(database=db, table=t, recorded=a.get(t), restored=b.get(t)))
    return diffs


class _Drill:
    def __init__(
        self,
        cfg: NodeConfig,
        result: DrillResult,
        bin_dir: Path,
        step: StepFn | None,
    ) -> None:
        self.cfg = cfg
        self.result = result
        self.bin_dir = bin_dir
        self.step = step or (lambda _msg: None)
        self.password = secret_value(cfg.postgresql.superuser.password)
        self.scratch: Path | None = None
        self.data_dir: Path | None = None
        self.run_as = RunAs()

    # ------------------------------------------------------------ checks
    def check(
        self, name: str, ok: bool | None, detail: str, t0: float | None = None, obj: str | None = None
    ) -> None:
        secs = None if t0 is None else round(time.monotonic() - t0, 3)
        self.result.checks[name] = Check(ok=ok, detail=detail, seconds=secs)
        if ok is False:
            self.result.fail(f"{name}: {detail}", obj)
        log.info("verify_check", check=name, ok=ok, detail=detail[:300], seconds=secs)

    async def verify_backup_files(self, repo: Repository, rec: BackupRecord, data_dir: Path) -> None:
        """pg_verifybackup of the copy, before PostgreSQL touches it (restore's after_copy)."""
        t0 = time.monotonic()
        if rec.manifest is None:
            self.check("pg_verifybackup", None, "the backup has no manifest", t0)
            return
        assert self.scratch is not None
        self.step("pg_verifybackup")
        if rec.kind == "incremental":
            # pg_combinebackup rebuilt the chain into the data directory with a manifest of
            # its own, written from the links' manifests: the backup's manifest describes
            # only the changed blocks
            path = data_dir / catalog.MANIFEST_NAME
        else:
            key = catalog.object_key(self.cfg.scope, rec.id, rec.manifest.name)
            path = self.scratch / catalog.MANIFEST_NAME
            try:
                data = await repo.get(key)
            except RepoError as e:
                self.check(
                    "pg_verifybackup", False, f"the manifest cannot be read: {e}", t0, _corrupt_name(e) or key
                )
                return
            await asyncio.to_thread(path.write_bytes, data)
            await asyncio.to_thread(self.run_as.chown, path)
        r = await run(
            # the restore's record of what it wrote is not the backup's (backup/restorestate.py)
            [self.bin_dir / "pg_verifybackup", "--no-parse-wal", "-i", STATE_FILE, "-m", path, data_dir],
            run_as=self.run_as,
            env={"LC_ALL": "C", "LC_MESSAGES": "C"},
            timeout=self.cfg.backup.verify.timeout,
            check=False,
        )
        if r.ok:
            self.check("pg_verifybackup", True, (r.stdout.strip() or "backup successfully verified"), t0)
        else:
            self.check("pg_verifybackup", False, f"exit {r.returncode}: {r.tail(12)}", t0)

    def conninfo(self, res: RestoreResult, dbname: str = "postgres") -> str:
        host = first_socket_dir(res.settings.get("unix_socket_directories", "")) or "127.0.0.1"
        ci = build_conninfo(
            host=host,
            port=_port_of(res),
            user=self.cfg.postgresql.superuser.username,
            dbname=dbname,
            application_name="hakeeper-verify",
            connect_timeout=10,
        )
        return ci

    async def connect(self, res: RestoreResult, dbname: str = "postgres") -> psycopg.AsyncConnection[Any]:
        kw: dict[str, Any] = {"autocommit": True}
        if self.password is not None:
            kw["password"] = self.password
        return await psycopg.AsyncConnection.connect(self.conninfo(res, dbname), **kw)

    async def count_rows(self, res: RestoreResult) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        async with await self.connect(res) as admin:
            dbs = [r[0] for r in await (await admin.execute(DATABASES_SQL)).fetchall()]
        for db in dbs:
            async with await self.connect(res, db) as conn:
                tables = [(t[0], t[1]) for t in await (await conn.execute(USER_TABLES_SQL)).fetchall()]
                counts, _failed = await count_tables(conn, tables)
                out[db] = counts
        return out

    async def check_rows(self, rec: BackupRecord, res: RestoreResult, at_point: bool) -> None:
        t0 = time.monotonic()
        self.step("row counts")
        try:
            counts = await self.count_rows(res)
        except (psycopg.Error, OSError) as e:
            self.check("row_counts", False, f"counting failed: {str(e).strip()}", t0)
            return
        rc = rec.row_counts
        compared = at_point and rc is not None and not rc.skipped
        rows = RowCheck(
            compared=compared,
            exact_expected=bool(compared and rc is not None and rc.exact),
            restore_point=rc.restore_point if rc else None,
            tables=sum(len(t) for t in counts.values()),
            rows=sum(sum(t.values()) for t in counts.values()),
            counts=counts,
        )
        self.result.row_counts = rows
        summary = f"{rows.tables} tables, {rows.rows} rows in {len(counts)} databases"
        if not compared:
            why = (
                "no counts were recorded with this backup"
                if rc is None
                else f"counts were not recorded ({rc.skipped})"
                if rc.skipped
                else "the restore did not go to the counts' restore point"
            )
            self.check("row_counts", True, f"{summary}; not compared: {why}", t0)
            return
        assert rc is not None
        rows.differences = compare_counts(rc.tables, counts)
        if not rows.differences:
            self.check(
                "row_counts", True, f"{summary}; equal to the counts recorded at {rc.restore_point}", t0
            )
            return
        shown = "; ".join(
            f"{d.database}.{d.table}: recorded {d.recorded}, restored {d.restored}"
            for d in rows.differences[:5]
        )
        more = f" (and {len(rows.differences) - 5} more)" if len(rows.differences) > 5 else ""
        if rows.exact_expected:
            self.check(
                "row_counts",
                False,
                f"{len(rows.differences)} tables differ from the exact counts: {shown}{more}",
                t0,
            )
        else:
            self.check(
                "row_counts",
                True,
                f"{summary}; {len(rows.differences)} tables differ from counts that were not exact "
                f"({rc.inexact_reason}): {shown}{more}",
                t0,
            )

    async def amcheck(self, res: RestoreResult) -> None:
        t0 = time.monotonic()
        self.step("pg_amcheck --heapallindexed")
        argv: list[str | Path] = [
            self.bin_dir / "pg_amcheck",
            "--all",
            "--heapallindexed",
            "--install-missing",
            "--no-password",  # PGPASSWORD, when there is one
            "-h",
            first_socket_dir(res.settings.get("unix_socket_directories", "")) or "127.0.0.1",
            "-p",
            str(_port_of(res)),
            "-U",
            self.cfg.postgresql.superuser.username,
        ]
        env = {"LC_ALL": "C", "LC_MESSAGES": "C", "PGAPPNAME": "hakeeper-verify"}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        r = await run(argv, env=env, timeout=self.cfg.backup.verify.timeout, check=False)
        if r.ok:
            self.check(
                "pg_amcheck", True, "no corruption found (all databases, heap and every btree index)", t0
            )
        else:
            self.check("pg_amcheck", False, f"exit {r.returncode}: {r.tail(12)}", t0)

    async def dump_check(self, repo: Repository, res: RestoreResult) -> None:
        from hakeeper.backup.dump import DumpError, RestoreRequest, load_dumps, restore_dump

        t0 = time.monotonic()
        if not self.cfg.backup.verify.dump_check:
            self.check("dump_restore", None, "disabled (backup.verify.dump_check)", t0)
            return
        try:
            dumps = (await load_dumps(repo, self.cfg.scope)).complete()
        except RepoError as e:
            self.check("dump_restore", False, f"the dumps cannot be listed: {e}", t0, _corrupt_name(e))
            return
        if not dumps:
            self.check("dump_restore", None, f"no complete logical dump in repository {repo.name}", t0)
            return
        d = dumps[0]
        self.step(f"restoring dump {d.id}")
        check = DumpCheck(dump_id=d.id, repository=repo.name, format=d.dump_format, taken_at=d.stop_time)
        self.result.dump = check
        for i, db in enumerate(d.databases):
            scratch_db = f"hakeeper_verify_{i}"
            req = RestoreRequest(
                conninfo=self.conninfo(res),
                password=self.password,
                bin_dir=self.bin_dir,
                database=db.name,
                create_db=scratch_db,
                no_owner=True,
                tmp_dir=self.scratch,
            )
            try:
                r = await restore_dump(repo, self.cfg.scope, d.id, req)
                counts = await self._db_counts(res, scratch_db)
            except (DumpError, RepoError, psycopg.Error, OSError) as e:
                check.seconds = round(time.monotonic() - t0, 3)
                self.check(
                    "dump_restore",
                    False,
                    f"dump {d.id} database {db.name}: {str(e).strip()}",
                    t0,
                    _corrupt_name(e),
                )
                return
            check.databases.append(
                DumpDatabaseCheck(
                    name=db.name,
                    scratch_database=scratch_db,
                    tables=len(counts),
                    rows=sum(counts.values()),
                    seconds=round(r.seconds, 3),
                )
            )
        check.seconds = round(time.monotonic() - t0, 3)
        detail = ", ".join(f"{c.name}: {c.tables} tables, {c.rows} rows" for c in check.databases)
        self.check("dump_restore", True, f"dump {d.id} ({d.dump_format}) restored: {detail}", t0)

    async def _db_counts(self, res: RestoreResult, db: str) -> dict[str, int]:
        async with await self.connect(res, db) as conn:
            tables = [(t[0], t[1]) for t in await (await conn.execute(USER_TABLES_SQL)).fetchall()]
            counts, _ = await count_tables(conn, tables)
            return counts

    # ------------------------------------------------------------ clean-up
    async def cleanup(self) -> None:
        """Stop the scratch server (pg_ctl stop -m immediate, then SIGKILL) and remove the
        scratch directory.  Runs after a success, a failure and an interruption."""
        if self.data_dir is not None:
            pid = await asyncio.to_thread(postmaster_pid, self.data_dir)
            if pid is not None:
                with contextlib.suppress(Exception):
                    await run(
                        [
                            self.bin_dir / "pg_ctl",
                            "stop",
                            "-D",
                            self.data_dir,
                            "-m",
                            "immediate",
                            "-w",
                            "-t",
                            "20",
                        ],
                        run_as=self.run_as,
                        env={"LC_ALL": "C"},
                        timeout=30,
                        check=False,
                    )
                deadline = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < deadline:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                    await asyncio.sleep(0.1)
                if pid_alive(pid):
                    self.result.notes.append(f"the scratch server (pid {pid}) did not stop")
        if self.scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self.scratch, True)
            if self.scratch.exists():
                self.result.notes.append(f"the scratch directory {self.scratch} could not be removed")


def _port_of(res: RestoreResult) -> int:
    return int(res.settings["port"])


SCRATCH_PREFIX = "hakeeper-verify-"
_SCRATCH_PID = re.compile(r"^hakeeper-verify-p(\d+)-")


def remove_stale_scratch(where: Path) -> list[Path]:
    """Scratch directories of drills whose process is gone (killed: its clean-up never ran):
    their server, if it still runs, is killed, and the directory removed.  Returns them."""
    removed = dirs_of_dead_processes(where, _SCRATCH_PID)
    for d in removed:
        pid = postmaster_pid(d / "data")  # only a postgres running in that very directory
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(d, ignore_errors=True)
        log.info("verify_stale_scratch_removed", path=str(d), server_pid=pid)
    return removed


async def run_drill(
    cfg: NodeConfig,
    *,
    backup_id: str | None = None,
    target_time: dt.datetime | None = None,
    repository: str | None = None,
    primary: Endpoint | None = None,
    etcd: EtcdClient | None = None,
    progress: ProgressFn | None = None,
    step: StepFn | None = None,
    store: bool = True,
    jobs: int | None = None,
) -> DrillResult:
    """Run one restore drill (see the module doc) and return its result; ``result.ok`` says
    whether it passed.  ``primary``: where ``pg_switch_wal()`` runs so that the target is
    archived.  ``etcd``: where the result is published (None: not published).  DrillError:
    nothing to drill (no repository, no such backup, no PostgreSQL binaries)."""
    from hakeeper.pg.bins import node_bin_dir
    from hakeeper.pg.errors import PgError

    now = catalog.utcnow()
    result = DrillResult(id=now.strftime(ID_FORMAT), scope=cfg.scope, started_at=now)
    t0 = time.monotonic()
    repos = [r for r in cfg.backup.repositories if repository is None or r.name == repository]
    if not repos:
        raise DrillError(
            f"no repository {repository!r}" if repository else "no backup repositories configured"
        )
    try:
        bin_dir = node_bin_dir(cfg.postgresql)
    except PgError as e:
        raise DrillError(str(e)) from None
    chosen: tuple[RepositoryConfig, Repository, catalog.Catalog, BackupRecord] | None = None
    refusals: list[str] = []
    opened: list[Repository] = []
    try:
        for rc in repos:
            r = make_repository(rc)
            opened.append(r)
            try:
                cat = await catalog.load_catalog(r, cfg.scope, wal=False)
            except RepoError as e:
                refusals.append(f"{rc.name}: {e}")
                continue
            rec = _pick_backup(cat, backup_id, target_time)
            if rec is None:
                what = f"no backup {backup_id!r}" if backup_id else "no complete backup"
                if target_time is not None and not backup_id:
                    what += f" ending before {timefmt.iso(target_time)}"
                refusals.append(
                    f"{rc.name}: {what}" + (f" ({'; '.join(cat.problems)})" if cat.problems else "")
                )
                continue
            chosen = (rc, r, cat, rec)
            break
        if chosen is None:
            raise DrillError("nothing to verify: " + "; ".join(refusals))
        rc, repo, cat, rec = chosen
        result.repository, result.backup_id = rc.name, rec.id
        for p in cat.problems:  # an unreadable backup record in the repository: named, a failure
            obj = p.split(": corrupt object:")[0].rpartition(" ")[2] if ": corrupt object:" in p else None
            result.checks["catalog"] = Check(ok=False, detail=p)
            result.fail(f"catalog: {p}", obj)
        drill = _Drill(cfg, result, bin_dir, step)
        try:
            await _run(drill, rc, repo, rec, target_time, primary, progress, jobs)
        except asyncio.CancelledError:
            result.fail("interrupted")
            raise
        finally:
            await asyncio.shield(drill.cleanup())
            result.finished_at = catalog.utcnow()
            result.seconds = round(time.monotonic() - t0, 3)
            if result.error is None and not any(c.ok is False for c in result.checks.values()):
                result.ok = True
            if store:
                await asyncio.shield(_store(result, repo, cfg, etcd))
    finally:
        for r in opened:
            with contextlib.suppress(Exception):
                await r.close()
    log.info(
        "verify_finished",
        ok=result.ok,
        backup=result.backup_id,
        repository=result.repository,
        error=result.error,
        failed_object=result.failed_object,
        seconds=result.seconds,
    )
    return result


async def _run(
    drill: _Drill,
    rc: RepositoryConfig,
    repo: Repository,
    rec: BackupRecord,
    target_time: dt.datetime | None,
    primary: Endpoint | None,
    progress: ProgressFn | None,
    jobs: int | None = None,
) -> None:
    cfg, result = drill.cfg, drill.result
    vcfg = cfg.backup.verify
    base = vcfg.scratch_dir
    if base is not None:
        await asyncio.to_thread(base.mkdir, parents=True, exist_ok=True)
    where = base if base is not None else Path(tempfile.gettempdir())
    for stale in await asyncio.to_thread(remove_stale_scratch, where):
        result.notes.append(f"removed the scratch directory of a drill that was killed: {stale}")
    prefix = f"{SCRATCH_PREFIX}p{os.getpid()}-"
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix, dir=where))
    drill.scratch = scratch
    try:
        drill.run_as = resolve_run_as(scratch / "data", cfg.postgresql.os_user)
    except RuntimeError as e:
        result.fail(str(e))
        return
    await asyncio.to_thread(drill.run_as.chown, scratch)
    drill.data_dir = scratch / "data"
    target, at_point = _target_for(rec, target_time)
    result.target = target.describe()
    drill.step(f"restoring backup {rec.id} from {rc.name} to {result.target}")

    async def after_copy(r: BackupRecord, data_dir: Path) -> None:
        await drill.verify_backup_files(repo, r, data_dir)

    opts = RestoreOptions(
        data_dir=drill.data_dir,
        target=target,
        bin_dir=drill.bin_dir,
        run_as=drill.run_as,
        superuser=cfg.postgresql.superuser,
        backup_id=rec.id,
        start=True,
        port=_free_port(),
        primary=primary,
        switch_wal=primary is not None,
        wal_timeout=60.0,
        start_timeout=vcfg.timeout,
        progress=progress,
        serve_wal=True,
        after_copy=after_copy,
        parallel=jobs or os.cpu_count() or 2,  # restore --jobs: workers unpacking an indexed backup
        # A drill checks PostgreSQL's own tools end to end: a chain is rebuilt by
        # pg_combinebackup and checked by pg_verifybackup (a restore applies it in place).
        combine=COMBINE_TOOL,
    )
    t0 = time.monotonic()
    try:
        res = await restore(repo, rc, cfg.scope, opts)
    except (RestoreRefused, RestoreError, BackupError, RepoError) as e:
        kind = "refused" if isinstance(e, RestoreRefused) else "failed"
        result.checks["restore"] = Check(ok=False, detail=str(e), seconds=round(time.monotonic() - t0, 3))
        result.fail(f"restore {kind}: {e}", _corrupt_name(e) or _named_in(str(e), cfg.scope, rec.id))
        return
    result.restore = res.to_dict()
    result.phases = dict(res.phases)
    result.notes.extend(res.notes)
    result.rto = Rto(
        plan=round(res.seconds_plan, 3),
        fetch=round(res.seconds_fetch_wait or 0.0, 3),
        decompress=round(res.seconds_decompress or 0.0, 3),
        wal_replay=None if res.seconds_replay is None else round(res.seconds_replay, 3),
        promote=None if res.seconds_promote is None else round(res.seconds_promote, 3),
        total=round(
            res.seconds_plan + res.seconds_fetch + (res.seconds_replay or 0) + (res.seconds_promote or 0), 3
        ),
    )
    result.checks["restore"] = Check(
        ok=True,
        detail=f"restored to {res.target}, promoted on timeline {res.new_timeline}, writable",
        seconds=round(time.monotonic() - t0, 3),
    )
    await drill.check_rows(rec, res, at_point)
    await drill.amcheck(res)
    await drill.dump_check(repo, res)


def _named_in(message: str, scope: str, backup_id: str) -> str | None:
    """A repository key of the backup named in an error message (restore's refusals name it)."""
    prefix = layout.backup_prefix(scope, backup_id)
    i = message.find(prefix)
    if i < 0:
        return None
    end = i
    while end < len(message) and not message[end].isspace() and message[end] not in ":,;)":
        end += 1
    return message[i:end]


async def _store(result: DrillResult, repo: Repository, cfg: NodeConfig, etcd: EtcdClient | None) -> None:
    """The result next to the backup and in etcd; a failure to store is a note, not a failure."""
    if result.backup_id is not None:
        key = drill_key(cfg.scope, result.backup_id, result.id)
        try:
            await repo.put(key, (result.model_dump_json(indent=1) + "\n").encode())
            result.stored.append(f"{repo.name}:{key}")
        except RepoError as e:
            result.notes.append(f"the result could not be stored in {repo.name}: {e}")
    if etcd is None:
        return
    doc = json.dumps(result.summary(), separators=(",", ":"))
    try:
        async with asyncio.timeout(10):
            await etcd.put(Keys(cfg.prefix).verify_last, doc)
            result.stored.append(f"etcd:{Keys(cfg.prefix).verify_last}")
            if result.ok:
                await etcd.put(Keys(cfg.prefix).verify_last_success, doc)
                result.stored.append(f"etcd:{Keys(cfg.prefix).verify_last_success}")
    except Exception as e:  # EtcdError, TimeoutError, connection errors: the drill still counts
        result.notes.append(f"the result could not be published in etcd: {e or type(e).__name__}")


# ============================================================================ metrics


def parse_summary(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def metric_values(last: bytes | str | None, last_success: bytes | str | None) -> dict[str, Any]:
    """The gauges the agent exports from etcd's ``verify/last`` and ``verify/last_success``:
    ``last_timestamp``, ``last_ok`` (1/0), ``last_success_timestamp`` and ``rto`` (phase ->
    seconds of the last successful drill); None where there is no drill yet."""
    a, s = parse_summary(last), parse_summary(last_success)
    rto: dict[str, float] = {}
    if s and isinstance(s.get("rto"), dict):
        rto = {k: float(v) for k, v in s["rto"].items() if isinstance(v, int | float)}
    return {
        "last_timestamp": _epoch(a.get("finished_at")) if a else None,
        "last_ok": None if a is None else (1 if a.get("ok") else 0),
        "last_success_timestamp": _epoch(s.get("finished_at")) if s else None,
        "rto": rto,
    }
