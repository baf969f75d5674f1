"""Parallel unpacking of an indexed backup (layout ``zstd-indexed``; see backup/fileindex.py).

A full restore first creates the tree from the index -- directories, symbolic links, and every
file at its final size, owned by PostgreSQL's OS user -- and then ``jobs`` workers each take a
part: fetch it (the repository checks the stored bytes' size and SHA-256), decompress it
(zstd checks the frame's checksum of the content, and the size must be the index's) and
``pwrite`` every member slice it holds at the member's file offset.  Parts are independent zstd
frames, compressed by the backup (:func:`compress_part`) and stored as they are, so the SHA-256
covers the compressed bytes -- far fewer than the data -- and the workers never wait for each
other; zstd and ``os.pwrite`` release the GIL, so the workers' threads use every CPU.

``global/pg_control`` is written last, after every other byte is in place and flushed: a
directory left by a restore that failed or was killed half-way never holds a pg_control, so no
PostgreSQL starts on it and nothing takes it for a good copy (the caller empties it on failure
as well).  A corrupt or missing part fails the unpack with the part's object key.

Delta restores (backup/delta.py) use :func:`write_extents` with only the changed blocks.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from hakeeper.backup import catalog
from hakeeper.backup.errors import CorruptObject, RepoError
from hakeeper.backup.fileindex import (
    CONTROL_FILE,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    BadIndex,
    Extent,
    FileIndex,
    assign_to_parts,
    parse_index,
    whole_file_extents,
)
from hakeeper.backup.repo import Repository
from hakeeper.util.fsutil import fsync_dir
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

log = get_logger(__name__)

ProgressFn = Callable[[str, int, int | None], None]


class UnpackError(Exception):
    """The unpack failed; the message names the part or file."""


@dataclass(frozen=True, slots=True)
class UnpackStats:
    parts_fetched: int
    bytes_fetched: int  # stored (compressed) bytes of the parts fetched
    bytes_written: int  # file bytes written
    bytes_total: int  # the backup's file bytes (the index's)
    seconds_fetch: float  # wall time the workers spent waiting for the repository, / jobs


async def load_index(repo: Repository, scope: str, rec: catalog.BackupRecord) -> FileIndex:
    """The backup's index, fetched (checked against its SHA-256) and validated."""
    if rec.index is None:
        raise UnpackError(f"backup {rec.id} has no file index (layout {rec.layout})")
    key = catalog.object_key(scope, rec.id, rec.index.name)
    try:
        raw = await repo.get(key)
    except RepoError as e:
        raise UnpackError(f"the index {key} cannot be read: {e}") from e
    if len(raw) != rec.index.size:
        raise UnpackError(f"the index {key} is {len(raw)} bytes, the record says {rec.index.size}")
    try:
        return await asyncio.to_thread(parse_index, raw, len(rec.parts))
    except BadIndex as e:
        log.error("restore_index_refused", backup=rec.id, key=key, reason=str(e))
        raise UnpackError(f"the index {key} is not one a backup can have written: {e}") from None


def _chown_fd(fd: int, ra: RunAs) -> None:
    if ra.uid is not None and ra.gid is not None:
        os.fchown(fd, ra.uid, ra.gid)


def parent_fd(root: Path, rel: str) -> tuple[int, str]:
    """A descriptor of the directory holding ``root/rel`` and the last name, reached one name at
    a time without following a symbolic link anywhere below ``root``.

    Why: the directories below ``root`` are the PostgreSQL user's (created for it, or an old
    copy it owns); running as root, a directory swapped for a link meanwhile must not lead a
    write, mode or owner change out of the data directory."""
    *dirs, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in dirs:
            nxt = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def open_under(root: Path, rel: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of ``root/rel`` that follows no symbolic link below ``root``."""
    pfd, name = parent_fd(root, rel)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=pfd)
    finally:
        os.close(pfd)


def create_file(root: Path, rel: str, mode: int, size: int, ra: RunAs, *, exclusive: bool = True) -> None:
    """A file of ``size`` bytes (a hole until written), mode ``mode``, owned by ``ra``; never
    through a symbolic link.  Not ``exclusive``: an existing file is truncated or extended."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else 0)
    fd = open_under(root, rel, flags)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, mode)
        _chown_fd(fd, ra)
    finally:
        os.close(fd)


def set_dir_mode(root: Path, rel: str, mode: int, ra: RunAs) -> None:
    """Mode and owner of directory ``root/rel``, never through a symbolic link (as root, a link
    planted in an old copy would hand its target to the PostgreSQL user)."""
    fd = open_under(root, rel, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchmod(fd, mode)
        _chown_fd(fd, ra)
    finally:
        os.close(fd)


def make_dir(root: Path, rel: str) -> None:
    pfd, name = parent_fd(root, rel)
    try:
        os.mkdir(name, 0o700, dir_fd=pfd)
    finally:
        os.close(pfd)


def make_link(root: Path, rel: str, target: str, ra: RunAs) -> None:
    pfd, name = parent_fd(root, rel)
    try:
        os.symlink(target, name, dir_fd=pfd)
        if ra.uid is not None and ra.gid is not None:
            os.chown(name, ra.uid, ra.gid, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


def prepare_tree(data_dir: Path, index: FileIndex, ra: RunAs) -> None:
    """Directories, links and pre-sized files of a full restore into the empty ``data_dir``
    (blocking).  The index lists every parent before its children (parse_index checked it)."""
    for m in index.members:
        if m.kind == KIND_DIR:
            make_dir(data_dir, m.path)
            set_dir_mode(data_dir, m.path, m.mode, ra)
        elif m.kind == KIND_LINK:
            assert m.link is not None
            make_link(data_dir, m.path, m.link, ra)
        elif m.kind == KIND_FILE and m.path != CONTROL_FILE:  # pg_control: see write_control
            create_file(data_dir, m.path, m.mode, m.size, ra)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _write_slices(
    data_dir: Path,
    slices: Sequence[tuple[Extent, int, int, int]],
    data: bytes,
    deferred: list[tuple[int, bytes]],
) -> int:
    """Write one part's slices (blocking; a worker thread).  pg_control's are kept for last."""
    view = memoryview(data)
    written = 0
    fd: int | None = None
    fd_path = ""
    try:
        for e, in_part, in_extent, n in slices:
            chunk = view[in_part : in_part + n]
            if e.path == CONTROL_FILE:  # written last (write_control)
                deferred.append((e.file_offset + in_extent, bytes(chunk)))
                continue
            if fd is None or fd_path != e.path:
                if fd is not None:
                    os.close(fd)
                    fd = None
                fd = open_under(data_dir, e.path, os.O_WRONLY)
                fd_path = e.path
            _pwrite_all(fd, chunk, e.file_offset + in_extent)
            written += n
    finally:
        if fd is not None:
            os.close(fd)
    return written


def write_control(data_dir: Path, index: FileIndex, deferred: Sequence[tuple[int, bytes]], ra: RunAs) -> int:
    """pg_control created, written and fsynced (blocking): the last file of a restore, so that
    a directory a failed or killed restore leaves has none.  (A backup without one -- nothing
    PostgreSQL writes -- gets none.)"""
    m = index.by_path().get(CONTROL_FILE)
    if m is None or m.kind != KIND_FILE:
        return 0
    create_file(data_dir, CONTROL_FILE, m.mode, m.size, ra, exclusive=False)
    fd = open_under(data_dir, CONTROL_FILE, os.O_WRONLY)
    try:
        for off, b in deferred:
            _pwrite_all(fd, memoryview(b), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sum(len(b) for _, b in deferred)


def _first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]


def compress_part(data: bytes | memoryview, level: int) -> bytes:
    """A part as it is stored: one zstd frame with its content size and checksum (blocking)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(data)


def _decompress_part(blob: bytes, size: int, key: str) -> bytes:
    """A part's content; zstd checks the frame's checksum of the decompressed bytes."""
    try:
        data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    except zstandard.ZstdError as e:
        raise UnpackError(f"part {key} does not decompress: {e}") from None
    if len(data) != size:
        raise UnpackError(f"part {key} is {len(data)} bytes uncompressed, the index says {size}")
    return data


def _unpack_part(
    blob: bytes,
    size: int,
    key: str,
    data_dir: Path,
    slices: Sequence[tuple[Extent, int, int, int]],
    deferred: list[tuple[int, bytes]],
) -> int:
    """Decompress one part and write its slices (blocking: a worker thread; zstd and pwrite
    release the GIL)."""
    data = _decompress_part(blob, size, key)
    del blob
    try:
        return _write_slices(data_dir, slices, data, deferred)
    except OSError as e:
        raise UnpackError(f"writing part {key} into {data_dir}: {e}") from e


async def write_extents(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    index: FileIndex,
    extents: Sequence[Extent],
    data_dir: Path,
    *,
    jobs: int,
    progress: ProgressFn | None = None,
    deferred: list[tuple[int, bytes]],
) -> UnpackStats:
    """Fetch the parts holding ``extents`` (``jobs`` at a time) and write the extents into the
    existing files of ``data_dir``.  pg_control's slices go to ``deferred`` for the caller to
    write last (:func:`write_control`).  UnpackError names a part that cannot be fetched or
    does not match its record."""
    work = assign_to_parts(extents, index.part_sizes)
    total = sum(sl[3] for w in work for sl in w.slices)
    jobs = max(1, jobs)
    sem = asyncio.Semaphore(jobs)
    done = 0
    fetched = 0
    fetch_secs = 0.0

    async def one(i: int, slices: Sequence[tuple[Extent, int, int, int]]) -> None:
        nonlocal done, fetched, fetch_secs
        part = rec.parts[i]
        key = catalog.object_key(scope, rec.id, part.name)
        async with sem:
            t0 = time.monotonic()
            try:
                # the stored zstd frame, checked against its SHA-256 (and size) on the way
                blob = await repo.get(key)
                if len(blob) != part.size:
                    raise CorruptObject(key, f"{len(blob)} bytes, the record says {part.size}")
            except RepoError as e:
                log.error("restore_part_failed", backup=rec.id, part=key, reason=str(e))
                raise UnpackError(f"part {key}: {e}") from e
            fetch_secs += time.monotonic() - t0
            fetched += part.stored_size
            try:
                n = await asyncio.to_thread(
                    _unpack_part, blob, index.part_sizes[i], key, data_dir, slices, deferred
                )
            except UnpackError as e:
                log.error("restore_part_failed", backup=rec.id, part=key, reason=str(e))
                raise
            del blob
            done += n
            if progress is not None:
                progress("fetch", done, total)

    try:
        async with asyncio.TaskGroup() as tg:  # the first failure cancels the other workers
            for w in work:
                tg.create_task(one(w.index, w.slices))
    except BaseExceptionGroup as eg:
        # the first failure is the news (the others were cancelled because of it)
        raise _first_error(eg) from None
    return UnpackStats(
        parts_fetched=len(work),
        bytes_fetched=fetched,
        bytes_written=total,
        bytes_total=index.data_bytes,
        seconds_fetch=fetch_secs / jobs,
    )


async def unpack_full(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    ra: RunAs,
    *,
    jobs: int,
    progress: ProgressFn | None = None,
    before_control: Callable[[], None] | None = None,
) -> UnpackStats:
    """An indexed backup unpacked into the empty ``data_dir``: tree first, then the parts by
    ``jobs`` workers, then ``before_control`` (the caller's flush), then pg_control."""
    from_index = await load_index(repo, scope, rec)
    await asyncio.to_thread(prepare_tree, data_dir, from_index, ra)
    deferred: list[tuple[int, bytes]] = []
    stats = await write_extents(
        repo,
        scope,
        rec,
        from_index,
        whole_file_extents(from_index),
        data_dir,
        jobs=jobs,
        progress=progress,
        deferred=deferred,
    )
    if before_control is not None:
        await asyncio.to_thread(before_control)
    await asyncio.to_thread(write_control, data_dir, from_index, deferred, ra)
    await asyncio.to_thread(fsync_dir, data_dir / "global")
    return stats
