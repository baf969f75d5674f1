"""Retention: which backups and which archived WAL ``hakeeper backup expire`` removes.

Per repository (``retention`` in its configuration):

* ``full_count: N`` keeps the newest N complete backups; ``full_days: D`` keeps every complete
  backup that ended within D days plus the newest one that ended before (so every moment of the
  window stays restorable).  With both, a backup either rule keeps is kept; with neither, no
  complete backup is expired.
* Incremental backups (PostgreSQL 17+): whole chains only (:func:`keep_chains`): a full backup
  and every incremental taken against it are kept or expired together; ``full_count`` counts
  full backups; an incremental whose chain is broken is expired.
* Never expired: a backup in progress (a ``running`` record refreshed within
  :data:`~hakeeper.backup.catalog.STALE_AFTER`), or the newest complete backup.
* Always expired: failed backups, abandoned ``running`` ones, and backup prefixes without a
  record that are older than an hour (left by an interrupted expire or backup).
* WAL: once at least one complete backup is kept, an archived segment (also ``.partial`` and
  ``.backup`` files) is removed when it is older than every kept backup: on the backup's
  timeline or an older one, and before the segment the backup starts in.  Timeline history
  files are always kept.
* ``wal_days: W`` narrows that to a point-in-time recovery window: all WAL is kept from the
  newest kept backup that ended at least W days ago on (every moment of the last W days stays
  restorable); of the kept backups older than that, only the WAL from each one's start to its
  end (``wal_start`` .. ``wal_stop``), so each can still be restored to its end.

A backup is removed record first (from then on it is not usable), then its other objects.
:func:`plan_expire` is pure; :func:`expire` reads the catalog and carries the plan out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field

from hakeeper.backup import catalog, layout
from hakeeper.backup.catalog import BackupRecord, BackupStatus, Catalog
from hakeeper.backup.repo import Repository
from hakeeper.core import timefmt
from hakeeper.core.backup_config import RetentionConfig
from hakeeper.util.log import get_logger

log = get_logger(__name__)

ORPHAN_AFTER = dt.timedelta(hours=1)
_WAL_SEGMENT_PART = re.compile(r"^([0-9A-F]{24})(?:\.partial|\.[0-9A-F]{8}\.backup)?$")


@dataclass
class ExpiredBackup:
    id: str
    status: str
    reason: str
    objects: list[str]
    stored_size: int


@dataclass
class ExpirePlan:
    repository: str
    dry_run: bool = False
    backups: list[ExpiredBackup] = field(default_factory=list)
    wal: list[str] = field(default_factory=list)  # object names
    kept: list[str] = field(default_factory=list)  # complete backups kept
    running: list[str] = field(default_factory=list)
    wal_boundary: list[tuple[int, str]] = field(default_factory=list)  # (timeline, first kept segment)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "repository": self.repository,
            "dry_run": self.dry_run,
            "backups": [
                {
                    "id": b.id,
                    "status": b.status,
                    "reason": b.reason,
                    "objects": b.objects,
                    "stored_size": b.stored_size,
                }
                for b in self.backups
            ],
            "wal": self.wal,
            "kept": self.kept,
            "running": self.running,
            "wal_kept_from": [{"timeline": t, "segment": s} for t, s in self.wal_boundary],
            "notes": self.notes,
        }


def keep_set(
    done: list[BackupRecord], retention: RetentionConfig, now: dt.datetime
) -> tuple[set[str], dict[str, str]]:
    """Which complete backups (newest first in ``done``) to keep, and why each other one goes."""
    if not done:
        return set(), {}
    if retention.full_count is None and retention.full_days is None:
        return {b.id for b in done}, {}
    keep: set[str] = {done[0].id}  # never the newest (so never the only one)
    why: dict[str, str] = {}
    if retention.full_count is not None:
        keep |= {b.id for b in done[: retention.full_count]}
    if retention.full_days is not None:
        cutoff = now - dt.timedelta(days=retention.full_days)
        inside = [b for b in done if b.stop_time is not None and b.stop_time >= cutoff]
        keep |= {b.id for b in inside}
        older = [b for b in done if b.stop_time is not None and b.stop_time < cutoff]
        if older:
            keep.add(older[0].id)  # the window's start must stay restorable
    for i, b in enumerate(done):
        if b.id in keep:
            continue
        parts = []
        if retention.full_count is not None:
            parts.append(f"not among the newest {retention.full_count} (number {i + 1})")
        if retention.full_days is not None:
            parts.append(f"older than {retention.full_days:g} days and not needed to cover them")
        why[b.id] = "; ".join(parts)
    return keep, why


def _whole_chains(
    cat: Catalog, by_id: dict[str, BackupRecord]
) -> tuple[list[BackupRecord], set[str], dict[str, str]]:
    """The complete backups whose chains are whole (newest first); those with a broken chain
    kept all the same because some record could not be read (the missing link may be that
    record); why each other broken one goes."""
    why: dict[str, str] = {}
    whole: list[BackupRecord] = []
    unsure: set[str] = set()
    for b in cat.complete():
        broken = catalog.chain_problem(b, by_id)
        if broken is None:
            whole.append(b)
        elif cat.problems:
            unsure.add(b.id)
        else:
            why[b.id] = broken
    return whole, unsure, why


def keep_chains(
    cat: Catalog, retention: RetentionConfig, now: dt.datetime
) -> tuple[set[str], dict[str, str]]:
    """:func:`keep_set` for a repository with incremental backups: retention keeps or removes
    whole chains (a full backup and the incrementals taken against it), never the parent of a
    backup it keeps.  ``full_count`` counts full backups (chains); ``full_days`` keeps the chain
    of every backup that ended within the window and of the newest one that ended before it;
    the chain of the newest backup, and of a backup still running, is always kept.  An
    incremental whose chain is broken (a link missing or failed) cannot be restored: it goes --
    unless some record could not be read (``cat.problems``): the missing link may be that
    record, so nothing with a broken chain is removed then."""
    by_id = {r.id: r for r in cat.records}
    whole, unsure, why = _whole_chains(cat, by_id)
    # the root as the parents lead to it, not the record's own chain_root (a record's word)
    root = {b.id: catalog.chain_of(b, by_id)[0].id for b in whole}
    fulls = [b for b in whole if b.kind == "full"]
    if not whole:
        return unsure, why
    if retention.full_count is None and retention.full_days is None:
        return {b.id for b in whole} | unsure, why
    roots: set[str] = {root[whole[0].id]}  # never the newest (so never the only one)
    for r in cat.records:
        if r.status is BackupStatus.RUNNING and not r.abandoned(now):
            roots.add(r.root)
            if r.parent is not None and r.parent in root:
                roots.add(root[r.parent])  # the chain its parent really belongs to
    if retention.full_count is not None:
        roots |= {b.id for b in fulls[: retention.full_count]}
    if retention.full_days is not None:
        cutoff = now - dt.timedelta(days=retention.full_days)
        roots |= {root[b.id] for b in whole if b.stop_time is not None and b.stop_time >= cutoff}
        older = [b for b in whole if b.stop_time is not None and b.stop_time < cutoff]
        if older:
            roots.add(root[older[0].id])  # the window's start must stay restorable
    keep = {b.id for b in whole if root[b.id] in roots} | unsure
    numbers = {b.id: i + 1 for i, b in enumerate(fulls)}
    for b in whole:
        if b.id in keep:
            continue
        parts = []
        if retention.full_count is not None:
            n = numbers.get(root[b.id])
            where = f"number {n}" if n is not None else "its full backup is gone"
            parts.append(
                f"chain {root[b.id]} not among the newest {retention.full_count} full backups ({where})"
            )
        if retention.full_days is not None:
            parts.append(
                f"chain {root[b.id]} older than {retention.full_days:g} days and not needed to cover them"
            )
        why[b.id] = "; ".join(parts)
    return keep, why


def plan_expire(
    cat: Catalog, scope: str, retention: RetentionConfig, now: dt.datetime | None = None
) -> ExpirePlan:
    now = now or catalog.utcnow()
    plan = ExpirePlan(cat.repository)
    done = cat.complete()
    keep, why = keep_chains(cat, retention, now)
    plan.kept = [b.id for b in done if b.id in keep]
    _plan_backups(plan, cat, scope, keep, why, now)
    if cat.problems:
        plan.notes.extend(cat.problems)
        plan.notes.append("unreadable backup records: WAL is not expired until they are fixed or removed")
        return plan
    # WAL: older than every kept backup (and every running one that knows its start)
    kept_done = [b for b in done if b.id in keep]  # newest first
    if not kept_done:
        plan.notes.append("no complete backup: archived WAL is kept")
        return plan
    protected: list[tuple[set[int], int, int]] = []  # (timelines, first segno, last segno)
    if retention.wal_days is not None:
        kept_done, protected = _wal_window(plan, kept_done, retention.wal_days, now)
    anchors = kept_done + [
        b for b in cat.records if b.id in plan.running and b.start_lsn is not None and b.timeline is not None
    ]
    bounds: list[tuple[int, int]] = []
    for b in anchors:
        assert b.timeline is not None
        bounds.append((b.timeline, layout.segno_of(b.start_lsn_int)))
    plan.wal_boundary = sorted({(t, layout.segment_name(t, s)) for t, s in bounds})
    plan.wal = _expired_wal(cat, scope, bounds, protected)
    return plan


def _objects_of(cat: Catalog, scope: str, bid: str) -> list[str]:
    names = [e.name for e in cat.objects.get(bid, [])]
    record = catalog.record_key(scope, bid)
    # the record first: once it is gone the backup is no longer usable
    return ([record] if record in names else []) + sorted(n for n in names if n != record)


def _stored(cat: Catalog, bid: str) -> int:
    return sum(e.stored_size for e in cat.objects.get(bid, []))


def _plan_backups(
    plan: ExpirePlan, cat: Catalog, scope: str, keep: set[str], why: dict[str, str], now: dt.datetime
) -> None:
    """The backups to expire (not kept, failed, abandoned, orphaned objects), and the running ones."""
    for b in cat.records:
        if b.id in keep:
            continue
        if b.status is BackupStatus.RUNNING and not b.abandoned(now):
            plan.running.append(b.id)
            continue
        plan.backups.append(
            ExpiredBackup(
                b.id,
                b.effective_status(now),
                _expiry_reason(b, why, now),
                _objects_of(cat, scope, b.id),
                _stored(cat, b.id),
            )
        )
    for bid, entries in sorted(cat.orphans.items()):
        newest = max(e.modified for e in entries)
        if now - newest > ORPHAN_AFTER:
            plan.backups.append(
                ExpiredBackup(
                    bid,
                    "orphan",
                    f"objects without a {catalog.RECORD_NAME}",
                    _objects_of(cat, scope, bid),
                    _stored(cat, bid),
                )
            )
        else:
            plan.notes.append(f"{bid}: objects without a record, newer than an hour: left alone")


def _expiry_reason(b: BackupRecord, why: dict[str, str], now: dt.datetime) -> str:
    if b.usable():
        return why.get(b.id, "retention")
    if b.id in why:
        return why[b.id]
    if b.status is BackupStatus.COMPLETE:
        return "record incomplete (no start/stop position)"
    if b.abandoned(now):
        return f"abandoned: running, but not updated since {timefmt.iso(b.updated_at)}"
    return f"failed: {b.error or 'unknown error'}"


def _wal_window(
    plan: ExpirePlan, kept_done: list[BackupRecord], wal_days: float, now: dt.datetime
) -> tuple[list[BackupRecord], list[tuple[set[int], int, int]]]:
    """With a WAL recovery window: all WAL is kept from the newest backup that ends before the
    window on, and only their own WAL of the older kept backups.  Returns the backups whose WAL
    is kept from their start on, and the ranges kept of the others."""
    window_start = now - dt.timedelta(days=wal_days)
    cut = next(
        (i for i, b in enumerate(kept_done) if b.stop_time is not None and b.stop_time <= window_start),
        None,
    )
    if cut is None:
        return kept_done, []
    ranges: list[tuple[set[int], int, int]] = []
    for b in kept_done[cut + 1 :]:  # older than the window's base: their own WAL only
        first = layout.parse_segment_name(b.wal_start or "")
        last = layout.parse_segment_name(b.wal_stop or "")
        if first is None or last is None:
            return kept_done, []  # its WAL range is not recorded: keep all WAL from it on
        ranges.append(({first[0], last[0]}, first[1], last[1]))
    if ranges:
        plan.notes.append(
            f"WAL kept from backup {kept_done[cut].id} on (the {wal_days:g}-day "
            f"recovery window); of {len(ranges)} older backup(s) only their own WAL"
        )
    return kept_done[: cut + 1], ranges


def _expired_wal(
    cat: Catalog, scope: str, bounds: list[tuple[int, int]], protected: list[tuple[set[int], int, int]]
) -> list[str]:
    """The archived segments before every bound (timeline, segno) and outside the protected ranges."""
    expired: list[str] = []
    prefix = layout.wal_prefix(scope)
    for name in sorted(cat.wal):
        m = _WAL_SEGMENT_PART.match(name)
        if m is None:
            continue  # .history and anything unknown stay
        seg = layout.parse_segment_name(m.group(1))
        if seg is None:
            continue
        tli, segno = seg
        if any(tli in tlis and lo <= segno <= hi for tlis, lo, hi in protected):
            continue
        if all(tli <= bt and segno < bs for bt, bs in bounds):
            expired.append(prefix + name)
    return expired


async def expire(
    repo: Repository, scope: str, retention: RetentionConfig, *, dry_run: bool = False
) -> ExpirePlan:
    cat = await catalog.load_catalog(repo, scope, histories=False)
    plan = plan_expire(cat, scope, retention)
    plan.dry_run = dry_run
    if dry_run:
        return plan
    for b in plan.backups:
        for name in b.objects:
            await repo.delete(name)
        log.info("backup_expired", repo=repo.name, id=b.id, reason=b.reason, objects=len(b.objects))
    sem = asyncio.Semaphore(16)  # S3 deletes are one request each

    async def delete(name: str) -> None:
        async with sem:
            await repo.delete(name)

    await asyncio.gather(*(delete(n) for n in plan.wal))
    if plan.wal:
        log.info("wal_expired", repo=repo.name, files=len(plan.wal), first=plan.wal[0], last=plan.wal[-1])
    return plan
