"""What a restore wrote, kept in the data directory so that a later ``restore --delta`` need
not read files nothing has touched since (``hakeeper-restore-state.json``).

A delta compares every local file with the backup block by block (backup/delta.py); reading
a 9 GB copy to find that 90 % of it is unchanged costs more than the rest of the delta.  But
right after a full or delta restore of an indexed backup we *know* each file's content: it
is the backup's, whose block hashes the index holds.  So the restore records, per file, those
hashes beside the file's identity and change stamps -- device, inode, size, mtime and ctime
in nanoseconds -- as the file system reports them once everything is written.  A later delta
takes the recorded hashes instead of reading a file only when all five are still the same:
any write, truncation, chmod, chown, rename or replacement since changes at least the ctime
(which no unprivileged program can set back) or the inode, and such a file is read and hashed
as before.  ``--rehash`` ignores the record (a disk that may have rotted under the file system).

Why in the data directory: it moves with the files -- a file-system snapshot rolled back, or a
copy, carries its own record, whose inode numbers then no longer match (a copy) or still
describe exactly these files (a snapshot).  A backup taken of the restored cluster holds the
file too; a restore writes it like any file and, when it ends, replaces it with its own record
(an indexed backup) or removes it (the others: restore.py); until then, stamps taken in
another directory at another time match nothing here.  It holds paths, sizes and hashes of the
cluster's files: no secret.

Refusals: a record that is not one this module writes (format, sizes, hash lengths, paths) is
ignored as a whole and logged; nothing in it can lead a write anywhere, since it only lets the
delta skip reading files of the backup's own index.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from hakeeper.backup.fileindex import HASH_LEN, KIND_FILE, STATE_FILE, FileIndex, block_count
from hakeeper.backup.unpack import open_under, parent_fd
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

log = get_logger(__name__)

STATE_FORMAT = 1
MAX_STATE_BYTES = 1 << 30
# timestamps are taken from a coarse clock: stamping waits this long after the last write, so
# that a later write can never carry the same ctime as the one recorded
CLOCK_TICK_S = 0.05


@dataclass(frozen=True, slots=True)
class Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Known:
    stamp: Stamp
    blocks: tuple[bytes, ...]


def discard(data_dir: Path) -> None:
    """Remove the record (blocking): from here until a new one, every file is read."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_dir / STATE_FILE)  # unlink never follows a link at that name


def record(data_dir: Path, index: FileIndex, ra: RunAs) -> int:
    """Record that every file of ``index`` below ``data_dir`` holds the backup's content
    (blocking; called once the restore wrote and flushed everything).  Returns the number of
    files recorded."""
    discard(data_dir)
    time.sleep(CLOCK_TICK_S)
    files: dict[str, list[object]] = {}
    for m in index.members:
        if m.kind != KIND_FILE:
            continue
        try:
            pfd, name = parent_fd(data_dir, m.path)
        except OSError:
            continue
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            continue
        finally:
            os.close(pfd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != m.size:
            continue  # not what the backup has (a caller wrote it since): read next time
        s = Stamp.of(st)
        files[m.path] = [
            s.dev,
            s.ino,
            s.size,
            s.mtime_ns,
            s.ctime_ns,
            base64.b64encode(b"".join(m.blocks)).decode(),
        ]
    doc = {"format": STATE_FORMAT, "block_size": index.block_size, "hash": "xxh3-128", "files": files}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    fd = open_under(data_dir, STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, raw)
        if ra.uid is not None and ra.gid is not None:
            os.fchown(fd, ra.uid, ra.gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(files)


class BadState(ValueError):
    pass


def load(data_dir: Path, block_size: int) -> dict[str, Known]:
    """The record, if there is a valid one for ``block_size`` (blocking); else nothing (the
    reason logged), and every file is read."""
    try:
        fd = open_under(data_dir, STATE_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("restore_state_ignored", data_dir=str(data_dir), reason=str(e))
        return {}
    try:
        size = os.fstat(fd).st_size
        if size > MAX_STATE_BYTES:
            log.warning("restore_state_ignored", data_dir=str(data_dir), reason=f"{size} bytes")
            return {}
        raw = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    try:
        return parse(raw, block_size)
    except BadState as e:
        log.warning("restore_state_ignored", data_dir=str(data_dir), reason=str(e))
        return {}


def parse(raw: bytes, block_size: int) -> dict[str, Known]:
    """Pure: the record's entries; BadState for anything this module would not write."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadState(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("hash") != "xxh3-128":
        raise BadState("not a restore state of format 1 with xxh3-128 hashes")
    if doc.get("block_size") != block_size:
        raise BadState(f"block size {doc.get('block_size')!r}, the backup's is {block_size}")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise BadState("no files")
    out: dict[str, Known] = {}
    for path, row in files.items():
        if not isinstance(row, list) or len(row) != 6:
            raise BadState(f"{path!r}: not an entry")
        *nums, blob = row
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in nums):
            raise BadState(f"{path!r}: stamps are not non-negative integers")
        if not isinstance(blob, str):
            raise BadState(f"{path!r}: hashes are not base64 text")
        try:
            hashes = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise BadState(f"{path!r}: hashes are not base64") from None
        stamp = Stamp(*nums)
        if len(hashes) != HASH_LEN * block_count(stamp.size, block_size):
            raise BadState(f"{path!r}: {len(hashes)} bytes of hashes for {stamp.size} bytes")
        out[path] = Known(stamp, tuple(hashes[i : i + HASH_LEN] for i in range(0, len(hashes), HASH_LEN)))
    return out
