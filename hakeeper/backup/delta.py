"""Delta restore (``hakeeper restore --delta``): bring a directory holding an older copy of the
same cluster to the content of an indexed backup, fetching and writing only what differs.

1. Refused unless the directory holds a copy of the backup's cluster (the system identifier in
   ``global/pg_control``'s first 8 bytes equals the backup's), no server runs there, and the
   backup has a file index (backups taken before indexed backups existed have none) and is a
   full backup.
2. A marker file (``hakeeper-delta-in-progress``, holding the system identifier) is written and
   ``global/pg_control`` removed: from here until the end the directory cannot be started or
   taken for a good copy, and a second ``--delta`` after a failure still knows the cluster.
3. Everything the backup does not have is removed (``pg_wal`` contents, ``postmaster.pid``,
   signal files, the old restore script...), as is any entry of another kind than the
   backup's; missing directories, links and files are created.
4. Every remaining file is read and hashed per block with the index's block bounds (``jobs``
   threads) -- unless it is still the very file the last restore wrote and recorded
   (backup/restorestate.py: same inode, size, mtime and ctime), whose recorded hashes stand in
   for reading it -- then truncated or extended to the backup's size.  Blocks whose hash differs and
   blocks the local file does not cover are the work: only the parts holding them are fetched
   (backup/unpack.py), and only those blocks written.
5. Flush, pg_control written last, marker removed, and the new record of what the directory
   holds written.  The caller writes the recovery settings as
   for any restore (``postgresql.auto.conf`` is the backup's by then: nothing of the old
   copy's recovery block survives).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hakeeper.backup import catalog, restorestate
from hakeeper.backup.catalog import RestoreRefused
from hakeeper.backup.fileindex import (
    CONTROL_FILE,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    Extent,
    FileIndex,
    Member,
    block_extents,
    block_hash,
    changed_blocks,
    paths_to_remove,
    whole_file_extents,
)
from hakeeper.backup.repo import Repository
from hakeeper.backup.unpack import (
    UnpackStats,
    create_file,
    load_index,
    make_dir,
    make_link,
    open_under,
    parent_fd,
    set_dir_mode,
    write_control,
    write_extents,
)
from hakeeper.util.fsutil import fsync_dir, syncfs
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, postmaster_pid

log = get_logger(__name__)

MARKER = "hakeeper-delta-in-progress"
ProgressFn = Callable[[str, int, int | None], None]


@dataclass(frozen=True, slots=True)
class DeltaStats:
    bytes_total: int  # the backup's file bytes
    bytes_hashed: int  # local bytes read and compared
    bytes_unchanged_since_restore: int  # local bytes compared by the last restore's record, unread
    bytes_fetched: int  # stored bytes of the parts fetched
    bytes_written: int  # file bytes written
    parts_fetched: int
    parts_total: int
    files_changed: int
    entries_removed: int
    seconds_fetch: float


def local_system_identifier(data_dir: Path) -> int | None:
    """The system identifier of the copy in ``data_dir``: pg_control's first 8 bytes (little
    endian on every platform PostgreSQL runs on here), or the marker of an unfinished delta."""
    try:
        with open(data_dir / CONTROL_FILE, "rb") as f:
            head = f.read(8)
        if len(head) == 8:
            return int(struct.unpack("<Q", head)[0])
    except FileNotFoundError:
        pass
    try:
        return int((data_dir / MARKER).read_text().strip())
    except (OSError, ValueError):
        return None


def check_target(data_dir: Path) -> int:
    """Refuse a directory a delta cannot go into; its system identifier otherwise (blocking)."""
    if not data_dir.is_dir() or data_dir.is_symlink():
        raise RestoreRefused(f"--delta: {data_dir} is not a directory holding an older copy of the cluster")
    pid = postmaster_pid(data_dir)
    if pid is not None:
        raise RestoreRefused(f"--delta: PostgreSQL (pid {pid}) is running in {data_dir}; stop it first")
    sysid = local_system_identifier(data_dir)
    if sysid is None:
        raise RestoreRefused(
            f"--delta: {data_dir} has no readable global/pg_control: not a copy of a cluster "
            "(restore into an empty directory without --delta)"
        )
    return sysid


def check_backup(rec: catalog.BackupRecord, local_sysid: int, data_dir: Path) -> None:
    """Refuse a backup a delta cannot use for ``data_dir`` (RestoreRefused)."""
    if rec.kind != "full":
        raise RestoreRefused(
            f"--delta: backup {rec.id} is incremental; delta restore takes a full backup (--backup ID)"
        )
    if rec.index is None:
        raise RestoreRefused(
            f"--delta: backup {rec.id} has no file index (layout {rec.layout}: taken before "
            "indexed backups, or compressed by the server); restore it into an empty directory"
        )
    if rec.system_identifier is not None and int(rec.system_identifier) != local_sysid:
        raise RestoreRefused(
            f"--delta: {data_dir} holds a copy of another cluster (system identifier {local_sysid}, "
            f"backup {rec.id}: {rec.system_identifier})"
        )


def _scan(data_dir: Path) -> dict[str, str]:
    """Every entry below ``data_dir`` (relative path -> f/d/l, ``o`` for anything else),
    never following a link."""
    out: dict[str, str] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(data_dir / rel if rel else data_dir) as it:
            for e in it:
                p = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    out[p] = KIND_LINK
                elif e.is_dir(follow_symlinks=False):
                    out[p] = KIND_DIR
                    stack.append(p)
                elif e.is_file(follow_symlinks=False):
                    out[p] = KIND_FILE
                else:
                    out[p] = "o"
    out.pop(MARKER, None)
    return out


def _remove(data_dir: Path, rel: str, kind: str) -> None:
    """Remove ``rel`` below ``data_dir`` without following a link on the way (a directory whose
    parent was removed already is gone with it)."""
    try:
        pfd, name = parent_fd(data_dir, rel)
    except FileNotFoundError:
        return
    try:
        if kind == KIND_DIR:
            shutil.rmtree(name, dir_fd=pfd)  # fd-based: never leaves the tree through a link
        else:
            os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(pfd)


def _replace_link(data_dir: Path, rel: str, target: str, ra: RunAs) -> None:
    """The symbolic link ``rel`` pointing at ``target`` (an existing one with another target
    replaced)."""
    pfd, name = parent_fd(data_dir, rel)
    try:
        try:
            if os.readlink(name, dir_fd=pfd) == target:
                return
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
    finally:
        os.close(pfd)
    make_link(data_dir, rel, target, ra)


def _shape_tree(data_dir: Path, index: FileIndex, ra: RunAs) -> tuple[int, list[Member]]:
    """Remove what the backup lacks, create missing directories/links/files, fix modes and
    owners; the files that existed (to be compared) and the count removed (blocking)."""
    local = _scan(data_dir)
    gone = paths_to_remove(index, local)
    for rel in gone:
        _remove(data_dir, rel, local[rel])
    gone_set = set(gone)
    present: list[Member] = []
    for m in index.members:
        have = local.get(m.path) if m.path not in gone_set else None
        if m.kind == KIND_DIR:
            if have is None:
                make_dir(data_dir, m.path)
            set_dir_mode(data_dir, m.path, m.mode, ra)
        elif m.kind == KIND_LINK:
            assert m.link is not None
            _replace_link(data_dir, m.path, m.link, ra)
        elif m.path == CONTROL_FILE:
            continue  # written last (unpack.write_control)
        elif have is None:
            create_file(data_dir, m.path, m.mode, m.size, ra)
        else:
            present.append(m)
    return len(gone), present


def _compare(
    data_dir: Path, m: Member, block_size: int, ra: RunAs, known: restorestate.Known | None
) -> tuple[list[int], int, bool]:
    """The blocks of local file ``m.path`` that differ from the backup's, the bytes read, and
    whether the last restore's record stood in for reading; then the file is cut or extended
    to the backup's size, its mode and owner set (blocking).  ``known``: what the last restore
    recorded of this file; its hashes are taken instead of reading the file when the file is
    still the one it recorded (restorestate.py)."""
    fd = open_under(data_dir, m.path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        size = st.st_size
        hashes: list[bytes | None] = []
        read = 0
        trusted = known is not None and known.stamp == restorestate.Stamp.of(st)
        if known is not None and trusted:
            hashes = list(known.blocks)
        for b in range(len(hashes), len(m.blocks)):
            start = b * block_size
            end = min(m.size, start + block_size)
            if size < end:
                break
            data = os.pread(fd, end - start, start)
            read += len(data)
            hashes.append(block_hash(data) if len(data) == end - start else None)
        if size != m.size:
            os.ftruncate(fd, m.size)
        os.fchmod(fd, m.mode)
        if ra.uid is not None and ra.gid is not None:
            os.fchown(fd, ra.uid, ra.gid)
    finally:
        os.close(fd)
    return changed_blocks(m, block_size, size, hashes), read, trusted


async def delta_restore(
    repo: Repository,
    scope: str,
    rec: catalog.BackupRecord,
    data_dir: Path,
    ra: RunAs,
    local_sysid: int,
    *,
    jobs: int,
    progress: ProgressFn | None = None,
    rehash: bool = False,
) -> DeltaStats:
    """See the module docstring.  UnpackError: a part could not be fetched (the directory is
    left without pg_control, with the marker: run --delta again).  ``rehash``: read every
    local file, whatever the last restore recorded."""
    index = await load_index(repo, scope, rec)
    known = {} if rehash else await asyncio.to_thread(restorestate.load, data_dir, index.block_size)
    marker = data_dir / MARKER
    await asyncio.to_thread(_write_marker, data_dir, local_sysid)
    await asyncio.to_thread(fsync_dir, data_dir)
    await asyncio.to_thread(_drop_control, data_dir)
    await asyncio.to_thread(restorestate.discard, data_dir)
    removed, present = await asyncio.to_thread(_shape_tree, data_dir, index, ra)
    present_paths = {m.path for m in present}
    extents: list[Extent] = [e for e in whole_file_extents(index) if e.path not in present_paths]
    sem = asyncio.Semaphore(max(1, jobs))
    to_hash = sum(m.size for m in present)  # the local copy read and compared, block by block
    hashed = 0
    compared = 0
    trusted_bytes = 0
    changed_files = 0

    async def compare(m: Member) -> list[Extent]:
        nonlocal hashed, compared, trusted_bytes, changed_files
        async with sem:
            blocks, read, trusted = await asyncio.to_thread(
                _compare, data_dir, m, index.block_size, ra, known.get(m.path)
            )
        hashed += read
        compared += m.size
        if trusted:
            trusted_bytes += m.size
        if progress is not None:
            progress("compare", compared, to_hash)
        if blocks:
            changed_files += 1
        return block_extents(m, blocks, index.block_size)

    for got in await asyncio.gather(*(compare(m) for m in present)):
        extents.extend(got)
    changed_files += sum(1 for m in index.files() if m.path not in present_paths)
    deferred: list[tuple[int, bytes]] = []
    stats: UnpackStats = await write_extents(
        repo, scope, rec, index, extents, data_dir, jobs=jobs, progress=progress, deferred=deferred
    )
    await asyncio.to_thread(_flush_all, data_dir)
    await asyncio.to_thread(write_control, data_dir, index, deferred, ra)
    await asyncio.to_thread(fsync_dir, data_dir / "global")
    await asyncio.to_thread(marker.unlink)
    await asyncio.to_thread(fsync_dir, data_dir)
    await asyncio.to_thread(restorestate.record, data_dir, index, ra)
    out = DeltaStats(
        bytes_total=index.data_bytes,
        bytes_hashed=hashed,
        bytes_unchanged_since_restore=trusted_bytes,
        bytes_fetched=stats.bytes_fetched,
        bytes_written=stats.bytes_written,
        parts_fetched=stats.parts_fetched,
        parts_total=len(rec.parts),
        files_changed=changed_files,
        entries_removed=removed,
        seconds_fetch=stats.seconds_fetch,
    )
    log.info(
        "restore_delta_applied",
        backup=rec.id,
        bytes_total=out.bytes_total,
        bytes_hashed=out.bytes_hashed,
        bytes_unchanged_since_restore=out.bytes_unchanged_since_restore,
        bytes_fetched=out.bytes_fetched,
        bytes_written=out.bytes_written,
        parts_fetched=out.parts_fetched,
        parts_total=out.parts_total,
        files_changed=out.files_changed,
        entries_removed=out.entries_removed,
    )
    return out


def _write_marker(data_dir: Path, sysid: int) -> None:
    """The marker, new (whatever had its name -- an earlier marker, a planted link -- removed
    first: a link there is never written through)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_dir / MARKER)  # unlink never follows the link it removes
    fd = open_under(data_dir, MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, f"{sysid}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_control(data_dir: Path) -> None:
    try:
        pfd, name = parent_fd(data_dir, CONTROL_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return  # no global/ (or not a directory: removed with what the backup lacks)
    try:
        os.unlink(name, dir_fd=pfd)
        os.fsync(pfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(pfd)


def _flush_all(data_dir: Path) -> None:
    if not syncfs(data_dir):
        os.sync()
