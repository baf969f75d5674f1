"""The local queue: WAL waiting for repositories that were down (``<spool>/queue/<repo>/<file>``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hakeeper.backup import layout
from hakeeper.backup.archive.plan import archive_order
from hakeeper.util.fsutil import fsync_dir as _fsync_dir

QUEUE_DIR = "queue"
INCOMING = ".incoming"


@dataclass(slots=True)
class QueueEntry:
    size: int
    repos: set[str] = field(default_factory=set)


class SpoolQueue:
    """WAL waiting for repositories that were down: ``<root>/<repo>/<file>``.

    One copy per file on disk: it is written once (to ``<root>/.incoming``, fsynced) and
    hard-linked into the directory of every repository that needs it, each directory fsynced
    before the caller hands the file back to PostgreSQL.  The bytes of the queue are the sum of
    the distinct files.  Synchronous (called in a worker thread)."""

    def __init__(self, root: Path, repos: Sequence[str]) -> None:
        self.root = root
        self.repos = list(repos)
        self.entries: dict[str, QueueEntry] = {}

    def _dir(self, repo: str) -> Path:
        return self.root / repo

    def path(self, repo: str, name: str) -> Path:
        return self._dir(repo) / name

    def load(self) -> list[str]:
        """Read the queue from disk; returns what was removed (temporary files, directories of
        repositories no longer configured)."""
        removed: list[str] = []
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        incoming = self.root / INCOMING
        incoming.mkdir(mode=0o700, exist_ok=True)
        for tmp in incoming.iterdir():
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
        for d in self.root.iterdir():
            if d.name == INCOMING or not d.is_dir():
                continue
            if d.name not in self.repos:
                for f in d.iterdir():
                    f.unlink(missing_ok=True)
                d.rmdir()
                removed.append(str(d))
        self.entries.clear()
        for repo in self.repos:
            d = self._dir(repo)
            d.mkdir(mode=0o700, exist_ok=True)
            for f in d.iterdir():
                if not layout.WAL_FILE_RE.match(f.name):
                    f.unlink(missing_ok=True)
                    removed.append(str(f))
                    continue
                e = self.entries.setdefault(f.name, QueueEntry(f.stat().st_size))
                e.repos.add(repo)
        return removed

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def files_for(self, repo: str) -> list[str]:
        return sorted((n for n, e in self.entries.items() if repo in e.repos), key=archive_order)

    def bytes_for(self, repo: str) -> int:
        return sum(e.size for e in self.entries.values() if repo in e.repos)

    def add(self, name: str, data: bytes, repos: Iterable[str]) -> None:
        """Queue ``data`` as ``name`` for ``repos``, durably (fsynced file and directories)."""
        want = [r for r in repos if r not in self.entries.get(name, QueueEntry(0)).repos]
        if not want:
            return
        entry = self.entries.get(name)
        if entry is not None and entry.repos:
            src = self.path(next(iter(entry.repos)), name)
            tmp = None
        else:
            tmp = self.root / INCOMING / f"{name}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            src = tmp
        try:
            for repo in want:
                dst = self.path(repo, name)
                try:
                    os.link(src, dst)
                except FileExistsError:
                    pass
                _fsync_dir(dst.parent)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        e = self.entries.setdefault(name, QueueEntry(len(data)))
        e.repos.update(want)

    def remove(self, repo: str, name: str) -> None:
        e = self.entries.get(name)
        self.path(repo, name).unlink(missing_ok=True)
        _fsync_dir(self._dir(repo))
        if e is not None:
            e.repos.discard(repo)
            if not e.repos:
                del self.entries[name]

    def read(self, repo: str, name: str) -> bytes:
        return self.path(repo, name).read_bytes()
