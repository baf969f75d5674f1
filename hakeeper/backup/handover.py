"""WAL served to a recovering server by the process that restored it (``hakeeper restore``, a
bootstrap from a backup), through the file system.

``restore_command`` runs as PostgreSQL's OS user, which may not be able to run hakeeper's
Python at all (a virtualenv below /root, a checkout in a 0700 directory) nor read the
repository.  So, like the archiver's ``archive_command``, the restore script only hands over:
it drops a request ``<pg_wal>/.hakeeper-handover/req/<file>`` and waits for
``out/<file>`` (then moves it to ``%p``: exit 0), ``out/<file>.missing`` (exit 1: not in the
archive) or ``out/<file>.error`` (exit 200: unknown, recovery must stop rather than end early).
This process, holding the repository, answers the requests and fetches the next segments ahead
of replay; the next :data:`AHEAD` of them it also writes to ``out/`` before they are asked for,
so that the script finds them at once (it then leaves ``req/<file>.taken``, and the window moves
on): a request-answer round trip per 16 MiB segment slowed replay by a third.  ``pid`` names the
serving process; without one alive the script falls back to the Python walfetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hakeeper.backup import layout
from hakeeper.backup.errors import NotFound, RepoError
from hakeeper.backup.repo import Repository
from hakeeper.backup.walfetch import HANDOVER_DIR, transient_retry  # the script uses the same dir
from hakeeper.util.fsutil import ensure_dir_fd, write_new
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

log = get_logger(__name__)

POLL = 0.01
PREFETCH = 8
AHEAD = 4  # segments written to out/ before they are asked for (disk: AHEAD x 16 MiB)
TAKEN = ".taken"


def handover_dir(data_dir: Path) -> Path:
    return data_dir / "pg_wal" / HANDOVER_DIR


def _next_segments(fname: str, count: int) -> list[str]:
    parsed = layout.parse_segment_name(fname)
    if parsed is None:
        return []
    tli, segno = parsed
    return [layout.segment_name(tli, s) for s in range(segno + 1, segno + 1 + count)]


class _Server:
    def __init__(self, hdir: Path, repo: Repository, scope: str, run_as: RunAs) -> None:
        self.hdir = hdir
        self.req = hdir / "req"
        self.out = hdir / "out"
        self.repo = repo
        self.scope = scope
        self.run_as = run_as
        self.fetches: dict[str, asyncio.Task[bytes | None]] = {}
        self.busy: set[str] = set()
        self.served = 0
        self.ahead: dict[str, asyncio.Task[None]] = {}  # written (or being written) to out/ unasked
        self.taken_ahead = 0
        self._fds: list[int] = []  # hdir, req, out: opened once, every later step goes through them

    def _mkdirs(self) -> None:
        # The directories belong to PostgreSQL's OS user (its restore script writes requests and
        # takes answers), so as root nothing here may go through a name that user could have
        # replaced by a link: each directory is opened without following one and every later
        # create, rename and unlink is relative to those descriptors.
        hfd = ensure_dir_fd(self.hdir, mode=0o700, owner=self.run_as)
        self._fds = [hfd]
        try:
            for name in ("req", "out"):
                self._fds.append(ensure_dir_fd(name, mode=0o700, owner=self.run_as, dir_fd=hfd))
            write_new("pid", f"{os.getpid()}\n".encode(), dir_fd=hfd, mode=0o644)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    async def _get(self, fname: str) -> bytes | None:
        key = layout.wal_key(self.scope, fname)
        try:
            async for attempt in transient_retry():
                with attempt:
                    return await self.repo.get(key)
        except NotFound:
            return None
        return None  # pragma: no cover - the loop returns or raises

    def _fetch(self, fname: str) -> asyncio.Task[bytes | None]:
        task = self.fetches.get(fname)
        if task is None:
            task = asyncio.ensure_future(self._get(fname))
            self.fetches[fname] = task
        return task

    def _write(self, name: str, data: bytes) -> None:
        # a unique temporary name: a write ahead may race an answer
        write_new(name, data, dir_fd=self._fds[2], mode=0o600, owner=self.run_as)

    async def _answer(self, fname: str) -> None:
        try:
            if layout.WAL_FILE_RE.match(fname) is None:
                outcome, data = "error", b""
            else:
                try:
                    got = await self._fetch(fname)
                except RepoError as e:
                    log.error("wal_handover_failed", file=fname, error=str(e))
                    outcome, data = "error", b""
                else:
                    outcome, data = ("missing", b"") if got is None else ("ok", got)
            self.fetches.pop(fname, None)
            if outcome == "ok":
                await asyncio.to_thread(self._write, fname, data)
                self.served += 1
                self._advance(fname)
            else:
                await asyncio.to_thread(self._write, f"{fname}.{outcome}", b"")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fname, dir_fd=self._fds[1])
        finally:
            self.busy.discard(fname)

    def _advance(self, fname: str) -> None:
        """``fname`` was handed over: fetch the next segments, write the first of them to out/."""
        nxt = _next_segments(fname, PREFETCH)
        for name in nxt:
            self._fetch(name)
        for name in nxt[:AHEAD]:
            if name not in self.ahead:
                self.ahead[name] = asyncio.ensure_future(self._write_ahead(name))
        # forget prefetches behind the one just served
        parsed = layout.parse_segment_name(fname)
        for name in list(self.fetches):
            p = layout.parse_segment_name(name)
            if parsed is not None and p is not None and p[1] < parsed[1]:
                self.fetches.pop(name).cancel()

    async def _write_ahead(self, fname: str) -> None:
        try:
            data = await self._fetch(fname)
        except RepoError:
            return  # asked for, it is fetched again and the error answered then
        if data is not None and fname not in self.busy:
            try:
                await asyncio.to_thread(self._write, fname, data)
            except OSError as e:  # asked for, it is written (or the error answered) then
                log.warning("wal_handover_write_ahead_failed", file=fname, error=str(e))

    def _taken(self, fname: str) -> None:
        """The script took ``fname`` from out/ without asking."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{fname}{TAKEN}", dir_fd=self._fds[1])
        self.served += 1
        self.taken_ahead += 1
        self.fetches.pop(fname, None)
        self._advance(fname)

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    names = await asyncio.to_thread(os.listdir, self._fds[1])
                except FileNotFoundError:
                    names = []
                for name in names:
                    if name.endswith(TAKEN):
                        self._taken(name[: -len(TAKEN)])
                        continue
                    if name not in self.busy and not name.startswith("."):
                        self.busy.add(name)
                        t = asyncio.ensure_future(self._answer(name))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                await asyncio.sleep(POLL)
        finally:
            pending: list[asyncio.Future[Any]] = [*tasks, *self.ahead.values(), *self.fetches.values()]
            for f in pending:
                f.cancel()


@contextlib.asynccontextmanager
async def serving(data_dir: Path, repo: Repository, scope: str, run_as: RunAs) -> AsyncIterator[None]:
    """Serve the restore script's WAL requests while the body runs (the server recovers)."""
    server = _Server(handover_dir(data_dir), repo, scope, run_as)
    # The directories and the pid file exist before the body starts the server: a restore
    # script that found no pid file would fall back to starting Python for every file.
    await asyncio.to_thread(server._mkdirs)
    task = asyncio.ensure_future(server.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        log.info("wal_handover_done", served=server.served, written_ahead=server.taken_ahead)
        await asyncio.to_thread(shutil.rmtree, server.hdir, True)
