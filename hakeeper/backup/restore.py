"""Restore a base backup and recover to a target (``hakeeper restore``).

Order of work, so that a restore that cannot succeed stops before a byte is copied:

1. The data directory must be empty (or absent) and no server may run in it.
2. Plan (:func:`hakeeper.backup.catalog.plan_restore`): the backup, the target timeline, and
   the WAL on the way, all from the repository's listing and history files.  When the archive
   cannot show that it reaches the target (the segment the primary is writing is never
   archived until it is switched) and the primary is reachable, ``pg_switch_wal()`` runs there
   and the restore waits until that segment is archived, then plans again -- for target
   ``latest`` only with ``include_current_wal`` (else it restores what is archived, without a
   wait: ``hakeeper restore --latest``'s default).
3. Every part's trailer is read (size, SHA-256 against the record).
4. The parts are fetched and decompressed in parallel (each checked against its SHA-256).  An
   indexed backup (layout ``zstd-indexed``) is unpacked by ``parallel`` workers, each writing
   the member slices of its part at their file offsets (backup/unpack.py), pg_control last;
   the other layouts are one stream, decoded in order by one thread (backup/untar.py).  With
   ``delta``, an older copy of the cluster in the directory is brought to the backup's content
   instead, fetching only the parts holding blocks that differ (backup/delta.py).
5. Recovery settings go into ``postgresql.auto.conf`` (``restore_command`` with
   :mod:`hakeeper.backup.walfetch`, the target, ``recovery_target_action = 'promote'``, the
   timeline, ``archive_mode = off`` so that a restored copy never archives into the
   production repository, replication settings of the source neutralised), and
   ``recovery.signal`` is created.
6. With ``start``: ``pg_ctl start``, then wait until ``pg_is_in_recovery()`` is false (not
   merely until connections are accepted); a recovery that fails shows the server's log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import grp
import os
import pwd
import re
import shlex
import shutil
import site
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from hakeeper.backup import catalog, delta, layout, restorestate, untar
from hakeeper.backup.basebackup import BackupError, Endpoint, switch_wal
from hakeeper.backup.catalog import (
    COMBINE_IN_PLACE,
    COMBINE_MODES,
    COMBINE_TOOL,
    Catalog,
    RestorePlan,
    RestoreRefused,
    StoredObject,
    Target,
)
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.handover import serving
from hakeeper.backup.incremental_apply import ApplyError, apply_chain
from hakeeper.backup.phases import PhaseStats, phases_dict, restore_phases
from hakeeper.backup.repo import FilesystemRepository, Repository
from hakeeper.backup.unpack import UnpackError, unpack_full
from hakeeper.backup.walfetch import DEFAULT_PREFETCH, DEFAULT_PREFETCH_MAX_BYTES, fast_path_script
from hakeeper.backup.walspool import TimelinePath
from hakeeper.core import timefmt
from hakeeper.core.backup_config import RepositoryConfig, WalToolConfig
from hakeeper.core.config import Credentials
from hakeeper.core.lsn import format_lsn, parse_lsn
from hakeeper.pg.conf import build_conninfo, quote_conf_value
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import SOCKET_SUBDIR
from hakeeper.pg.version import binaries_version
from hakeeper.util.fsutil import (
    BackgroundWriteback,
    UnsafePathError,
    ensure_dir,
    ensure_dir_fd,
    read_regular,
    syncfs,
    write_atomic,
)
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, dirs_of_dead_processes, postmaster_pid, run

log = get_logger(__name__)

WAL_CONFIG_NAME = "hakeeper-restore-wal.json"  # next to the data directory, never in it: see wal_config_path
RESTORE_SCRIPT_NAME = "hakeeper-restore-command.sh"  # restore_command: walfetch's shell fast path
LOG_REL = Path("log") / "postgresql.log"
WALFETCH_MODULE = "hakeeper.backup.walfetch"
_MAX_SOCKET_PATH = 107
ProgressFn = Callable[[str, int, int | None], None]
# Called with the record and the data directory once the copy is complete, before the recovery
# settings are written and before anything starts (a restore drill runs pg_verifybackup there).
AfterCopyFn = Callable[[catalog.BackupRecord, Path], Awaitable[None]]

__all__ = ["RestoreError", "RestoreOptions", "RestoreRefused", "RestoreResult", "restore"]


class RestoreError(Exception):
    """The restore failed after it started copying (the data directory was emptied again), or
    recovery failed; the message says why."""


@dataclass
class RestoreOptions:
    data_dir: Path
    target: Target
    bin_dir: Path
    run_as: RunAs
    superuser: Credentials
    backup_id: str | None = None
    start: bool = False
    port: int | None = None
    primary: Endpoint | None = None  # where pg_switch_wal() runs to complete the archive
    switch_wal: bool = True
    # For target "latest": also switch WAL on the primary and wait for that segment (the very
    # latest point of a running cluster).  False restores what is archived, as pgBackRest does,
    # without a wait before the copy; the CLI's default (--include-current-wal sets it).
    include_current_wal: bool = True
    on_planned: Callable[[RestorePlan], None] = lambda plan: None  # told the point before the copy
    wal_timeout: float = 60.0
    start_timeout: float = 3600.0
    # workers of an indexed backup's unpack (the CLI's --jobs), or parts fetched ahead of the
    # stream extraction of the other layouts
    parallel: int = field(default_factory=lambda: os.cpu_count() or 2)
    progress: ProgressFn | None = None
    # bring an older copy of the same cluster in data_dir to the backup (backup/delta.py)
    delta: bool = False
    # a delta reads every local file, whatever the last restore recorded (backup/restorestate.py)
    rehash: bool = False
    serve_wal: bool = False  # the caller serves WAL while the server recovers (handover.serving)
    after_copy: AfterCopyFn | None = None
    # How a chain of incremental backups is rebuilt (docs/decisions.md): "in-place" (the full
    # unpacked into the data directory, the links applied to it: backup/incremental_apply.py)
    # or "pg_combinebackup" (every link unpacked, combined by PostgreSQL's tool, the result
    # checked with pg_verifybackup; what restore drills use).
    combine: str = COMBINE_IN_PLACE
    # WAL fetched ahead of recovery, by this process (--start) or the prefetch spool (later)
    prefetch: int = DEFAULT_PREFETCH
    prefetch_max_bytes: int = DEFAULT_PREFETCH_MAX_BYTES


@dataclass
class RestoreResult:
    backup_id: str
    repository: str
    target: str
    timeline: int
    data_dir: str
    size: int
    parts: int
    started: bool
    new_timeline: int | None = None
    dsn: str | None = None
    seconds_plan: float = 0.0
    seconds_fetch: float = 0.0
    # seconds_fetch split: the copy waited for the repository (fetch) / for zstd, writes and the
    # final flush to disk (decompress); see _extract
    seconds_fetch_wait: float | None = None
    seconds_decompress: float | None = None
    seconds_replay: float | None = None
    seconds_promote: float | None = None
    seconds_total: float = 0.0
    notes: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    start_command: str | None = None
    chain: list[str] = field(default_factory=list)  # the backups restored, full first
    combine_mode: str | None = None  # "in-place", or pg_combinebackup's copy mode (a chain)
    seconds_combine: float | None = None
    # an indexed backup: stored bytes fetched, file bytes written, the backup's file bytes
    bytes_fetched: int | None = None
    bytes_written: int | None = None
    bytes_total: int | None = None
    delta: bool = False
    jobs: int | None = None
    stored_size: int = 0  # bytes fetched from the repository for the copy
    replay_start_lsn: int | None = None  # where replay starts (the backup's start)
    replay_goal_lsn: int | None = None  # the target LSN, else the end of the last archived WAL
    replay_end_lsn: int | None = None  # pg_last_wal_replay_lsn() once recovery ended
    phases: dict[str, PhaseStats] = field(default_factory=dict)  # backup/phases.py
    # restore_command's segment requests during --start (walspool stats): taken at once from
    # what was fetched ahead (hits), and the seconds replay waited for the others
    wal_requests: int | None = None
    wal_prefetch_hits: int | None = None
    wal_fetch_wait_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backup": self.backup_id,
            "repository": self.repository,
            "target": self.target,
            "target_timeline": self.timeline,
            "new_timeline": self.new_timeline,
            "data_dir": self.data_dir,
            "size": self.size,
            "parts": self.parts,
            "started": self.started,
            "dsn": self.dsn,
            "chain": self.chain,
            "combine_mode": self.combine_mode,
            "delta": self.delta,
            "jobs": self.jobs,
            "bytes": {
                "fetched": self.bytes_fetched,
                "written": self.bytes_written,
                "total": self.bytes_total,
            },
            "seconds": {
                "plan": round(self.seconds_plan, 3),
                "fetch_decompress": round(self.seconds_fetch, 3),
                "fetch": None if self.seconds_fetch_wait is None else round(self.seconds_fetch_wait, 3),
                "decompress": None if self.seconds_decompress is None else round(self.seconds_decompress, 3),
                "combine": None if self.seconds_combine is None else round(self.seconds_combine, 3),
                "wal_replay": None if self.seconds_replay is None else round(self.seconds_replay, 3),
                "promote": None if self.seconds_promote is None else round(self.seconds_promote, 3),
                "total": round(self.seconds_total, 3),
            },
            "phases": phases_dict(self.phases),
            "wal_requests": self.wal_requests,
            "wal_prefetch_hits": self.wal_prefetch_hits,
            "wal_fetch_wait_s": None if self.wal_fetch_wait_s is None else round(self.wal_fetch_wait_s, 3),
            "wal_fetch_wait_share": (
                round(self.wal_fetch_wait_s / self.seconds_replay, 4)
                if self.wal_fetch_wait_s is not None and self.seconds_replay
                else None
            ),
            "settings": self.settings,
            "start_command": self.start_command,
            "notes": self.notes,
        }


# ============================================================================ checks


def replay_goal(plan: RestorePlan, target: Target) -> int | None:
    """The LSN replay heads for, for the progress display: a target LSN, else the end of the
    last archived segment on the way (a bound: a time, xid or name target stops before)."""
    if target.kind == "lsn" and target.lsn is not None:
        return target.lsn
    parsed = layout.parse_segment_name(plan.covered_until) if plan.covered_until else None
    if parsed is None:
        return None
    return (parsed[1] + 1) * layout.DEFAULT_SEGMENT_SIZE


def check_data_dir(data_dir: Path) -> None:
    """Refuse a data directory that is in use or not empty (RestoreRefused)."""
    pidfile = data_dir / "postmaster.pid"
    if pidfile.exists():
        pid = postmaster_pid(data_dir)
        state = f"PostgreSQL (pid {pid}) is running there" if pid else "a server was not shut down there"
        raise RestoreRefused(f"{data_dir}: postmaster.pid exists ({state}); refusing to restore over it")
    if data_dir.exists():
        if not data_dir.is_dir():
            raise RestoreRefused(f"{data_dir} exists and is not a directory")
        entries = sorted(p.name for p in data_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise RestoreRefused(
                f"{data_dir} is not empty ({len(entries)} entries: {shown}); restore needs an empty "
                "or missing directory"
            )


def _can_access(path: Path, ra: RunAs, want: int) -> bool:
    """Whether user ``ra`` may access ``path`` with ``want`` (a mask of R_OK/W_OK/X_OK),
    traversing every directory on the way, symbolic links followed (classic permission bits,
    as root sees them)."""
    if ra.uid is None:
        return os.access(path, want)
    groups = {ra.gid}
    if ra.name:
        groups |= {g.gr_gid for g in grp.getgrall() if ra.name in g.gr_mem}

    def allowed(d: Path, bits: int) -> bool:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == ra.uid:
            perm = (st.st_mode >> 6) & 7
        elif st.st_gid in groups:
            perm = (st.st_mode >> 3) & 7
        else:
            perm = st.st_mode & 7
        return perm & bits == bits

    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    dirs = {*given.parents, *real.parents}
    return all(allowed(d, os.X_OK) for d in dirs) and allowed(real, want)


def python_command(module: str, ra: RunAs) -> str:
    """A shell command that runs ``python -m module`` as user ``ra``.

    Our interpreter when that user can run it.  Otherwise (a virtualenv below /root, say) a
    system Python of the same version with our import paths, which works because the
    compiled extensions are built for that version's ABI."""
    exe = Path(sys.executable)
    if _can_access(exe, ra, os.X_OK):
        return f"{shlex.quote(str(exe))} -m {module}"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    import hakeeper

    root = Path(hakeeper.__file__).resolve().parent.parent
    paths = [str(root), *(p for p in site.getsitepackages() if Path(p).is_dir())]
    for cand in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        c = Path(cand)
        if c.exists() and _can_access(c, ra, os.X_OK):
            unreadable = [p for p in paths if not _can_access(Path(p), ra, os.R_OK | os.X_OK)]
            if unreadable:
                break
            return f"PYTHONPATH={shlex.quote(os.pathsep.join(paths))} {shlex.quote(cand)} -m {module}"
    raise RestoreRefused(
        f"the PostgreSQL OS user {ra.name or ra.uid} cannot run {sys.executable} (restore_command "
        f"needs it) and no usable python{ver} was found; install hakeeper where that user can read it"
    )


def _check_repo_readable(repo: Repository, scope: str, plan: RestorePlan, ra: RunAs) -> None:
    """restore_command runs as the PostgreSQL OS user: it must be able to read archived WAL."""
    if ra.uid is None or not isinstance(repo, FilesystemRepository) or not plan.segments:
        return
    probe = repo.root / layout.wal_key(scope, plan.segments[0])
    if not _can_access(probe, ra, os.R_OK):
        try:
            st = probe.stat()
            owner = f"owner {pwd.getpwuid(st.st_uid).pw_name}, mode {stat.S_IMODE(st.st_mode):04o}"
        except (OSError, KeyError):
            owner = "not accessible"
        raise RestoreRefused(
            f"the PostgreSQL OS user {ra.name} cannot read the archived WAL of repository {repo.name} "
            f"({probe}: {owner}), which its restore_command must fetch"
        )


# ============================================================================ planning


async def _plan(repo: Repository, scope: str, opts: RestoreOptions) -> tuple[Catalog, RestorePlan, list[str]]:
    cat = await catalog.load_catalog(repo, scope)
    notes: list[str] = []
    if cat.lineage_problem is not None:
        # Without the binding nothing tells an upgraded cluster's backups apart: said, not refused
        # (a restore is what one needs when things are broken).
        log.warning("restore_binding_unreadable", repo=repo.name, reason=cat.lineage_problem)
        notes.append(f"{cat.lineage_problem}: backups of a cluster before a major upgrade are not recognised")
    plan = catalog.plan_restore(cat, opts.target, opts.backup_id)
    if plan.era is not None:
        # An upgraded cluster's WAL ends at its end; the primary of today is the new cluster's,
        # so a WAL switch there adds nothing this backup can use.
        log.info(
            "restore_of_upgraded_cluster",
            backup=plan.backup.id,
            system_identifier=plan.era.system_identifier,
            pg_major=plan.era.pg_major,
            upgraded_to_major=plan.era.upgraded_to_major,
            ends_at=plan.era.end_text(),
            target=opts.target.describe(),
        )
        return cat, plan, notes
    if plan.proven:
        return cat, plan, notes
    wanted = opts.target.kind != "latest" or opts.include_current_wal
    if opts.switch_wal and opts.primary is not None and wanted:
        closed = await _switch_and_wait(repo, scope, opts)
        if closed:
            notes.append(f"switched WAL on the primary {opts.primary.address}; {closed} archived")
        cat = await catalog.load_catalog(repo, scope)
        plan = catalog.plan_restore(cat, opts.target, opts.backup_id)
        if plan.proven:
            return cat, plan, notes
    if opts.target.kind in ("time", "lsn"):
        hint = ""
        if opts.primary is None:
            hint = " (no primary reachable to switch WAL on)"
        elif not opts.switch_wal:
            hint = " (WAL switch on the primary disabled)"
        raise RestoreRefused(f"{plan.missing}{hint}")
    last = plan.covered_until or "none"
    mod = timefmt.iso(plan.covered_until_modified) if plan.covered_until_modified else "?"
    if not wanted:
        log.info("restore_wal_switch_skipped", reason="latest restores what is archived", last_archived=last)
        notes.append(
            f"recovery ends with the archived WAL ({last}, archived {mod}); WAL still in the primary's "
            "current segment is not restored (--include-current-wal switches and waits for it)"
        )
    elif opts.primary is None or not opts.switch_wal:
        notes.append(
            f"no WAL switch on the primary: recovery ends with the archived WAL ({last}, archived {mod}); "
            "WAL still in the primary's current segment is not restored"
        )
    return cat, plan, notes


async def _switch_and_wait(repo: Repository, scope: str, opts: RestoreOptions) -> str | None:
    assert opts.primary is not None
    try:
        closed = await switch_wal(opts.primary, opts.superuser)
    except BackupError as e:
        log.warning("restore_wal_switch_failed", error=str(e))
        return None
    if closed is None:
        return None
    key = layout.wal_key(scope, closed)
    deadline = time.monotonic() + opts.wal_timeout
    while True:
        try:
            await repo.stat(key)
            return closed
        except NotFound:
            pass
        except RepoError as e:
            log.warning("restore_wal_wait", error=str(e))
        if time.monotonic() > deadline:
            raise RestoreRefused(
                f"switched WAL on the primary {opts.primary.address}, but {closed} did not reach "
                f"repository {repo.name} within {opts.wal_timeout:.0f}s; is WAL archiving working?"
            )
        await asyncio.sleep(0.3)


async def _verify_parts(repo: Repository, scope: str, rec: catalog.BackupRecord) -> None:
    """Every part, the manifest and the index exist with the size and checksum the record names."""
    objs: list[StoredObject] = [
        *rec.parts,
        *([rec.manifest] if rec.manifest else []),
        *([rec.index] if rec.index else []),
    ]
    if not rec.parts:
        raise RestoreRefused(f"backup {rec.id} has no parts")
    sem = asyncio.Semaphore(16)

    async def one(o: StoredObject) -> None:
        key = catalog.object_key(scope, rec.id, o.name)
        async with sem:
            try:
                st = await repo.stat(key)
            except NotFound:
                raise RestoreRefused(f"backup {rec.id}: {key} is missing from {repo.name}") from None
            except CorruptObject as e:
                raise RestoreRefused(f"backup {rec.id}: {e}") from None
        if st.sha256 != o.sha256 or st.size != o.size:
            raise RestoreRefused(
                f"backup {rec.id}: {key} in {repo.name} is not the object the backup recorded "
                f"(sha256 {st.sha256[:16]}.. size {st.size}, recorded {o.sha256[:16]}.. size {o.size})"
            )

    await asyncio.gather(*(one(o) for o in objs))


# ============================================================================ copying


def wal_config_path(data_dir: Path) -> Path:
    """Where the restore_command's repository config (it may hold S3 credentials) lives:
    *beside* the data directory (``<parent>/.<name>.hakeeper-restore-wal.json``), so that no base
    backup, clone or copy of the data directory carries it.  Mode 0600, owned by PostgreSQL's OS
    user (walfetch runs as that user); ``recovery_end_command`` removes it when recovery ends, the
    agent's seed removes it when the replica streams."""
    return data_dir.parent / f".{data_dir.name}.{WAL_CONFIG_NAME}"


def _mkdir_owned(path: Path, ra: RunAs) -> bool:
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    ensure_dir(path, mode=0o700, owner=ra)  # a link at the data directory's name is refused
    return created


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


@dataclass
class _Tally:
    """Bytes of an indexed unpack, for the result."""

    fetched: int = 0
    written: int = 0
    total: int = 0


async def _extract_indexed(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    opts: RestoreOptions,
    durable: bool,
    tally: _Tally | None,
) -> float:
    """An indexed backup unpacked by ``opts.parallel`` workers (backup/unpack.py), written back
    while it is unpacked and flushed before pg_control, which comes last."""
    writeback = BackgroundWriteback(data_dir).start() if durable else None
    try:
        stats = await unpack_full(
            repo,
            scope,
            rec,
            data_dir,
            opts.run_as,
            jobs=opts.parallel,
            progress=opts.progress,
            before_control=writeback.finish if writeback is not None else None,
            # what the directory now holds, for a later --delta (not for a chain's staged links)
            after=(lambda idx: restorestate.record(data_dir, idx, opts.run_as)) if durable else None,
        )
    except UnpackError as e:
        raise RestoreError(f"backup {rec.id}: {e}") from None
    except OSError as e:  # creating the tree or pg_control (a full disk, ...)
        raise RestoreError(f"backup {rec.id}: unpacking into {data_dir}: {e}") from None
    finally:
        if writeback is not None:
            writeback.cancel()
    if tally is not None:
        tally.fetched += stats.bytes_fetched
        tally.written += stats.bytes_written
        tally.total += stats.bytes_total
    return stats.seconds_fetch


async def _extract(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    opts: RestoreOptions,
    *,
    durable: bool = True,
    tally: _Tally | None = None,
) -> float:
    """One backup into ``data_dir``: by parallel workers when it has an index, else as one
    stream (:func:`_extract_untar`)."""
    if rec.index is not None:
        return await _extract_indexed(repo, scope, rec, data_dir, opts, durable, tally)
    return await _extract_untar(repo, scope, rec, data_dir, opts, durable=durable)


async def _extract_untar(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    opts: RestoreOptions,
    *,
    durable: bool = True,
) -> float:
    """A backup without an index: its parts fetched in order (``opts.parallel`` ahead, at least
    3) and its tar stream decoded and written by a worker thread (backup/untar.py), written
    back while it runs and flushed before pg_control (unless not ``durable``: a chain's links,
    read once by pg_combinebackup and removed).

    Returns the seconds the copy waited for the repository (the next part not fetched yet when
    the extraction could take it); the rest of the copy's time is decompression and writing."""
    writeback = BackgroundWriteback(data_dir).start() if durable else None
    try:
        _, waited = await untar.extract_backup(
            repo,
            scope,
            rec,
            data_dir,
            opts.run_as,
            window=max(3, opts.parallel),
            progress=opts.progress,
            before_control=writeback.finish if writeback is not None else None,
        )
    except UnpackError as e:
        raise RestoreError(str(e)) from None
    finally:
        if writeback is not None:
            writeback.cancel()
    return waited


# ============================================================================ chains


CHAIN_STAGE = "hakeeper-chain"
PARALLEL_UNPACK_CPUS = 4  # from this many CPUs on, a chain's links are unpacked beside its full


def chain_stage_path(data_dir: Path) -> Path:
    """Where the links of a chain are unpacked: beside the data directory, on its filesystem
    (so that pg_combinebackup can hard-link or clone instead of copying)."""
    return data_dir.parent / f".{data_dir.name}.{CHAIN_STAGE}-{os.getpid()}"


_STAGE_PID = re.compile(rf"^\..*\.{CHAIN_STAGE}-(\d+)$")


def _remove_stale_stages(where: Path) -> None:
    """The link directories of chain restores whose process was killed (a ``finally`` never
    ran): decrypted backup data that would otherwise stay beside the data directory."""
    for d in dirs_of_dead_processes(where, _STAGE_PID):
        shutil.rmtree(d, ignore_errors=True)
        log.info("restore_stale_chain_stage_removed", path=str(d))


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _can_clone(where: Path) -> bool:
    """Whether the filesystem of ``where`` clones files (FICLONE: btrfs, XFS with reflink)."""
    ficlone = 0x40049409
    src = where / ".clone-probe-src"
    dst = where / ".clone-probe-dst"
    try:
        src.write_bytes(b"x" * 4096)
        with open(src, "rb") as fs, open(dst, "wb") as fd:
            fcntl.ioctl(fd.fileno(), ficlone, fs.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (src, dst):
            with contextlib.suppress(OSError):
                p.unlink()


def combine_mode(version_major: int, stage: Path, data_dir: Path) -> str:
    """pg_combinebackup's way of producing the output from the unpacked links (docs/decisions.md):
    ``--link`` (PostgreSQL 18+, one filesystem): the output shares the unchanged files with the
    links, which are temporary copies removed right after -- nothing is copied at all;
    ``--clone`` where the filesystem clones (btrfs, XFS); ``--copy-file-range`` on one
    filesystem (the kernel copies, no round trip through user space); else ``--copy``."""
    same = _same_fs(stage, data_dir)
    if same and version_major >= 18:
        return "--link"
    if same and _can_clone(stage):
        return "--clone"
    if same:
        return "--copy-file-range"
    return "--copy"


async def _fresh_stage(data_dir: Path, opts: RestoreOptions) -> Path:
    """An empty directory for a chain's links beside ``data_dir`` (stale ones of killed
    restores removed first)."""
    stage = chain_stage_path(data_dir)
    await asyncio.to_thread(_remove_stale_stages, data_dir.parent)
    await asyncio.to_thread(shutil.rmtree, stage, True)
    await asyncio.to_thread(_mkdir_owned, stage, opts.run_as)
    return stage


async def _unpack_link(
    repo: Repository,
    scope: str,
    link: catalog.BackupRecord,
    d: Path,
    opts: RestoreOptions,
    *,
    into_data_dir: bool,
) -> float:
    """One link of a chain unpacked into ``d`` with its manifest: the data directory itself
    (written back as it is unpacked) or a link directory of the stage (not flushed: read once,
    then removed).  Returns the seconds it waited for the repository."""
    if not into_data_dir:
        await asyncio.to_thread(_mkdir_owned, d, opts.run_as)
    waited = await _extract(repo, scope, link, d, opts, durable=into_data_dir)
    if link.manifest is not None:  # a zstd-stream backup's tar has no manifest
        raw = await repo.get(catalog.object_key(scope, link.id, link.manifest.name))
        await asyncio.to_thread(
            write_atomic, d / catalog.MANIFEST_NAME, raw.decode(), mode=0o600, run_as=opts.run_as
        )
    return waited


async def _extract_chain(
    repo: Repository,
    scope: str,
    links: list[catalog.BackupRecord],
    data_dir: Path,
    opts: RestoreOptions,
    result: RestoreResult,
) -> float:
    """An incremental backup: every link of its chain unpacked into a directory of its own
    (with its manifest; all links at once), ``pg_combinebackup`` of them into ``data_dir``, and
    ``pg_verifybackup`` of the result against the manifest pg_combinebackup wrote.

    Only the result is written to disk: the links are unpacked and combined without a flush
    (``--no-sync``) and removed right after the combination, so that the pages of the links'
    files the result does not share (the relation files rebuilt from several links) are
    dropped unwritten; then the result is flushed (syncfs) while pg_verifybackup reads it.  A
    chain thus costs the disk what its full backup alone costs."""
    stage = await _fresh_stage(data_dir, opts)
    dirs = [stage / link.id for link in links]

    async def unpack(link: catalog.BackupRecord, d: Path) -> float:
        return await _unpack_link(repo, scope, link, d, opts, into_data_dir=False)

    marks: dict[str, float] = {}  # seconds of each step (logged)
    t_unpack = time.monotonic()
    try:
        # the links are independent until pg_combinebackup: unpacked side by side (each tar and
        # zstd a process of their own), so a chain restores in about the time of its largest link
        unpacked = await asyncio.gather(
            *(unpack(link, d) for link, d in zip(links, dirs, strict=True)), return_exceptions=True
        )
        for u in unpacked:
            if isinstance(u, BaseException):
                raise u
        fetch_wait = max(float(u) for u in unpacked if not isinstance(u, BaseException))
        marks["unpack"] = time.monotonic() - t_unpack
        major = (links[-1].pg_version or 170000) // 10000  # the binaries' (_check_binaries_for)
        mode = await asyncio.to_thread(combine_mode, major, stage, data_dir)
        t0 = time.monotonic()
        r = await run(
            [str(opts.bin_dir / "pg_combinebackup"), "--no-sync", "-o", str(data_dir), mode, *map(str, dirs)],
            run_as=opts.run_as,
            env={"LC_ALL": "C", "LC_MESSAGES": "C"},
            timeout=None,  # as long as the copy takes (start_timeout is the recovery's)
            check=False,
        )
        if not r.ok:
            raise RestoreError(
                f"pg_combinebackup {mode} of {', '.join(links_ids(links))} failed: {r.tail(12)}"
            )
        result.combine_mode = mode.removeprefix("--")
        result.seconds_combine = time.monotonic() - t0
        marks["combine"] = result.seconds_combine
        t1 = time.monotonic()
        await asyncio.to_thread(shutil.rmtree, stage, True)  # before the flush: see above
        marks["remove_links"] = time.monotonic() - t1
        t2 = time.monotonic()

        async def flush() -> None:
            await asyncio.to_thread(_flush, data_dir)
            marks["flush"] = time.monotonic() - t2

        flushed = asyncio.create_task(flush())
        try:
            v = await run(
                [str(opts.bin_dir / "pg_verifybackup"), "--no-parse-wal", "--quiet", str(data_dir)],
                run_as=opts.run_as,
                env={"LC_ALL": "C", "LC_MESSAGES": "C"},
                timeout=None,
                check=False,
            )
            marks["verify"] = time.monotonic() - t2
        finally:
            await flushed  # a thread cannot be cancelled: waited for in any case
        if not v.ok:
            raise RestoreError(f"pg_verifybackup of the combined backup failed: {v.tail(12)}")
        log.info(
            "restore_chain_combined",
            backup=links[-1].id,
            chain=links_ids(links),
            mode=result.combine_mode,
            seconds=round(result.seconds_combine, 3),
            **{k: round(secs, 3) for k, secs in marks.items()},
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, stage, True)
    return fetch_wait


async def _apply_chain_in_place(
    repo: Repository,
    scope: str,
    links: list[catalog.BackupRecord],
    data_dir: Path,
    opts: RestoreOptions,
    result: RestoreResult,
) -> float:
    """An incremental backup restored in place (backup/incremental_apply.py): the chain's full
    unpacked straight into ``data_dir`` as a full restore does (written back while it is
    unpacked), every later link into a directory of its own beside it (not flushed), beside
    the full or after it (PARALLEL_UNPACK_CPUS); then the links applied to the data directory,
    oldest first -- the files they carry whole are renamed into it, the relation files they
    carry as changed blocks rebuilt there -- and the data directory flushed once more.
    Unlike pg_combinebackup, which writes a new copy of every relation file any link changed,
    this writes only the changed blocks: a chain costs the disk its full backup plus its
    links."""
    stage = await _fresh_stage(data_dir, opts)
    dirs = [data_dir, *(stage / link.id for link in links[1:])]

    async def unpack(link: catalog.BackupRecord, d: Path) -> float:
        return await _unpack_link(repo, scope, link, d, opts, into_data_dir=d == data_dir)

    marks: dict[str, float] = {}
    t_unpack = time.monotonic()
    try:
        # Each unpack is a pipeline of its own (fetch, zstd, tar): on a machine of few CPUs the
        # links unpacked beside the full slow the full's down (measured with 2 CPUs: +1.7 s of
        # waiting on a 2.3 GB full), so there the full goes first and the (smaller) links after.
        pairs = list(zip(links, dirs, strict=True))
        waves = [pairs] if (os.cpu_count() or 1) >= PARALLEL_UNPACK_CPUS else [pairs[:1], pairs[1:]]
        fetch_wait = 0.0  # per wave, the longest wait (they overlap within a wave)
        for wave in waves:
            got = await asyncio.gather(*(unpack(link, d) for link, d in wave), return_exceptions=True)
            for u in got:
                if isinstance(u, BaseException):
                    raise u
            fetch_wait += max(float(u) for u in got if not isinstance(u, BaseException))
        marks["unpack"] = time.monotonic() - t_unpack
        t0 = time.monotonic()
        try:
            stats = await asyncio.to_thread(apply_chain, data_dir, dirs[1:], opts.run_as)
        except ApplyError as e:
            log.error("restore_chain_refused", backup=links[-1].id, chain=links_ids(links), reason=str(e))
            raise RestoreError(f"applying the chain {', '.join(links_ids(links))} failed: {e}") from None
        result.combine_mode = COMBINE_IN_PLACE
        result.seconds_combine = time.monotonic() - t0
        marks["apply"] = result.seconds_combine
        t1 = time.monotonic()
        await asyncio.to_thread(shutil.rmtree, stage, True)  # what was not moved: not needed
        marks["remove_links"] = time.monotonic() - t1
        t2 = time.monotonic()
        await asyncio.to_thread(_flush, data_dir)
        marks["flush"] = time.monotonic() - t2
        log.info(
            "restore_chain_applied",
            backup=links[-1].id,
            chain=links_ids(links),
            mode=COMBINE_IN_PLACE,
            files_rebuilt=stats.files_rebuilt,
            files_moved=stats.files_moved,
            files_removed=stats.files_removed,
            blocks_written=stats.blocks_written,
            checksums_compared=stats.checksums_compared,
            **{k: round(secs, 3) for k, secs in marks.items()},
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, stage, True)
    return fetch_wait


def _flush(data_dir: Path) -> None:
    """Everything written to ``data_dir``'s filesystem made durable (blocking)."""
    if not syncfs(data_dir):
        os.sync()


def links_ids(links: list[catalog.BackupRecord]) -> list[str]:
    return [link.id for link in links]


# ============================================================================ recovery settings


def _socket_dir(data_dir: Path, port: int | None) -> str:
    path = str(data_dir / SOCKET_SUBDIR)
    if len(path) + len(f"/.s.PGSQL.{port or 65535}") > _MAX_SOCKET_PATH or any(c in path for c in '", \t'):
        return "/tmp"
    return path


def pauses_at_target(opts: RestoreOptions) -> bool:
    """Whether the restored server pauses at its target for hakeeper to promote it: only when
    hakeeper starts and watches it, and there is a target."""
    return opts.start and opts.target.kind != "latest"


def recovery_settings(
    opts: RestoreOptions, plan: RestorePlan, restore_command: str, socket_dir: str
) -> dict[str, str | int | bool]:
    t = opts.target
    s: dict[str, str | int | bool] = {"restore_command": restore_command}
    if t.kind == "time":
        assert t.time is not None
        s["recovery_target_time"] = t.time.astimezone(dt.UTC).isoformat(sep=" ")
    elif t.kind == "lsn":
        assert t.lsn is not None
        s["recovery_target_lsn"] = format_lsn(t.lsn)
    elif t.kind == "xid":
        s["recovery_target_xid"] = str(t.xid)
    elif t.kind == "name":
        assert t.name is not None
        s["recovery_target_name"] = t.name
    if t.kind in ("time", "lsn", "xid"):
        s["recovery_target_inclusive"] = t.inclusive
    s["recovery_target_action"] = "promote"
    if pauses_at_target(opts):
        # We start the server and watch it: it pauses at the target and we promote it
        # (pg_promote).  A promotion on request ends recovery with an end-of-recovery record
        # and a checkpoint in the background; recovery_target_action=promote makes the
        # startup process wait for a full checkpoint first (about 1 s per GB of shared
        # buffers dirtied by replay: time the restored server is not writable yet).
        s["recovery_target_action"] = "pause"
        s["hot_standby"] = True  # without it, pause would shut the server down
    s["recovery_target_timeline"] = str(plan.timeline)
    # A restored copy must never archive into the production repository, stream from, or
    # wait for the source cluster's members.
    s["archive_mode"] = False
    s["primary_conninfo"] = ""
    s["primary_slot_name"] = ""
    s["synchronous_standby_names"] = ""
    s["unix_socket_directories"] = socket_dir
    if opts.port is not None:
        s["port"] = opts.port
        s["listen_addresses"] = "127.0.0.1"
    return s


def _write_settings(
    data_dir: Path, ra: RunAs, settings: dict[str, str | int | bool], wal_conf: str, header: str
) -> None:
    write_atomic(wal_config_path(data_dir), wal_conf, mode=0o600, run_as=ra)
    auto = data_dir / "postgresql.auto.conf"
    try:
        # The backup's file: as root, never read through a link (it would copy any file root can
        # read into a file the PostgreSQL user owns).
        old = read_regular(auto).decode()
    except FileNotFoundError:
        old = "# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n"
    lines = [old.rstrip("\n") + "\n", f"# {header}\n"]
    for k, v in settings.items():
        lines.append(f"{k} = {quote_conf_value(v)}\n")
    write_atomic(auto, "".join(lines), mode=0o600, run_as=ra)
    for name in ("standby.signal", "postmaster.opts"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).unlink()
    write_atomic(data_dir / "recovery.signal", "", mode=0o600, run_as=ra)
    # log/ and pg_stat_tmp/ came with the backup: a link there is refused (not chmod-ed, chown-ed
    # or written through), and the old server log is removed relative to the directory opened.
    for d in (data_dir / LOG_REL.parent, data_dir / SOCKET_SUBDIR):
        fd = ensure_dir_fd(d, mode=0o700, owner=ra)
        try:
            if d.name == LOG_REL.parent.name:
                # The source's server log came with the backup; it is not this server's.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(LOG_REL.name, dir_fd=fd)
        finally:
            os.close(fd)
    _fsync_dir(data_dir)


# ============================================================================ starting


_NEW_TLI = re.compile(r"selected new timeline ID: (\d+)")
_REPLAY_DONE = ("redo done at", "recovery stopping", "archive recovery complete", "redo is not required")
_RELEVANT = re.compile(r"FATAL|PANIC|ERROR|recovery|restore|timeline|consistent|hakeeper walfetch", re.I)
# What our own connection attempts make the server log while it starts.
_NOISE = (
    "the database system is starting up",
    "not yet accepting connections",
    "Consistent recovery state has not been yet reached",
    "the database system is shutting down",
    "the database system is in recovery mode",
)
_READY = ("ready to accept", "pausing at the end of recovery")  # worth asking the server now


class _LogWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines: list[str] = []
        self.replay_done_at: float | None = None
        self.new_timeline: int | None = None
        self.ready_seen = 0  # "ready to accept (read-only) connections" (or paused) lines so far

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            if any(n in line for n in _NOISE):
                continue
            self.lines.append(line)
            if any(r in line for r in _READY):
                self.ready_seen += 1
            if self.replay_done_at is None and any(m in line for m in _REPLAY_DONE):
                self.replay_done_at = time.monotonic()
            m = _NEW_TLI.search(line)
            if m:
                self.new_timeline = int(m.group(1))

    def relevant(self, n: int = 25) -> str:
        picked = [ln for ln in self.lines if _RELEVANT.search(ln)]
        return "\n".join((picked or self.lines)[-n:])


def pg_ctl_start_command(bin_dir: Path, data_dir: Path, ra: RunAs) -> str:
    q = shlex.quote
    cmd = f"{q(str(bin_dir / 'pg_ctl'))} -D {q(str(data_dir))} -l {q(str(data_dir / LOG_REL))} start"
    if ra.name:
        return f"runuser -u {ra.name} -- {cmd}" if os.geteuid() == 0 else cmd
    return cmd


async def _promote_paused(conn: psycopg.AsyncConnection[Any]) -> None:
    """Promote a server paused at its recovery target, without waiting for a checkpoint.

    Paused, the startup process sleeps on a condition variable and looks for a promotion
    request once a second; only pg_wal_replay_resume() wakes it.  Resuming alone would end
    recovery the way recovery_target_action=promote does (a full checkpoint first), so: the
    promotion is requested, then replay resumed and paused again in one statement.  Woken,
    the startup process finds itself still paused, checks for the request, and ends recovery
    as a promotion (an end-of-recovery record; the checkpoint runs in the background).  Should
    it look between the two calls, it ends recovery with a checkpoint: slower, as correct."""
    await conn.execute("SELECT pg_promote(false)")
    await asyncio.sleep(0.05)  # the postmaster passes the signal on to the startup process
    with contextlib.suppress(psycopg.Error):  # "promotion is ongoing": it already saw it
        await conn.execute("SELECT pg_wal_replay_resume(), pg_wal_replay_pause()")


def _replayed(opts: RestoreOptions, result: RestoreResult, lsn_text: str | None) -> None:
    """Record how far replay got (pg_last_wal_replay_lsn(): static once recovery ended, so the
    last value is the end of replay) and report it as the ``wal_replay`` phase's progress."""
    lsn = parse_lsn(lsn_text) if lsn_text else None
    if lsn is None:
        return
    result.replay_end_lsn = lsn
    start = result.replay_start_lsn
    if opts.progress is not None and start is not None:
        goal = result.replay_goal_lsn
        total = goal - start if goal is not None and goal > start else None
        opts.progress("wal_replay", max(0, lsn - start), total)


async def _start_and_wait(
    opts: RestoreOptions, data_dir: Path, socket_dir: str, result: RestoreResult
) -> None:
    assert opts.port is not None
    logf = data_dir / LOG_REL
    watch = _LogWatch(logf)
    t0 = time.monotonic()
    if opts.progress is not None:  # replay begins with the server's start (as seconds_replay)
        goal, start = result.replay_goal_lsn, result.replay_start_lsn
        opts.progress("wal_replay", 0, goal - start if goal and start and goal > start else None)
    r = await run(
        [
            str(opts.bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(data_dir),
            "-l",
            str(logf),
            "-W",
        ],
        run_as=opts.run_as,
        env={"LC_ALL": "C", "LC_MESSAGES": "C"},
        timeout=60,
        check=False,
    )
    if not r.ok:
        watch.poll()
        raise RestoreError(f"pg_ctl start failed (exit {r.returncode}): {r.tail(4)}\n{watch.relevant()}")
    conninfo = build_conninfo(
        host=socket_dir,
        port=opts.port,
        user=opts.superuser.username,
        dbname="postgres",
        application_name="hakeeper-restore",
        connect_timeout=2,
    )
    seen_pid = False
    promoted_at: float | None = None
    early_promote = pauses_at_target(opts)
    deadline = t0 + opts.start_timeout
    asked_at_ready, last_ask = 0, t0
    while True:
        watch.poll()
        pid = postmaster_pid(data_dir)
        if pid is not None:
            seen_pid = True
        elif seen_pid or time.monotonic() - t0 > 10:
            await asyncio.sleep(0.2)
            watch.poll()
            raise RestoreError(f"PostgreSQL stopped during recovery (log: {logf}):\n{watch.relevant()}")
        if time.monotonic() > deadline:
            raise RestoreError(
                f"still in recovery after {opts.start_timeout:.0f}s; the server keeps running "
                f"(pid {pid}, log {logf}):\n{watch.relevant(10)}"
            )
        in_recovery: bool | None = None
        # Ask once the server says it accepts connections (read-only while it replays), and
        # every second anyway in case its messages are not in English; every attempt before
        # it is ready costs a FATAL line in its log.
        now = time.monotonic()
        if watch.ready_seen != asked_at_ready or now - last_ask >= 1.0:
            asked_at_ready, last_ask = watch.ready_seen, now
        else:
            await asyncio.sleep(0.05)
            continue
        paused = False
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with asyncio.timeout(5):
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    cur = await conn.execute(
                        "SELECT pg_is_in_recovery(), pg_is_in_recovery()"
                        " AND pg_get_wal_replay_pause_state() = 'paused', pg_last_wal_replay_lsn()::text"
                    )
                    row = await cur.fetchone()
                    in_recovery = bool(row[0]) if row else None
                    paused = bool(row[1]) if row else False
                    _replayed(opts, result, row[2] if row else None)
                    if in_recovery and not paused and early_promote:
                        # Ask for the promotion now, long before the target: in archive
                        # recovery (recovery.signal, not standby.signal) the startup process
                        # looks at the request only once paused at the target, where it then
                        # promotes at once (the first check of its pause loop).  A promotion
                        # requested while paused waits for its next check, up to a second.
                        early_promote = False
                        await conn.execute("SELECT pg_promote(false)")
                    if paused:
                        # At the target (recovery_target_action = pause; a target never
                        # reached ends recovery with a FATAL instead): promote now.
                        if promoted_at is None:
                            promoted_at = time.monotonic()
                            watch.poll()
                            log.info("restore_target_reached_promoting")
                        await _promote_paused(conn)
                        cur = await conn.execute("SELECT pg_is_in_recovery()")
                        row = await cur.fetchone()
                        in_recovery = bool(row[0]) if row else None
        if opts.progress is not None and watch.replay_done_at is not None:  # after the replay's report
            opts.progress("end_of_recovery", 0, None)  # the checkpoint (or promotion), for the display
        if in_recovery is False:
            break
        if paused:
            continue
        await asyncio.sleep(0.1)
    end = time.monotonic()
    watch.poll()
    replay_end = watch.replay_done_at or promoted_at or end
    result.seconds_replay = replay_end - t0
    result.seconds_promote = end - replay_end
    result.new_timeline = watch.new_timeline
    if result.new_timeline is None:
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with asyncio.timeout(5):
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    cur = await conn.execute("SELECT timeline_id FROM pg_control_checkpoint()")
                    row = await cur.fetchone()
                    result.new_timeline = int(row[0]) if row else None
    result.dsn = build_conninfo(
        host="127.0.0.1", port=opts.port, dbname="postgres", user=opts.superuser.username
    )


# ============================================================================ the restore


def _check_binaries_for(links: list[catalog.BackupRecord], opts: RestoreOptions) -> None:
    """When the restore runs PostgreSQL's programs (``start``, or a chain combined by
    pg_combinebackup): the binaries in ``opts.bin_dir`` are of the backup's major (PostgreSQL
    would refuse the data directory after the whole copy otherwise) and have the tools
    (RestoreRefused before anything is copied; blocking).  A copy alone needs none."""
    tool = len(links) > 1 and opts.combine == COMBINE_TOOL
    if not (opts.start or tool):
        return
    backup_major = (links[-1].pg_version or 0) // 10000
    try:
        binaries = binaries_version(opts.bin_dir)
    except PgError as e:
        raise RestoreRefused(f"the PostgreSQL binaries in {opts.bin_dir} cannot be used: {e}") from None
    if backup_major and binaries.major != backup_major:
        raise RestoreRefused(
            f"backup {links[-1].id} is of PostgreSQL {backup_major}, the binaries in {opts.bin_dir} "
            f"are {binaries.text}: restore it with PostgreSQL {backup_major}'s binaries (--bin-dir, "
            f"or postgresql.bin_dir: the bin directory of a PostgreSQL {backup_major} installation; "
            "a backup taken before a major upgrade needs the old major's)"
        )
    for program in (COMBINE_TOOL, "pg_verifybackup") if tool else ():
        if not (opts.bin_dir / program).is_file():
            raise RestoreRefused(f"{program} is not in {opts.bin_dir} (PostgreSQL 17+ has it)")


async def _copy_backup(
    repo: Repository,
    scope: str,
    links: list[catalog.BackupRecord],
    data_dir: Path,
    opts: RestoreOptions,
    result: RestoreResult,
) -> float:
    """The backup (a full one, or the chain of an incremental one) into ``data_dir``; returns
    the seconds the copy waited for the repository."""
    if opts.progress is not None:  # the copy's phase begins before its first part arrives
        opts.progress("fetch", 0, None)
    if len(links) == 1:
        tally = _Tally()
        waited = await _extract(repo, scope, links[0], data_dir, opts, tally=tally)
        if links[0].index is None:  # a restore state the source had is not this directory's
            await asyncio.to_thread(restorestate.discard, data_dir)
        else:
            result.bytes_fetched, result.bytes_written, result.bytes_total = (
                tally.fetched,
                tally.written,
                tally.total,
            )
            result.stored_size = tally.fetched  # a delta fetches only some of the parts
        return waited
    if opts.combine == COMBINE_IN_PLACE:
        waited = await _apply_chain_in_place(repo, scope, links, data_dir, opts, result)
    else:
        waited = await _extract_chain(repo, scope, links, data_dir, opts, result)
    await asyncio.to_thread(restorestate.discard, data_dir)  # the full's record, not the chain's
    return waited


async def _copy_into_empty(
    repo: Repository,
    scope: str,
    links: list[catalog.BackupRecord],
    data_dir: Path,
    opts: RestoreOptions,
    result: RestoreResult,
) -> float:
    """The copy into an empty directory; on any failure the directory is emptied again (and
    removed if this created it)."""
    try:
        created = _mkdir_owned(data_dir, opts.run_as)
    except UnsafePathError as e:
        raise RestoreRefused(str(e)) from None
    try:
        return await _copy_backup(repo, scope, links, data_dir, opts, result)
    except BaseException as e:
        await asyncio.to_thread(_empty_dir, data_dir)
        if created:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(data_dir.rmdir)
        if isinstance(e, RepoError):
            raise RestoreError(f"{e} (restore abandoned; {data_dir} emptied)") from e
        if isinstance(e, RestoreError):
            raise RestoreError(f"{e} (restore abandoned; {data_dir} emptied)") from e
        raise


async def _delta_copy(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    opts: RestoreOptions,
    local_sysid: int,
    result: RestoreResult,
) -> float:
    """The delta into the older copy in ``data_dir``.  On failure the directory is left as it
    is -- without pg_control, with delta's marker: not a usable copy, and a second ``--delta``
    picks up from there (emptying it would throw away what a retry can reuse)."""
    try:
        st = await delta.delta_restore(
            repo,
            scope,
            rec,
            data_dir,
            opts.run_as,
            local_sysid,
            jobs=opts.parallel,
            progress=opts.progress,
            rehash=opts.rehash,
        )
    except (UnpackError, OSError) as e:
        why = (
            f"backup {rec.id}: {e} (delta restore abandoned; {data_dir} has no pg_control: "
            "run restore --delta again)"
        )
        log.error("restore_failed", backup=rec.id, delta=True, reason=why)
        raise RestoreError(why) from None
    result.bytes_fetched, result.bytes_written, result.bytes_total = (
        st.bytes_fetched,
        st.bytes_written,
        st.bytes_total,
    )
    result.notes.append(
        f"delta: fetched {st.parts_fetched} of {st.parts_total} parts ({st.bytes_fetched} stored bytes), "
        f"wrote {st.bytes_written} of {st.bytes_total} bytes in {st.files_changed} files, "
        f"removed {st.entries_removed} entries; read {st.bytes_hashed} local bytes to compare "
        f"({st.bytes_unchanged_since_restore} unchanged since the last restore were not read)"
    )
    return st.seconds_fetch


async def restore(
    repo: Repository, repo_cfg: RepositoryConfig, scope: str, opts: RestoreOptions
) -> RestoreResult:
    """Restore into ``opts.data_dir`` (see the module docstring).  RestoreRefused: nothing was
    touched; RestoreError: the copy or the recovery failed."""
    t0 = time.monotonic()
    data_dir = opts.data_dir.absolute()
    local_sysid = await asyncio.to_thread(delta.check_target, data_dir) if opts.delta else None
    if local_sysid is None:
        check_data_dir(data_dir)
    if opts.start and opts.port is None:
        raise RestoreRefused("starting the restored server needs a port")
    if opts.combine not in COMBINE_MODES:
        raise RestoreRefused(f"combine: {opts.combine!r} is not one of {', '.join(COMBINE_MODES)}")
    _cat, plan, notes = await _plan(repo, scope, opts)
    rec = plan.backup
    opts.on_planned(plan)
    try:
        restore_command_base = python_command(WALFETCH_MODULE, opts.run_as)
        _check_repo_readable(repo, scope, plan, opts.run_as)
    except RestoreRefused as e:
        if not (opts.start or opts.serve_wal):
            raise RestoreRefused(f"{e}; or use --start: hakeeper then serves the WAL itself") from None
        # This process serves the WAL while the server recovers (handover.serving); without it,
        # the script's last resort fails loudly (exit 200) instead of ending recovery early.
        restore_command_base = f"echo {shlex.quote(f'hakeeper: {e}')} >&2; exit 200; :"
        notes.append("WAL is served to the recovering server by this process (its OS user cannot run it)")
    links = catalog.chain_of(rec, {r.id: r for r in _cat.records})  # planning checked it is whole
    if local_sysid is not None:
        try:
            delta.check_backup(rec, local_sysid, data_dir)
        except RestoreRefused as e:
            log.warning("restore_refused", backup=rec.id, reason=str(e))
            raise
    await asyncio.to_thread(_check_binaries_for, links, opts)
    for link in links:
        await _verify_parts(repo, scope, link)
    # again: planning may have taken a while
    if local_sysid is not None:
        await asyncio.to_thread(delta.check_target, data_dir)
    else:
        check_data_dir(data_dir)
    result = RestoreResult(
        backup_id=rec.id,
        repository=repo.name,
        target=opts.target.describe(),
        timeline=plan.timeline,
        data_dir=str(data_dir),
        size=rec.size,
        parts=sum(len(link.parts) for link in links),
        started=False,
        notes=[*plan.notes, *notes],
        chain=[link.id for link in links],
        delta=opts.delta,
        jobs=opts.parallel,
        stored_size=sum(p.stored_size for link in links for p in link.parts),
        replay_start_lsn=rec.start_lsn_int,
        replay_goal_lsn=replay_goal(plan, opts.target),
    )
    result.seconds_plan = time.monotonic() - t0
    log.info(
        "restore_planned",
        backup=rec.id,
        timeline=plan.timeline,
        target=result.target,
        covered_until=plan.covered_until,
    )
    t1 = time.monotonic()
    if local_sysid is not None:
        fetch_wait = await _delta_copy(repo, scope, rec, data_dir, opts, local_sysid, result)
    else:
        fetch_wait = await _copy_into_empty(repo, scope, links, data_dir, opts, result)
    result.seconds_fetch = time.monotonic() - t1
    result.seconds_fetch_wait = fetch_wait
    result.seconds_decompress = max(0.0, result.seconds_fetch - fetch_wait - (result.seconds_combine or 0.0))
    if opts.after_copy is not None:
        await opts.after_copy(rec, data_dir)
    wal_conf_path = wal_config_path(data_dir)
    wal_conf = WalToolConfig(
        scope=scope,
        repositories=[repo_cfg],
        prefetch=opts.prefetch,
        prefetch_max_bytes=opts.prefetch_max_bytes,
    ).dump()
    script_path = data_dir / RESTORE_SCRIPT_NAME
    script = fast_path_script(f"{restore_command_base}", wal_conf_path, wal_conf.encode())
    restore_command = f"{shlex.quote(str(script_path))} %f %p"
    socket_dir = _socket_dir(data_dir, opts.port)
    settings = recovery_settings(opts, plan, restore_command, socket_dir)
    # The repository config (credentials) outlives this process when the operator starts the
    # server later: PostgreSQL disposes of it itself once recovery has ended.  It owns the file,
    # so it can always empty it; removing it also needs write access to the parent directory,
    # which it may lack (root mode).
    q = shlex.quote(str(wal_conf_path))
    settings["recovery_end_command"] = f"if [ -f {q} ]; then : > {q}; rm -f {q}; fi"
    header = (
        f"hakeeper restore of backup {rec.id} from repository {repo.name} at {timefmt.iso(catalog.utcnow())}"
    )
    await asyncio.to_thread(write_atomic, script_path, script, mode=0o700, run_as=opts.run_as)
    try:
        await asyncio.to_thread(_write_settings, data_dir, opts.run_as, settings, wal_conf, header)
    except UnsafePathError as e:
        log.error("restore_refused", backup=rec.id, reason=str(e))
        raise RestoreRefused(f"backup {rec.id}: {e}; the restored copy in {data_dir} is not usable") from None
    result.settings = {k: str(v) for k, v in settings.items()}
    result.start_command = pg_ctl_start_command(opts.bin_dir, data_dir, opts.run_as)
    log.info("restore_copied", backup=rec.id, size=rec.size, seconds=round(result.seconds_fetch, 3))
    if opts.start:
        path = TimelinePath(plan.timeline, tuple(plan.history))
        async with serving(
            data_dir,
            repo,
            scope,
            opts.run_as,
            path=path,
            prefetch=opts.prefetch,
            max_bytes=opts.prefetch_max_bytes,
        ) as served:
            await _start_and_wait(opts, data_dir, socket_dir, result)
        result.started = True
        result.wal_requests, result.wal_prefetch_hits, result.wal_fetch_wait_s = served.stats
    result.seconds_total = time.monotonic() - t0
    result.phases = restore_phases(result)
    return result
