"""The 3-2-1 policy check (``hakeeper backup policy``): for every retained base backup and dump,
whether it has at least 3 copies, on at least 2 storage types, at least 1 of them off-site.

Copies are counted in the configured repositories only (the live database is not counted: an
old backup's point in time exists nowhere else).  A repository holds a copy of a base backup
when it has the complete record **and** every WAL segment the backup needs; of a dump, when it
has the complete record.  The storage type of a repository is its ``storage`` setting (default
``disk`` for fs, ``object`` for s3); ``offsite`` is its flag.  A repository that cannot be read
counts as holding nothing, and the report says so.

:func:`evaluate` is pure; :func:`check_policy` reads the repositories.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hakeeper.backup import catalog, dump
from hakeeper.backup.errors import RepoError
from hakeeper.backup.repos import make_repository
from hakeeper.core import timefmt
from hakeeper.core.backup_config import BackupConfig, RepositoryConfig


@dataclass(frozen=True, slots=True)
class Rule:
    copies: int = 3
    storage_types: int = 2
    offsite: int = 1

    def describe(self) -> str:
        return f"{self.copies} copies, {self.storage_types} storage types, {self.offsite} off-site"


@dataclass(frozen=True, slots=True)
class RepoFacts:
    name: str
    storage: str
    offsite: bool

    @classmethod
    def of(cls, rc: RepositoryConfig) -> RepoFacts:
        return cls(rc.name, rc.storage_type, rc.offsite)


@dataclass(frozen=True, slots=True)
class Item:
    """One backup or dump and the repositories holding a usable copy of it."""

    id: str
    kind: str  # "backup" | "dump"
    time: dt.datetime | None
    holders: tuple[str, ...]


@dataclass
class PolicyRow:
    id: str
    kind: str
    time: dt.datetime | None
    repositories: list[str]
    storage_types: list[str]
    offsite: list[str]
    ok: bool
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "time": timefmt.iso(self.time) if self.time else None,
            "copies": len(self.repositories),
            "repositories": self.repositories,
            "storage_types": self.storage_types,
            "offsite": self.offsite,
            "ok": self.ok,
            "missing": self.missing,
        }


def evaluate(items: Sequence[Item], repos: Mapping[str, RepoFacts], rule: Rule) -> list[PolicyRow]:
    """One row per item, newest first: does it meet ``rule``, and what is missing if not."""
    rows = []
    for it in sorted(
        items, key=lambda i: (i.time or dt.datetime.min.replace(tzinfo=dt.UTC), i.id), reverse=True
    ):
        holders = sorted(h for h in set(it.holders) if h in repos)
        types = sorted({repos[h].storage for h in holders})
        off = [h for h in holders if repos[h].offsite]
        missing = []
        if len(holders) < rule.copies:
            missing.append(f"{len(holders)} of {rule.copies} copies")
        if len(types) < rule.storage_types:
            missing.append(
                f"{len(types)} of {rule.storage_types} storage types ({', '.join(types) or 'none'})"
            )
        if len(off) < rule.offsite:
            missing.append(f"{len(off)} of {rule.offsite} off-site copies")
        rows.append(PolicyRow(it.id, it.kind, it.time, holders, types, off, not missing, missing))
    return rows


@dataclass
class PolicyReport:
    rule: Rule
    rows: list[PolicyRow]
    repositories: list[RepoFacts]
    unreadable: dict[str, str]  # repository -> error
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows) and not self.unreadable

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "rule": {
                "copies": self.rule.copies,
                "storage_types": self.rule.storage_types,
                "offsite": self.rule.offsite,
            },
            "repositories": [
                {"name": r.name, "storage": r.storage, "offsite": r.offsite} for r in self.repositories
            ],
            "unreadable": self.unreadable,
            "items": [r.to_dict() for r in self.rows],
            "notes": self.notes,
        }


async def _holdings(rc: RepositoryConfig, scope: str) -> tuple[list[Item], list[str]]:
    """Usable backups (with their WAL) and dumps in one repository, one Item each."""
    notes: list[str] = []
    async with make_repository(rc) as repo:
        cat = await catalog.load_catalog(repo, scope)
        dcat = await dump.load_dumps(repo, scope)
    items = []
    for b in cat.complete():
        hist = cat.history_of(b.stop_timeline or b.timeline or 1)
        need = catalog.required_segments(b.start_lsn_int, b.stop_lsn_int, b.stop_timeline or 1, hist or [])
        lacking = [s for s in need if s not in cat.wal]
        if hist is None or lacking:
            notes.append(
                f"{rc.name}: backup {b.id} lacks WAL it needs ({lacking[0] if lacking else 'history'})"
            )
            continue
        items.append(Item(b.id, "backup", b.stop_time, (rc.name,)))
    items.extend(Item(d.id, "dump", d.stop_time, (rc.name,)) for d in dcat.complete())
    return items, notes


async def check_policy(cfg: BackupConfig, scope: str, rule: Rule = Rule()) -> PolicyReport:
    facts = [RepoFacts.of(rc) for rc in cfg.repositories]
    unreadable: dict[str, str] = {}
    notes: list[str] = []
    merged: dict[tuple[str, str], Item] = {}

    async def one(rc: RepositoryConfig) -> None:
        try:
            items, n = await _holdings(rc, scope)
        except RepoError as e:
            unreadable[rc.name] = str(e)
            return
        notes.extend(n)
        for it in items:
            key = (it.kind, it.id)
            prev = merged.get(key)
            merged[key] = (
                it if prev is None else Item(it.id, it.kind, prev.time or it.time, prev.holders + it.holders)
            )

    await asyncio.gather(*(one(rc) for rc in cfg.repositories))
    rows = evaluate(list(merged.values()), {f.name: f for f in facts}, rule)
    if not rows:
        notes.append("no complete backup or dump in any repository")
    return PolicyReport(rule, rows, facts, unreadable, sorted(notes))
