"""Parallel unpacking of an indexed backup (layout ``zstd-indexed``; see backup/fileindex.py).

A full restore first creates the tree from the index -- directories, symbolic links, and every
file at its final size, owned by PostgreSQL's OS user -- and then ``jobs`` workers each take a
part: fetch it (the repository checks the stored bytes' size and SHA-256), decompress it as a
stream (zstd checks the frame's checksum of the content at its end, and the size must be the
index's) and ``pwrite`` every member slice it holds at the member's file offset as it comes,
whole 4 KiB blocks with ``O_DIRECT`` (:class:`_PartWriter` says why).  Parts are independent zstd
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
import concurrent.futures
import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    bytes_direct: int = 0  # of bytes_written, written with O_DIRECT


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


DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes
DIRECT_CHUNK = 8 << 20  # bytes per O_DIRECT write
DIRECT_MIN = 256 << 10  # smaller runs (a delta's scattered blocks) go through the page cache


class ByteSource(Protocol):
    """Decompressed bytes read in order (a part, or a whole tar stream: backup/untar.py)."""

    def read_exactly(self, view: memoryview) -> None: ...


def skip_bytes(reader: ByteSource, n: int, scratch: memoryview) -> None:
    """Read and drop ``n`` bytes (what lies between the slices a worker writes)."""
    while n > 0:
        k = min(n, len(scratch))
        reader.read_exactly(scratch[:k])
        n -= k


_WRITERS: concurrent.futures.ThreadPoolExecutor | None = None
_WRITERS_LOCK = threading.Lock()


def _write_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that carry out O_DIRECT writes while their part goes on decompressing."""
    global _WRITERS
    with _WRITERS_LOCK:
        if _WRITERS is None:
            _WRITERS = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="restore-write")
        return _WRITERS


@dataclass
class _Pending:
    """A direct write under way: what to write through the page cache if O_DIRECT fails."""

    future: concurrent.futures.Future[None]
    fd: int
    view: memoryview
    offset: int


class _PartWriter:
    """Writes one part's slices as its zstd frame is decompressed (blocking: a worker thread).

    The decompressed bytes stream through small buffers instead of a whole part in memory, and
    runs of whole 4 KiB blocks are written with ``O_DIRECT`` from page-aligned buffers: on
    this kind of machine buffered writes of gigabytes stall in the kernel's dirty-page
    throttling (docs/decisions.md: 9 GB written at 0.43 GB/s buffered, 1.3 GB/s direct, with
    the same decompression).  Two buffers take turns: while one is written (a thread of
    :func:`_write_pool`; an O_DIRECT write waits for the disk) the next is decompressed into.
    Partial blocks at a slice's ends -- shared with a neighbouring slice another worker may
    write -- and short runs go through the page cache; a file system without O_DIRECT (EINVAL)
    gets every write through the page cache."""

    def __init__(self, data_dir: Path, direct: bool) -> None:
        self.data_dir = data_dir
        self.direct = direct
        self.path = ""
        self.fd: int | None = None
        self.dfd: int | None = None
        # page-aligned
        self.bufs = [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(2)] if direct else []
        self.turn = 0
        self.pending: _Pending | None = None
        self.small = bytearray(DIRECT_CHUNK if not direct else DIRECT_MIN)
        self.direct_bytes = 0  # written with O_DIRECT

    def _settle(self) -> None:
        """Wait for the write under way; one O_DIRECT refused (EINVAL: an alignment this file
        system does not take) is written through the page cache, and so is everything after."""
        p, self.pending = self.pending, None
        if p is None:
            return
        try:
            p.future.result()
            self.direct_bytes += len(p.view)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct = False
            assert self.fd is not None
            _pwrite_all(self.fd, p.view, p.offset)

    def close(self) -> None:
        try:
            self._settle()
        finally:
            for fd in (self.fd, self.dfd):
                if fd is not None:
                    os.close(fd)
            self.fd = self.dfd = None
            self.path = ""

    def release(self) -> None:
        """Close everything, after the write under way, whatever happened: the path that
        succeeded called :meth:`close` itself, which raises a failed write."""
        try:
            self.close()
        except OSError:
            pass  # the failure being handled already is the news
        finally:
            self._free()

    def _free(self) -> None:
        for buf in self.bufs:
            # after a failure a traceback may still hold a view of it: then the collector frees it
            with contextlib.suppress(BufferError):
                buf.close()

    def _open(self, path: str) -> None:
        if path != self.path:
            self.close()
            self.fd = open_under(self.data_dir, path, os.O_WRONLY)
            self.path = path

    def _direct_fd(self) -> int | None:
        if self.dfd is None and self.direct:
            try:
                self.dfd = open_under(self.data_dir, self.path, os.O_WRONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # the file system has no O_DIRECT
        return self.dfd

    def copy(self, reader: ByteSource, path: str, offset: int, n: int) -> None:
        """``n`` bytes from ``reader`` to ``path`` at ``offset``."""
        self._open(path)
        head = min(n, -offset % DIRECT_ALIGN) if n >= DIRECT_MIN else n
        self._buffered(reader, offset, head)
        offset += head
        n -= head
        whole = n - n % DIRECT_ALIGN
        if whole:
            dfd = self._direct_fd() if self.direct else None
            if dfd is None:
                self._buffered(reader, offset, whole)
            else:
                self._direct(reader, dfd, offset, whole)
            offset += whole
            n -= whole
        self._buffered(reader, offset, n)

    def _buffered(self, reader: ByteSource, offset: int, n: int) -> None:
        assert self.fd is not None
        view = memoryview(self.small)
        while n > 0:
            k = min(n, len(view))
            reader.read_exactly(view[:k])
            _pwrite_all(self.fd, view[:k], offset)
            offset += k
            n -= k

    def _direct(self, reader: ByteSource, dfd: int, offset: int, n: int) -> None:
        while n > 0:
            k = min(n, DIRECT_CHUNK)
            # the buffer of two turns ago: its write was settled before the last one started
            chunk = memoryview(self.bufs[self.turn])[:k]
            self.turn ^= 1
            reader.read_exactly(chunk)
            self._settle()
            if self.direct:
                fut = _write_pool().submit(_pwrite_all, dfd, chunk, offset)
                self.pending = _Pending(fut, dfd, chunk, offset)
            else:
                assert self.fd is not None
                _pwrite_all(self.fd, chunk, offset)
            offset += k
            n -= k


class _Reader:
    """A part's decompressed content, read in order (zstd checks the frame's checksum of the
    content when the stream reaches its end)."""

    def __init__(self, blob: bytes, size: int, key: str) -> None:
        self.stream = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=False)
        self.size = size
        self.key = key
        self.pos = 0

    def read_exactly(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.stream.readinto(view[got:])
                if n <= 0:
                    raise UnpackError(
                        f"part {self.key} is {self.pos + got} bytes uncompressed, the index says {self.size}"
                    )
                got += n
        except zstandard.ZstdError as e:
            raise UnpackError(f"part {self.key} does not decompress: {e}") from None
        self.pos += got

    def skip(self, n: int, scratch: memoryview) -> None:
        skip_bytes(self, n, scratch)

    def finish(self, scratch: memoryview) -> None:
        """Read to the end: the size must be the index's and the frame's checksum must hold."""
        self.skip(self.size - self.pos, scratch)
        try:
            extra = self.stream.read(1)
        except zstandard.ZstdError as e:
            raise UnpackError(f"part {self.key} does not decompress: {e}") from None
        if extra:
            raise UnpackError(f"part {self.key} holds more than the {self.size} bytes the index says")


def write_control(data_dir: Path, index: FileIndex, deferred: Sequence[tuple[int, bytes]], ra: RunAs) -> int:
    """pg_control created, written and fsynced (blocking): the last file of a restore, so that
    a directory a failed or killed restore leaves has none.  (A backup without one -- nothing
    PostgreSQL writes -- gets none.)"""
    m = index.by_path().get(CONTROL_FILE)
    if m is None or m.kind != KIND_FILE:
        return 0
    write_control_file(data_dir, m.mode, m.size, deferred, ra)
    return sum(len(b) for _, b in deferred)


def write_control_file(
    data_dir: Path, mode: int, size: int, chunks: Sequence[tuple[int, bytes]], ra: RunAs
) -> None:
    """``global/pg_control`` of ``size`` bytes from ``(offset, bytes)`` chunks, fsynced
    (blocking; an earlier one, from a delta's old copy, is replaced in place)."""
    create_file(data_dir, CONTROL_FILE, mode, size, ra, exclusive=False)
    fd = open_under(data_dir, CONTROL_FILE, os.O_WRONLY)
    try:
        for off, b in chunks:
            _pwrite_all(fd, memoryview(b), off)
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _unpack_part(
    blob: bytes,
    size: int,
    key: str,
    data_dir: Path,
    slices: Sequence[tuple[Extent, int, int, int]],
    deferred: list[tuple[int, bytes]],
    direct: bool,
) -> tuple[int, int]:
    """Decompress one part and write its slices as they come (blocking: a worker thread; zstd
    and pwrite release the GIL).  pg_control's slices are kept for last.  Returns the bytes
    written and how many of them with O_DIRECT."""
    reader = _Reader(blob, size, key)
    writer = _PartWriter(data_dir, direct)
    scratch = memoryview(bytearray(1 << 20))
    written = 0
    try:
        for e, in_part, in_extent, n in sorted(slices, key=lambda sl: sl[1]):
            if in_part < reader.pos:
                raise UnpackError(f"part {key}: slices of the index overlap at {in_part}")
            reader.skip(in_part - reader.pos, scratch)
            if e.path == CONTROL_FILE:  # written last (write_control)
                held = bytearray(n)
                reader.read_exactly(memoryview(held))
                deferred.append((e.file_offset + in_extent, bytes(held)))
                continue
            writer.copy(reader, e.path, e.file_offset + in_extent, n)
            written += n
        reader.finish(scratch)
        writer.close()  # the last write done (its failure raised here)
    except OSError as e:
        raise UnpackError(f"writing part {key} into {data_dir}: {e}") from e
    finally:
        writer.release()
    return written, writer.direct_bytes


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
    direct: bool = True,
) -> UnpackStats:
    """Fetch the parts holding ``extents`` (``jobs`` at a time) and write the extents into the
    existing files of ``data_dir``.  pg_control's slices go to ``deferred`` for the caller to
    write last (:func:`write_control`); ``direct``: whole blocks with O_DIRECT where the file
    system allows it (:class:`_PartWriter`).  UnpackError names a part that cannot be fetched or
    does not match its record."""
    work = assign_to_parts(extents, index.part_sizes)
    total = sum(sl[3] for w in work for sl in w.slices)
    jobs = max(1, jobs)
    sem = asyncio.Semaphore(jobs)
    done = 0
    fetched = 0
    fetch_secs = 0.0
    direct_bytes = 0

    async def one(i: int, slices: Sequence[tuple[Extent, int, int, int]]) -> None:
        nonlocal done, fetched, fetch_secs, direct_bytes
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
                n, nd = await asyncio.to_thread(
                    _unpack_part, blob, index.part_sizes[i], key, data_dir, slices, deferred, direct
                )
            except UnpackError as e:
                log.error("restore_part_failed", backup=rec.id, part=key, reason=str(e))
                raise
            del blob
            done += n
            direct_bytes += nd
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
        bytes_direct=direct_bytes,
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
    after: Callable[[FileIndex], object] | None = None,
) -> UnpackStats:
    """An indexed backup unpacked into the empty ``data_dir``: tree first, then the parts by
    ``jobs`` workers, then ``before_control`` (the caller's flush), then pg_control, then
    ``after`` with the index (blocking, in a thread; the restore's record of what it wrote)."""
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
    if after is not None:
        await asyncio.to_thread(after, from_index)
    return stats
