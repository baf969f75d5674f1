"""Small file-system helpers with no heavy imports (used by short-lived helper processes)."""

from __future__ import annotations

import contextlib
import ctypes
import os
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
