"""Small file-system helpers with no heavy imports (used by short-lived helper processes)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hakeeper.util.proc import RunAs


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: Any = None


def libc() -> Any:
    """The C library (for the few calls Python's os module lacks)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def syncfs(path: Path) -> bool:
    """syncfs(2) on the file system holding ``path``: write back every dirty page of it and
    wait (False where the call is not available)."""
    fn = getattr(libc(), "syncfs", None)
    if fn is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(fn(fd) == 0)
    finally:
        os.close(fd)


class BackgroundWriteback:
    """While a large amount of data is being written below ``path`` (a restore), write it back
    to disk in a thread (syncfs in a loop) instead of leaving gigabytes of dirty pages for one
    fsync pass at the end: PostgreSQL's start after a restore fsyncs the whole data directory
    (recovery_init_sync_method), so what is already on disk then costs nothing there, and the
    disk works while the CPU decompresses.  ``finish()`` waits for a last pass: everything
    written before it is durable."""

    def __init__(self, path: Path, pause: float = 0.2) -> None:
        self.path = path
        self.pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)
        self.available = True

    def start(self) -> BackgroundWriteback:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.pause):
            if not syncfs(self.path):
                self.available = False
                return

    def finish(self) -> None:
        """Stop the loop and make everything written so far durable (blocking)."""
        self._stop.set()
        self._thread.join()
        if not syncfs(self.path):
            os.sync()

    def cancel(self) -> None:
        self._stop.set()


def write_atomic(path: Path, data: str, *, mode: int, run_as: RunAs) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``, owned by ``run_as``) atomically and durably;
    never follows a symlink at the temporary name."""
    tmp = path.with_name(f".{path.name}.hakeeper-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if run_as.uid is not None and run_as.gid is not None:
            os.fchown(fd, run_as.uid, run_as.gid)
        view = memoryview(data.encode())
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- never following a link as root ------------------------------------------------------------
#
# When the agent runs as root, the directories under PGDATA belong to the PostgreSQL OS user (and
# a restored backup brings its own entries): a symbolic link planted at a name root then opens,
# chmods or chowns would hand root's privilege to that user.  Every privileged step below works on
# a file descriptor opened with O_NOFOLLOW (the last name must not be a link) and checks what it
# opened with fstat before changing it.  Linux has no lchmod, so modes are set with fchmod.


class UnsafePathError(OSError):
    """A name that had to be a plain directory or file is a symbolic link or something else."""


def open_nofollow(path: Path | str, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """``os.open`` that refuses a symbolic link at the last name (UnsafePathError)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR) or (
            e.errno == errno.ENOTDIR and not flags & os.O_DIRECTORY
        ):
            raise
        # Linux answers ENOTDIR, not ELOOP, for O_DIRECTORY on a link: say which it was.
        try:
            is_link = stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = e.errno == errno.ELOOP
        what = f"refusing to follow the symbolic link at {path}" if is_link else f"{path} is not a directory"
        raise UnsafePathError(e.errno, what, str(path)) from None


def open_dir(path: Path | str, *, dir_fd: int | None = None) -> int:
    """A read-only descriptor of the directory ``path`` (never through a link at its last name)."""
    return open_nofollow(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)


def open_regular(path: Path | str, *, dir_fd: int | None = None) -> int:
    """A read-only descriptor of the regular file ``path``: not a link, not a FIFO or device
    (a FIFO would block the reader, a device would read something that is not a file)."""
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(errno.EINVAL, f"{path} is not a regular file", str(path))
    return fd


def read_regular(path: Path | str, *, dir_fd: int | None = None) -> bytes:
    """The content of the regular file ``path``, never read through a symbolic link."""
    fd = open_regular(path, dir_fd=dir_fd)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _own(fd: int, run_as: RunAs | None) -> None:
    if run_as is not None and run_as.uid is not None and run_as.gid is not None:
        os.fchown(fd, run_as.uid, run_as.gid)


def ensure_dir_fd(
    path: Path | str, *, mode: int = 0o700, owner: RunAs | None = None, dir_fd: int | None = None
) -> int:
    """Create directory ``path`` if missing, then open it (no link followed), check that it is a
    directory and set its mode and owner on the descriptor.  Returns the open descriptor."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode, dir_fd=dir_fd)
    fd = open_dir(path, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        _own(fd, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(
    path: Path | str, *, mode: int = 0o700, owner: RunAs | None = None, dir_fd: int | None = None
) -> None:
    """:func:`ensure_dir_fd` without keeping the descriptor."""
    os.close(ensure_dir_fd(path, mode=mode, owner=owner, dir_fd=dir_fd))


def ensure_private_dir(path: Path, *, mode: int = 0o700) -> None:
    """A directory only this process's user can write (created with its parents if missing):
    a link at ``path`` is refused; an existing directory owned by someone else (an older agent
    gave the runtime directory to the PostgreSQL user) is taken back, and every entry in it that
    is not a plain file or directory of ours is removed, since whoever owned it could have
    planted links there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    fd = open_dir(path)
    try:
        me = os.geteuid()
        st = os.fstat(fd)
        if st.st_uid != me:
            os.fchown(fd, me, os.getegid())
            for name in os.listdir(fd):
                est = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not (stat.S_ISREG(est.st_mode) or stat.S_ISDIR(est.st_mode)) or est.st_uid != me:
                    if stat.S_ISDIR(est.st_mode):
                        continue  # not ours to judge; nothing opens a directory in it
                    os.unlink(name, dir_fd=fd)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_new(name: str, data: bytes, *, dir_fd: int, mode: int = 0o600, owner: RunAs | None = None) -> None:
    """Write ``data`` to ``name`` in the directory ``dir_fd`` atomically: a fresh temporary file
    (O_EXCL: neither a link nor a hard link planted at its name is written through), then renamed
    over ``name`` (a rename replaces a link, it does not follow it)."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd
    )
    try:
        os.fchmod(fd, mode)
        _own(fd, owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
