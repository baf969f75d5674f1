"""Restore a chain of incremental base backups in place, with the result pg_combinebackup gives.

The chain's full backup has been unpacked into the data directory, each incremental link into
a directory of its own (with its ``backup_manifest``).  :func:`apply_chain` turns the data
directory into the newest link's state, moving files instead of copying them:

* a file the newest link has whole: renamed from that link's directory (same filesystem);
* a file the newest link has as ``INCREMENTAL.NAME`` (PostgreSQL's incremental file: the blocks
  changed since the parent backup): rebuilt from the newest link that has it whole (the full in
  the data directory, or a link's copy renamed there) by writing into it the blocks the later
  links carry;
* a file of the full that the newest link lacks (a dropped relation): removed, and so are the
  directories the newest link lacks (a dropped database);
* ``backup_label``: the newest link's without its ``INCREMENTAL FROM`` lines (a server refuses
  to start from an incremental backup's label); no ``backup_manifest``: the full's describes
  another state and the newest link's lists its incremental files (docs/decisions.md).

The blocks a rebuilt file gets are exactly those pg_combinebackup gives it (reconstruct.c):
every block the newest link carries; below the newest link's *truncation block length* T, a
block not there comes from the newest older link that carries it, else from the whole file when
it is that long, else it is zeros; the file ends at T blocks or after the newest link's last
block, whichever is later.  Older links' truncation lengths play no part, as in
pg_combinebackup (tests/integration/test_incremental_apply.py checks the results byte for byte
against pg_combinebackup's, on real chains and on hand-made headers).

Pure file work, blocking: the caller runs it in a worker thread.  Every name comes from a
manifest or a directory listing and is checked (relative, no ``..``); every directory on a path
is opened without following a link, and every file with ``O_NOFOLLOW``: a link planted in a
backup is never written through.  Anything inconsistent is an :class:`ApplyError` naming the
file; the caller then empties the data directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hakeeper.core.lsn import parse_lsn
from hakeeper.util.fsutil import UnsafePathError, open_dir, open_nofollow, open_regular, write_new
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

log = get_logger(__name__)

__all__ = [
    "BLCKSZ",
    "INCREMENTAL_MAGIC",
    "ApplyError",
    "ApplyStats",
    "IncrementalHeader",
    "apply_chain",
    "parse_header",
]

BLCKSZ = 8192
INCREMENTAL_MAGIC = 0xD3AE1F0D
INCREMENTAL_PREFIX = "INCREMENTAL."
# A relation segment is at most 4 GB (the largest --with-segsize with 8 kB blocks fits 2^32
# bytes): no block number of a segment, and no block count, can be larger.
MAX_SEGMENT_BLOCKS = (1 << 32) // BLCKSZ
LABEL = "backup_label"
MANIFEST = "backup_manifest"
WAL_DIR = "pg_wal/"
# Lines of an incremental backup's label that the combined result must not have (the server
# refuses to start from a label that says it is incremental); pg_combinebackup drops them too.
_INCREMENTAL_LABEL_LINES = ("INCREMENTAL FROM LSN: ", "INCREMENTAL FROM TLI: ")
_DIGESTS = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
_CHUNK = 8 << 20


class ApplyError(Exception):
    """The chain cannot be applied: a malformed or inconsistent file (the message names it)."""


# ============================================================================ incremental files


@dataclass(frozen=True, slots=True)
class IncrementalHeader:
    """The header of an incremental relation file (PostgreSQL 17+): the blocks it carries, in
    file order, and the truncation block length (the file's length, in blocks, below which a
    block it does not carry comes from the older backups)."""

    blocks: tuple[int, ...]
    truncation_block_length: int
    header_length: int  # where the first block starts: a multiple of BLCKSZ when there are blocks

    def block_offset(self, index: int) -> int:
        return self.header_length + index * BLCKSZ

    def reconstructed_blocks(self) -> int:
        """The length in blocks of the file rebuilt with this as the newest version."""
        return max(self.truncation_block_length, max(self.blocks, default=-1) + 1)


def header_length(num_blocks: int) -> int:
    """Magic, count, truncation length and the block numbers; then padding up to a multiple of
    BLCKSZ when there are blocks, so that each block is aligned in the file (checked on
    PostgreSQL 17.10 and 18.6's files)."""
    raw = 12 + 4 * num_blocks
    if num_blocks == 0:
        return raw
    return -(-raw // BLCKSZ) * BLCKSZ


def parse_header(data: bytes, file_size: int, name: str) -> IncrementalHeader:
    """The header of the incremental file ``name`` of ``file_size`` bytes whose first bytes are
    ``data`` (at least the header: 12 bytes, then 4 per block).  ApplyError when anything in it
    is inconsistent."""
    if len(data) < 12:
        raise ApplyError(f"{name}: {file_size} bytes, too short for an incremental file's header")
    magic, count, trunc = struct.unpack_from("<III", data)
    if magic != INCREMENTAL_MAGIC:
        raise ApplyError(
            f"{name}: not an incremental file (magic {magic:#010x}, expected {INCREMENTAL_MAGIC:#010x})"
        )
    if count > MAX_SEGMENT_BLOCKS:
        raise ApplyError(
            f"{name}: claims {count} blocks, more than a segment can have ({MAX_SEGMENT_BLOCKS})"
        )
    if trunc > MAX_SEGMENT_BLOCKS:
        raise ApplyError(
            f"{name}: truncation block length {trunc} exceeds a segment ({MAX_SEGMENT_BLOCKS} blocks)"
        )
    hlen = header_length(count)
    expected = hlen + count * BLCKSZ
    if file_size != expected:
        raise ApplyError(
            f"{name}: {file_size} bytes, but a header of {count} blocks means {expected} "
            f"({hlen} of header, {count} x {BLCKSZ})"
        )
    if len(data) < 12 + 4 * count:
        raise ApplyError(f"{name}: the header's {count} block numbers were not read in full")
    blocks = struct.unpack_from(f"<{count}I", data, 12)
    if any(b >= MAX_SEGMENT_BLOCKS for b in blocks):
        bad = next(b for b in blocks if b >= MAX_SEGMENT_BLOCKS)
        raise ApplyError(f"{name}: block number {bad} exceeds a segment ({MAX_SEGMENT_BLOCKS} blocks)")
    if len(set(blocks)) != count:
        raise ApplyError(f"{name}: a block number appears twice")
    return IncrementalHeader(blocks=blocks, truncation_block_length=trunc, header_length=hlen)


def read_header(fd: int, name: str) -> IncrementalHeader:
    size = os.fstat(fd).st_size
    head = os.pread(fd, 12, 0)
    count = struct.unpack_from("<I", head, 4)[0] if len(head) >= 12 else 0
    want = 12 + 4 * min(count, MAX_SEGMENT_BLOCKS)
    data = head if want <= len(head) else os.pread(fd, want, 0)
    return parse_header(data, size, name)


# ============================================================================ manifests and names


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    size: int
    algorithm: str  # NONE, CRC32C, SHA224 .. SHA512
    checksum: str


def check_rel_path(path: str, where: str) -> str:
    """A relative path inside a backup: no absolute path, no ``..``, no empty component."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise ApplyError(f"{where}: unsafe path {path!r} (absolute, empty or with ..)")
    return path


def load_manifest(path: Path) -> tuple[dict[str, ManifestEntry], int | None]:
    """The files a backup_manifest lists (by path) and its system identifier."""
    try:
        doc: Any = json.loads(path.read_bytes())
        files = doc["Files"]
        out: dict[str, ManifestEntry] = {}
        for f in files:
            if "Path" in f:
                name = str(f["Path"])
            else:  # a name that is not UTF-8, hex-encoded
                name = bytes.fromhex(f["Encoded-Path"]).decode("utf-8", "surrogateescape")
            out[check_rel_path(name, str(path))] = ManifestEntry(
                size=int(f["Size"]),
                algorithm=str(f.get("Checksum-Algorithm", "NONE")).upper(),
                checksum=str(f.get("Checksum", "")).lower(),
            )
        sysid = doc.get("System-Identifier")
        return out, None if sysid is None else int(sysid)
    except FileNotFoundError:
        raise ApplyError(f"{path}: missing (every link of a chain needs its backup_manifest)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ApplyError(f"{path}: not a readable backup manifest ({e})") from None


def whole_name(path: str) -> tuple[str, bool]:
    """(the file's name in the result, whether ``path`` is an incremental file)."""
    head, _, base = path.rpartition("/")
    if base.startswith(INCREMENTAL_PREFIX) and len(base) > len(INCREMENTAL_PREFIX):
        plain = base[len(INCREMENTAL_PREFIX) :]
        return (f"{head}/{plain}" if head else plain), True
    return path, False


@dataclass
class _Link:
    """One unpacked link: its directory, manifest, label, and its files by their result name
    (value: the name in the link, ``INCREMENTAL.X`` or ``X``)."""

    index: int
    root: Path
    manifest: dict[str, ManifestEntry]
    sysid: int | None
    files: dict[str, str]
    label: str


def _read_link(index: int, root: Path) -> _Link:
    manifest, sysid = load_manifest(root / MANIFEST)
    files: dict[str, str] = {}
    for path in manifest:
        plain, _ = whole_name(path)
        if plain in files:
            raise ApplyError(f"{root}: the manifest lists both {files[plain]} and {path}")
        files[plain] = path
    if LABEL not in manifest:
        raise ApplyError(f"{root}: the manifest lists no {LABEL}")
    try:
        label = _read_small(root, LABEL).decode()
    except UnicodeDecodeError:
        raise ApplyError(f"{root / LABEL}: not text") from None
    return _Link(index=index, root=root, manifest=manifest, sysid=sysid, files=files, label=label)


def _read_small(root: Path, rel: str) -> bytes:
    fd = _open_rel(root, rel)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _label_field(label: str, key: str) -> str | None:
    for line in label.splitlines():
        if line.startswith(key + ": "):
            return line[len(key) + 2 :].split(" ", 1)[0]
    return None


def _check_chain(links: list[_Link]) -> None:
    """Each link is an incremental backup of the one before it, of the same system (what
    pg_combinebackup also checks before it starts)."""
    if _label_field(links[0].label, "INCREMENTAL FROM LSN") is not None:
        raise ApplyError(f"{links[0].root / LABEL}: the chain's first backup is not a full one")
    for prev, cur in itertools.pairwise(links):
        if cur.sysid != prev.sysid:
            raise ApplyError(f"{cur.root}: system identifier {cur.sysid}, but {prev.root} is of {prev.sysid}")
        parent_lsn = _label_field(cur.label, "INCREMENTAL FROM LSN")
        start = _label_field(prev.label, "START WAL LOCATION")
        if parent_lsn is None:
            raise ApplyError(f"{cur.root / LABEL}: not an incremental backup (no INCREMENTAL FROM LSN)")
        if _lsn(parent_lsn) != _lsn(start) or _lsn(start) is None:
            raise ApplyError(
                f"{cur.root / LABEL}: incremental from LSN {parent_lsn}, but {prev.root} starts at {start}"
            )


def _lsn(text: str | None) -> int | None:
    try:
        return parse_lsn(text)
    except ValueError:
        return None


def combined_label(label: str) -> str:
    """The newest link's backup_label as the combined backup's: its INCREMENTAL FROM lines out."""
    return "".join(
        line for line in label.splitlines(keepends=True) if not line.startswith(_INCREMENTAL_LABEL_LINES)
    )


# ============================================================================ safe descriptors


def _open_rel(root: Path, rel: str, flags: int = os.O_RDONLY) -> int:
    """``root/rel`` opened with no link followed on the way (each directory opened by itself)."""
    head, _, base = rel.rpartition("/")
    dfd = _open_dirs(root, head)
    try:
        return open_nofollow(base, flags, dir_fd=dfd)
    finally:
        os.close(dfd)


def _open_dirs(root: Path, rel_dir: str) -> int:
    fd = open_dir(root)
    for part in rel_dir.split("/") if rel_dir else ():
        try:
            nxt = open_dir(part, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


class _Dirs:
    """Descriptors of the directories under a root, opened once each without following a link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[str, int] = {}

    def fd(self, rel_dir: str) -> int:
        if rel_dir not in self.fds:
            if rel_dir == "":
                self.fds[rel_dir] = open_dir(self.root)
            else:
                head, _, base = rel_dir.rpartition("/")
                self.fds[rel_dir] = open_dir(base, dir_fd=self.fd(head))
        return self.fds[rel_dir]

    def split(self, rel: str) -> tuple[int, str]:
        head, _, base = rel.rpartition("/")
        return self.fd(head), base

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _walk(root: Path) -> tuple[set[str], set[str]]:
    """(files, directories) under ``root``, relative; a symbolic link or special file is an
    ApplyError (hakeeper's backups have no tablespaces: nothing in them is a link)."""
    files: set[str] = set()
    dirs: set[str] = set()

    def visit(fd: int, rel: str) -> None:
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            sub = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(st.st_mode):
                dirs.add(sub)
                child = open_dir(name, dir_fd=fd)
                try:
                    visit(child, sub)
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                files.add(sub)
            else:
                raise ApplyError(f"{root / sub}: not a regular file or directory (a link?)")

    top = open_dir(root)
    try:
        visit(top, "")
    finally:
        os.close(top)
    return files, dirs


# ============================================================================ checks


def _check_file(fd: int, entry: ManifestEntry | None, what: str, *, digest: bool) -> bool:
    """The open file against its manifest entry: its size, and with ``digest`` its SHA checksum
    (CRC32C is not checked: the standard library has no CRC-32C; docs/backup.md).  Returns
    whether a checksum was compared.  No entry: WAL pg_basebackup fetched, listed by no manifest."""
    if entry is None:
        return False
    size = os.fstat(fd).st_size
    if size != entry.size:
        raise ApplyError(f"{what}: {size} bytes, its manifest says {entry.size}")
    algo = _DIGESTS.get(entry.algorithm)
    if not digest or algo is None:
        return False
    h = hashlib.new(algo)
    off = 0
    while chunk := os.pread(fd, _CHUNK, off):
        h.update(chunk)
        off += len(chunk)
    if h.hexdigest() != entry.checksum:
        raise ApplyError(f"{what}: {entry.algorithm} checksum differs from its manifest's")
    return True


# ============================================================================ applying


@dataclass(frozen=True, slots=True)
class ApplyStats:
    links: int
    files_moved: int  # taken whole from a link
    files_rebuilt: int
    files_removed: int
    dirs_created: int
    dirs_removed: int
    blocks_written: int
    checksums_compared: int
    seconds: float


@dataclass
class _Counts:
    moved: int = 0
    rebuilt: int = 0
    removed: int = 0
    dirs_created: int = 0
    dirs_removed: int = 0
    blocks: int = 0
    checksums: int = 0


def apply_chain(
    data_dir: Path, link_dirs: list[Path], run_as: RunAs, *, verify_checksums: bool = True
) -> ApplyStats:
    """Turn ``data_dir`` (the chain's full backup, unpacked) into the state of the newest of
    ``link_dirs`` (the incremental links, oldest first, each unpacked with its manifest); the
    files of the links are consumed (renamed into the data directory).  ApplyError when the
    chain is inconsistent or a file malformed; nothing is flushed (the caller does, once)."""
    t0 = time.monotonic()
    if not link_dirs:
        raise ApplyError("no incremental link to apply")
    links = [_read_link(0, data_dir)] + [_read_link(i + 1, d) for i, d in enumerate(link_dirs)]
    _check_chain(links)
    newest = links[-1]
    counts = _Counts()
    data = _Dirs(data_dir)
    stages = [_Dirs(link.root) for link in links]
    try:
        newest_files, want_dirs = _walk(newest.root)
        _check_listing(newest, newest_files)
        have_files, have_dirs = _walk(data_dir)
        _remove_obsolete(links[0], newest, have_files, data, counts)
        _create_dirs(newest, want_dirs, have_dirs, data, stages[-1], run_as, counts)
        for plain in sorted(newest.files):
            if plain in (LABEL, MANIFEST):
                continue
            _apply_file(plain, links, data, stages, counts, verify_checksums=verify_checksums)
        _remove_dirs(have_dirs - want_dirs, data, counts)
        label = combined_label(newest.label).encode()
        write_new(LABEL, label, dir_fd=data.fd(""), mode=0o600, owner=run_as)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(MANIFEST, dir_fd=data.fd(""))
    except UnsafePathError as e:
        raise ApplyError(str(e)) from None
    except OSError as e:
        raise ApplyError(f"applying the chain to {data_dir}: {e}") from None
    finally:
        data.close()
        for s in stages:
            s.close()
    stats = ApplyStats(
        links=len(links),
        files_moved=counts.moved,
        files_rebuilt=counts.rebuilt,
        files_removed=counts.removed,
        dirs_created=counts.dirs_created,
        dirs_removed=counts.dirs_removed,
        blocks_written=counts.blocks,
        checksums_compared=counts.checksums,
        seconds=time.monotonic() - t0,
    )
    log.info("chain_applied", data_dir=str(data_dir), **dataclasses.asdict(stats))
    return stats


def _check_listing(newest: _Link, files: set[str]) -> None:
    """The newest link's directory (``files``, its listing) holds what its manifest lists, and
    nothing else but the manifest and WAL in pg_wal/ (``pg_basebackup -X fetch`` writes WAL the
    manifest covers by its WAL-Ranges, not by file: such files are taken as they are, as
    pg_combinebackup does).  Anything else means a damaged unpack."""
    wal = {f for f in files - set(newest.manifest) if f.startswith(WAL_DIR)}
    extra = sorted(files - set(newest.manifest) - {MANIFEST} - wal)
    missing = sorted(set(newest.manifest) - files)
    if extra or missing:
        raise ApplyError(
            f"{newest.root}: its files differ from its manifest "
            f"(not listed: {extra[:5]}; missing: {missing[:5]})"
        )
    for f in wal:
        newest.files[f] = f


def _remove_obsolete(full: _Link, newest: _Link, have: set[str], data: _Dirs, counts: _Counts) -> None:
    """Files of the full that the newest link does not have (a dropped or re-created relation,
    a removed config file, the full's WAL).  Any other file no manifest lists is left alone and
    logged: it did not come from the backup."""
    for rel in sorted(have - set(newest.files) - {LABEL, MANIFEST}):
        if rel not in full.manifest and not rel.startswith(WAL_DIR):
            log.warning(
                "chain_apply_unlisted_file_kept", path=rel, reason="not in the full backup's manifest"
            )
            continue
        dfd, base = data.split(rel)
        os.unlink(base, dir_fd=dfd)
        counts.removed += 1


def _create_dirs(
    newest: _Link, want: set[str], have: set[str], data: _Dirs, stage: _Dirs, run_as: RunAs, counts: _Counts
) -> None:
    for rel in sorted(want - have, key=lambda r: r.count("/")):
        mode = stat.S_IMODE(os.fstat(stage.fd(rel)).st_mode)
        dfd, base = data.split(rel)
        os.mkdir(base, mode, dir_fd=dfd)
        fd = open_dir(base, dir_fd=dfd)
        try:
            os.fchmod(fd, mode)
            if run_as.uid is not None and run_as.gid is not None:
                os.fchown(fd, run_as.uid, run_as.gid)
        finally:
            os.close(fd)
        counts.dirs_created += 1


def _remove_dirs(obsolete: set[str], data: _Dirs, counts: _Counts) -> None:
    """Directories the newest link lacks, deepest first; one still holding a file no manifest
    listed stays (see _remove_obsolete)."""
    for rel in sorted(obsolete, key=lambda r: r.count("/"), reverse=True):
        head, _, base = rel.rpartition("/")
        fd = data.fds.pop(rel, None)
        if fd is not None:
            os.close(fd)
        try:
            os.rmdir(base, dir_fd=data.fd(head))
            counts.dirs_removed += 1
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            log.warning("chain_apply_dir_kept", path=rel, reason="holds files no manifest listed")


def _apply_file(
    plain: str,
    links: list[_Link],
    data: _Dirs,
    stages: list[_Dirs],
    counts: _Counts,
    *,
    verify_checksums: bool,
) -> None:
    """The newest version of ``plain`` into the data directory."""
    n = len(links) - 1
    # The newest link with the file whole, and the incremental versions after it.
    base = n
    while True:
        name = links[base].files.get(plain)
        if name is None:
            raise ApplyError(
                f"{links[base + 1].root / links[base + 1].files[plain]}: incremental, but the older "
                f"backup {links[base].root} does not have {plain}"
            )
        if not whole_name(name)[1]:
            break
        if base == 0:  # cannot happen: the full was checked not to be incremental
            raise ApplyError(f"{links[0].root / name}: an incremental file in the full backup")
        base -= 1
    dfd, fname = data.split(plain)
    if base > 0:  # the newest whole copy is a link's: moved into the data directory
        sfd, sname = stages[base].split(plain)
        fd = open_regular(sname, dir_fd=sfd)
        try:
            counts.checksums += _check_file(
                fd, links[base].manifest.get(plain), str(links[base].root / plain), digest=verify_checksums
            )
        finally:
            os.close(fd)
        os.replace(sname, fname, src_dir_fd=sfd, dst_dir_fd=dfd)
    if base == n:
        counts.moved += 1
        return
    if base == 0:
        fd = open_regular(fname, dir_fd=dfd)
        try:
            counts.checksums += _check_file(
                fd, links[0].manifest.get(plain), str(links[0].root / plain), digest=verify_checksums
            )
        finally:
            os.close(fd)
    _rebuild(plain, links[base + 1 :], data, stages, counts, verify_checksums=verify_checksums)


def _rebuild(
    plain: str,
    incs: list[_Link],
    data: _Dirs,
    stages: list[_Dirs],
    counts: _Counts,
    *,
    verify_checksums: bool,
) -> None:
    """Write into the data directory's whole copy of ``plain`` the blocks of the incremental
    versions ``incs`` (oldest first) that pg_combinebackup would take from them."""
    fds: list[int] = []
    try:
        headers: list[IncrementalHeader] = []
        for link in incs:
            name = link.files[plain]
            sfd, sname = stages[link.index].split(name)
            fd = open_regular(sname, dir_fd=sfd)
            fds.append(fd)
            what = str(link.root / name)
            counts.checksums += _check_file(fd, link.manifest[name], what, digest=verify_checksums)
            headers.append(read_header(fd, what))
        latest = headers[-1]
        limit = latest.truncation_block_length
        # block -> (source descriptor, offset): the newest version of each block wins; older
        # links contribute only below the newest truncation length (pg_combinebackup's rule).
        source: dict[int, tuple[int, int]] = {}
        for age, (fd, hdr) in enumerate(zip(reversed(fds), reversed(headers), strict=True)):
            for i, b in enumerate(hdr.blocks):
                if (age == 0 or b < limit) and b not in source:
                    source[b] = (fd, hdr.block_offset(i))
        dfd, fname = data.split(plain)
        out = open_nofollow(fname, os.O_RDWR, dir_fd=dfd)
        try:
            size = os.fstat(out).st_size
            # A whole copy's partial last block is not used (pg_combinebackup reads whole blocks),
            # nor any block from the truncation length on: zeros unless the newest link has it.
            keep = min(size // BLCKSZ, limit)
            if size != keep * BLCKSZ:
                os.ftruncate(out, keep * BLCKSZ)
            if limit > keep:
                os.ftruncate(out, limit * BLCKSZ)
            for start, src, off, count in _runs(source):
                _copy(src, out, off, start * BLCKSZ, count * BLCKSZ)
                counts.blocks += count
            expected = latest.reconstructed_blocks() * BLCKSZ
            got = os.fstat(out).st_size
            if got != expected:
                raise ApplyError(f"{plain}: rebuilt to {got} bytes, expected {expected}")
        finally:
            os.close(out)
        counts.rebuilt += 1
    finally:
        for fd in fds:
            os.close(fd)


def _runs(source: dict[int, tuple[int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """(first block, source descriptor, source offset, blocks) of consecutive blocks that lie
    consecutively in one source: one copy each."""
    run: list[int] | None = None  # [start, fd, offset, count]
    for b in sorted(source):
        fd, off = source[b]
        if run is not None and run[1] == fd and b == run[0] + run[3] and off == run[2] + run[3] * BLCKSZ:
            run[3] += 1
            continue
        if run is not None:
            yield run[0], run[1], run[2], run[3]
        run = [b, fd, off, 1]
    if run is not None:
        yield run[0], run[1], run[2], run[3]


def _copy(src: int, dst: int, src_off: int, dst_off: int, length: int) -> None:
    """``length`` bytes from ``src`` at ``src_off`` to ``dst`` at ``dst_off``: in the kernel
    (copy_file_range: no round trip through this process) where it can, else read and write."""
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _copy_slow(src, dst, src_off, dst_off, min(length, _CHUNK))
        if n <= 0:
            raise ApplyError(f"the incremental file ends before the block at offset {src_off}")
        src_off += n
        dst_off += n
        length -= n


def _copy_slow(src: int, dst: int, src_off: int, dst_off: int, length: int) -> int:
    data = os.pread(src, length, src_off)
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(dst, view[done:], dst_off + done)
    return len(data)
