"""Copies of base backups and dumps between repositories (``hakeeper backup copy``), for the
3-2-1 rule (see :mod:`hakeeper.backup.policy`).

An object is copied in its codec form (:meth:`~hakeeper.backup.repo.Repository.get_stored` ->
:meth:`~hakeeper.backup.repo.Repository.put_stored`): no decompression and recompression, the
copy is the same bytes (an encrypted repository decrypts what it gives and seals what it takes,
with its own key: the comparisons below are of the codec form).  On the way the source's
content is decoded and checked against its SHA-256 trailer (a corrupt source object is never
copied; the write is abandoned before it is committed), and afterwards the copy is read back
and its bytes compared with the source's by SHA-256 and size.

A base backup is useless without the WAL from its start to its end: the segments it needs (and
every timeline history file) that the target lacks are copied too; segments already in the
target are checked to have the same content.  An incremental backup is copied with its chain
(its full backup and every incremental between, parents first): the target can restore it
alone.  WAL written after the backup reaches the target
through archiving (the archiver pushes to every repository).

The record (``backup.json`` / ``dump.json``) is written last, with ``repository`` set to the
target: until then the target holds objects without a record, which neither ``list`` nor
restore use (and expire removes after an hour if the copy died).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from hakeeper.backup import catalog, codec, dump, layout
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.phases import collect, phase, phases_dict
from hakeeper.backup.repo import Repository
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import BackupConfig, RepositoryConfig
from hakeeper.util.log import get_logger

log = get_logger(__name__)

ProgressFn = Callable[[str, int, int | None], None]
PARALLEL = 4


class CopyError(Exception):
    """The copy failed or was refused; the message says why."""


class NotInSource(CopyError):
    """The source repository has no such backup or dump."""


@dataclass
class CopyResult:
    item_id: str
    kind: str  # "backup" or "dump"
    source: str
    target: str
    objects: int = 0  # data objects copied
    stored_bytes: int = 0
    wal_copied: int = 0
    wal_present: int = 0  # needed segments (and history files) the target had already
    already_there: bool = False  # the target held a complete copy: nothing was copied
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.item_id,
            "kind": self.kind,
            "source": self.source,
            "target": self.target,
            "objects": self.objects,
            "stored_bytes": self.stored_bytes,
            "wal_copied": self.wal_copied,
            "wal_present": self.wal_present,
            "already_there": self.already_there,
            "seconds": round(self.seconds, 3),
            # one pipeline per object (read, check, write, read back): one wall time
            "phases": phases_dict(collect(copy=phase(self.seconds, self.stored_bytes))),
            "notes": self.notes,
        }


async def copy_object(src: Repository, dst: Repository, name: str) -> int:
    """Copy one object byte for byte (verifying the source's content on the way and the copy's
    bytes afterwards); return its stored size."""
    dec = codec.Decoder(name)
    digest = hashlib.sha256()
    size = 0

    async def verified() -> AsyncGenerator[bytes, None]:
        nonlocal size
        async for chunk in src.get_stored(name):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.to_thread(dec.feed, chunk)
            yield chunk
        await asyncio.to_thread(dec.finish)  # raises CorruptObject before the copy is committed

    await dst.put_stored(name, verified())
    back = hashlib.sha256()
    back_size = 0
    async for chunk in dst.get_stored(name):
        back.update(chunk)
        back_size += len(chunk)
    if back_size != size or back.hexdigest() != digest.hexdigest():
        raise CopyError(
            f"{dst.name}: {name}: the copy reads back different bytes ({back_size} vs {size} bytes)"
        )
    return size


async def _present(dst: Repository, src: Repository, name: str) -> bool:
    """Whether ``dst`` has ``name`` with the same content as ``src`` (CopyError if it has other
    content: the target is never overwritten with different WAL)."""
    try:
        there = await dst.stat(name)
    except NotFound:
        return False
    except CorruptObject:
        return False  # a damaged copy: replaced by a good one
    mine = await src.stat(name)
    if (there.sha256, there.size) != (mine.sha256, mine.size):
        raise CopyError(
            f"{dst.name} holds {name} with other content (sha256 {there.sha256}, {src.name}: "
            f"{mine.sha256}); refusing to overwrite archived WAL"
        )
    return True


async def _copy_all(
    src: Repository, dst: Repository, names: list[str], res: CopyResult, progress: ProgressFn | None
) -> None:
    sem = asyncio.Semaphore(PARALLEL)
    if progress is not None:  # the phase begins before the first object is copied
        progress("copy", res.objects, len(names))

    async def one(n: str) -> None:
        async with sem:
            copied = await copy_object(src, dst, n)
            # not `res.stored_bytes += await ...`: that reads the sum before the await, and the
            # copies running beside this one would lose their additions
            res.stored_bytes += copied
            res.objects += 1
            if progress is not None:
                progress("copy", res.objects, len(names))

    await dump.all_or_first_error(one(n) for n in names)


async def _copy_wal(src: Repository, dst: Repository, scope: str, names: list[str], res: CopyResult) -> None:
    sem = asyncio.Semaphore(PARALLEL)

    async def one(fname: str) -> None:
        key = layout.wal_key(scope, fname)
        async with sem:
            if await _present(dst, src, key):
                res.wal_present += 1
                return
            await copy_object(src, dst, key)
            res.wal_copied += 1

    await dump.all_or_first_error(one(n) for n in names)


_Rec = TypeVar("_Rec", catalog.BackupRecord, dump.DumpRecord)


async def _usable(read: Awaitable[_Rec], src: Repository, what: str, item_id: str) -> _Rec:
    """The record ``read`` returns, if complete; NotInSource / CopyError otherwise."""
    try:
        rec = await read
    except NotFound:
        raise NotInSource(f"{src.name}: no {what} {item_id!r}") from None
    except ValueError as e:
        raise CopyError(str(e)) from None
    if not rec.usable():
        raise CopyError(f"{src.name}: {what} {item_id} is {rec.status}; only complete {what}s are copied")
    return rec


async def copy_backup(
    src: Repository, dst: Repository, scope: str, backup_id: str, progress: ProgressFn | None = None
) -> CopyResult:
    res = CopyResult(backup_id, "backup", src.name, dst.name)
    rec = await _usable(catalog.read_record(src, scope, backup_id), src, "backup", backup_id)
    assert rec.timeline is not None
    # the WAL it needs, along the history of the timeline it ended on
    wal_names = [
        e.name[len(layout.wal_prefix(scope)) :] for e in await src.list_objects(layout.wal_prefix(scope))
    ]
    histories = [n for n in wal_names if layout.parse_history_name(n) is not None]
    stop_tli = rec.stop_timeline or rec.timeline
    hist: list[layout.HistoryEntry] = []
    if stop_tli != 1:
        if layout.history_name(stop_tli) not in histories:
            raise CopyError(f"{src.name}: {layout.history_name(stop_tli)} is not in the archive")
        hist = (await catalog.load_histories(src, scope, [layout.history_name(stop_tli)]))[stop_tli]
    need = catalog.required_segments(rec.start_lsn_int, rec.stop_lsn_int, stop_tli, hist)
    lacking = [s for s in need if s not in set(wal_names)]
    if lacking:
        raise CopyError(
            f"{src.name}: WAL segment {lacking[0]} backup {backup_id} needs is not in its archive"
        )
    existing = await _existing(dst, catalog.record_key(scope, backup_id), catalog.BackupRecord)
    await _copy_wal(src, dst, scope, histories + need, res)
    if existing is not None and existing.usable():
        res.already_there = True
        res.notes.append(f"{dst.name} holds a complete copy of backup {backup_id} already")
        return res
    prefix = layout.backup_prefix(scope, backup_id)
    record = catalog.record_key(scope, backup_id)
    names = [e.name for e in await src.list_objects(prefix) if e.name != record]
    expected = (
        {prefix + p.name for p in rec.parts}
        | ({prefix + rec.manifest.name} if rec.manifest else set())
        | ({prefix + rec.index.name} if rec.index else set())
    )
    if not expected <= set(names):
        raise CopyError(f"{src.name}: backup {backup_id} lacks {sorted(expected - set(names))[0]}")
    await _copy_all(src, dst, names, res, progress)
    rec.repository = dst.name
    await dst.put(record, rec.to_json())
    return res


async def copy_chain(
    src: Repository, dst: Repository, scope: str, backup_id: str, progress: ProgressFn | None = None
) -> CopyResult:
    """Copy a backup with the whole chain it needs (an incremental backup: its full backup and
    every incremental between, parents first, each with its WAL), so that the target can
    restore it on its own.  A link the target holds already is left as it is."""
    rec = await _usable(catalog.read_record(src, scope, backup_id), src, "backup", backup_id)
    links = [rec]
    while links[0].kind == "incremental":
        parent_id = links[0].parent
        if parent_id is None:
            raise CopyError(f"{src.name}: incremental backup {links[0].id} names no parent")
        try:
            parent = await _usable(catalog.read_record(src, scope, parent_id), src, "backup", parent_id)
        except CopyError as e:
            raise CopyError(f"{src.name}: the chain of backup {backup_id} is broken: {e}") from None
        if len(links) > catalog.MAX_LINKS:
            raise CopyError(f"{src.name}: the chain of backup {backup_id} is too long (a cycle?)")
        links.insert(0, parent)
    total = CopyResult(backup_id, "backup", src.name, dst.name, already_there=True)
    for link in links:
        one = await copy_backup(src, dst, scope, link.id, progress)
        total.objects += one.objects
        total.stored_bytes += one.stored_bytes
        total.wal_copied += one.wal_copied
        total.wal_present += one.wal_present
        total.already_there = total.already_there and one.already_there
        total.notes.extend(one.notes)
    if len(links) > 1:
        total.notes.append(f"chain copied parents first: {' -> '.join(link.id for link in links)}")
    return total


async def copy_dump(
    src: Repository, dst: Repository, scope: str, dump_id: str, progress: ProgressFn | None = None
) -> CopyResult:
    res = CopyResult(dump_id, "dump", src.name, dst.name)
    rec = await _usable(dump.read_record(src, scope, dump_id), src, "dump", dump_id)
    existing = await _existing(dst, dump.record_key(scope, dump_id), dump.DumpRecord)
    if existing is not None and existing.usable():
        res.already_there = True
        res.notes.append(f"{dst.name} holds a complete copy of dump {dump_id} already")
        return res
    prefix = dump.dump_prefix(scope, dump_id)
    names = [prefix + n for n in rec.object_names()]
    await _copy_all(src, dst, names, res, progress)
    rec.repository = dst.name
    await dst.put(dump.record_key(scope, dump_id), rec.to_json())
    return res


async def _existing(dst: Repository, key: str, model: type[_Rec]) -> _Rec | None:
    try:
        return model.model_validate_json(await dst.get(key))
    except (NotFound, CorruptObject, ValueError):
        return None


async def copy_item(
    src: Repository, dst: Repository, scope: str, item_id: str, progress: ProgressFn | None = None
) -> CopyResult:
    """Copy the base backup or dump ``item_id`` (dump ids start with ``D``) from ``src`` to
    ``dst`` and verify the copy.  Idempotent: a complete copy in ``dst`` is left as it is."""
    if src.name == dst.name:
        raise CopyError("source and target are the same repository")
    t0 = time.monotonic()
    try:
        if dump.is_dump_id(item_id):
            res = await copy_dump(src, dst, scope, item_id, progress)
        else:
            res = await copy_chain(src, dst, scope, item_id, progress)
    except CorruptObject as e:
        raise CopyError(f"{src.name}: {e}; nothing was recorded in {dst.name}") from e
    except RepoError as e:
        raise CopyError(f"copy of {item_id} from {src.name} to {dst.name}: {e}") from e
    res.seconds = time.monotonic() - t0
    log.info(
        "copy_done",
        id=item_id,
        kind=res.kind,
        source=src.name,
        target=dst.name,
        objects=res.objects,
        wal_copied=res.wal_copied,
        already=res.already_there,
    )
    return res


def _repo_cfg(cfg: BackupConfig, name: str) -> RepositoryConfig:
    for r in cfg.repositories:
        if r.name == name:
            return r
    raise CopyError(
        f"unknown repository {name!r} (configured: {', '.join(r.name for r in cfg.repositories)})"
    )


async def copy_to(
    cfg: BackupConfig,
    scope: str,
    item_id: str,
    target: str,
    *,
    source: str | None = None,
    progress: ProgressFn | None = None,
) -> CopyResult:
    """Copy a base backup or dump to the repository named ``target`` from ``source`` (default:
    the first other configured repository holding a complete copy).  For schedules and the CLI;
    raises :class:`CopyError`."""
    dst_cfg = _repo_cfg(cfg, target)
    candidates = [_repo_cfg(cfg, source)] if source else [r for r in cfg.repositories if r.name != target]
    reasons: list[str] = []
    async with make_repository(dst_cfg) as dst:
        for rc in candidates:
            async with make_repository(rc) as src:
                try:
                    return await copy_item(src, dst, scope, item_id, progress)
                except NotInSource as e:
                    if source is not None:
                        raise
                    reasons.append(str(e))
    raise CopyError("; ".join(reasons) or f"no repository besides {target} to copy from")
