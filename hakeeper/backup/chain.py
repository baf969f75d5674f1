"""Chains of incremental base backups (PostgreSQL 17+): the pure rules, no I/O.

A chain is a full backup followed by incremental backups, each taken with
``pg_basebackup --incremental`` against the manifest of the one before it (its ``parent``).
Restoring a link needs every backup from the chain's full one to it (pg_combinebackup), so:

* a new incremental's parent is the newest complete backup of the repository, and only when
  that backup can carry it (:func:`choose_parent`): same system identifier, same timeline as
  the server now (a chain never crosses a timeline switch or a re-bootstrap), same major
  version, a manifest, an unbroken chain of its own; otherwise the backup is taken as a full
  and the reason is recorded;
* a chain is broken when one of its links is missing or not complete (:func:`chain_of`);
* retention keeps and removes whole chains (:func:`chain_groups`), never a parent of a backup
  it keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hakeeper.backup.catalog import MAX_LINKS, BackupRecord, BrokenChain, chain_of, chain_problem

__all__ = [
    "BrokenChain",
    "ParentChoice",
    "ancestors",
    "chain_groups",
    "chain_of",
    "chain_problem",
    "choose_parent",
    "major",
]


def major(version_num: int | None) -> int | None:
    """150018 -> 15, 170010 -> 17."""
    return None if version_num is None else version_num // 10000


@dataclass(frozen=True, slots=True)
class ParentChoice:
    """The parent of a new incremental backup, or why the backup is taken as a full."""

    parent: BackupRecord | None
    reason: str | None  # set when parent is None

    @property
    def chain_root(self) -> str | None:
        return None if self.parent is None else self.parent.root


def choose_parent(
    records: Iterable[BackupRecord], *, system_identifier: str, timeline: int | None, version_num: int
) -> ParentChoice:
    """The parent for an incremental backup of a server with ``system_identifier``, now on
    ``timeline`` and of ``version_num``: the newest complete backup, when it can carry one."""
    by_id = {r.id: r for r in records}
    done = sorted((r for r in by_id.values() if r.usable()), key=lambda r: (r.stop_time, r.id), reverse=True)
    if not done:
        return ParentChoice(None, "no complete backup in the repository to be incremental to")
    p = done[0]
    if p.system_identifier != system_identifier:
        return ParentChoice(
            None,
            f"the newest backup {p.id} is of system identifier {p.system_identifier}, the server's is "
            f"{system_identifier} (re-bootstrapped): a chain never spans two clusters",
        )
    p_tli = p.stop_timeline or p.timeline
    if timeline is None or p_tli != timeline:
        return ParentChoice(
            None,
            f"the newest backup {p.id} ended on timeline {p_tli}, the server is on timeline {timeline} "
            "(a promotion since): a chain never crosses a timeline switch",
        )
    if major(p.pg_version) != major(version_num):
        return ParentChoice(
            None,
            f"the newest backup {p.id} is of PostgreSQL {major(p.pg_version)}, "
            f"the server runs {major(version_num)}",
        )
    if p.manifest is None:
        return ParentChoice(None, f"the newest backup {p.id} has no stored backup_manifest")
    why = chain_problem(p, by_id)
    if why is not None:
        return ParentChoice(None, why)
    return ParentChoice(p, None)


def chain_groups(records: Iterable[BackupRecord]) -> dict[str, list[BackupRecord]]:
    """Backups by the id of their chain's full backup (a full alone is a chain of one), each
    list oldest first."""
    out: dict[str, list[BackupRecord]] = {}
    for r in sorted(records, key=lambda r: r.id):
        out.setdefault(r.root, []).append(r)
    return out


def ancestors(rec: BackupRecord, records: Mapping[str, BackupRecord]) -> list[str]:
    """Ids of the backups ``rec`` needs (its parents up to the full), whatever their state."""
    out: list[str] = []
    cur = rec
    while cur.kind == "incremental" and cur.parent is not None and len(out) <= MAX_LINKS:
        out.append(cur.parent)
        nxt = records.get(cur.parent)
        if nxt is None:
            break
        cur = nxt
    return out
