"""Physical base backups into a repository (``hakeeper backup create``).

``pg_basebackup -D - -Ft -X none --checkpoint=fast`` streams the data directory as one tar
stream over the replication protocol (PostgreSQL 15 appends ``backup_manifest`` to it).  The
stream is cut into parts of ``part_size`` bytes; each part is compressed (zstd, in a worker
thread: zstandard and hashlib release the GIL) and stored while the next one is read, with at
most ``parallel`` parts in flight.  On the way, a tar header scanner picks out ``backup_label``
(start LSN and timeline) and ``backup_manifest`` (the WAL range up to the backup's end).

The backup is complete only when every WAL segment from its start to its end is in the archive
of the same repository.  From a standby, the last segment may still be the one the primary is
writing: ``pg_switch_wal()`` on the primary closes it.  If the WAL does not arrive within
``wal_timeout`` the backup is marked failed and its parts are removed: a backup is never
reported successful before it can be restored.

The record (:class:`~hakeeper.backup.catalog.BackupRecord`) is written as ``running`` first,
refreshed while the backup runs, and rewritten last as ``complete`` or ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import fcntl
import functools
import json
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import zstandard

from hakeeper.backup import catalog, chain, fileindex, layout
from hakeeper.backup.binding import BindingMismatch, bind
from hakeeper.backup.catalog import BackupRecord, BackupStatus, SourceInfo, StoredObject
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.fileindex import tar_checksum_ok, tar_number
from hakeeper.backup.phases import backup_phases
from hakeeper.backup.repo import PutResult, Repository
from hakeeper.backup.unpack import compress_part
from hakeeper.core.backup_config import RowCountConfig
from hakeeper.core.config import Credentials, secret_value
from hakeeper.core.lsn import format_lsn
from hakeeper.pg.conf import build_conninfo
from hakeeper.util.fsutil import libc
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, child_env, dirs_of_dead_processes

log = get_logger(__name__)

DEFAULT_PART_SIZE = 64 << 20
READ_CHUNK = 4 << 20
MAX_CAPTURE = 512 << 20  # backup_manifest of a very large cluster; anything bigger is refused
CAPTURED = ("backup_label", "backup_manifest", "tablespace_map")
SWITCH_EVERY_S = 10.0

ProgressFn = Callable[[str, int, int | None], None]  # (phase, done, total)


class BackupError(Exception):
    """The backup failed; the message says why.  The record says ``failed``."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A PostgreSQL server to connect to (name: the member name, for the record)."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# ============================================================================ tar scanning


class TarFormatError(ValueError):
    pass


@dataclass
class TarScanner:
    """Follows a tar stream fed in arbitrary pieces: counts members and keeps the content of
    the few small files named in ``capture`` (without copying anything else)."""

    capture: tuple[str, ...] = CAPTURED
    files: dict[str, bytes] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    regular_files: int = 0
    ended: bool = False
    _hdr: bytearray = field(default_factory=bytearray)
    _skip: int = 0  # body + padding still to pass over
    _cap_name: str | None = None
    _cap: bytearray = field(default_factory=bytearray)
    _cap_left: int = 0
    _long_name: str | None = None
    _long_pending: bool = False
    _zero_blocks: int = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                if self._cap_left:
                    c = min(take, self._cap_left)
                    self._cap += view[i : i + c]
                    self._cap_left -= c
                self._skip -= take
                i += take
                if self._skip == 0:
                    self._finish_member()
                continue
            take = min(512 - len(self._hdr), n - i)
            self._hdr += view[i : i + take]
            i += take
            if len(self._hdr) == 512:
                hdr = bytes(self._hdr)
                self._hdr.clear()
                self._header(hdr)

    def _header(self, hdr: bytes) -> None:
        if hdr.count(0) == 512:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self.ended = True
            return
        if self.ended:
            raise TarFormatError("data after the end of the tar stream")
        self._zero_blocks = 0
        if not tar_checksum_ok(hdr):
            raise TarFormatError(f"bad tar header checksum after {len(self.members)} members")
        name = hdr[:100].split(b"\0", 1)[0].decode(errors="replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode(errors="replace")
            if prefix:
                name = f"{prefix}/{name}"
        size = tar_number(hdr[124:136])
        kind = hdr[156:157]
        if kind in (b"L",):  # GNU long name: the body is the next member's name
            self._long_pending = True
            self._start_body("\0longname", size, capture=True)
            return
        if self._long_name is not None:
            name, self._long_name = self._long_name, None
        if kind in (b"x", b"g"):  # pax headers: skip
            self._start_body(None, size, capture=False)
            return
        name = name.removeprefix("./")
        self.members.append(name)
        if kind in (b"0", b"\0", b"7"):
            self.regular_files += 1
            self._start_body(name, size, capture=name in self.capture)
        else:
            self._start_body(None, size if kind not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0, False)

    @property
    def between_members(self) -> bool:
        """At a member boundary (the last member's content complete)."""
        return self._skip == 0 and not self._hdr

    def _start_body(self, name: str | None, size: int, capture: bool) -> None:
        if capture and size > MAX_CAPTURE:
            raise TarFormatError(f"{name} is {size} bytes; too large to keep")
        self._skip = math.ceil(size / 512) * 512
        self._cap_name = name if capture else None
        self._cap = bytearray()
        self._cap_left = size if capture else 0
        if self._skip == 0:
            self._finish_member()

    def _finish_member(self) -> None:
        if self._cap_name is not None:
            if self._cap_name == "\0longname":
                self._long_name = bytes(self._cap).split(b"\0", 1)[0].decode(errors="replace")
            else:
                self.files[self._cap_name] = bytes(self._cap)
        self._cap_name = None
        self._cap = bytearray()


# ============================================================================ SQL helpers


def conn_kwargs(ep: Endpoint, creds: Credentials, timeout: float = 10.0) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "conninfo": build_conninfo(
            host=ep.host,
            port=ep.port,
            user=creds.username,
            dbname="postgres",
            application_name="hakeeper-backup",
            connect_timeout=max(2, math.ceil(timeout)),
            gssencmode="disable",
            client_encoding="UTF8",
        ),
        "autocommit": True,
    }
    password = secret_value(creds.password)
    if password is not None:
        kw["password"] = password
    return kw


async def query(ep: Endpoint, creds: Credentials, sql: str, timeout: float = 15.0) -> list[tuple[Any, ...]]:
    """One statement on a fresh superuser connection; raises BackupError on any failure."""
    try:
        async with asyncio.timeout(timeout):
            async with await psycopg.AsyncConnection.connect(**conn_kwargs(ep, creds, timeout)) as conn:
                cur = await conn.execute(sql)
                return await cur.fetchall() if cur.description is not None else []
    except (psycopg.Error, OSError) as e:
        raise BackupError(f"{ep.name} ({ep.address}): {str(e).strip()}") from e
    except TimeoutError as e:
        raise BackupError(f"{ep.name} ({ep.address}): no answer within {timeout:.0f}s") from e


@dataclass(frozen=True, slots=True)
class SourceFacts:
    in_recovery: bool
    version_num: int
    system_identifier: str
    extra_tablespaces: list[str]
    estimated_size: int
    upstream: Endpoint | None  # a standby's WAL sender (pg_stat_wal_receiver)
    timeline: int | None = None  # the timeline the server writes (a standby: receives/replays)
    summarize_wal: bool = False  # PostgreSQL 17+: WAL summaries, which incremental backups need
    zstd: bool = True  # the server was built with zstd (server-side compression)


# A primary's timeline is that of the WAL it inserts (pg_control's checkpoint timeline lags
# behind a promotion until the next checkpoint); a standby's, the one it receives.
_TIMELINE_SQL = (
    "CASE WHEN pg_is_in_recovery() THEN coalesce("
    "(SELECT received_tli FROM pg_stat_wal_receiver WHERE received_tli > 0),"
    " (SELECT timeline_id FROM pg_control_checkpoint()))"
    " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int END"
)


async def source_facts(ep: Endpoint, creds: Credentials) -> SourceFacts:
    rows = await query(
        ep,
        creds,
        "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int,"
        " (SELECT system_identifier::text FROM pg_control_system()),"
        " ARRAY(SELECT spcname::text FROM pg_tablespace"
        "       WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1),"
        " (SELECT sum(pg_database_size(oid))::bigint FROM pg_database),"
        " (SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'),"
        " (SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'),"
        f" {_TIMELINE_SQL},"
        # missing_ok: PostgreSQL 15 has no such setting (NULL)
        " coalesce(current_setting('summarize_wal', true), 'off'),"
        # some builds lack zstd (the PostgreSQL 18 test build): the server cannot compress then
        " coalesce((SELECT setting LIKE '%with-zstd%' FROM pg_config WHERE name = 'CONFIGURE'), true)",
    )
    rec, ver, sysid, spaces, size, s_host, s_port, tli, summarize, zstd = rows[0]
    upstream = None
    if rec and s_host and s_port and not str(s_host).startswith("/"):
        upstream = Endpoint(f"upstream of {ep.name}", str(s_host), int(s_port))
    return SourceFacts(
        bool(rec),
        int(ver),
        str(sysid),
        list(spaces or []),
        int(size or 0),
        upstream,
        None if tli is None else int(tli),
        str(summarize) == "on",
        bool(zstd),
    )


async def switch_wal(primary: Endpoint, creds: Credentials) -> str | None:
    """``pg_switch_wal()`` on the primary; the name of the segment that closes (None when the
    server turned out to be in recovery).

    With no WAL written since the last switch, pg_switch_wal() does not switch and returns the
    start of the current segment, a segment boundary.  At a boundary pg_walfile_name() names the
    previous segment on PostgreSQL 15 but the current (still open) one from 17 on, and a caller
    waiting for that segment in the archive would wait for ever.  One byte before the returned
    position is in the segment that closed on every major: the last one written in full when
    nothing was switched, else the one the switch record ends."""
    rows = await query(
        primary,
        creds,
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_switch_wal() - 1) END",
    )
    return None if rows[0][0] is None else str(rows[0][0])


# ============================================================================ the backup


@dataclass
class _Run:
    repo: Repository
    scope: str
    record: BackupRecord
    progress: ProgressFn | None
    last_saved: float = 0.0

    async def save(self) -> None:
        self.record.updated_at = catalog.utcnow()
        await self.repo.put(catalog.record_key(self.scope, self.record.id), self.record.to_json())
        self.last_saved = time.monotonic()

    def tick(self, phase: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)


async def claim_backup_id(
    repo: Repository, scope: str, now: dt.datetime, make: Callable[[str], BackupRecord]
) -> BackupRecord:
    """The record of a new backup under an id no other backup has: the id is claimed by
    creating its record exclusively (``Repository.create``), so two backups started in the same
    second (the scheduler and the CLI, two agents) never share an id -- they would overwrite
    each other's parts, and the failure of one would delete the other's.  The loser takes the
    next second."""
    for i in range(120):
        bid = catalog.make_backup_id(now + dt.timedelta(seconds=i))
        if await repo.list_objects(layout.backup_prefix(scope, bid)):
            continue
        record = make(bid)
        if await repo.create(catalog.record_key(scope, bid), record.to_json()):
            return record
        log.info("backup_id_taken", id=bid, reason="claimed by a concurrent backup")
    raise BackupError("cannot find a free backup id")


async def create_backup(
    repo: Repository,
    *,
    scope: str,
    source: Endpoint,
    superuser: Credentials,
    replication: Credentials,
    bin_dir: Path,
    primary: Endpoint | None = None,
    label: str | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    parallel: int = 2,
    wal_timeout: float = 300.0,
    manifest_checksums: str = "CRC32C",
    progress: ProgressFn | None = None,
    compress_on: str = "server",
    staging_dir: Path | None = None,
    row_counts: RowCountConfig | None = None,
    backup_type: str = "full",
) -> BackupRecord:
    """Back ``source`` up into ``repo`` and return the complete record (BackupError otherwise).

    ``backup_type`` ``incremental`` (PostgreSQL 17+; BackupError before anything is copied on
    an older server): ``pg_basebackup --incremental`` against the newest complete backup when
    that can be the parent (:func:`hakeeper.backup.chain.choose_parent`), else a full backup
    with the reason in the record's ``became_full`` (also when the incremental copy fails,
    e.g. WAL summaries that do not reach back to the parent's start).

    ``primary`` is where ``pg_switch_wal()`` runs when the source is a standby (default: the
    standby's upstream, if that is a primary).  With ``row_counts`` (enabled), the row counts
    of every table and a restore point are recorded on the primary once the data is copied
    (:func:`record_row_counts`; a failure there is recorded, never fails the backup)."""
    facts = await source_facts(source, superuser)
    if facts.extra_tablespaces:
        raise BackupError(
            f"{source.name} has tablespaces besides pg_default/pg_global "
            f"({', '.join(facts.extra_tablespaces)}): not supported by hakeeper backups yet"
        )
    if backup_type not in ("full", "incremental"):
        raise BackupError(f"unknown backup type {backup_type!r} (full or incremental)")
    if backup_type == "incremental" and facts.version_num < INCREMENTAL_MIN_VERSION:
        why = (
            f"incremental backups need PostgreSQL 17 or later; {source.name} runs "
            f"{facts.version_num // 10000} (take a full backup: --type full)"
        )
        log.warning("backup_refused", source=source.address, reason=why)
        raise BackupError(why)
    if primary is None:
        primary = source if not facts.in_recovery else facts.upstream
    try:  # a repository of an earlier cluster of this scope is refused before anything is copied
        await bind(repo, scope, facts.system_identifier, f"backup create {source.name}", time.time())
    except BindingMismatch as e:
        raise BackupError(str(e)) from None
    parent = None
    became_full = None
    if backup_type == "incremental":
        parent, became_full = await _prepare_incremental(
            repo, scope, source, facts, primary, superuser, wal_timeout
        )
    now = catalog.utcnow()
    record = await claim_backup_id(
        repo,
        scope,
        now,
        lambda bid: BackupRecord(
            id=bid,
            label=label or f"hakeeper {bid}",
            status=BackupStatus.RUNNING,
            scope=scope,
            repository=repo.name,
            source=SourceInfo(
                member=source.name, host=source.host, port=source.port, standby=facts.in_recovery
            ),
            pg_version=facts.version_num,
            system_identifier=facts.system_identifier,
            start_time=now,
            updated_at=now,
            manifest_checksums=manifest_checksums,
            kind="incremental" if parent is not None else "full",
            parent=None if parent is None else parent.id,
            chain_root=None if parent is None else parent.root,
            became_full=became_full,
        ),
    )
    bid = record.id
    run = _Run(repo, scope, record, progress)
    run.last_saved = time.monotonic()
    log.info(
        "backup_started",
        id=bid,
        repo=repo.name,
        source=source.address,
        standby=facts.in_recovery,
        type=record.kind,
        parent=record.parent,
    )
    try:
        nudge = None if facts.in_recovery else asyncio.create_task(_nudge_archive_wait(source, superuser))
        try:
            copy = _CopyArgs(
                compress_on,
                source,
                replication,
                bin_dir,
                part_size,
                parallel,
                wal_timeout,
                facts,
                staging_dir,
            )
            run.tick("copy", 0, facts.estimated_size or None)  # the phase begins (for the display)
            await _copy_against(run, copy, parent)
        finally:
            if nudge is not None:
                nudge.cancel()
                await asyncio.gather(nudge, return_exceptions=True)
        # the row counts are taken while the backup waits for its WAL (both after the copy)
        counting = (
            asyncio.create_task(
                record_row_counts(
                    primary, superuser, bid, max_bytes=row_counts.max_bytes, timeout=row_counts.timeout
                )
            )
            if row_counts is not None and row_counts.enabled
            else None
        )
        try:
            await _wait_for_wal(run, primary, superuser, wal_timeout)
            if counting is not None:
                record.row_counts = await counting
        finally:
            if counting is not None and not counting.done():
                counting.cancel()
                await asyncio.gather(counting, return_exceptions=True)
        if record.parent is not None:
            await _check_chain_still_there(repo, scope, record)
    except BaseException as e:
        msg = str(e) if isinstance(e, BackupError | RepoError) else f"{type(e).__name__}: {e}"
        if isinstance(e, asyncio.CancelledError | KeyboardInterrupt):
            msg = "interrupted"
        await asyncio.shield(_fail(run, msg))
        if isinstance(e, BackupError):
            raise
        if isinstance(e, RepoError):
            raise BackupError(f"backup {bid}: {e}") from e
        raise
    record.status = BackupStatus.COMPLETE
    record.error = None
    record.phases = backup_phases(record)
    await run.save()
    log.info(
        "backup_complete",
        id=bid,
        size=record.size,
        stored=record.stored_size,
        seconds=record.seconds_copy,
        wal_wait=record.seconds_wal_wait,
    )
    return record


async def _fail(run: _Run, msg: str) -> None:
    rec = run.record
    rec.status = BackupStatus.FAILED
    rec.error = msg
    log.error("backup_failed", id=rec.id, error=msg)
    # The parts are useless without a complete record: remove them now; the record stays so
    # that `backup list` shows the failure (`backup expire` removes it).
    with contextlib.suppress(RepoError):
        await _remove_parts(run)
    rec.parts = []
    rec.manifest = None
    rec.index = None
    rec.stored_size = 0
    with contextlib.suppress(RepoError):
        await run.save()


def _stored(name: str, r: PutResult) -> StoredObject:
    return StoredObject(name=name, size=r.size, stored_size=r.stored_size, sha256=r.sha256)


@dataclass(frozen=True, slots=True)
class _CopyArgs:
    compress_on: str
    source: Endpoint
    replication: Credentials
    bin_dir: Path
    part_size: int
    parallel: int
    wal_timeout: float
    facts: SourceFacts
    staging_dir: Path | None


async def _copy_either(run: _Run, a: _CopyArgs, extra: tuple[str, ...] = ()) -> None:
    """The copy: compressed by the server (PostgreSQL 15+, built with zstd) unless asked otherwise."""
    if a.compress_on == "server" and not server_compression_possible(a.facts):
        log.warning(
            "backup_server_compression_unavailable",
            id=run.record.id,
            reason=f"{a.source.name}'s PostgreSQL was built without zstd: compressing here instead",
        )
    if a.compress_on == "server" and server_compression_possible(a.facts):
        run.record.layout = catalog.LAYOUT_STREAM
        await _copy_compressed(
            run,
            a.source,
            a.replication,
            a.bin_dir,
            a.part_size,
            a.parallel,
            a.wal_timeout,
            a.facts,
            a.staging_dir,
            extra,
        )
    else:
        # compressed here: every part a zstd frame of its own, with the file index beside them
        # (zstd-indexed: restored in parallel and by delta; see backup/fileindex.py)
        run.record.layout = catalog.LAYOUT_INDEXED
        await _copy(
            run, a.source, a.replication, a.bin_dir, a.part_size, a.parallel, a.wal_timeout, a.facts, extra
        )


# ------------------------------------------------------------ incremental backups


INCREMENTAL_MIN_VERSION = 170000


async def _choose_parent(
    repo: Repository, scope: str, source: Endpoint, facts: SourceFacts
) -> chain.ParentChoice:
    """The parent of an incremental backup of ``source``, or why it is taken as a full."""
    if not facts.summarize_wal:
        return chain.ParentChoice(
            None,
            f"summarize_wal is off on {source.name}: no WAL summaries to take an incremental backup from",
        )
    cat = await catalog.load_catalog(repo, scope, wal=False)
    return chain.choose_parent(
        cat.records,
        system_identifier=facts.system_identifier,
        timeline=facts.timeline,
        version_num=facts.version_num,
    )


async def _prepare_incremental(
    repo: Repository,
    scope: str,
    source: Endpoint,
    facts: SourceFacts,
    primary: Endpoint | None,
    superuser: Credentials,
    wal_timeout: float,
) -> tuple[BackupRecord | None, str | None]:
    """The parent of an incremental backup, or None and why the backup is taken as a full."""
    choice = await _choose_parent(repo, scope, source, facts)
    if choice.reason is not None:
        log.warning("backup_incremental_became_full", source=source.address, reason=choice.reason)
    elif choice.parent is not None and facts.in_recovery:
        await _standby_past_parent(source, primary, superuser, choice.parent, min(wal_timeout, 60.0))
    return choice.parent, choice.reason


_LSN_SQL = "({}) - '0/0'::pg_lsn"  # a pg_lsn as a number of bytes (numeric)


async def _standby_past_parent(
    source: Endpoint, primary: Endpoint | None, superuser: Credentials, parent: BackupRecord, timeout: float
) -> None:
    """Let an incremental backup of a standby start after its parent's end.

    A backup of a standby starts at the redo point of the last checkpoint record the standby
    replayed (the restartpoint pg_backup_start forces), not at a new checkpoint as on a
    primary.  With little written since the parent, that is still the checkpoint the parent
    itself started at, and PostgreSQL refuses the incremental ("manifest requires WAL from
    final timeline ... ending at X, but this backup starts at Y").  So when the standby's last
    restartpoint is not past the parent's end, a CHECKPOINT runs on the primary and we wait
    until the standby has replayed it.  Never fatal: if it does not work out, the incremental
    fails and the backup is taken as a full, with that reason."""
    try:
        rows = await query(
            source, superuser, f"SELECT {_LSN_SQL.format('SELECT redo_lsn FROM pg_control_checkpoint()')}"
        )
        if int(rows[0][0]) > parent.stop_lsn_int:
            return  # the restartpoint is past the parent already: nothing to do
        if primary is None:
            raise BackupError("no primary known to run a CHECKPOINT on")
        await query(primary, superuser, "CHECKPOINT", timeout=timeout)
        rows = await query(
            primary,
            superuser,
            f"SELECT {_LSN_SQL.format('SELECT checkpoint_lsn FROM pg_control_checkpoint()')}",
        )
        checkpoint = int(rows[0][0])
        replayed = f"SELECT {_LSN_SQL.format('SELECT pg_last_wal_replay_lsn()')}"
        deadline = time.monotonic() + timeout
        while int((await query(source, superuser, replayed))[0][0] or 0) <= checkpoint:
            if time.monotonic() > deadline:
                raise BackupError(
                    f"{source.name} did not replay the primary's checkpoint at {format_lsn(checkpoint)} "
                    f"within {timeout:.0f}s"
                )
            await asyncio.sleep(0.1)
        log.info(
            "backup_standby_checkpoint_replayed",
            source=source.address,
            primary=primary.address,
            checkpoint=format_lsn(checkpoint),
            parent=parent.id,
            reason="the standby's last restartpoint was not past the parent's end",
        )
    except (BackupError, ValueError, TypeError) as e:
        log.warning("backup_standby_checkpoint_failed", source=source.address, parent=parent.id, error=str(e))


async def _copy_against(run: _Run, a: _CopyArgs, parent: BackupRecord | None) -> None:
    """The copy of a full backup, or of an incremental one against ``parent``'s manifest
    (fetched from the repository, decrypted, into a private temporary directory).  When the
    incremental copy fails, or turns out to start on another timeline than its parent ended
    on (a promotion in between), its parts are removed and a full backup is taken instead,
    the reason logged and recorded in ``became_full``."""
    if parent is None:
        await _copy_either(run, a)
        return
    assert parent.manifest is not None
    rec = run.record
    key = catalog.object_key(run.scope, parent.id, parent.manifest.name)
    try:
        manifest = await run.repo.get(key)
    except RepoError as e:
        reason: str | None = f"the manifest of the parent {parent.id} cannot be read: {e}"
    else:
        where = Path(
            await asyncio.to_thread(
                tempfile.mkdtemp,
                prefix=f"hakeeper-incr-{rec.id}-",
                dir=str(a.staging_dir or tempfile.gettempdir()),
            )
        )
        try:
            path = where / catalog.MANIFEST_NAME
            await asyncio.to_thread(path.write_bytes, manifest)
            try:
                await _copy_either(run, a, (f"--incremental={path}",))
                reason = None
            except BackupError as e:
                reason = f"pg_basebackup --incremental against {parent.id} failed: {e}"
        finally:
            await asyncio.to_thread(shutil.rmtree, where, True)
        parent_tli = parent.stop_timeline or parent.timeline
        if reason is None and rec.timeline != parent_tli:
            reason = (
                f"the backup started on timeline {rec.timeline}, its parent {parent.id} ended on timeline "
                f"{parent_tli} (a promotion meanwhile): a chain never crosses a timeline switch"
            )
        if reason is None:
            return
    log.warning("backup_incremental_became_full", id=rec.id, parent=parent.id, reason=reason)
    await _remove_parts(run)
    rec.kind, rec.parent, rec.chain_root, rec.became_full = "full", None, None, reason
    rec.timeline = rec.stop_timeline = None
    rec.start_lsn = rec.stop_lsn = None
    rec.backup_label = None
    await run.save()
    await _copy_either(run, a)


async def _check_chain_still_there(repo: Repository, scope: str, record: BackupRecord) -> None:
    """Before an incremental is marked complete: every link of its chain is still in the
    repository and complete.  The parent was chosen before this backup's record existed, so an
    ``expire`` meanwhile (another process) may have removed its chain; complete, this backup
    would be listed and could not be restored."""
    seen: set[str] = set()
    link: str | None = record.parent
    while link is not None and link not in seen:
        seen.add(link)
        try:
            rec = await catalog.read_record(repo, scope, link)
        except (NotFound, ValueError) as e:
            raise BackupError(
                f"the chain of this incremental lost backup {link} while it ran ({e}); "
                "it could not be restored: take a full backup"
            ) from None
        if rec.status is not BackupStatus.COMPLETE:
            raise BackupError(f"backup {link} of this incremental's chain is {rec.status.value}")
        link = rec.parent if rec.kind == "incremental" else None


async def _remove_parts(run: _Run) -> None:
    """Every object of the backup but its record."""
    for e in await run.repo.list_objects(layout.backup_prefix(run.scope, run.record.id)):
        if not e.name.endswith("/" + catalog.RECORD_NAME):
            await run.repo.delete(e.name)
    run.record.parts = []
    run.record.manifest = None
    run.record.index = None
    run.record.stored_size = 0
    run.record.size = 0


def server_compression_possible(facts: SourceFacts) -> bool:
    """pg_basebackup --compress=server-zstd needs PostgreSQL 15+ and a server built with zstd."""
    return facts.version_num >= 150000 and facts.zstd


async def _nudge_archive_wait(source: Endpoint, superuser: Credentials) -> None:
    """While a primary's walsender waits for the archiving of the backup's last WAL segment,
    commit a tiny transaction every 100 ms.

    The walsender looks at the archive status once a second (a latch wait with a 1 s timeout
    in do_pg_backup_stop) -- up to a second lost per backup although our archiver stores a
    segment in about 0.2 s.  A WAL flush sets every walsender's latch, so each commit makes
    it look again at once.  Only while pg_stat_progress_basebackup says it waits; at most a
    few transactions per backup; never fatal (a failure only costs that second)."""
    try:
        async with await psycopg.AsyncConnection.connect(**conn_kwargs(source, superuser)) as conn:
            await conn.execute("SET synchronous_commit = local")  # never wait for a sync standby
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_progress_basebackup"
                    " WHERE phase LIKE 'waiting for wal archiving%'"
                )
                row = await cur.fetchone()
                if row and row[0]:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_current_xact_id()")
                await asyncio.sleep(0.1)
    except (psycopg.Error, OSError) as e:
        log.debug("backup_archive_nudge_stopped", error=str(e))


async def _spawn_pg_basebackup(
    bin_dir: Path,
    source: Endpoint,
    replication: Credentials,
    target: str,
    rec: BackupRecord,
    *extra_args: str,
    stdout: int | None = None,
) -> asyncio.subprocess.Process:
    """pg_basebackup of ``source`` in tar format into ``target`` (``-``: its standard output,
    a pipe: ``stdout``'s write end if given, else asyncio's), without WAL; standard error is a pipe."""
    conninfo = build_conninfo(
        host=source.host,
        port=source.port,
        user=replication.username,
        application_name="hakeeper-backup",
        connect_timeout=10,
        gssencmode="disable",
    )
    argv = [
        str(bin_dir / "pg_basebackup"),
        "-d",
        conninfo,
        "-D",
        target,
        "-Ft",
        "-X",
        "none",
        "--checkpoint=fast",
        f"--manifest-checksums={rec.manifest_checksums}",
        "--no-password",
        "-l",
        rec.label,
        *extra_args,
    ]
    extra = {"LC_ALL": "C", "LC_MESSAGES": "C"}
    password = secret_value(replication.password)
    if password is not None:
        extra["PGPASSWORD"] = password
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout
        if stdout is not None
        else (asyncio.subprocess.PIPE if target == "-" else asyncio.subprocess.DEVNULL),
        stderr=asyncio.subprocess.PIPE,
        env=child_env(RunAs(), extra),
        start_new_session=True,
        limit=READ_CHUNK,
    )


def _check_exit(rc: int, stderr: str, source: Endpoint) -> None:
    if rc != 0:
        tail = stderr.strip().splitlines()[-8:]
        raise BackupError(f"pg_basebackup from {source.address} failed (exit {rc}):\n" + "\n".join(tail))


def _streamed_label_and_manifest(
    scanner: TarScanner,
) -> tuple[catalog.BackupLabel, bytes, list[catalog.WalRange]]:
    """The label, the raw manifest and the WAL ranges it names, from a complete tar stream."""
    if not scanner.ended:
        raise BackupError("pg_basebackup's tar stream ended without its end-of-archive marker")
    if "tablespace_map" in scanner.files and scanner.files["tablespace_map"].strip():
        raise BackupError("the backup carries a non-empty tablespace_map: tablespaces are not supported")
    try:
        label = catalog.parse_backup_label(scanner.files["backup_label"].decode())
        manifest_raw = scanner.files["backup_manifest"]
        ranges = catalog.manifest_wal_ranges(json.loads(manifest_raw))
    except KeyError as e:
        raise BackupError(f"the backup stream has no {e.args[0]}") from e
    except ValueError as e:
        raise BackupError(f"cannot read the backup's label or manifest: {e}") from e
    return label, manifest_raw, ranges


async def _copy(
    run: _Run,
    source: Endpoint,
    replication: Credentials,
    bin_dir: Path,
    part_size: int,
    parallel: int,
    wal_timeout: float,
    facts: SourceFacts,
    extra: tuple[str, ...] = (),
) -> None:
    rec = run.record
    t0 = time.monotonic()
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):
        # a pipe of 1 MiB: fewer, larger reads, and pg_basebackup waits less for the reader
        fcntl.fcntl(rfd, fcntl.F_SETPIPE_SZ, 1 << 20)
    try:
        proc = await _spawn_pg_basebackup(bin_dir, source, replication, "-", rec, *extra, stdout=wfd)
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)  # the child has its copy: its exit is the end of the stream
    assert proc.stderr is not None
    stderr_buf = bytearray()

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            stderr_buf.extend(chunk[-65536:])
            if len(stderr_buf) > 65536:
                del stderr_buf[: len(stderr_buf) - 65536]

    err_task = asyncio.create_task(drain_stderr())
    # a buffer per part being compressed, one being filled, one ready to be
    reader = _PipeReader(rfd, part_size, parallel + 2)
    parts = _PartUploader(run, parallel, level=_part_level(run.repo.level))
    loop = asyncio.get_running_loop()
    filled: asyncio.Queue[tuple[bytearray | None, int]] = asyncio.Queue()

    def deliver(buf: bytearray | None, size: int) -> None:  # in the reader's thread
        loop.call_soon_threadsafe(filled.put_nowait, (buf, size))

    read_task = asyncio.ensure_future(asyncio.to_thread(reader.run, t0, deliver))
    idle_timeout = max(wal_timeout, 300.0)
    try:
        while True:
            get = asyncio.ensure_future(filled.get())
            await asyncio.wait([get, read_task], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                await asyncio.gather(get, return_exceptions=True)
                if read_task.done():
                    read_task.result()  # the reader's error; else its last part is queued
                    continue
                _check_silence(reader, wal_timeout, idle_timeout)
                run.tick("copy", reader.total, facts.estimated_size or None)
                continue
            buf, size = get.result()
            if buf is None:
                break
            await parts.submit(memoryview(buf)[:size], release=functools.partial(reader.release, buf))
            run.tick("copy", reader.total, facts.estimated_size or None)
            if time.monotonic() - run.last_saved > catalog.HEARTBEAT_S:
                rec.size = reader.total
                await run.save()
        await read_task
        try:
            # A primary waits (server side) until the backup's last segment is archived.
            rc = await asyncio.wait_for(proc.wait(), timeout=wal_timeout)
        except TimeoutError as e:
            raise BackupError(
                f"pg_basebackup did not finish within {wal_timeout:.0f}s after sending the data "
                "(the server waits for the archiving of the backup's last WAL segment)"
            ) from e
        await err_task
        _check_exit(rc, stderr_buf.decode(errors="replace"), source)
        reader.marks["pg_basebackup_exit"] = time.monotonic() - t0
        results = await parts.finish()
        reader.marks["parts_stored"] = time.monotonic() - t0
    except BaseException:
        await _kill(proc)  # the pipe's write end closes: the reader sees the end and returns
        reader.stop.set()
        err_task.cancel()
        await parts.cancel()
        await asyncio.gather(err_task, read_task, return_exceptions=True)
        raise
    finally:
        if read_task.done():
            os.close(rfd)
        else:  # cancelled while the reader still runs: it closes nothing, so close it after
            read_task.add_done_callback(lambda _t: os.close(rfd))
    rec.stop_time = catalog.utcnow()
    rec.seconds_copy = round(time.monotonic() - t0, 3)
    log.info("backup_copy_timing", id=rec.id, **{k: round(v, 3) for k, v in reader.marks.items()})
    scanner, total = reader.scanner, reader.total
    label, manifest_raw, ranges = _streamed_label_and_manifest(scanner)
    try:
        index = reader.indexer.finish(parts.sizes)
    except fileindex.BadIndex as e:
        raise BackupError(f"cannot index pg_basebackup's tar stream: {e}") from e
    stored = await run.repo.put(
        catalog.object_key(run.scope, rec.id, fileindex.INDEX_NAME), fileindex.to_bytes(index)
    )
    rec.index = _stored(fileindex.INDEX_NAME, stored)
    await _record_copy(
        run,
        results,
        manifest_raw,
        total,
        scanner.regular_files,
        label,
        scanner.files["backup_label"],
        ranges,
        facts,
    )


def _check_silence(reader: _PipeReader, wal_timeout: float, idle_timeout: float) -> None:
    """Raise if pg_basebackup has sent nothing for longer than it may."""
    wait = wal_timeout if reader.at_end else idle_timeout
    if time.monotonic() - reader.last_read <= wait:
        return
    if reader.at_end:
        raise BackupError(
            f"the server sent the data but then waited more than {wait:.0f}s for the "
            "archiving of the backup's WAL; is archive_command working?"
        )
    raise BackupError(
        f"pg_basebackup sent nothing for {wait:.0f}s (after {reader.total} bytes): a checkpoint "
        "that does not finish?"
    )


class _PipeReader:
    """Reads pg_basebackup's standard output (a pipe of our own, not asyncio's) in a worker
    thread, straight into part buffers that are reused once their part is compressed.

    Why not asyncio's StreamReader: each byte was then copied four times in this process (into
    the reader's buffer, out of it into a chunk, chunks joined into a part, fresh memory
    faulted in for every part) -- on 2 CPUs that was more CPU than compressing it
    (docs/benchmarks.md).  Here the kernel copies into the part buffer and zstd reads it.  The
    tar scanner and the index builder see every read as a view of the buffer in the same
    thread; the event loop only receives whole parts (and the last, shorter one)."""

    def __init__(self, fd: int, part_size: int, buffers: int) -> None:
        self.fd = fd
        self.part_size = part_size
        self.scanner = TarScanner()
        self.indexer = fileindex.IndexBuilder()
        self.free: queue.Queue[bytearray] = queue.Queue()
        self.unallocated = max(2, buffers)  # allocated when first needed: a small backup needs one
        self.stop = threading.Event()
        self.total = 0
        self.last_read = time.monotonic()  # the last sign of life of pg_basebackup
        self.at_end = False  # pg_control seen: a silence now is the server waiting for WAL
        self.marks: dict[str, float] = {}

    def release(self, buf: bytearray) -> None:
        """A part's buffer may be refilled (its part is compressed)."""
        self.free.put(buf)

    def _buffer(self) -> bytearray | None:
        if self.free.empty() and self.unallocated:
            self.unallocated -= 1
            return bytearray(self.part_size)
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                buf = self.free.get(timeout=0.2)
                # waiting for our own compression is not pg_basebackup being silent
                self.last_read = time.monotonic()
                return buf
        return None

    def run(self, t0: float, deliver: Callable[[bytearray | None, int], None]) -> None:
        """Blocking (a worker thread): hand over every full part, then the rest and ``None``."""
        seen_control, checked = False, 0
        while (buf := self._buffer()) is not None:
            view = memoryview(buf)
            filled = 0
            while filled < self.part_size:
                n = os.readv(self.fd, [view[filled:]])
                if n == 0:
                    break
                now = time.monotonic()
                self.last_read = now
                self.marks.setdefault("first_byte", now - t0)
                if self.at_end:
                    self.marks.setdefault("pg_control", now - t0)
                chunk = view[filled : filled + n]
                try:
                    self.scanner.feed(chunk)
                    # hashes every 1 MiB block as it passes: xxh3 at ~20 GB/s
                    self.indexer.feed(chunk)
                except (TarFormatError, fileindex.BadIndex) as e:
                    raise BackupError(f"pg_basebackup's output is not a valid tar stream: {e}") from e
                del chunk
                filled += n
                self.total += n
                # The server sends nothing during its checkpoint at the start and, from a
                # primary, while it waits for the archiving of the backup's last segment after
                # pg_control (always the last data file) and before the manifest.  Its header
                # is enough: pg_basebackup's stdio buffer may hold the rest of the member until
                # the manifest comes, so "between members" would never be seen there.
                members = self.scanner.members
                if not seen_control and len(members) > checked:
                    seen_control = fileindex.CONTROL_FILE in members[checked:]
                    checked = len(members)
                self.at_end = seen_control
            del view
            if filled < self.part_size:  # the end of the stream
                self.marks["stream_end"] = time.monotonic() - t0
                if filled or self.total == 0:
                    deliver(buf, filled)
                deliver(None, 0)
                return
            deliver(buf, filled)


# ------------------------------------------------------------ server-side compression


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a consumed range of the staging file (its size stays)."""
    fallocate = libc().fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return bool(fallocate(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length) == 0)


_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
FOLLOW_POLL = 0.05


class _LabelReader:
    """Decompresses the start of the server's zstd stream until ``backup_label`` (the first
    member) is complete; the rest of the stream is never decompressed here."""

    LIMIT = 64 << 20

    def __init__(self) -> None:
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self.scanner = TarScanner(capture=("backup_label",))
        self.out = 0

    @property
    def label(self) -> bytes | None:
        return self.scanner.files.get("backup_label")

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), 65536):
            if self.label is not None:
                return
            try:
                out = self._dobj.decompress(view[i : i + 65536])
            except zstandard.ZstdError as e:
                raise BackupError(f"the server's compressed backup stream is not valid zstd: {e}") from e
            self.out += len(out)
            try:
                self.scanner.feed(out)
            except TarFormatError as e:
                raise BackupError(f"pg_basebackup's output is not a valid tar stream: {e}") from e
            if self.label is None and (self.out > self.LIMIT or len(self.scanner.members) > 1):
                raise BackupError("the backup stream does not start with backup_label")


STAGING_PREFIX = "hakeeper-backup-"
_STAGING_PID = re.compile(r"^hakeeper-backup-.*-p(\d+)-[^-]*$")


def remove_stale_staging(where: Path) -> list[Path]:
    """Remove the staging directories of backups whose process is gone (killed: a ``finally``
    never ran), so that they do not pile up in the staging directory.  Returns what it removed."""
    removed = dirs_of_dead_processes(where, _STAGING_PID)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
        log.info("backup_stale_staging_removed", path=str(d))
    return removed


def _open_if_present(stream: Path) -> int | None:
    """A descriptor on the staging file pg_basebackup writes, once it has created it."""
    try:
        return os.open(stream, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _read_staged_manifest(out_dir: Path) -> bytes:
    """The manifest pg_basebackup wrote next to ``base.tar.zst``, which must be all it wrote."""
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ("base.tar.zst", "backup_manifest"))
    if others:
        names = ", ".join(others)
        raise BackupError(f"pg_basebackup wrote more than the base archive ({names}): tablespaces?")
    try:
        return (out_dir / "backup_manifest").read_bytes()
    except FileNotFoundError:
        raise BackupError("pg_basebackup wrote no backup_manifest") from None


def _staged_label_and_manifest(
    label_raw: bytes, manifest_raw: bytes
) -> tuple[list[dict[str, Any]], list[catalog.WalRange], catalog.BackupLabel]:
    """The manifest's files, the WAL ranges it names and the parsed label."""
    try:
        manifest = json.loads(manifest_raw)
        files = manifest["Files"]
        ranges = catalog.manifest_wal_ranges(manifest)
        parsed = catalog.parse_backup_label(label_raw.decode())
    except (ValueError, KeyError, TypeError) as e:
        raise BackupError(f"cannot read the backup's label or manifest: {e}") from e
    return files, ranges, parsed


class _StagedStream:
    """The growing ``base.tar.zst`` pg_basebackup writes into the staging directory, read as it
    grows; the blocks of what was read are freed a part at a time (a hole punched)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.offset = 0  # bytes read from the staging file
        self.freed = 0  # bytes of it whose blocks were released
        self.can_punch = True

    def _read_some(self) -> bytes:
        assert self.fd is not None
        return os.pread(self.fd, READ_CHUNK, self.offset)

    async def read_new(self, run: _Run, parts: _StreamedParts, label: _LabelReader, part_size: int) -> bool:
        """Hand what was written since the last call to ``label`` (until it has the label) and to
        ``parts``; whether there was anything."""
        if self.fd is None:
            self.fd = _open_if_present(self.path)
        got_any = False
        while self.fd is not None:
            chunk = await asyncio.to_thread(self._read_some)
            if not chunk:
                break
            got_any = True
            self.offset += len(chunk)
            if label.label is None:
                await asyncio.to_thread(label.feed, chunk)
            await parts.feed(chunk)
            run.tick("copy", self.offset, None)
            if self.offset - self.freed >= part_size:
                # the chunks given to parts are in memory: their blocks here can go
                if self.can_punch:
                    self.can_punch = await asyncio.to_thread(
                        _punch_hole, self.fd, self.freed, self.offset - self.freed
                    )
                self.freed = self.offset
                if time.monotonic() - run.last_saved > catalog.HEARTBEAT_S:
                    await run.save()
        return got_any

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


async def _make_stage(staging_dir: Path | None, backup_id: str) -> Path:
    """A new staging directory for pg_basebackup's files (in the temporary directory unless
    configured), after removing those that killed backups left behind."""
    where = str(staging_dir) if staging_dir else tempfile.gettempdir()
    await asyncio.to_thread(remove_stale_staging, Path(where))
    prefix = f"{STAGING_PREFIX}{backup_id}-p{os.getpid()}-"
    return Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix, dir=where))


async def _copy_compressed(
    run: _Run,
    source: Endpoint,
    replication: Credentials,
    bin_dir: Path,
    part_size: int,
    parallel: int,
    wal_timeout: float,
    facts: SourceFacts,
    staging_dir: Path | None,
    extra: tuple[str, ...] = (),
) -> None:
    """The server compresses (``--compress=server-zstd``, ``parallel`` worker threads on the
    server); pg_basebackup writes ``base.tar.zst`` and ``backup_manifest`` into a staging
    directory.  The growing ``base.tar.zst`` is followed and cut into parts that are stored as
    they are (no second compression); the consumed ranges of the staging file are freed (a hole
    punched), so the staging directory never holds more than the parts in flight.

    Why: pg_basebackup cannot put the manifest into a compressed stream on its standard output,
    and compressing on the server is the fastest way there is (the data crosses the connection
    compressed, the server's zstd runs in threads; see docs/benchmarks.md)."""
    rec = run.record
    level = max(1, min(run.repo.level, 19))
    spec = f"server-zstd:level={level}" + (f",workers={parallel}" if parallel > 1 else "")
    stage = await _make_stage(staging_dir, rec.id)
    out_dir = stage / "pgbb"
    t0 = time.monotonic()
    proc = await _spawn_pg_basebackup(
        bin_dir, source, replication, str(out_dir), rec, f"--compress={spec}", *extra
    )
    assert proc.stderr is not None
    err_task = asyncio.create_task(proc.stderr.read())
    wait_task = asyncio.create_task(proc.wait())
    parts = _StreamedParts(run, part_size, parallel)
    label = _LabelReader()
    stream = out_dir / "base.tar.zst"
    staged = _StagedStream(stream)
    idle_timeout = max(wal_timeout, 300.0)
    last_growth = time.monotonic()
    try:
        while True:
            finished = wait_task.done()
            got_any = await staged.read_new(run, parts, label, part_size)
            if finished:
                break  # everything written before the exit has been read
            now = time.monotonic()
            if got_any:
                last_growth = now
            elif now - last_growth > idle_timeout:
                raise BackupError(
                    f"pg_basebackup wrote nothing for {idle_timeout:.0f}s (after {staged.offset} compressed "
                    "bytes): a checkpoint that does not finish, or the server waiting for the "
                    "archiving of the backup's last WAL segment (is archive_command working?)"
                )
            await asyncio.wait([wait_task], timeout=FOLLOW_POLL)
        rc = wait_task.result()
        _check_exit(rc, (await err_task).decode(errors="replace"), source)
        manifest_raw = await asyncio.to_thread(_read_staged_manifest, out_dir)
        results = await parts.finish()
    except BaseException:
        await _kill(proc)
        err_task.cancel()
        wait_task.cancel()
        await parts.cancel()
        await asyncio.gather(err_task, wait_task, return_exceptions=True)
        raise
    finally:
        staged.close()
        await asyncio.to_thread(shutil.rmtree, stage, True)
    rec.stop_time = catalog.utcnow()
    rec.seconds_copy = round(time.monotonic() - t0, 3)
    if label.label is None:
        raise BackupError("the backup stream has no backup_label")
    files, ranges, parsed = _staged_label_and_manifest(label.label, manifest_raw)
    size = sum(int(f.get("Size", 0)) for f in files)
    await _record_copy(
        run,
        results,
        manifest_raw,
        size,
        len(files),
        parsed,
        label.label,
        ranges,
        facts,
        compressed=staged.offset,
        compression=spec,
    )


async def _record_copy(
    run: _Run,
    results: list[PutResult],
    manifest_raw: bytes,
    size: int,
    files: int,
    label: catalog.BackupLabel,
    label_raw: bytes,
    ranges: list[catalog.WalRange],
    facts: SourceFacts,
    **log_extra: Any,
) -> None:
    """After either copy: store the manifest and record parts, sizes and label fields."""
    rec = run.record
    man = await run.repo.put(catalog.object_key(run.scope, rec.id, catalog.MANIFEST_NAME), manifest_raw)
    rec.manifest = _stored(catalog.MANIFEST_NAME, man)
    rec.parts = [_stored(catalog.part_name(i), r) for i, r in enumerate(results)]
    rec.size = size
    rec.stored_size = sum(p.stored_size for p in rec.parts) + man.stored_size
    rec.stored_size += rec.index.stored_size if rec.index is not None else 0
    rec.files = files
    _set_label_fields(rec, label, label_raw, ranges, facts)
    await run.save()
    log.info(
        "backup_copied",
        id=rec.id,
        size=size,
        parts=len(rec.parts),
        start_lsn=rec.start_lsn,
        stop_lsn=rec.stop_lsn,
        seconds=rec.seconds_copy,
        **log_extra,
    )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Stop pg_basebackup (its process group) after a failure, and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()


def _set_label_fields(
    rec: BackupRecord,
    label: catalog.BackupLabel,
    label_raw: bytes,
    ranges: list[catalog.WalRange],
    facts: SourceFacts,
) -> None:
    rec.backup_label = label_raw.decode(errors="replace")
    rec.timeline = label.start_timeline
    rec.start_lsn = format_lsn(label.start_lsn)
    rec.stop_lsn = format_lsn(ranges[-1].end_lsn)
    rec.stop_timeline = ranges[-1].timeline
    if facts.in_recovery != label.from_standby:
        log.warning("backup_source_role_changed", id=rec.id, label_from_standby=label.from_standby)
        assert rec.source is not None
        rec.source.standby = label.from_standby


def _part_level(level: int) -> int:
    """The zstd level of a part compressed here: 1 for the configured 1 to 3.  On PostgreSQL
    pages in 64 MiB parts, level 1 compressed both faster (1.35x on pgbench tables, 2.1x on
    random md5 text) and *smaller* (pgbench 41x against 36x; md5 text 2.8x against 2.5x) than
    level 3, and compression is most of the CPU an indexed backup costs here
    (docs/benchmarks.md).  Higher levels are a deliberate choice of size over time: kept."""
    level = max(1, min(level, 19))
    return 1 if level <= 3 else level


class _PartUploader:
    """Stores parts ``parallel`` at a time, in the order given (part 0, 1, ...).  With ``level``,
    each part is compressed here into a zstd frame of its own (in a worker thread) and stored
    as it is: the repository's SHA-256 then covers the compressed bytes (a twentieth of the data
    for a typical database), zstd's frame checksum the content (layout zstd-indexed)."""

    def __init__(self, run: _Run, parallel: int, *, as_is: bool = False, level: int | None = None) -> None:
        self.run = run
        self.as_is = as_is or level is not None
        self.level = level
        self.sem = asyncio.Semaphore(max(1, parallel))
        self.tasks: list[asyncio.Task[PutResult]] = []
        self.sizes: list[int] = []  # uncompressed, per part

    async def _upload(
        self, index: int, data: bytes | memoryview, release: Callable[[], None] | None
    ) -> PutResult:
        try:
            rec = self.run.record
            try:
                if self.level is not None:
                    data = await asyncio.to_thread(compress_part, data, self.level)
                elif isinstance(data, memoryview):
                    data = data.tobytes()
            except asyncio.CancelledError:
                # the worker thread may still be reading the buffer: it is not given back (the
                # backup is ending; its reader has been told to stop)
                raise
            except BaseException:
                if release is not None:
                    release()
                raise
            if release is not None:  # the input is no longer needed: its buffer is reused
                release()
            return await self.run.repo.put(
                catalog.object_key(self.run.scope, rec.id, catalog.part_name(index)),
                data,
                meta={"backup": rec.id, "part": str(index)},
                as_is=self.as_is,
            )
        finally:
            self.sem.release()

    async def submit(self, data: bytes | memoryview, release: Callable[[], None] | None = None) -> None:
        """Store ``data`` as the next part; ``release`` is called once ``data`` has been read."""
        await self.sem.acquire()
        for t in self.tasks:  # fail early: a part that could not be stored ends the backup
            if t.done() and not t.cancelled() and t.exception() is not None:
                self.sem.release()
                if release is not None:
                    release()
                raise t.exception()  # type: ignore[misc]
        self.sizes.append(len(data))
        self.tasks.append(asyncio.create_task(self._upload(len(self.tasks), data, release)))

    async def finish(self) -> list[PutResult]:
        return list(await asyncio.gather(*self.tasks))

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _StreamedParts:
    """Parts written while the stream grows: the open part is a :meth:`Repository.put_stream`
    fed chunk by chunk, closed once it holds ``part_size`` bytes (its fsync and rename then
    run beside the next part; at most ``parallel`` parts open or closing at once).

    Why not :class:`_PartUploader` (a part stored when whole): the last part, tens of MiB, was
    then checksummed and written only after pg_basebackup had exited -- 0.2 s of every backup
    of a few GB (docs/benchmarks.md); streamed, only its last chunk and the fsync are left."""

    _END = b""

    def __init__(self, run: _Run, part_size: int, parallel: int) -> None:
        self.run = run
        self.part_size = part_size
        self.sem = asyncio.Semaphore(max(1, parallel))
        self.tasks: list[asyncio.Task[PutResult]] = []
        self.queue: asyncio.Queue[bytes] | None = None  # the open part's chunks
        self.filled = 0  # bytes given to the open part

    def _check(self) -> None:
        """Raise the error of a part that failed: it ends the backup at once."""
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _store(self, index: int, queue: asyncio.Queue[bytes]) -> PutResult:
        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not self._END:
                yield chunk

        try:
            rec = self.run.record
            return await self.run.repo.put_stream(
                catalog.object_key(self.run.scope, rec.id, catalog.part_name(index)),
                chunks(),
                meta={"backup": rec.id, "part": str(index)},
                as_is=True,
            )
        finally:
            self.sem.release()

    async def _open(self) -> asyncio.Queue[bytes]:
        await self.sem.acquire()
        try:
            self._check()
        except BaseException:
            self.sem.release()
            raise
        # a few chunks of slack: the part's writer runs behind the reader at most that much
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self.tasks.append(asyncio.create_task(self._store(len(self.tasks), queue)))
        self.queue = queue
        self.filled = 0
        return queue

    async def _put(self, queue: asyncio.Queue[bytes], item: bytes) -> None:
        """``queue.put`` that gives up when the part's writer has failed (it reads no more)."""
        writer = self.tasks[-1]
        put = asyncio.ensure_future(queue.put(item))
        await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await asyncio.gather(put, return_exceptions=True)
            self._check()

    async def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        queue = self.queue if self.queue is not None else await self._open()
        await self._put(queue, chunk)
        self.filled += len(chunk)
        if self.filled >= self.part_size:
            await self._put(queue, self._END)
            self.queue = None

    async def finish(self) -> list[PutResult]:
        """Close the open part (or store an empty one if there is none) and wait for all."""
        if self.queue is None and not self.tasks:
            await self._open()
        if self.queue is not None:
            await self._put(self.queue, self._END)
            self.queue = None
        return list(await asyncio.gather(*self.tasks))

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _segment_present(repo: Repository, key: str) -> bool:
    try:
        await repo.stat(key)
    except NotFound:
        return False
    except CorruptObject as e:
        raise BackupError(f"archived WAL {key} is corrupt: {e}") from e
    except RepoError:
        return False  # cannot tell now: ask again
    return True


async def _wait_for_wal(run: _Run, primary: Endpoint | None, superuser: Credentials, timeout: float) -> None:
    rec = run.record
    assert rec.timeline is not None and rec.stop_timeline is not None
    history: list[layout.HistoryEntry] = []
    t0 = time.monotonic()
    deadline = t0 + timeout
    if rec.stop_timeline != rec.timeline:  # promoted during the backup: follow the new history
        hkey = layout.wal_key(run.scope, layout.history_name(rec.stop_timeline))
        while True:
            try:
                history = layout.parse_history((await run.repo.get(hkey)).decode())
                break
            except NotFound:
                if time.monotonic() > deadline:
                    raise BackupError(f"{hkey} did not reach the archive within {timeout:.0f}s") from None
                await asyncio.sleep(0.5)
    segments = catalog.required_segments(rec.start_lsn_int, rec.stop_lsn_int, rec.stop_timeline, history)
    rec.wal_start, rec.wal_stop, rec.wal_segments = segments[0], segments[-1], len(segments)
    missing = list(segments)
    last_switch = -math.inf if (rec.source and rec.source.standby) else t0
    warned = False
    while True:
        still = []
        for name in missing:
            if not await _segment_present(run.repo, layout.wal_key(run.scope, name)):
                still.append(name)
        missing = still
        run.tick("wal", len(segments) - len(missing), len(segments))
        if not missing:
            break
        now = time.monotonic()
        if now - last_switch >= SWITCH_EVERY_S:
            last_switch = now
            if primary is not None:
                try:
                    closed = await switch_wal(primary, superuser)
                    log.info("backup_wal_switch", id=rec.id, primary=primary.address, closed=closed)
                except BackupError as e:
                    log.warning("backup_wal_switch_failed", id=rec.id, error=str(e))
            elif not warned:
                warned = True
                log.warning("backup_no_primary_for_switch", id=rec.id, missing=missing[0])
        if now > deadline:
            hint = "" if primary is not None else " (no primary known to run pg_switch_wal() on)"
            raise BackupError(
                f"WAL segment {missing[0]} ({len(missing)} of {len(segments)} needed by the backup) "
                f"did not reach the archive of {run.repo.name} within {timeout:.0f}s{hint}; "
                "is WAL archiving working?"
            )
        await asyncio.sleep(0.5)
    rec.seconds_wal_wait = round(time.monotonic() - t0, 3)


# ============================================================================ row counts


USER_TABLES_SQL = (
    "SELECT n.nspname::text, c.relname::text, pg_relation_size(c.oid)"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind = 'r' AND c.relpersistence = 'p'"
    " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
    " ORDER BY 1, 2"
)
DATABASES_SQL = "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A ``pg_current_snapshot()``: xmin, xmax and the transactions in progress."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))


def nothing_committed_between(before: Snapshot, after: Snapshot) -> bool:
    """Whether no transaction can have committed (or aborted) between two snapshots: every one
    in progress at ``before``, and every one started since, is still in progress at ``after``.
    (Conservative: a transaction that ended without changing rows counts as a change.)"""
    if after.xmax < before.xmax:
        return False
    started = after.xmax - before.xmax
    if started > len(after.xip):  # more new transactions than can still be in progress
        return False
    need = set(before.xip) | set(range(before.xmax, after.xmax))
    return need <= after.xip


STRADDLE_WAIT = 5.0  # s to wait for transactions in progress at the restore point to end


async def _straddling(
    admin: psycopg.AsyncConnection[Any],
    per_db: Mapping[str, tuple[Any, Snapshot, Any]],
    after: Snapshot,
    changed: Sequence[str],
) -> list[str]:
    """The databases whose snapshot missed a transaction that may have committed before the
    restore point: one still running right after the point (a commit is WAL-logged before it
    becomes visible, and a synchronous commit waits between the two) and invisible to that
    snapshot, that then committed or did not end within STRADDLE_WAIT.  Conservative: such a
    commit cannot be placed before or after the restore point.  (A snapshot does not list
    every running transaction: its xmax is the newest completed one + 1, so a transaction
    assigned later but running is in neither ``xip`` nor the range between two xmax.)"""
    # every transaction holds the lock on its own id; autovacuum's (an ANALYZE writes only
    # pg_statistic) changes no counted row
    cur = await admin.execute(
        "SELECT DISTINCT l.transactionid::text FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted "
        "AND coalesce(a.backend_type, '') <> 'autovacuum worker'"
    )
    running = {_full_xid(int(r[0]), after.xmax) for r in await cur.fetchall()}
    need = {
        db: {x for x in running if x in snap.xip or x >= snap.xmax}
        for db, (_c, snap, _t) in per_db.items()
        if db not in changed
    }
    pending = set().union(*need.values()) if need else set()
    if not pending:
        return []
    status: dict[int, str] = {}
    deadline = time.monotonic() + STRADDLE_WAIT
    while True:
        cur = await admin.execute(
            "SELECT x, pg_xact_status(x::text::xid8) FROM unnest(%s::bigint[]) AS x", (sorted(pending),)
        )
        status = {int(x): str(st) for x, st in await cur.fetchall()}
        if all(st != "in progress" for st in status.values()) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    doubtful = {x for x, st in status.items() if st in ("committed", "in progress")}
    return [db for db, xids in need.items() if xids & doubtful]


def _full_xid(xid: int, near: int) -> int:
    """The 64-bit transaction id of the 32-bit ``xid`` (pg_locks') closest to ``near`` (a
    snapshot's xid8): the same epoch, or the one before or after across a wraparound."""
    full = (near & ~0xFFFFFFFF) | xid
    if full > near + 2**31:
        full -= 2**32
    elif full < near - 2**31:
        full += 2**32
    return full


def table_name(schema: str, table: str) -> str:
    return f"{schema}.{table}"


async def count_tables(
    conn: psycopg.AsyncConnection[Any], tables: list[tuple[str, str]]
) -> tuple[dict[str, int], list[str]]:
    """``count(*)`` of each table on ``conn`` (in its current transaction, one savepoint per
    table); the counts, and the tables that could not be counted (dropped meanwhile, say)."""
    from psycopg import sql as pgsql

    counts: dict[str, int] = {}
    failed: list[str] = []
    for schema, table in tables:
        q = pgsql.SQL("SELECT count(*) FROM {}.{}").format(pgsql.Identifier(schema), pgsql.Identifier(table))
        try:
            if conn.autocommit:
                cur = await conn.execute(q)
                row = await cur.fetchone()
            else:
                async with conn.transaction():
                    cur = await conn.execute(q)
                    row = await cur.fetchone()
        except psycopg.errors.UndefinedTable:
            failed.append(table_name(schema, table))
            continue
        counts[table_name(schema, table)] = int(row[0]) if row else 0
    return counts, failed


def restore_point_name(backup_id: str) -> str:
    return f"hakeeper-{backup_id}"


async def record_row_counts(
    primary: Endpoint | None, creds: Credentials, backup_id: str, *, max_bytes: int, timeout: float
) -> catalog.RowCounts:
    """Row counts of every permanent user table of every database, exact per database (one
    REPEATABLE READ snapshot each), and a restore point right after the snapshots were taken:
    a restore to that point holds exactly these rows when no transaction committed in between
    (``exact``; see :func:`nothing_committed_between`).  The snapshots are all taken first and
    the restore point created at once, so the window is the time to open the connections, not
    the time of the counting.  Never raises: a failure is recorded as ``skipped``."""
    t0 = time.monotonic()
    rc = catalog.RowCounts(taken_at=catalog.utcnow())
    if primary is None:
        rc.skipped = "no primary known to count rows and create a restore point on"
        return rc
    conns: list[psycopg.AsyncConnection[Any]] = []
    try:
        async with asyncio.timeout(timeout):
            await _count_rows(primary, creds, backup_id, max_bytes, rc, conns)
    except TimeoutError:
        rc.skipped = f"counting took longer than {timeout:.0f}s (backup.row_counts.timeout)"
    except (psycopg.Error, OSError, ValueError) as e:
        rc.skipped = f"{primary.name} ({primary.address}): {str(e).strip()}"
    finally:
        for c in conns:
            with contextlib.suppress(psycopg.Error, OSError):
                await c.close()
    if rc.skipped:
        rc.tables = {}
        rc.exact = False
        log.warning("backup_row_counts_skipped", id=backup_id, reason=rc.skipped)
    rc.seconds = round(time.monotonic() - t0, 3)
    return rc


async def _count_rows(
    primary: Endpoint,
    creds: Credentials,
    backup_id: str,
    max_bytes: int,
    rc: catalog.RowCounts,
    conns: list[psycopg.AsyncConnection[Any]],
) -> None:
    kw = conn_kwargs(primary, creds)
    admin = await psycopg.AsyncConnection.connect(**kw)
    conns.append(admin)
    cur = await admin.execute("SELECT pg_is_in_recovery()")
    row = await cur.fetchone()
    if row is None or row[0]:
        rc.skipped = f"{primary.name} is not a primary (in recovery): no restore point possible"
        return
    databases = [r[0] for r in await (await admin.execute(DATABASES_SQL)).fetchall()]
    # 1. one REPEATABLE READ snapshot per database, and its table list
    per_db: dict[str, tuple[psycopg.AsyncConnection[Any], Snapshot, list[tuple[str, str]]]] = {}
    total = 0
    for db in databases:
        conn = await psycopg.AsyncConnection.connect(**{**kw, "autocommit": False, "dbname": db})
        conns.append(conn)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        cur = await conn.execute("SELECT pg_current_snapshot()::text")  # the transaction's snapshot
        row = await cur.fetchone()
        assert row is not None
        snap = Snapshot.parse(row[0])
        tables = await (await conn.execute(USER_TABLES_SQL)).fetchall()
        total += sum(int(t[2]) for t in tables)
        per_db[db] = (conn, snap, [(t[0], t[1]) for t in tables])
    rc.bytes_counted = total
    if total > max_bytes:
        rc.skipped = f"the tables hold {total} bytes, more than backup.row_counts.max_bytes ({max_bytes})"
        return
    # 2. the restore point, and what has committed since the snapshots
    name = restore_point_name(backup_id)
    cur = await admin.execute("SELECT pg_create_restore_point(%s)::text", (name,))
    row = await cur.fetchone()
    assert row is not None
    rc.restore_point, rc.restore_point_lsn = name, str(row[0])
    # a statement of its own: a statement's snapshot is taken when it starts
    cur = await admin.execute("SELECT pg_current_snapshot()::text")
    row = await cur.fetchone()
    assert row is not None
    after = Snapshot.parse(row[0])
    changed = [db for db, (_c, snap, _t) in per_db.items() if not nothing_committed_between(snap, after)]
    changed += await _straddling(admin, per_db, after, changed)
    # 3. the counts, each in its database's snapshot
    rc.exact = not changed
    if changed:
        rc.inexact_reason = (
            "transactions committed between the snapshot of "
            + ", ".join(changed)
            + " and the restore point: a restore to it may hold other rows"
        )
    for db, (conn, _snap, tables) in per_db.items():
        counts, failed = await count_tables(conn, tables)
        rc.tables[db] = counts
        if failed:
            rc.exact = False
            rc.inexact_reason = f"{db}: tables dropped while counting: {', '.join(failed)}"
        await conn.rollback()
    log.info(
        "backup_row_counts",
        id=backup_id,
        databases=len(per_db),
        tables=sum(len(t) for t in rc.tables.values()),
        exact=rc.exact,
        restore_point_lsn=rc.restore_point_lsn,
    )
