"""The backup catalog: one JSON record per base backup, and the choices made from it.

A base backup lives below ``<scope>/backup/<id>/`` in one repository:

* ``base.tar.00000``, ``base.tar.00001``, ...: consecutive pieces (parts) of the tar stream
  ``pg_basebackup -D - -Ft -X none`` wrote (the data directory, with ``backup_label`` first and
  PostgreSQL's ``backup_manifest`` injected last).  Each part is a repository object of its own
  (zstd, SHA-256 trailer), compressed and uploaded in parallel with the others.
* ``backup_manifest``: PostgreSQL's manifest again, as an object of its own (for tools and for
  ``backup info`` without reading the parts).
* ``backup.json``: the :class:`BackupRecord`.  Written with status ``running`` when the backup
  starts (so ``expire`` never removes a backup in progress), refreshed while it runs, and
  rewritten last with status ``complete`` once every part is stored **and** every WAL segment
  the backup needs is in the archive of the same repository.  Only a record with status
  ``complete`` makes a backup usable.

Ids are the UTC start time, ``20261124T071500Z``: sortable, readable, one per second and
repository.

This module is also the pure part of restore planning: which backup and timeline reach a
target, and whether the archive covers the way there (:func:`plan_restore`).  No I/O in the
planning functions; the repository reads are in :func:`load_catalog`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hakeeper.backup import layout
from hakeeper.backup.errors import EncryptionMismatch, NotFound, RepoError, WrongKey
from hakeeper.backup.lineage import (
    BINDING_NAME,
    ClusterEra,
    Lineage,
    LineageError,
    era_timeline_allowed,
    lineage_from_binding,
)
from hakeeper.backup.phases import PhaseStats
from hakeeper.backup.repo import ListEntry, Repository
from hakeeper.core.lsn import format_lsn, parse_lsn
from hakeeper.core.timefmt import iso

FORMAT_VERSION = 1
RECORD_NAME = "backup.json"
MANIFEST_NAME = "backup_manifest"
PART_PREFIX = "base.tar."
ID_FORMAT = "%Y%m%dT%H%M%SZ"
# How a restore rebuilds an incremental backup's chain (restore.py, docs/backup.md): in place
# (the default) or with PostgreSQL's pg_combinebackup (what restore drills use).
COMBINE_IN_PLACE = "in-place"
COMBINE_TOOL = "pg_combinebackup"
COMBINE_MODES = (COMBINE_IN_PLACE, COMBINE_TOOL)
# What a backup id read from a repository may be (make_backup_id writes 20261207T094946Z).
# Records come from the repository, which may have been tampered with, and an id names
# directories (a chain's staging directories) and object keys: "..", "/etc" or a name with a
# slash is refused when a record is read (read_record).
BACKUP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# How the tar stream is stored in the parts.  zstd-parts: every part a zstd frame of its own
# (hakeeper compressed the stream).  zstd-stream: the server compressed the whole stream
# (pg_basebackup --compress=server-zstd); the parts are consecutive slices of that one zstd
# stream, stored as they are (see codec.encode_raw).
LAYOUT_PARTS: Final = "zstd-parts"
LAYOUT_STREAM: Final = "zstd-stream"
# zstd-indexed: every part a zstd frame of its own, compressed here and stored as it is (the
# parts' sizes and SHA-256 are the compressed bytes'), plus an index object
# (backup/fileindex.py: every member's offset in the uncompressed stream, a hash per 1 MiB
# block of every file), so that parts can be unpacked in any order by several workers
# (backup/unpack.py) and a delta restore fetches only the parts it needs.
LAYOUT_INDEXED: Final = "zstd-indexed"
# A "running" record not refreshed for this long belongs to a backup that died (kill -9, host
# lost): it is treated as failed.  A running backup refreshes its record every 30 s.
STALE_AFTER = dt.timedelta(minutes=15)
HEARTBEAT_S = 30.0


class BackupStatus(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class _Model(BaseModel):
    # Records written by a newer version may carry fields this one does not know.
    model_config = ConfigDict(extra="ignore")


class StoredObject(_Model):
    """One object of a backup: its name relative to the backup's prefix, uncompressed size,
    stored (compressed) size and the SHA-256 of the uncompressed content."""

    name: str
    size: int
    stored_size: int
    sha256: str


class SourceInfo(_Model):
    member: str
    host: str
    port: int
    standby: bool


class RowCounts(_Model):
    """Exact row counts of every permanent user table of every database, taken on the primary
    right after the backup's data was copied, and the restore point created with them
    (:func:`hakeeper.backup.basebackup.record_row_counts`).

    ``exact``: a restore to ``restore_point`` holds exactly these rows: every count came from a
    REPEATABLE READ snapshot taken just before the restore point, and no transaction committed
    between any of those snapshots and the restore point (compared with ``pg_current_snapshot()``
    taken right after it).  ``skipped``: why nothing was counted (then ``tables`` is empty)."""

    taken_at: dt.datetime
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    exact: bool = False
    inexact_reason: str | None = None
    skipped: str | None = None
    bytes_counted: int = 0
    seconds: float = 0.0
    tables: dict[str, dict[str, int]] = Field(default_factory=dict)  # database -> schema.table -> rows


class BackupRecord(_Model):
    format: int = FORMAT_VERSION
    id: str
    label: str
    # full: the whole data directory; incremental: pg_basebackup --incremental against the
    # manifest of ``parent`` (PostgreSQL 17+), restored by pg_combinebackup of its chain.
    # Records written before incremental backups existed have neither field: full.
    kind: Literal["full", "incremental"] = "full"
    parent: str | None = None  # incremental: the backup it was taken against
    chain_root: str | None = None  # incremental: the full backup its chain starts with
    # --type incremental was asked for but a full was taken: why (a timeline switch, ...)
    became_full: str | None = None
    layout: Literal["zstd-parts", "zstd-stream", "zstd-indexed"] = LAYOUT_PARTS
    index: StoredObject | None = None  # zstd-indexed: the file index (absent in older records)
    status: BackupStatus
    error: str | None = None
    scope: str
    repository: str
    source: SourceInfo | None = None
    pg_version: int | None = None  # server_version_num, e.g. 150018
    system_identifier: str | None = None
    timeline: int | None = None  # timeline the backup started on
    stop_timeline: int | None = None  # timeline of its end (differs only if promoted meanwhile)
    start_lsn: str | None = None
    stop_lsn: str | None = None
    start_time: dt.datetime
    stop_time: dt.datetime | None = None
    updated_at: dt.datetime
    wal_start: str | None = None  # first WAL segment the backup needs
    wal_stop: str | None = None  # last one
    wal_segments: int = 0
    size: int = 0  # bytes of the data directory (tar stream; zstd-stream: the manifest's files)
    stored_size: int = 0  # bytes stored for the parts and the manifest
    parts: list[StoredObject] = Field(default_factory=list)
    manifest: StoredObject | None = None
    manifest_checksums: str | None = None
    backup_label: str | None = None
    files: int = 0
    created_on: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    seconds_copy: float | None = None  # pg_basebackup stream, compression, upload
    seconds_wal_wait: float | None = None  # waiting for the archive
    row_counts: RowCounts | None = None  # backup.row_counts; None in older records
    # seconds/bytes/rate per phase (backup/phases.py); empty in records before issue 16
    phases: dict[str, PhaseStats] = Field(default_factory=dict)

    # -- derived
    @property
    def start_lsn_int(self) -> int:
        v = parse_lsn(self.start_lsn)
        if v is None:
            raise ValueError(f"backup {self.id} has no start LSN")
        return v

    @property
    def stop_lsn_int(self) -> int:
        v = parse_lsn(self.stop_lsn)
        if v is None:
            raise ValueError(f"backup {self.id} has no stop LSN")
        return v

    @property
    def root(self) -> str:
        """The id of the full backup this backup's chain starts with (its own for a full)."""
        return (self.chain_root or self.id) if self.kind == "incremental" else self.id

    def usable(self) -> bool:
        return (
            self.status is BackupStatus.COMPLETE
            and self.start_lsn is not None
            and self.stop_lsn is not None
            and self.timeline is not None
            and self.stop_time is not None
        )

    def abandoned(self, now: dt.datetime) -> bool:
        """A running record nobody refreshed for :data:`STALE_AFTER`: the backup died."""
        return self.status is BackupStatus.RUNNING and now - self.updated_at > STALE_AFTER

    def effective_status(self, now: dt.datetime) -> str:
        return "abandoned" if self.abandoned(now) else str(self.status)

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    def summary(self, now: dt.datetime | None = None) -> dict[str, object]:
        """The fields ``backup list`` shows (JSON-friendly)."""
        now = now or utcnow()
        return {
            "id": self.id,
            "repository": self.repository,
            "status": self.effective_status(now),
            "kind": self.kind,
            "type": self.kind,
            "parent": self.parent,
            "chain": self.root,
            "source": self.source.member if self.source else None,
            "from_standby": self.source.standby if self.source else None,
            "timeline": self.timeline,
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "start_time": iso(self.start_time),
            "stop_time": iso(self.stop_time) if self.stop_time else None,
            "wal_start": self.wal_start,
            "wal_stop": self.wal_stop,
            "size": self.size,
            "stored_size": self.stored_size,
            "error": self.error,
            "pg_version": self.pg_version,
            "pg_major": self.pg_version // 10000 if self.pg_version else None,
            "system_identifier": self.system_identifier,
        }


# ============================================================================ chains (incremental backups)

MAX_LINKS = 1000  # a guard against a parent cycle in tampered records


class BrokenChain(ValueError):
    """A link of a backup's chain is missing, incomplete or of another cluster."""


def chain_of(rec: BackupRecord, records: Mapping[str, BackupRecord]) -> list[BackupRecord]:
    """``rec``'s chain, its full backup first and ``rec`` last (``[rec]`` for a full).
    Raises :class:`BrokenChain` naming the first link that cannot be used."""
    out = [rec]
    cur = rec
    while cur.kind == "incremental":
        if cur.parent is None:
            raise BrokenChain(f"incremental backup {cur.id} names no parent")
        parent = records.get(cur.parent)
        if parent is None:
            raise BrokenChain(
                f"the chain of backup {rec.id} is broken: its link {cur.parent} (parent of {cur.id}) "
                "is missing"
            )
        if not parent.usable():
            raise BrokenChain(
                f"the chain of backup {rec.id} is broken: its link {parent.id} (parent of {cur.id}) "
                f"is {parent.status}, not complete"
            )
        if parent.system_identifier != cur.system_identifier:
            raise BrokenChain(
                f"backup {cur.id}'s parent {parent.id} is of another cluster (system identifier)"
            )
        if len(out) > MAX_LINKS:
            raise BrokenChain(f"the chain of backup {rec.id} has more than {MAX_LINKS} links (a cycle?)")
        out.append(parent)
        cur = parent
    out.reverse()
    return out


def chain_problem(rec: BackupRecord, records: Mapping[str, BackupRecord]) -> str | None:
    """Why ``rec``'s chain cannot be restored (None: it can, or ``rec`` is a full)."""
    try:
        chain_of(rec, records)
    except BrokenChain as e:
        return str(e)
    return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_backup_id(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(ID_FORMAT)


def backup_id_time(backup_id: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(backup_id, ID_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def record_key(scope: str, backup_id: str) -> str:
    return layout.backup_prefix(scope, backup_id) + RECORD_NAME


def object_key(scope: str, backup_id: str, name: str) -> str:
    return layout.backup_prefix(scope, backup_id) + name


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}"


# ============================================================================ backup_label, manifest


@dataclass(frozen=True, slots=True)
class BackupLabel:
    start_lsn: int
    checkpoint_lsn: int | None
    start_timeline: int
    from_standby: bool
    label: str
    start_time: str


def parse_backup_label(text: str) -> BackupLabel:
    """The fields of a ``backup_label`` file (ValueError when the essential ones are missing)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        start = parse_lsn(fields["START WAL LOCATION"].split()[0])
        tli = int(fields["START TIMELINE"])
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"backup_label without a usable start location/timeline: {text[:200]!r}") from e
    assert start is not None
    ckpt = fields.get("CHECKPOINT LOCATION")
    return BackupLabel(
        start_lsn=start,
        checkpoint_lsn=parse_lsn(ckpt.split()[0]) if ckpt else None,
        start_timeline=tli,
        from_standby=fields.get("BACKUP FROM", "primary") == "standby",
        label=fields.get("LABEL", ""),
        start_time=fields.get("START TIME", ""),
    )


@dataclass(frozen=True, slots=True)
class WalRange:
    timeline: int
    start_lsn: int
    end_lsn: int


def manifest_wal_ranges(manifest: Mapping[str, object]) -> list[WalRange]:
    """``WAL-Ranges`` of a parsed backup_manifest, oldest first."""
    raw = manifest.get("WAL-Ranges")
    if not isinstance(raw, list) or not raw:
        raise ValueError("backup_manifest has no WAL-Ranges")
    out = []
    for r in raw:
        if not isinstance(r, dict):
            raise ValueError("backup_manifest: malformed WAL-Ranges entry")
        start = parse_lsn(str(r["Start-LSN"]))
        end = parse_lsn(str(r["End-LSN"]))
        assert start is not None and end is not None
        out.append(WalRange(int(r["Timeline"]), start, end))
    out.sort(key=lambda w: (w.start_lsn, w.timeline))
    return out


def required_segments(
    start_lsn: int,
    stop_lsn: int,
    stop_timeline: int,
    history: list[layout.HistoryEntry],
    seg_size: int = layout.DEFAULT_SEGMENT_SIZE,
) -> list[str]:
    """WAL segments recovery reads from ``start_lsn`` up to the end of the record that ends
    at ``stop_lsn`` (an exclusive end: a stop exactly on a segment boundary needs nothing of
    the next segment)."""
    last = max(start_lsn, stop_lsn - 1)
    return layout.wal_segments(start_lsn, last, stop_timeline, history, seg_size)


# ============================================================================ reading the catalog


@dataclass
class Catalog:
    """What one repository holds for one scope: backup records, backup prefixes without a
    record (orphans), unreadable records, the archived WAL and the timeline histories."""

    repository: str
    records: list[BackupRecord] = field(default_factory=list)
    objects: dict[str, list[ListEntry]] = field(default_factory=dict)  # backup id -> its objects
    orphans: dict[str, list[ListEntry]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    wal: dict[str, ListEntry] = field(default_factory=dict)  # file name -> entry
    histories: dict[int, list[layout.HistoryEntry]] = field(default_factory=dict)
    # The scope's clusters as the binding says (the current one and those a major upgrade
    # replaced); lineage_problem: why the binding could not be read (then nothing is known).
    lineage: Lineage = field(default_factory=Lineage)
    lineage_problem: str | None = None

    def get(self, backup_id: str) -> BackupRecord | None:
        for r in self.records:
            if r.id == backup_id:
                return r
        return None

    def complete(self) -> list[BackupRecord]:
        """Usable backups, newest first."""
        done = [r for r in self.records if r.usable()]
        return sorted(done, key=lambda r: (r.stop_time, r.id), reverse=True)

    def cluster_of(self, rec: BackupRecord) -> str:
        """``current``, or ``before upgrade to N`` for a backup of a cluster a major upgrade
        replaced (``backup list``'s column)."""
        return self.lineage.cluster_label(rec.system_identifier)

    def history_of(self, tli: int) -> list[layout.HistoryEntry] | None:
        """:func:`history_of`, where the first timeline of a cluster made by an upgrade has no
        ancestors (its history file is not needed)."""
        hist = history_of(tli, self.histories)
        if hist is None and tli in self.lineage.first_timelines():
            return []
        return hist


def _ids_from_listing(scope: str, entries: Iterable[ListEntry]) -> dict[str, list[ListEntry]]:
    prefix = layout.backup_prefix(scope)
    out: dict[str, list[ListEntry]] = {}
    for e in entries:
        rest = e.name[len(prefix) :]
        bid, sep, _ = rest.partition("/")
        if sep and bid:
            out.setdefault(bid, []).append(e)
    return out


async def read_record(repo: Repository, scope: str, backup_id: str) -> BackupRecord:
    raw = await repo.get(record_key(scope, backup_id))
    try:
        rec = BackupRecord.model_validate_json(raw)
    except ValidationError as e:
        raise ValueError(f"{repo.name}: backup {backup_id}: unreadable {RECORD_NAME}: {e}") from e
    if rec.id != backup_id:
        raise ValueError(
            f"{repo.name}: backup {backup_id}: its {RECORD_NAME} names another backup ({rec.id!r})"
        )
    for what, value in (("id", rec.id), ("parent", rec.parent), ("chain_root", rec.chain_root)):
        if value is not None and not BACKUP_ID_RE.fullmatch(value):
            raise ValueError(
                f"{repo.name}: backup {backup_id}: {RECORD_NAME} has an invalid {what} {value!r}"
            )
    return rec


async def load_catalog(
    repo: Repository, scope: str, *, wal: bool = True, histories: bool = True, lineage: bool = True
) -> Catalog:
    """Read every backup record of ``scope`` (and, unless told otherwise, the WAL listing,
    every timeline history file and the binding's clusters)."""
    cat = Catalog(repo.name)
    listing = await repo.list_objects(layout.backup_prefix(scope))
    by_id = _ids_from_listing(scope, listing)
    cat.objects = by_id

    async def one(bid: str) -> None:
        names = {e.name for e in by_id[bid]}
        if record_key(scope, bid) not in names:
            cat.orphans[bid] = by_id[bid]
            return
        try:
            cat.records.append(await read_record(repo, scope, bid))
        except NotFound:
            cat.orphans[bid] = by_id[bid]  # deleted meanwhile
        except (WrongKey, EncryptionMismatch):
            raise  # the configuration, not this record: no backup of the repository is readable
        except (ValueError, RepoError) as e:
            cat.problems.append(str(e))  # this record, damaged or tampered with: refused

    await asyncio.gather(*(one(bid) for bid in sorted(by_id)))
    cat.records.sort(key=lambda r: r.id)
    if wal:
        prefix = layout.wal_prefix(scope)
        for e in await repo.list_objects(prefix):
            cat.wal[e.name[len(prefix) :]] = e
    if histories and wal:
        cat.histories = await load_histories(repo, scope, [n for n in cat.wal if n.endswith(".history")])
    if lineage:
        await _load_lineage(repo, scope, cat)
    return cat


async def _load_lineage(repo: Repository, scope: str, cat: Catalog) -> None:
    """The binding's clusters into ``cat`` (binding.py writes the object; it is read here so
    that every catalog knows which backups are of an earlier cluster)."""
    try:
        cat.lineage = lineage_from_binding(await repo.get(f"{scope}/{BINDING_NAME}"))
    except NotFound:
        pass  # unbound: every backup counts as the current cluster's
    except (WrongKey, EncryptionMismatch):
        raise
    except (LineageError, RepoError) as e:
        # Not a refusal of the catalog: the backups are readable without it; the planning and
        # `backup list` say the clusters are not known.
        cat.lineage_problem = f"{repo.name}: {scope}/{BINDING_NAME}: unreadable binding: {e}"


async def load_histories(
    repo: Repository, scope: str, names: Iterable[str]
) -> dict[int, list[layout.HistoryEntry]]:
    out: dict[int, list[layout.HistoryEntry]] = {}

    async def one(name: str) -> None:
        tli = layout.parse_history_name(name)
        if tli is None:
            return
        text = (await repo.get(layout.wal_key(scope, name))).decode(errors="replace")
        out[tli] = layout.parse_history(text)

    await asyncio.gather(*(one(n) for n in names))
    return out


# ============================================================================ restore planning


class RestoreRefused(Exception):
    """The restore cannot be done as asked; the message says why (nothing was copied)."""


TargetKind = Literal["time", "lsn", "xid", "name", "latest"]


@dataclass(frozen=True, slots=True)
class Target:
    kind: TargetKind
    time: dt.datetime | None = None
    lsn: int | None = None
    xid: int | None = None
    name: str | None = None
    inclusive: bool = True
    timeline: int | Literal["latest", "current"] = "latest"

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            what = f"time {iso(self.time)}"
        elif self.kind == "lsn" and self.lsn is not None:
            what = f"LSN {format_lsn(self.lsn)}"
        elif self.kind == "xid":
            what = f"xid {self.xid}"
        elif self.kind == "name":
            what = f"restore point {self.name!r}"
        else:
            return "the end of the archived WAL (latest)"
        return what + ("" if self.inclusive else " (exclusive)")


@dataclass
class RestorePlan:
    backup: BackupRecord
    timeline: int  # recovery_target_timeline to set
    history: list[layout.HistoryEntry]
    segments: list[str]  # WAL known to be needed and present, from the backup's start
    covered_until: str | None  # the last segment of the unbroken run on the path
    covered_until_modified: dt.datetime | None
    notes: list[str] = field(default_factory=list)
    # The archive may not hold WAL past the target yet (time/xid/name/latest): a WAL switch on
    # the primary and a wait would make sure.  ``proven`` is True when the archive provably
    # reaches the target (an LSN inside the covered run, a time older than archived WAL).
    proven: bool = False
    missing: str | None = None  # why it is not proven (for the refusal when nothing helps)
    # The backup is of a cluster a major upgrade replaced: recovery ends at that cluster's end
    # at the latest (its WAL ends there), and a WAL switch on today's primary adds nothing.
    era: ClusterEra | None = None


def history_of(
    tli: int, histories: Mapping[int, list[layout.HistoryEntry]]
) -> list[layout.HistoryEntry] | None:
    """The history of timeline ``tli`` (None when its history file is not archived)."""
    if tli == 1:
        return []
    return histories.get(tli)


def describe_history(tli: int, hist: Sequence[layout.HistoryEntry]) -> str:
    if not hist:
        return f"timeline {tli} (no ancestors)"
    steps = " -> ".join(f"{e.tli} (until {format_lsn(e.switch_lsn)})" for e in hist)
    return f"{steps} -> {tli}"


def on_path(
    tli: int, start: int, stop: int, target_tli: int, hist: Sequence[layout.HistoryEntry]
) -> str | None:
    """None if the WAL range [start, stop) written on timeline ``tli`` lies on the history of
    ``target_tli``; else the reason it does not."""
    if tli == target_tli:
        begin = hist[-1].switch_lsn if hist else 0
        if start < begin:  # cannot happen for a real backup: a timeline starts at its fork
            return f"timeline {tli} begins at {format_lsn(begin)}, after {format_lsn(start)}"
        return None
    for e in hist:
        if e.tli == tli:
            if stop > e.switch_lsn:
                return (
                    f"timeline {target_tli} left timeline {tli} at {format_lsn(e.switch_lsn)}, "
                    f"before {format_lsn(stop)}: what was written on timeline {tli} after "
                    f"{format_lsn(e.switch_lsn)} is not part of timeline {target_tli}"
                )
            return None
    hist_text = describe_history(target_tli, hist)
    return f"timeline {tli} is not in the history of timeline {target_tli} ({hist_text})"


def backup_on_path(b: BackupRecord, target_tli: int, hist: Sequence[layout.HistoryEntry]) -> str | None:
    assert b.timeline is not None
    stop_tli = b.stop_timeline or b.timeline
    why = on_path(b.timeline, b.start_lsn_int, b.start_lsn_int, target_tli, hist)
    if why is None:
        why = on_path(stop_tli, b.stop_lsn_int, b.stop_lsn_int, target_tli, hist)
    if why is None:
        return None
    where = f"timeline {b.timeline}, {b.start_lsn} .. {b.stop_lsn}"
    return f"backup {b.id} ({where}) is not on timeline {target_tli}: {why}"


def archived_timelines(cat: Catalog) -> list[int]:
    """Timelines with a history file or segments in the archive, newest first."""
    tlis = set(cat.histories)
    for name in cat.wal:
        seg = layout.parse_segment_name(name)
        if seg is not None:
            tlis.add(seg[0])
    tlis.add(1)
    return sorted(tlis, reverse=True)


def latest_timeline_for(b: BackupRecord, cat: Catalog) -> int | None:
    """The newest archived timeline whose history contains the backup (None if none does); for
    a backup of a cluster a major upgrade replaced, the newest of that cluster's timelines."""
    era = cat.lineage.era_of(b.system_identifier)
    for tli in archived_timelines(cat):
        hist = cat.history_of(tli)
        if hist is None:
            continue
        if era is not None and not era_timeline_allowed(era, tli, [(e.tli, e.switch_lsn) for e in hist]):
            continue
        if backup_on_path(b, tli, hist) is None:
            return tli
    return None


def abandonment(tli: int, lsn: int, cat: Catalog) -> str | None:
    """Why the position ``lsn`` on timeline ``tli`` is on an abandoned branch (None if not):
    some archived timeline forked off ``tli`` at or before ``lsn``."""
    for other, hist in sorted(cat.histories.items()):
        for e in hist:
            if e.tli == tli and e.switch_lsn <= lsn:
                return (
                    f"timeline {tli} was abandoned at {format_lsn(e.switch_lsn)}, where timeline "
                    f"{_child_of(tli, other, hist)} forked off; {format_lsn(lsn)} on timeline {tli} "
                    "is WAL no surviving timeline contains (restore to an LSN before "
                    f"{format_lsn(e.switch_lsn)}, or along timeline {other})"
                )
    return None


def _child_of(tli: int, leaf: int, hist: Sequence[layout.HistoryEntry]) -> int:
    for i, e in enumerate(hist):
        if e.tli == tli:
            return hist[i + 1].tli if i + 1 < len(hist) else leaf
    return leaf


@dataclass(frozen=True, slots=True)
class Coverage:
    segments: list[str]  # the unbroken run from the start, in order
    gap: str | None  # the first segment missing on the path (None: the path's WAL ends there)
    after_gap: list[str]  # segments on the path present beyond the gap


def coverage(
    cat: Catalog,
    start_lsn: int,
    target_tli: int,
    hist: Sequence[layout.HistoryEntry],
    seg_size: int = layout.DEFAULT_SEGMENT_SIZE,
) -> Coverage:
    """The WAL present along the history of ``target_tli`` from ``start_lsn`` on."""
    present: dict[int, set[int]] = {}
    for name in cat.wal:
        seg = layout.parse_segment_name(name, seg_size)
        if seg is not None:
            present.setdefault(seg[1], set()).add(seg[0])
    h = list(hist)
    run: list[str] = []
    segno = layout.segno_of(start_lsn, seg_size)
    top = max(present, default=-1)
    gap: str | None = None
    while segno <= top:
        tli = layout.timeline_of((segno + 1) * seg_size - 1, target_tli, h)
        if tli in present.get(segno, ()):
            run.append(layout.segment_name(tli, segno, seg_size))
            segno += 1
            continue
        gap = layout.segment_name(tli, segno, seg_size)
        break
    after: list[str] = []
    if gap is not None:
        for s in range(segno + 1, top + 1):
            tli = layout.timeline_of((s + 1) * seg_size - 1, target_tli, h)
            if tli in present.get(s, ()):
                after.append(layout.segment_name(tli, s, seg_size))
    return Coverage(run, gap, after)


def _candidates(cat: Catalog, target: Target, backup_id: str | None) -> list[BackupRecord]:
    if backup_id is not None:
        b = cat.get(backup_id)
        if b is None:
            known = ", ".join(r.id for r in cat.records) or "none"
            raise RestoreRefused(f"{cat.repository}: no backup {backup_id!r} (backups: {known})")
        if not b.usable():
            raise RestoreRefused(
                f"{cat.repository}: backup {backup_id} is {b.status}"
                + (f" ({b.error})" if b.error else "")
                + "; only complete backups can be restored"
            )
        return [b]
    done = cat.complete()
    if not done:
        raise RestoreRefused(f"{cat.repository}: no complete backup")
    return done


def plan_restore(
    cat: Catalog,
    target: Target,
    backup_id: str | None = None,
    seg_size: int = layout.DEFAULT_SEGMENT_SIZE,
) -> RestorePlan:
    """Choose the backup and the timeline for ``target`` and check the archive on the way.

    Automatic choice: the newest complete backup that ends before the target (time: stop time
    <= target; LSN: stop LSN <= target on the target timeline's history; xid/name/latest: the
    newest), on the history of the target timeline.  With ``latest`` as target timeline, the
    newest archived timeline whose history contains the backup; backups on the newest timeline
    of the archive are preferred over backups on an abandoned branch.  Raises
    :class:`RestoreRefused` with every reason when nothing fits.
    """
    cands = _candidates(cat, target, backup_id)
    newest = archived_timelines(cat)[0]
    reasons: list[str] = []
    fits: list[RestorePlan] = []
    for b in cands:
        era = cat.lineage.era_of(b.system_identifier)
        if backup_id is None and era is not None and target.kind in ("latest", "xid", "name"):
            # Chosen automatically, an old-cluster backup would restore the data of before the
            # upgrade on the old major: only when the operator names it (--backup).
            reasons.append(
                f"backup {b.id} is of the cluster upgraded to PostgreSQL {era.upgraded_to_major} at "
                f"{era.end_text()}: not chosen for {target.describe()} (name it with --backup to "
                "restore that cluster as it was at its end, with its own major's binaries)"
            )
            continue
        try:
            fits.append(_plan_for(cat, b, target, seg_size))
        except RestoreRefused as e:
            reasons.append(str(e))
            continue
        if backup_id is None and fits[-1].timeline == newest:
            return fits[-1]
    if fits:
        plan = fits[0]
        if plan.era is not None:
            pass  # its own note says where it ends
        elif backup_id is None and target.timeline == "latest":
            plan.notes.append(
                f"no backup reaches the target on timeline {newest} (the newest in the archive); "
                f"restoring along timeline {plan.timeline}"
            )
        return plan
    if backup_id is not None:
        raise RestoreRefused(reasons[0])
    raise RestoreRefused(
        f"{cat.repository}: no backup can reach {target.describe()}:\n  " + "\n  ".join(reasons)
    )


def _plan_for(cat: Catalog, b: BackupRecord, target: Target, seg_size: int) -> RestorePlan:
    assert b.timeline is not None and b.stop_time is not None
    broken = chain_problem(b, {r.id: r for r in cat.records})
    if broken is not None:
        raise RestoreRefused(broken)
    era = cat.lineage.era_of(b.system_identifier)
    if era is not None:
        _check_within_era(b, era, target)
    tli, hist = _timeline_for(cat, b, target)
    _check_ends_before(cat, b, target, tli, hist)
    # --- the WAL on the way
    need = required_segments(b.start_lsn_int, b.stop_lsn_int, tli, hist, seg_size)
    cov = coverage(cat, b.start_lsn_int, tli, hist, seg_size)
    have = set(cov.segments)
    lacking = [s for s in need if s not in have]
    if lacking:
        raise RestoreRefused(
            f"backup {b.id}: WAL segment {lacking[0]} it needs to become consistent is not in "
            f"the archive of {cat.repository}"
        )
    last = cov.segments[-1] if cov.segments else None
    last_mod = cat.wal[last].modified if last else None
    plan = RestorePlan(b, tli, list(hist), list(cov.segments), last, last_mod, era=era)
    if cov.gap is not None and cov.after_gap:
        plan.notes.append(
            f"the archive has a gap on timeline {tli}'s history: {cov.gap} is missing, "
            f"{len(cov.after_gap)} later segment(s) ({cov.after_gap[0]} ...) cannot be reached"
        )
    if target.kind == "lsn":
        _prove_lsn_reached(plan, cat, target, cov, seg_size)
    elif target.kind == "time":
        _prove_time_reached(plan, cat, target, cov)
    else:
        plan.missing = "WAL not yet archived may hold the target (the segment being written is not archived)"
        if cov.after_gap and target.kind == "latest":
            raise RestoreRefused(
                f"restoring the latest state would silently stop at a gap: {plan.notes[-1]}; "
                "give an explicit target before the gap"
            )
    if era is not None:
        _era_reached(plan, era, cov, seg_size)
    return plan


def _check_within_era(b: BackupRecord, era: ClusterEra, target: Target) -> None:
    """A backup of a cluster a major upgrade replaced reaches that cluster's end, never past
    it: the later WAL is the new cluster's (another system identifier, another major)."""
    past = None
    if target.kind == "time" and target.time is not None and target.time > era.until:
        past = f"the target time {iso(target.time)} is after"
    elif target.kind == "lsn" and target.lsn is not None and era.until_lsn is not None:
        if target.lsn > era.until_lsn:
            past = f"the target LSN {format_lsn(target.lsn)} is after"
    if past is None:
        return
    to = f"PostgreSQL {era.upgraded_to_major}" if era.upgraded_to_major else "a new major"
    raise RestoreRefused(
        f"backup {b.id} is of the cluster {era.system_identifier} (PostgreSQL {era.pg_major or '?'}), "
        f"which was upgraded to {to} at {iso(era.until)}; {past} the upgrade: point-in-time "
        f"recovery across a major-version upgrade is impossible (the WAL after it is the new "
        f"cluster's). The newest point of the old cluster that can be reached is its end, "
        f"{era.end_text()}; for a later target restore a backup of the new cluster instead "
        "(`hakeeper backup list`: cluster current)"
    )


def _era_reached(plan: RestorePlan, era: ClusterEra, cov: Coverage, seg_size: int) -> None:
    """An old cluster's WAL ends at its end: once the archive holds it up to there, nothing a
    WAL switch could add is missing (the primary of today is the new cluster's)."""
    b = plan.backup
    if plan.proven or era.until_lsn is None:
        if plan.missing is not None and not plan.proven:
            plan.notes.append(f"the end of the old cluster's WAL is not recorded: {plan.missing}")
        plan.proven = True
    else:
        last = layout.wal_segments(era.until_lsn, era.until_lsn, plan.timeline, plan.history, seg_size)
        have = set(cov.segments)
        lacking = [x for x in last if x not in have]
        if lacking:
            plan.missing = (
                f"WAL segment {lacking[0]}, which holds the end of the cluster {era.system_identifier} "
                f"({era.end_text()}), is not in the archive"
            )
            plan.notes.append(plan.missing + ": recovery stops before that cluster's end")
        plan.proven = True
    plan.notes.append(
        f"backup {b.id} is of the cluster {era.system_identifier} (PostgreSQL {era.pg_major or '?'}), "
        f"upgraded to PostgreSQL {era.upgraded_to_major or '?'} at {iso(era.until)}: recovery goes "
        f"along timeline {plan.timeline} to that cluster's end ({era.end_text()}) at the latest, "
        f"and needs PostgreSQL {era.pg_major or '?'}'s binaries"
    )


def _timeline_for(cat: Catalog, b: BackupRecord, target: Target) -> tuple[int, list[layout.HistoryEntry]]:
    """The timeline to recover along (and its history), which must contain backup ``b``."""
    assert b.timeline is not None
    if target.timeline == "latest":
        tli = latest_timeline_for(b, cat)
        if tli is None:
            raise RestoreRefused(
                f"backup {b.id}: no archived timeline contains it (is the history file of its "
                f"timeline {b.timeline} missing?)"
            )
    elif target.timeline == "current":
        tli = b.stop_timeline or b.timeline
    else:
        tli = target.timeline
    hist = cat.history_of(tli)
    if hist is None:
        raise RestoreRefused(
            f"timeline {tli}: its history file {layout.history_name(tli)} is not in the archive "
            f"of {cat.repository}"
        )
    why = backup_on_path(b, tli, hist)
    if why is not None:
        raise RestoreRefused(why)
    era = cat.lineage.era_of(b.system_identifier)
    if era is not None and not era_timeline_allowed(era, tli, [(e.tli, e.switch_lsn) for e in hist]):
        raise RestoreRefused(
            f"backup {b.id} is of the cluster {era.system_identifier}, upgraded at {iso(era.until)}: "
            f"timeline {tli} is the new cluster's; that cluster's WAL ends at {era.end_text()}"
        )
    return tli, hist


def _check_ends_before(
    cat: Catalog, b: BackupRecord, target: Target, tli: int, hist: list[layout.HistoryEntry]
) -> None:
    """The backup must end before the target (a target LSN also on a branch still archived)."""
    assert b.stop_time is not None
    if target.kind == "time":
        assert target.time is not None
        if b.stop_time > target.time:
            raise RestoreRefused(
                f"backup {b.id} ended at {iso(b.stop_time)}, after the target time {iso(target.time)}"
            )
    if target.kind == "lsn":
        assert target.lsn is not None
        if b.stop_lsn_int > target.lsn:
            raise RestoreRefused(
                f"backup {b.id} ends at {b.stop_lsn}, after the target LSN {format_lsn(target.lsn)} "
                "(recovery cannot stop before the backup is consistent)"
            )
        tli_at = layout.timeline_of(target.lsn, tli, hist)
        gone = abandonment(tli_at, target.lsn, cat)
        if gone is not None:
            raise RestoreRefused(f"target LSN {format_lsn(target.lsn)}: {gone}")


def _prove_lsn_reached(plan: RestorePlan, cat: Catalog, target: Target, cov: Coverage, seg_size: int) -> None:
    """Proven when every segment up to the target LSN is archived; refused when one is missing
    and the rest lies beyond a gap."""
    assert target.lsn is not None
    b = plan.backup
    through = layout.wal_segments(b.start_lsn_int, target.lsn, plan.timeline, plan.history, seg_size)
    have = set(cov.segments)
    missing = [s for s in through if s not in have]
    if missing:
        plan.missing = (
            f"WAL segment {missing[0]} (needed to reach {format_lsn(target.lsn)} on timeline "
            f"{plan.timeline}) is not in the archive of {cat.repository}"
        )
        if cov.after_gap:
            raise RestoreRefused(plan.missing + "; " + plan.notes[-1])
    else:
        plan.proven = True
        plan.segments = through


def _prove_time_reached(plan: RestorePlan, cat: Catalog, target: Target, cov: Coverage) -> None:
    """Proven when a segment archived after the target time is reachable; refused when the WAL
    after the target time lies beyond a gap."""
    assert target.time is not None
    last_mod = plan.covered_until_modified
    if last_mod is not None and last_mod > target.time:
        plan.proven = True
    elif cov.after_gap and _newest(cat, cov.after_gap) > target.time:
        raise RestoreRefused(
            f"the WAL written after {iso(target.time)} lies beyond a gap in the archive: {plan.notes[-1]}"
        )
    else:
        plan.missing = (
            f"the archive of {cat.repository} holds no WAL written after {iso(target.time)} "
            f"(the newest segment on timeline {plan.timeline}'s history, {plan.covered_until}, was "
            f"archived at {iso(last_mod) if last_mod else '?'})"
        )


def _newest(cat: Catalog, names: Sequence[str]) -> dt.datetime:
    return max(cat.wal[n].modified for n in names)
