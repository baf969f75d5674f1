"""WAL served to a recovering server by the process that restored it (``hakeeper restore
--start``, a bootstrap from a backup), through the file system.

``restore_command`` runs as PostgreSQL's OS user, which may not be able to run hakeeper's
Python at all (a virtualenv below /root, a checkout in a 0700 directory) nor read the
repository.  So, like the archiver's ``archive_command``, the restore script only hands over:
it drops a request ``<pg_wal>/.hakeeper-handover/req/<file>`` and waits for
``out/<file>`` (then moves it to ``%p``: exit 0), ``out/<file>.missing`` (exit 1: not in the
archive) or ``out/<file>.error`` (exit 200, its text in PostgreSQL's log: unknown, recovery
must stop rather than end early).  ``pid`` names the serving process; without one alive the
script falls back to the Python walfetch.

This process, holding the repository, keeps a window of the segments recovery asks for next
downloaded, checked and written to ``out/`` before they are asked for, so that the script finds
them at once (it then leaves ``req/<file>.taken``): a request-answer round trip per 16 MiB
segment slowed replay by a third, and a download started only when asked for makes replay wait
for the repository.  The window is planned by :mod:`hakeeper.backup.walspool`, as the prefetch
worker's spool is: ``prefetch`` segments along the target timeline's history (from the restore
plan, and from every history file recovery asks for), never more than ``max_bytes`` of them in
memory and in ``out/`` together (a download holds its slot from its start), a new download
started whenever a slot frees, files of a timeline recovery has left removed.  A segment failing
its checks is fetched again (:data:`~hakeeper.backup.walfetch.CORRUPT_ATTEMPTS` rounds) before
the request is answered with ``.error`` naming it and why.

The script records every segment request in the spool's ``stats`` (taken from ``out/``: a
hit; else the seconds it waited), the format :func:`hakeeper.backup.walspool.prefetch_stats`
reads for both paths; :func:`serving` yields a :class:`Handover` whose ``stats`` it fills in
when recovery is over, then removes the handover directory and the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hakeeper.backup import layout, walspool
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.repo import Repository
from hakeeper.backup.walfetch import (  # the script uses the same dir; the spool the same bounds
    CORRUPT_ATTEMPTS,
    DEFAULT_PREFETCH,
    DEFAULT_PREFETCH_MAX_BYTES,
    HANDOVER_DIR,
    transient_retry,
)
from hakeeper.util.fsutil import ensure_dir_fd, write_new
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

log = get_logger(__name__)

POLL = 0.01
DEFAULT_PARALLEL = 4  # downloads at once (the spool's prefetch_parallel default)
TAKEN = ".taken"
_MIN_SEG = 1024 * 1024  # PostgreSQL's smallest WAL segment size


def handover_dir(data_dir: Path) -> Path:
    return data_dir / "pg_wal" / HANDOVER_DIR


def _segment_size(n: int) -> int | None:
    """``n`` if it is a possible WAL segment size (a power of two from 1 MiB to 1 GiB)."""
    return n if _MIN_SEG <= n <= 1024 * _MIN_SEG and n & (n - 1) == 0 else None


class Handover:
    """What :func:`serving` measured, filled in when it ends."""

    def __init__(self) -> None:
        self.stats = walspool.PrefetchStats(0, 0, 0.0)
        self.served = 0
        self.taken_ahead = 0
        self.peak_segments = 0  # most segments in memory and out/ at once
        self.failed: dict[str, str] = {}  # segments answered with .error: why


class _Server:
    def __init__(
        self,
        hdir: Path,
        repo: Repository,
        scope: str,
        run_as: RunAs,
        *,
        path: walspool.TimelinePath | None,
        prefetch: int,
        max_bytes: int,
        parallel: int,
        outcome: Handover,
    ) -> None:
        self.hdir = hdir
        self.repo = repo
        self.scope = scope
        self.run_as = run_as
        self.path = path
        self.prefetch = prefetch
        self.max_bytes = max_bytes
        self.parallel = parallel
        self.outcome = outcome
        self.seg_size = layout.DEFAULT_SEGMENT_SIZE  # until a segment says otherwise
        self.cursor: str | None = None  # the last segment recovery asked for or took
        # a download holds its slot until its file is in out/ (or it is discarded)
        self.downloads: dict[str, asyncio.Task[None]] = {}
        self.written: set[str] = set()  # in out/, not taken yet
        self.absent: set[str] = set()  # not in the archive (yet): the window stops there
        self.failed: dict[str, str] = {}  # prefetch gave up (a request fetches it once more)
        self.busy: set[str] = set()  # requests being answered
        self.closing = False  # no new downloads once the serving ends
        self.keep: set[str] = set()  # the window as last planned (within the bound)
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

    # ------------------------------------------------------------------ fetching

    async def _download(self, fname: str) -> bytes | None:
        """The checked content of ``fname``; None when the archive does not have it.  A copy
        failing its checks is fetched again (damaged on the way is not damaged in the archive);
        RepoError after :data:`CORRUPT_ATTEMPTS` rounds or the transient retries."""
        key = layout.wal_key(self.scope, fname)
        attempt = 1
        while True:
            try:
                async for retry in transient_retry():
                    with retry:
                        return await self.repo.get(key)
            except NotFound:
                return None
            except CorruptObject as e:
                if attempt >= CORRUPT_ATTEMPTS:
                    raise
                log.warning("wal_segment_refetched", file=fname, attempt=attempt, reason=str(e))
                await asyncio.sleep(0.2 * attempt)
                attempt += 1
        return None  # pragma: no cover - the loop returns or raises

    def _write(self, name: str, data: bytes) -> None:
        # a unique temporary name, then the rename: the script never sees half a file
        write_new(name, data, dir_fd=self._fds[2], mode=0o600, owner=self.run_as)

    def _unlink_out(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fds[2])

    def _wanted(self, name: str) -> bool:
        return name in self.busy or name in self.keep

    async def _fetch_to_out(self, fname: str) -> None:
        """Download ``fname`` and, if recovery still wants it, write it to out/ under the very
        name it was fetched as; the outcome goes to written/absent/failed."""
        try:
            data = await self._download(fname)
            if data is None:
                self.absent.add(fname)
                return
            if fname == self.cursor or self.cursor is None:
                self.seg_size = _segment_size(len(data)) or self.seg_size
            if self._wanted(fname):
                await asyncio.to_thread(self._write, fname, data)
                self.written.add(fname)
            else:  # a timeline recovery left, or a window that moved on while it downloaded
                log.debug("wal_prefetch_discarded", file=fname)
        except RepoError as e:
            self.failed[fname] = str(e)
            log.warning("wal_prefetch_failed", file=fname, reason=str(e))
        except OSError as e:
            self.failed[fname] = f"writing it for the restore script: {e}"
            log.warning("wal_prefetch_failed", file=fname, reason=self.failed[fname])
        except Exception as e:  # anything else must fail the request naming it, not hang it
            self.failed[fname] = f"{type(e).__name__}: {e}"
            log.error("wal_prefetch_failed", file=fname, reason=self.failed[fname], exc_info=True)
        finally:
            if self.downloads.get(fname) is asyncio.current_task():
                del self.downloads[fname]
            self._pump()

    # ------------------------------------------------------------------ the window

    def _move_cursor(self, fname: str) -> None:
        """Recovery reads ``fname``: the window follows it forward, not back.  Recovery asks
        for a segment again after a later one (its WAL prefetcher decodes ahead, and the file it
        restored is gone once the next one is restored): that one is fetched for the request
        alone, and the window, still ahead of it, stays."""
        new = layout.parse_segment_name(fname, self.seg_size)
        old = None if self.cursor is None else layout.parse_segment_name(self.cursor, self.seg_size)
        if new is not None and (old is None or new[1] >= old[1]):
            self.cursor = fname

    def _window(self) -> list[str]:
        if self.cursor is None:
            return []
        slots = walspool.spool_slots(self.max_bytes, self.seg_size)
        return walspool.predict_window(self.cursor, self.seg_size, min(self.prefetch, slots), self.path)

    def _pump(self) -> None:
        """Bring memory and out/ to the window: drop what recovery will not ask for, start a
        download for every free slot (called after every change)."""
        if self.cursor is None or self.closing:
            return
        slots = walspool.spool_slots(self.max_bytes, self.seg_size)
        full = self._window()
        # Segments asked for outside the window (the one just asked for: the window starts
        # after it; one asked for again behind it) hold their bytes too, in memory while they
        # download, in out/ until the script took them: the window gets the slots left.
        held_out = {n for n in self.written if n in self.busy and n not in full}
        held_dl = {n for n in self.downloads if n in self.busy and n not in full}
        room = max(0, slots - len(held_out) - len(held_dl))
        window = full[:room]
        self.keep = keep = set(window)
        for name in [n for n in self.downloads if n not in keep and n not in self.busy]:
            self.downloads.pop(name).cancel()  # its bytes are freed now; nobody will ask
        plan = walspool.plan_spool(
            window,
            self.written - held_out,
            [n for n in self.downloads if n not in held_dl],
            room,
            max(0, self.parallel - len(held_dl)),
            absent=self.absent,
            skip=self.failed,
        )
        for name in plan.drop:  # before any new download: the bound holds at every moment
            if name in self.busy:
                continue  # asked for: the answer hands it over
            self.written.discard(name)
            self._unlink_out(name)
            log.debug("wal_prefetch_dropped", file=name)
        for name in plan.start:
            self.downloads[name] = asyncio.ensure_future(self._fetch_to_out(name))
        self._note_peak()

    def _note_peak(self) -> None:
        self.outcome.peak_segments = max(self.outcome.peak_segments, len(self.written) + len(self.downloads))

    def _learn_history(self, fname: str, data: bytes) -> None:
        """Recovery fetched a timeline's history: with ``latest`` it probes newer ones, which
        are then the target, so the newest one seen is the path the window follows."""
        tli = layout.parse_history_name(fname)
        if tli is None or (self.path is not None and tli < self.path.target):
            return
        try:
            hist = layout.parse_history(data.decode())
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("wal_prefetch_history_unreadable", file=fname, error=str(e))
            return
        self.path = walspool.TimelinePath(tli, tuple(hist))
        self._pump()

    # ------------------------------------------------------------------ requests

    async def _segment(self, fname: str) -> tuple[str, str]:
        """Make ``out/<fname>`` exist: ("ok" | "missing" | "error", reason)."""
        refetched = False
        while True:
            if fname in self.written:
                self._pump()
                return "ok", ""
            task = self.downloads.get(fname)
            if task is None:
                if fname in self.failed:
                    if refetched:
                        return "error", self.failed[fname]
                    # the prefetch gave up on it: the request tries once more, then fails
                    del self.failed[fname]
                    refetched = True
                if fname in self.absent:
                    self.absent.discard(fname)  # the archive may have grown since
                    if refetched:
                        return "missing", ""
                    refetched = True
                task = self.downloads[fname] = asyncio.ensure_future(self._fetch_to_out(fname))
            # the window in the slots this one leaves (before the download runs at all)
            self._pump()
            await asyncio.shield(task)
            if fname not in self.written and fname not in self.failed and fname in self.absent:
                return "missing", ""

    async def _other(self, fname: str) -> tuple[str, str]:
        """A history file, a .partial or .backup file: fetched when asked for."""
        try:
            data = await self._download(fname)
        except RepoError as e:
            return "error", str(e)
        if data is None:
            return "missing", ""
        await asyncio.to_thread(self._write, fname, data)
        self._learn_history(fname, data)
        return "ok", ""

    async def _answer(self, fname: str) -> None:
        try:
            if layout.WAL_FILE_RE.match(fname) is None:
                outcome, reason = "error", "not a WAL file name"
            elif layout.parse_segment_name(fname, self.seg_size) is not None:
                self._move_cursor(fname)  # _segment fills the window once this one holds its slot
                outcome, reason = await self._segment(fname)
            else:
                outcome, reason = await self._other(fname)
            if outcome == "ok":
                self.written.discard(fname)  # the script moves it to %p now
                self.outcome.served += 1
            elif outcome == "error":
                # recovery stops on it: the reason goes to PostgreSQL's log (the script prints
                # the .error file) and to ours
                self.outcome.failed[fname] = reason
                log.error("wal_handover_failed", file=fname, reason=reason)
                await asyncio.to_thread(
                    self._write, f"{fname}.error", f"hakeeper walfetch: {fname}: {reason}\n".encode()
                )
            else:
                await asyncio.to_thread(self._write, f"{fname}.missing", b"")
        except OSError as e:
            log.error("wal_handover_failed", file=fname, reason=str(e))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fname, dir_fd=self._fds[1])
            self.busy.discard(fname)
            self._pump()

    def _taken(self, fname: str) -> None:
        """The script took ``fname`` from out/ without asking."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{fname}{TAKEN}", dir_fd=self._fds[1])
        self.written.discard(fname)
        self.outcome.served += 1
        self.outcome.taken_ahead += 1
        self._move_cursor(fname)
        self._pump()

    def _still_there(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._fds[1], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    names = await asyncio.to_thread(os.listdir, self._fds[1])
                except FileNotFoundError:
                    names = []
                # takes first, in recovery's order: the cursor ends on the newest
                # The listing ran in a thread while answers finished: one answered (its request
                # removed) since is no longer there, and answering it again would fetch it again
                # and leave it in out/ (a request for it again is a new file, seen next time).
                for name in sorted(n for n in names if n.endswith(TAKEN)):
                    if self._still_there(name):
                        self._taken(name[: -len(TAKEN)])
                for name in names:
                    if (
                        not name.endswith(TAKEN)
                        and name not in self.busy
                        and not name.startswith(".")
                        and self._still_there(name)
                    ):
                        self.busy.add(name)
                        t = asyncio.ensure_future(self._answer(name))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                await asyncio.sleep(POLL)
        finally:
            self.closing = True
            pending: list[asyncio.Future[Any]] = [*tasks, *self.downloads.values()]
            for f in pending:
                f.cancel()
            if pending:
                await asyncio.wait(pending)


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path,
    repo: Repository,
    scope: str,
    run_as: RunAs,
    *,
    path: walspool.TimelinePath | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    max_bytes: int = DEFAULT_PREFETCH_MAX_BYTES,
    parallel: int = DEFAULT_PARALLEL,
) -> AsyncIterator[Handover]:
    """Serve the restore script's WAL requests while the body runs (the server recovers).
    ``path``: the recovery target timeline and its history, when the caller knows them."""
    outcome = Handover()
    server = _Server(
        handover_dir(data_dir),
        repo,
        scope,
        run_as,
        path=path,
        prefetch=prefetch,
        max_bytes=max_bytes,
        parallel=parallel,
        outcome=outcome,
    )
    # The directories and the pid file exist before the body starts the server: a restore
    # script that found no pid file would fall back to starting Python for every file.
    await asyncio.to_thread(server._mkdirs)
    task = asyncio.ensure_future(server.run())
    try:
        yield outcome
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        outcome.stats = await asyncio.to_thread(walspool.prefetch_stats, data_dir)
        log.info(
            "wal_handover_done",
            served=outcome.served,
            written_ahead=outcome.taken_ahead,
            requests=outcome.stats.requests,
            hits=outcome.stats.hits,
            seconds_waiting=round(outcome.stats.seconds_waiting, 3),
            peak_segments=outcome.peak_segments,
        )
        await asyncio.to_thread(shutil.rmtree, server.hdir, True)
        await asyncio.to_thread(walspool.discard_spools, data_dir)
