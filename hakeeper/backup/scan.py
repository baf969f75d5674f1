"""``hakeeper repo verify``: the checksum scan of a repository (what pgBackRest calls verify;
hakeeper's ``verify`` is the restore drill, :mod:`hakeeper.backup.verify`).

Every object below ``<scope>/`` is read in full and checked:

* the codec's SHA-256 trailer (and, in an encrypted repository, the authentication of every
  sealed record) -- a flipped byte anywhere is *corrupt*;
* a backup's parts and manifest against the size and SHA-256 its ``backup.json`` recorded --
  another object under that name is a *mismatch*;
* what is recorded but absent: a complete backup's parts and manifest, and the WAL segments it
  needs to be consistent -- *missing*;
* an incremental backup whose chain lacks a link (its parent, or a parent's parent, missing or
  not complete) -- *broken-chain*: it cannot be restored.

Archived WAL has no checksum besides the trailer; the trailer covers every byte of it.
Reading is bounded (``parallel`` objects at once), streamed (no object whole in memory).
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from hakeeper.backup import catalog, layout
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.repo import Repository
from hakeeper.util.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # missing | corrupt | mismatch | unreadable | broken-chain
    object: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "object": self.object, "detail": self.detail}


@dataclass
class ScanReport:
    repository: str
    objects: int = 0
    bytes: int = 0  # uncompressed bytes read and hashed
    wal_files: int = 0
    backups: int = 0
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None  # the scan itself could not run (listing failed)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "ok": self.ok,
            "objects": self.objects,
            "bytes": self.bytes,
            "wal_files": self.wal_files,
            "backups": self.backups,
            "problems": [p.to_dict() for p in self.problems],
            "error": self.error,
        }


async def _digest(repo: Repository, name: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    async with aclosing(repo.get_stream(name)) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _expected(scope: str, cat: catalog.Catalog) -> dict[str, tuple[str, catalog.StoredObject]]:
    """Object name -> (backup id, what its record says) for every complete backup."""
    out: dict[str, tuple[str, catalog.StoredObject]] = {}
    for rec in cat.records:
        if not rec.usable():
            continue  # running or failed: parts may be absent on purpose
        for so in [
            *rec.parts,
            *([rec.manifest] if rec.manifest else []),
            *([rec.index] if rec.index else []),
        ]:
            out[catalog.object_key(scope, rec.id, so.name)] = (rec.id, so)
    return out


def _missing_wal(cat: catalog.Catalog) -> list[tuple[str, str]]:
    """(segment, backup id) for each segment a complete backup needs that is not archived."""
    out: list[tuple[str, str]] = []
    for rec in cat.records:
        if not rec.usable():
            continue
        hist = cat.history_of(rec.stop_timeline or rec.timeline or 1) or []
        need = catalog.required_segments(rec.start_lsn_int, rec.stop_lsn_int, rec.stop_timeline or 1, hist)
        out.extend((s, rec.id) for s in need if s not in cat.wal)
    return out


async def scan_repository(repo: Repository, scope: str, parallel: int = 4) -> ScanReport:
    """Check every object of ``scope`` in ``repo`` (see the module doc)."""
    rep = ScanReport(repo.name)
    try:
        listing = await repo.list_objects(f"{scope}/")
        cat = await catalog.load_catalog(repo, scope, wal=True, histories=True)
    except (RepoError, OSError, ValueError) as e:
        rep.error = str(e) or type(e).__name__
        log.error("repository_scan_failed", repo=repo.name, error=rep.error)
        return rep
    rep.backups = len(cat.records)
    rep.wal_files = len(cat.wal)
    rep.problems.extend(Problem("corrupt", "backup.json", p) for p in cat.problems)
    expected = _expected(scope, cat)
    present = {e.name for e in listing}
    for name, (bid, _so) in sorted(expected.items()):
        if name not in present:
            rep.problems.append(Problem("missing", name, f"part of backup {bid} (recorded, not stored)"))
    by_id = {r.id: r for r in cat.records}
    for rec in cat.records:  # an incremental without its whole chain cannot be restored
        broken = catalog.chain_problem(rec, by_id) if rec.usable() else None
        if broken is not None:
            rep.problems.append(Problem("broken-chain", catalog.record_key(scope, rec.id), broken))
    for seg, bid in _missing_wal(cat):
        rep.problems.append(
            Problem("missing", layout.wal_key(scope, seg), f"WAL backup {bid} needs to be consistent")
        )
    sem = asyncio.Semaphore(parallel)

    async def one(name: str) -> None:
        async with sem:
            try:
                size, sha = await _digest(repo, name)
            except NotFound:
                return  # removed since the listing (expire): not damage
            except CorruptObject as e:
                rep.problems.append(Problem("corrupt", name, e.reason))
                return
            except (RepoError, OSError) as e:
                rep.problems.append(Problem("unreadable", name, str(e)))
                return
        rep.objects += 1
        rep.bytes += size
        if name in expected:
            bid, so = expected[name]
            if (size, sha) != (so.size, so.sha256):
                rep.problems.append(
                    Problem(
                        "mismatch",
                        name,
                        f"backup {bid} recorded {so.size} bytes sha256 {so.sha256}; stored: {size} bytes "
                        f"sha256 {sha}",
                    )
                )

    await asyncio.gather(*(one(e.name) for e in listing))
    rep.problems.sort(key=lambda p: (p.object, p.kind))
    for p in rep.problems:
        log.error("repository_object_bad", repo=repo.name, kind=p.kind, object=p.object, detail=p.detail)
    log.info(
        "repository_scanned", repo=repo.name, objects=rep.objects, bytes=rep.bytes, problems=len(rep.problems)
    )
    return rep
