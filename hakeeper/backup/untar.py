"""Extraction of a backup without a file index (layouts ``zstd-stream`` and ``zstd-parts``): the
parts, fetched in order by the caller, are one sequence of zstd frames holding pg_basebackup's
tar stream; a worker thread decodes it here and writes the members the way an indexed restore
writes its parts (backup/unpack.py: whole 4 KiB blocks with ``O_DIRECT``, the rest through the
page cache), instead of piping it to ``tar -x``.

Why not tar: GNU tar writes through the page cache, and a restore of gigabytes then spends its
time in the kernel's dirty-page throttling (docs/decisions.md, "Restore writes whole blocks with
O_DIRECT"); the decoding stays on one core either way, since a server-compressed stream is one
zstd frame.

The stream comes from a repository that may have been tampered with (its parts passed their
SHA-256 against the record, which an attacker with write access may have rewritten too), so
the members are checked as :mod:`hakeeper.backup.fileindex` checks an index: tar header
checksums, normalised relative paths, regular files, directories and symbolic links only, no
setuid/setgid/sticky modes, nothing
written through a link (every path is opened one name at a time without following links:
unpack.open_under), no member twice.  ``global/pg_control`` is written last, after the caller's
flush, as by an indexed restore: a directory a failed restore leaves never starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from hakeeper.backup import catalog
from hakeeper.backup.errors import CorruptObject
from hakeeper.backup.fileindex import (
    _FILE_TYPES,
    _MAX_META_BODY,
    CONTROL_FILE,
    BadIndex,
    _pax_records,
    _safe_path,
    tar_checksum_ok,
    tar_number,
)
from hakeeper.backup.repo import Repository
from hakeeper.backup.unpack import (
    UnpackError,
    _PartWriter,
    create_file,
    make_dir,
    make_link,
    set_dir_mode,
    skip_bytes,
    write_control_file,
)
from hakeeper.util.fsutil import fsync_dir
from hakeeper.util.proc import RunAs

END = None  # what the feeder puts after the last part


class Aborted(Exception):
    """The other side gave up (the feeder failed, or the extraction did)."""


class PartQueue:
    """The compressed stream, part after part, from the event loop (``put``, through a thread)
    to the extracting thread (``read``, as zstd's source).  ``abort`` wakes either side."""

    def __init__(self, depth: int) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=max(1, depth))
        self._cur = memoryview(b"")
        self._ended = False
        self.aborted = threading.Event()
        self.wait_s = 0.0  # time the extraction waited for the next part

    def put(self, part: bytes | None) -> None:
        """Blocking (a worker thread of the feeder): wait for room, unless aborted."""
        while not self.aborted.is_set():
            try:
                self._q.put(part, timeout=0.2)
                return
            except queue.Full:
                continue
        raise Aborted()

    def abort(self) -> None:
        self.aborted.set()

    def read(self, n: int = -1) -> bytes:
        while not self._cur:
            if self._ended:
                return b""
            t0 = time.monotonic()
            while True:
                if self.aborted.is_set():
                    raise Aborted()
                try:
                    nxt = self._q.get(timeout=0.2)
                    break
                except queue.Empty:
                    continue
            self.wait_s += time.monotonic() - t0
            if nxt is None:
                self._ended = True
                return b""
            self._cur = memoryview(nxt)
        k = len(self._cur) if n is None or n < 0 else min(n, len(self._cur))
        out = bytes(self._cur[:k])
        self._cur = self._cur[k:]
        return out


class _Stream:
    """The decompressed tar stream, read in order (zstd checks every frame's checksum)."""

    def __init__(self, source: PartQueue, what: str) -> None:
        self.stream = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", source), read_across_frames=True
        )
        self.what = what
        self.pos = 0

    def readinto_some(self, view: memoryview) -> int:
        try:
            return int(self.stream.readinto(view))
        except zstandard.ZstdError as e:
            raise UnpackError(f"{self.what}: the compressed stream does not decode: {e}") from None

    def read_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.readinto_some(view[got:])
            if n <= 0:
                raise UnpackError(f"{self.what}: the tar stream ends at {self.pos + got}, inside a member")
            got += n
        self.pos += got

    def skip(self, n: int, scratch: memoryview) -> None:
        skip_bytes(self, n, scratch)

    def drain(self, scratch: memoryview) -> None:
        """Read to the end of the stream (the archive's padding; every frame checked)."""
        while self.readinto_some(scratch) > 0:
            pass


@dataclass
class Extracted:
    files: int = 0
    bytes_written: int = 0
    bytes_direct: int = 0


@dataclass(frozen=True, slots=True)
class Header:
    """One member of the tar stream, long names and pax records applied."""

    path: str  # normalised, relative; "" for the data directory itself
    kind: bytes
    mode: int
    size: int
    link: str


class _Members:
    """The members of the tar stream, one header at a time (their bodies are the caller's to
    read, then :meth:`end_body` skips the padding)."""

    def __init__(self, stream: _Stream, what: str) -> None:
        self.stream = stream
        self.what = what
        self.scratch = memoryview(bytearray(1 << 20))
        self._hdr = memoryview(bytearray(512))
        self._pad = 0
        self._name: str | None = None
        self._link: str | None = None
        self._size: int | None = None

    def next(self) -> Header | None:
        """The next member, or None at the end-of-archive marker."""
        zero_blocks = 0
        while True:
            self.stream.read_exactly(self._hdr)
            raw = bytes(self._hdr)
            if raw.count(0) == 512:
                zero_blocks += 1
                if zero_blocks == 2:
                    return None
                continue
            if zero_blocks:
                raise UnpackError(
                    f"{self.what}: tar data after an end-of-archive block at {self.stream.pos - 512}"
                )
            if not tar_checksum_ok(raw):
                raise UnpackError(f"{self.what}: bad tar header checksum at offset {self.stream.pos - 512}")
            kind = raw[156:157]
            size = tar_number(raw[124:136])
            if kind in (b"L", b"K", b"x", b"g"):
                self._meta(kind, size)
                continue
            return self._member(raw, kind, size)

    def _meta(self, kind: bytes, size: int) -> None:
        """A long name, long link name or pax header: applies to the next member."""
        if size > _MAX_META_BODY:
            raise UnpackError(f"{self.what}: a {kind.decode()} header body of {size} bytes")
        body = bytearray(size)
        self.stream.read_exactly(memoryview(body))
        self.stream.skip(-size % 512, self.scratch)
        text = bytes(body).split(b"\0", 1)[0].decode(errors="surrogateescape")
        if kind == b"L":
            self._name = text
        elif kind == b"K":
            self._link = text
        elif kind == b"x":
            rec = _pax_records(bytes(body))
            self._name = rec.get("path", self._name)
            self._link = rec.get("linkpath", self._link)
            if "size" in rec:
                self._size = int(rec["size"])

    def _member(self, raw: bytes, kind: bytes, size: int) -> Header:
        name = raw[:100].split(b"\0", 1)[0].decode(errors="surrogateescape")
        if raw[257:262] == b"ustar":
            prefix = raw[345:500].split(b"\0", 1)[0].decode(errors="surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        link = raw[157:257].split(b"\0", 1)[0].decode(errors="surrogateescape")
        if self._name is not None:
            name, self._name = self._name, None
        if self._link is not None:
            link, self._link = self._link, None
        if self._size is not None:
            size, self._size = self._size, None
        if kind not in _FILE_TYPES:
            size = 0
        self._pad = -size % 512
        path = name.removeprefix("./").rstrip("/")
        if path:
            _safe_path(path)
        mode = tar_number(raw[100:108]) & 0o7777
        if mode & ~0o777:  # PostgreSQL's files are never setuid, setgid or sticky
            raise UnpackError(f"{self.what}: {path}: mode {mode:o} has bits beyond read/write/execute")
        return Header(path, kind, mode, size, link)

    def end_body(self) -> None:
        self.stream.skip(self._pad, self.scratch)
        self._pad = 0


def extract(
    source: PartQueue,
    data_dir: Path,
    ra: RunAs,
    what: str,
    *,
    direct: bool = True,
    before_control: Callable[[], None] | None = None,
) -> Extracted:
    """Decode the tar stream from ``source`` into the empty ``data_dir`` (blocking: a thread).
    UnpackError says what is wrong with the stream, naming ``what`` (the backup)."""
    stream = _Stream(source, what)
    members = _Members(stream, what)
    writer = _PartWriter(data_dir, direct)
    out = Extracted()
    seen: set[str] = set()
    control: tuple[int, bytes] | None = None
    try:
        while (h := members.next()) is not None:
            if h.path in seen:
                raise UnpackError(f"{what}: {h.path} is twice in the tar stream")
            seen.add(h.path)
            if h.kind in _FILE_TYPES and h.path == CONTROL_FILE:  # written last
                body = bytearray(h.size)
                stream.read_exactly(memoryview(body))
                control = (h.mode, bytes(body))
            elif h.kind in _FILE_TYPES and not h.path:
                stream.skip(h.size, members.scratch)  # "./" as a file: nothing to write
            elif h.kind in _FILE_TYPES:
                create_file(data_dir, h.path, h.mode, h.size, ra)
                if h.size:
                    writer.copy(stream, h.path, 0, h.size)
                out.files += 1
                out.bytes_written += h.size
            else:
                _make_entry(data_dir, h, ra, what)
            members.end_body()
        stream.drain(members.scratch)
        writer.close()  # the last write done (its failure raised here)
    except BadIndex as e:
        raise UnpackError(f"{what}: {e}") from None
    except OSError as e:
        raise UnpackError(f"{what}: writing into {data_dir}: {e}") from e
    finally:
        writer.release()
        out.bytes_direct = writer.direct_bytes
    if before_control is not None:
        before_control()
    if control is not None:
        write_control_file(data_dir, control[0], len(control[1]), [(0, control[1])], ra)
        fsync_dir(data_dir / "global")
        out.files += 1
        out.bytes_written += len(control[1])
    return out


def _make_entry(data_dir: Path, h: Header, ra: RunAs, what: str) -> None:
    """A directory or a symbolic link (blocking)."""
    if not h.path:
        return  # "./": the data directory itself
    if h.kind == b"5":
        make_dir(data_dir, h.path)
        set_dir_mode(data_dir, h.path, h.mode, ra)
    elif h.kind == b"2":
        if not h.link:
            raise UnpackError(f"{what}: {h.path}: symbolic link without a target")
        make_link(data_dir, h.path, h.link, ra)
    else:
        raise UnpackError(f"{what}: {h.path}: tar member type {h.kind!r} is not one a base backup holds")


ProgressFn = Callable[[str, int, int | None], None]


async def extract_backup(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    ra: RunAs,
    *,
    window: int,
    progress: ProgressFn | None = None,
    before_control: Callable[[], None] | None = None,
    direct: bool = True,
) -> tuple[Extracted, float]:
    """Fetch the parts of ``rec`` in order, ``window`` ahead, and extract them into the empty
    ``data_dir`` (:func:`extract`, in a thread).  Returns what was written and the seconds the
    extraction waited for the repository (the next part not fetched yet when it could take
    it: the time the copy was bound by the repository).  A part that cannot be fetched or
    does not match its record raises the repository's error (CorruptObject, RepoError)."""
    parts = list(rec.parts)
    total = sum(p.size for p in parts)
    source = PartQueue(depth=2)
    worker = asyncio.create_task(
        asyncio.to_thread(
            extract, source, data_dir, ra, f"backup {rec.id}", direct=direct, before_control=before_control
        )
    )

    async def fetch(p: catalog.StoredObject) -> bytes:
        key = catalog.object_key(scope, rec.id, p.name)
        data = await repo.get(key)
        if len(data) != p.size:
            raise CorruptObject(key, "size differs from the record")
        return data

    pending: deque[asyncio.Task[bytes]] = deque()
    nxt = 0
    done = 0
    try:
        while nxt < len(parts) and len(pending) < window:
            pending.append(asyncio.create_task(fetch(parts[nxt])))
            nxt += 1
        while pending:
            data = await pending.popleft()
            if nxt < len(parts):
                pending.append(asyncio.create_task(fetch(parts[nxt])))
                nxt += 1
            put = asyncio.create_task(asyncio.to_thread(source.put, data))
            await asyncio.wait({put, worker}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():  # the extraction ended first: its failure is the news
                source.abort()
                await asyncio.gather(put, return_exceptions=True)
                await worker
                raise UnpackError(f"backup {rec.id}: the tar stream ended before its last part")
            put.result()
            done += len(data)
            del data
            if progress is not None:
                progress("fetch", done, total)
        await asyncio.to_thread(source.put, END)
        return await worker, source.wait_s
    except BaseException:
        source.abort()
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(BaseException):
            await worker
        raise
