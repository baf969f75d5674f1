"""The :class:`Archiver`: the task that watches pg_wal, pushes each ``.ready`` file to every
repository and hands it back to PostgreSQL (the package docstring tells the whole story)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hakeeper.backup import layout
from hakeeper.backup.archive.command import DONE_DIR, SCRIPT_NAME, reachable_by, render_script
from hakeeper.backup.archive.gaps import GAP_FORMAT, GAPS_DIR, GapBook, GapRecord, gap_key
from hakeeper.backup.archive.plan import (
    ReadyInfo,
    archive_order,
    backoff,
    is_history,
    plan_give_up,
    plan_queue_drops,
)
from hakeeper.backup.archive.spool import QUEUE_DIR, SpoolQueue
from hakeeper.backup.archive.state import PushOutcome, ReadyFile, RepoState
from hakeeper.backup.errors import ContentConflict, NotFound, RepoError
from hakeeper.core.lsn import format_lsn
from hakeeper.core.timefmt import iso
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

if TYPE_CHECKING:
    from hakeeper.backup.repo import Repository
    from hakeeper.core.backup_config import ArchiveConfig, RepositoryConfig

log = get_logger(__name__)

MARKER_REWRITE_AFTER = 2.0  # a done file still .ready without its marker: PostgreSQL retried it
ORPHAN_SWEEP_EVERY = 5.0
_READY = ".ready"
_LAT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)


def _on_path(name: str, segno: int, tli: int, history: list[layout.HistoryEntry], seg_size: int) -> bool:
    """Whether segment ``name`` is the one recovery reads for ``segno`` on ``tli``'s history."""
    end = (segno + 1) * seg_size - 1
    return layout.segment_name(layout.timeline_of(end, tli, history), segno, seg_size) == name


def _segment_size(pg_wal: Path) -> int:
    """wal_segment_size, from the size of a segment file in pg_wal (16 MiB if there is none)."""
    with contextlib.suppress(OSError), os.scandir(pg_wal) as it:
        for e in it:
            if layout.parse_segment_name(e.name) is not None and e.is_file():
                return e.stat().st_size
    return layout.DEFAULT_SEGMENT_SIZE


def archive_repository_config(rc: RepositoryConfig, cfg: ArchiveConfig) -> RepositoryConfig:
    """``rc`` as the archiver uses it: with the WAL compression level of ``cfg`` if set."""
    if cfg.compression_level is None or cfg.compression_level == rc.compression_level:
        return rc
    return rc.model_copy(update={"compression_level": cfg.compression_level})


def _live_targets(
    repos: Mapping[str, RepoState], f: ReadyFile, any_up: bool, now: float
) -> list[RepoState] | None:
    """The repositories to push ``f`` to now; None when every one is down and none may be probed
    yet (the file is blocked)."""
    missing = [rs for rs in repos.values() if rs.name not in f.stored | f.queued]
    if any_up:
        # Possibly none: every repository that still lacks it is down, so the push queues it (it
        # is stored somewhere).
        return [rs for rs in missing if rs.up]
    targets = [rs for rs in missing if rs.claim_probe(now)]
    return targets or None


# One running push of a file to one repository: (outcome, error).
_PushTask = asyncio.Task[tuple[str, str | None]]


async def _await_puts(
    f: ReadyFile, puts: dict[_PushTask, RepoState], errors: list[str], queue_slow_after: float
) -> tuple[set[_PushTask], bool]:
    """Wait for the pushes of ``f``, recording each outcome on ``f`` (errors in ``errors``);
    returns the pushes still running (the slow ones) and whether one was refused."""
    refused = False
    started = time.monotonic()
    pending = set(puts)
    try:
        while pending:
            # Once one repository has the file, a slower one does not hold the hand-back up
            # for more than queue_slow_after: it gets the file through the queue instead.
            wait = None
            if f.stored:
                wait = max(0.0, started + queue_slow_after - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                rs = puts[t]
                outcome, err = t.result()
                if outcome == PushOutcome.STORED:
                    f.stored.add(rs.name)
                elif outcome == PushOutcome.CONFLICT:
                    f.conflicts[rs.name] = err or "conflict"
                elif outcome == PushOutcome.ERROR:
                    errors.append(f"{rs.name}: {err}")
                else:
                    refused = True
            if not done:
                break  # the slow ones: queued below, finished in the background
    except BaseException:
        for t in pending:
            t.cancel()
        raise
    return pending, refused


# ====================================================================== the archiver


class Archiver:
    """Archives ``pg_wal`` to ``repositories`` while ``may_archive()`` holds (see the module doc).

    ``prepare()`` (synchronous: directories, the script, markers and queue of an earlier run)
    before PostgreSQL may call the archive_command; then ``run()`` as a task; ``close()`` at the
    end (after PostgreSQL stopped, so its last archive_command calls still get answers).
    """

    def __init__(
        self,
        *,
        scope: str,
        pg_wal: Path,
        spool_dir: Path,
        repositories: Sequence[Repository],
        cfg: ArchiveConfig,
        may_archive: Callable[[], bool],
        refusal_reason: Callable[[], str | None] | None = None,
        run_as: RunAs = RunAs(),
        registry: CollectorRegistry | None = None,
        node: str = "",
    ) -> None:
        if not repositories:
            raise ValueError("the archiver needs at least one repository")
        self.scope = scope
        self.pg_wal = pg_wal
        self.status_dir = pg_wal / "archive_status"
        self.spool = spool_dir
        self.done_dir = spool_dir / DONE_DIR
        self.script = spool_dir / SCRIPT_NAME
        self.cfg = cfg
        self.may_archive = may_archive
        self.refusal_reason = refusal_reason
        self.run_as = run_as
        self.node = node
        self.repos: dict[str, RepoState] = {r.name: RepoState(r) for r in repositories}
        self.queue = SpoolQueue(spool_dir / QUEUE_DIR, list(self.repos))
        self.gaps = GapBook(spool_dir / GAPS_DIR, list(self.repos))
        self.files: dict[str, ReadyFile] = {}
        self.recent_conflicts: collections.deque[dict[str, str]] = collections.deque(maxlen=20)
        self.latencies: collections.deque[tuple[str, float]] = collections.deque(maxlen=20000)
        self.archived_files = 0
        self.archived_bytes = 0
        self.given_up_files = 0
        self.last_archived: str | None = None
        self.last_archived_at: float | None = None
        self.last_error: str | None = None
        self._allowed: bool | None = None
        self._refusal_logged = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._publishing: set[tuple[str, str]] = set()
        self._side: set[asyncio.Task[None]] = set()
        self.switch_check: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._last_sweep = 0.0
        self._prepared = False
        self._closed = False
        self._rpo_baselined = False
        self._init_metrics(registry or CollectorRegistry())

    # ------------------------------------------------------------------ metrics

    def _init_metrics(self, r: CollectorRegistry) -> None:
        self.m_last_success = Gauge(
            "hakeeper_archive_last_success_timestamp_seconds",
            "Unix time of the last WAL file stored in each repository",
            ["repo"],
            registry=r,
        )
        self.m_pending = Gauge(
            "hakeeper_archive_pending_files", "WAL files ready in pg_wal and not yet archived", registry=r
        )
        self.m_pending_bytes = Gauge(
            "hakeeper_archive_ready_bytes",
            "Bytes of the .ready WAL files in pg_wal (handed back or not)",
            registry=r,
        )
        self.m_failures = Counter(
            "hakeeper_archive_failures", "Failed attempts to store WAL, by repository", ["repo"], registry=r
        )
        self.m_files = Counter(
            "hakeeper_archive_files", "WAL files stored, by repository", ["repo"], registry=r
        )
        self.m_conflicts = Counter(
            "hakeeper_archive_conflicts",
            "WAL files refused by a repository holding other content under that name (quarantined)",
            ["repo"],
            registry=r,
        )
        self.m_queue_files = Gauge(
            "hakeeper_archive_queue_files",
            "WAL files queued for a repository that was down",
            ["repo"],
            registry=r,
        )
        self.m_queue_bytes = Gauge(
            "hakeeper_archive_queue_bytes", "Bytes in the local queue (distinct files)", registry=r
        )
        self.m_repo_up = Gauge(
            "hakeeper_archive_repository_up", "1 while a repository takes WAL", ["repo"], registry=r
        )
        self.m_gap_files = Counter(
            "hakeeper_archive_gap_files",
            "WAL files recorded as missing from a repository, by reason",
            ["reason"],
            registry=r,
        )
        self.m_active = Gauge(
            "hakeeper_archive_active",
            "1 while this node may archive (primary holding the leader key)",
            registry=r,
        )
        self.m_rpo = Gauge(
            "hakeeper_archive_rpo_seconds",
            "Archive RPO per repository: age of the newest WAL durable there (now minus the time the "
            "newest segment stored with every older one became ready); on the archiving primary only",
            ["repository"],
            registry=r,
        )
        self.m_latency = Histogram(
            "hakeeper_archive_latency_seconds",
            "From a WAL file's .ready to its hand-back to PostgreSQL (durable)",
            buckets=_LAT_BUCKETS,
            registry=r,
        )

    def _refresh_metrics(self) -> None:
        pending = [f for f in self.files.values() if not f.done]
        self.m_pending.set(len(pending))
        self.m_pending_bytes.set(sum(f.size for f in self.files.values()))
        self.m_queue_bytes.set(self.queue.total_bytes)
        self.m_active.set(1 if self._allowed else 0)
        for name, rs in self.repos.items():
            self.m_queue_files.labels(name).set(len(self.queue.files_for(name)))
            self.m_repo_up.labels(name).set(1 if rs.up else 0)
            if rs.last_success_at is not None:
                self.m_last_success.labels(name).set(rs.last_success_at)
        self._refresh_rpo(time.time())

    # ------------------------------------------------------------------ set-up

    def archive_command(self) -> str:
        """The ``archive_command`` value for postgresql.conf."""
        return f'{shlex.quote(str(self.script))} "%p" "%f"'

    def prepare(self) -> None:
        """Create the spool (the script, ``done/`` owned by PostgreSQL's OS user, the queue and
        gap directories), remove markers of an earlier run, load the queue and gap records."""
        sp = self.spool
        sp.mkdir(parents=True, exist_ok=True)
        # PostgreSQL's user must reach the script and done/, but not the queue or gap records.
        os.chmod(sp, 0o711 if self.run_as.uid is not None else 0o700)
        self.done_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.done_dir, 0o700)
        self.run_as.chown(self.done_dir)
        tmp = sp / f".{SCRIPT_NAME}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o755)
        try:
            os.write(fd, render_script(sp, self.cfg.timeout).encode())
            os.fchmod(fd, 0o755)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.script)
        _fsync_dir(sp)
        wiped = self._wipe_markers()
        removed = self.queue.load()
        self.gaps.load()
        if not reachable_by(self.done_dir, self.run_as):
            log.error(
                "archive_spool_unreachable",
                spool=str(sp),
                os_user=self.run_as.name,
                reason="PostgreSQL's OS user cannot traverse the spool directory; archive_command will fail",
            )
        log.info(
            "archiver_prepared",
            spool=str(sp),
            repositories=list(self.repos),
            stale_markers_removed=wiped,
            queued_files=len(self.queue.entries),
            queued_bytes=self.queue.total_bytes,
            unpublished_gaps=len(self.gaps.records),
            removed=removed or None,
        )
        self._prepared = True

    def _wipe_markers(self) -> int:
        n = 0
        with contextlib.suppress(FileNotFoundError):
            for m in self.done_dir.iterdir():
                m.unlink(missing_ok=True)
                n += 1
        return n

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        log.info("archiver_started", pg_wal=str(self.pg_wal), parallel=self.cfg.parallel)
        try:
            while True:
                try:
                    self.tick()
                except Exception as e:  # never let one bad pass stop archiving
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.exception("archiver_tick_failed")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.poll_interval):
                        await self._wake.wait()
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def close(self) -> None:
        """Stop every task and close the repositories."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Future[Any]] = [
            *self._tasks,
            *self._side,
            *(t for rs in self.repos.values() for t in rs.background),
        ]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rs in self.repos.values():
            with contextlib.suppress(Exception):
                await rs.repo.close()

    def _allowed_now(self) -> bool:
        try:
            return bool(self.may_archive())
        except Exception:
            log.exception("archive_predicate_failed")
            return False

    def _reason(self) -> str | None:
        if self.refusal_reason is None:
            return "may_archive() is false"
        try:
            return self.refusal_reason()
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def _spawn(self, coro: Any, name: str) -> None:
        t: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(t)

        def _done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._wake.set()
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("archiver_task_failed", task=task.get_name(), error=self.last_error)

        t.add_done_callback(_done)

    def scan(self) -> dict[str, float]:
        """``.ready`` files in archive_status: WAL file name -> mtime of its ``.ready``."""
        out: dict[str, float] = {}
        try:
            with os.scandir(self.status_dir) as it:
                for e in it:
                    n = e.name
                    if not n.endswith(_READY):
                        continue
                    fname = n[: -len(_READY)]
                    if not layout.WAL_FILE_RE.match(fname):
                        continue
                    try:
                        out[fname] = e.stat().st_mtime
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            pass  # no data directory (yet)
        return out

    def tick(self) -> None:
        now = time.monotonic()
        allowed = self._allowed_now()
        ready = self.scan()
        if not allowed:
            self._refuse(ready)
            self._refresh_metrics()
            return
        if self._allowed is not True:
            if not self._rpo_baselined:
                self._rpo_baselined = True
                self._rpo_baseline()
            if self._allowed is False:
                log.info("archive_resumed", ready=len(ready), queued=len(self.queue.entries))
            self._allowed = True
            self._refusal_logged = False
        self._sync_files(ready, now)
        self._fix_markers(ready, now)
        self._enforce_pg_wal_cap(now)
        self._schedule(now)
        if now - self._last_sweep > ORPHAN_SWEEP_EVERY:
            self._last_sweep = now
            self._sweep_orphan_markers(ready)
        self._refresh_metrics()

    def _refuse(self, ready: Mapping[str, float]) -> None:
        if self._allowed is not False:
            if self._allowed is True:
                wiped = self._wipe_markers()
                log.warning("archive_paused", reason=self._reason(), markers_removed=wiped)
            self._allowed = False
            self.files.clear()  # forget what we knew: re-checked (cheaply) if we archive again
        if not self._refusal_logged and (ready or self.queue.entries):
            self._refusal_logged = True
            log.warning(
                "archive_refused",
                reason=self._reason(),
                ready_files=len(ready),
                queued_files=len(self.queue.entries),
            )

    def _sync_files(self, ready: Mapping[str, float], now: float) -> None:
        for name in list(self.files):
            if name not in ready and not self.files[name].in_flight:
                del self.files[name]
        for name, mtime in ready.items():
            if name in self.files:
                continue
            try:
                size = (self.pg_wal / name).stat().st_size
            except FileNotFoundError:
                continue
            self.files[name] = ReadyFile(name, mtime, size)

    # ------------------------------------------------------------------ markers

    def _write_marker(self, f: ReadyFile) -> None:
        try:
            fd = os.open(
                self.done_dir / f.name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
            os.close(fd)
        except FileExistsError:
            pass
        f.done = True
        f.marker_at = time.monotonic()

    def _fix_markers(self, ready: Mapping[str, float], now: float) -> None:
        """A file we handed back is .ready again or still (PostgreSQL crashed between our
        marker and its rename to .done, and calls archive_command again): put the marker back."""
        for f in self.files.values():
            if f.done and f.name in ready and now - f.marker_at > MARKER_REWRITE_AFTER:
                if not (self.done_dir / f.name).exists():
                    self._write_marker(f)
                else:
                    f.marker_at = now

    def _sweep_orphan_markers(self, ready: Mapping[str, float]) -> None:
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return
        for n in names:
            if n not in ready and not (self.status_dir / (n + _READY)).exists():
                with contextlib.suppress(FileNotFoundError):
                    (self.done_dir / n).unlink()

    # ------------------------------------------------------------------ scheduling

    def _up_repos(self) -> list[RepoState]:
        return [rs for rs in self.repos.values() if rs.up]

    def _schedule(self, now: float) -> None:
        self._schedule_live(now)
        # Queued files to the repositories that lack them; a probe of a repository that is down.
        slots = self.cfg.parallel - len(self._tasks)
        for rs in self.repos.values():
            if slots <= 0:
                break
            names = [n for n in self.queue.files_for(rs.name) if n not in rs.draining]
            if not names:
                if not rs.up and not self.queue.files_for(rs.name) and rs.claim_probe(now):
                    slots -= 1
                    self._spawn(self._probe(rs), f"probe-{rs.name}")
                continue
            if not rs.up:
                if rs.draining or not rs.claim_probe(now):
                    continue
                names = names[:1]  # one file probes a repository that was down
            for n in names:
                if slots <= 0:
                    break
                rs.draining.add(n)
                slots -= 1
                self._spawn(self._drain_one(rs, n), f"drain-{rs.name}-{n}")
        for rec in list(self.gaps.records.values()):
            for repo in list(rec.pending):
                target = self.repos.get(repo)
                key = (rec.gap_id, repo)
                if target is not None and target.up and key not in self._publishing:
                    self._publishing.add(key)
                    self._spawn(self._publish_gap(target, rec), f"gap-{rec.gap_id}-{repo}")

    def _schedule_live(self, now: float) -> None:
        """Push .ready files to the repositories, oldest first, keeping a slot for the queue."""
        slots = self.cfg.parallel - len(self._tasks)
        drain_waiting = any(self.queue.files_for(r) for r in self.repos)
        reserve = 1 if drain_waiting and self.cfg.parallel > 1 else 0
        # History files first: a segment of a new timeline never goes before its history file.
        history_pending = any(
            is_history(f.name) and not f.done and not f.conflicts for f in self.files.values()
        )
        any_up = bool(self._up_repos())
        for f in sorted(self.files.values(), key=lambda f: archive_order(f.name)):
            if slots - reserve <= 0:
                break
            if f.done or f.in_flight or f.conflicts or now < f.next_try:
                continue
            if history_pending and not is_history(f.name):
                break
            targets = _live_targets(self.repos, f, any_up, now)
            if targets is None:
                f.blocked = True
                continue
            f.in_flight = True
            f.blocked = False
            slots -= 1
            self._spawn(self._push_live(f, targets), f"archive-{f.name}")

    # ------------------------------------------------------------------ pushing

    async def _put(self, rs: RepoState, name: str, data: bytes) -> tuple[str, str | None]:
        if not self._allowed_now():
            rs.probing = False
            return PushOutcome.REFUSED, "archiving not allowed now"
        key = layout.wal_key(self.scope, name)
        now = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.repo_timeout):
                await rs.repo.put_unique(key, data, meta={"node": self.node} if self.node else None)
        except ContentConflict as e:
            rs.conflicts += 1
            self.m_conflicts.labels(rs.name).inc()
            self.recent_conflicts.append(
                {"repo": rs.name, "file": name, "quarantined": e.quarantined, "at": iso(time.time()) or ""}
            )
            log.error(
                "archive_conflict",
                repo=rs.name,
                file=name,
                quarantined=e.quarantined,
                existing_sha256=e.existing_sha256,
                new_sha256=e.new_sha256,
                action="not archived; an object with other content has that name (split brain, or "
                "another cluster with the same scope?): an operator must look",
            )
            rs.ok(None)
            return PushOutcome.CONFLICT, str(e)
        except TimeoutError:
            err = f"no answer within {self.cfg.repo_timeout:g} s"
            self.m_failures.labels(rs.name).inc()
            rs.failed(err, now)
            return PushOutcome.ERROR, err
        except RepoError as e:
            self.m_failures.labels(rs.name).inc()
            rs.failed(str(e), now)
            return PushOutcome.ERROR, str(e)
        except OSError as e:
            self.m_failures.labels(rs.name).inc()
            rs.failed(f"{type(e).__name__}: {e}", now)
            return PushOutcome.ERROR, str(e)
        rs.ok(name)
        self._note_durable(rs, name)
        self.m_files.labels(rs.name).inc()
        self.m_last_success.labels(rs.name).set(rs.last_success_at or time.time())
        return PushOutcome.STORED, None

    async def _push_live(self, f: ReadyFile, targets: list[RepoState]) -> None:
        try:
            await self._push_live_inner(f, targets)
        finally:
            f.in_flight = False
            for rs in targets:
                rs.probing = False

    async def _push_live_inner(self, f: ReadyFile, targets: list[RepoState]) -> None:
        try:
            data = await asyncio.to_thread((self.pg_wal / f.name).read_bytes)
        except FileNotFoundError:
            log.warning("archive_file_vanished", file=f.name)
            self.files.pop(f.name, None)
            return
        puts = {asyncio.ensure_future(self._put(rs, f.name, data)): rs for rs in targets}
        errors: list[str] = []
        pending, refused = await _await_puts(f, puts, errors, self.cfg.queue_slow_after)
        slow = [puts[t] for t in pending]
        if refused or self.files.get(f.name) is not f or not self._allowed_now():
            for t in pending:
                t.cancel()
            return  # refused meanwhile: nothing more (the state is forgotten anyway)
        missing = [r for r in self.repos if r not in f.stored | f.queued | set(f.conflicts)]
        if missing and (f.stored or f.conflicts):
            try:
                await self._enqueue(f, data, missing)
            except OSError as e:
                errors.append(f"spool: {e}")
                log.error("archive_spool_write_failed", file=f.name, repos=missing, error=str(e))
        for t, rs in ((t, puts[t]) for t in pending):
            if rs.name in f.queued and len(rs.background) < self.cfg.parallel and f.name not in rs.draining:
                rs.draining.add(f.name)  # the background push acts as this file's drain
                rs.background.add(t)
                t.add_done_callback(functools.partial(self._background_done, rs, f.name))
            else:
                t.cancel()
        if slow:
            log.info("archive_repository_slow", file=f.name, repos=[rs.name for rs in slow])
        if f.conflicts:
            f.last_error = "; ".join(f"{r}: {m}" for r, m in f.conflicts.items())
            self.last_error = f.last_error
            return
        if set(self.repos) <= f.stored | f.queued:
            self._handed_back(f)
            return
        f.attempts += 1
        f.last_error = "; ".join(errors) or "no repository could be tried"
        self.last_error = f"{f.name}: {f.last_error}"
        f.next_try = time.monotonic() + backoff(f.attempts)

    def _background_done(self, rs: RepoState, name: str, t: asyncio.Future[tuple[str, str | None]]) -> None:
        """A push that went on after its file was queued for the repository finished."""
        rs.background.discard(t)
        if t.cancelled():
            rs.draining.discard(name)
            return
        outcome, err = t.result()
        if outcome == PushOutcome.STORED:
            self._spawn(self._dequeue(rs, name), f"dequeue-{rs.name}-{name}")
        elif outcome == PushOutcome.CONFLICT:
            self._spawn(self._dequeue(rs, name, conflict=err), f"dequeue-{rs.name}-{name}")
        else:
            rs.draining.discard(name)

    async def _dequeue(self, rs: RepoState, name: str, conflict: str | None = None) -> None:
        try:
            if conflict is not None:
                await self._record_gap([name], [rs.name], "conflict", detail=conflict)
            await asyncio.to_thread(self.queue.remove, rs.name, name)
        finally:
            rs.draining.discard(name)

    async def _enqueue(self, f: ReadyFile, data: bytes, repos: list[str]) -> None:
        await asyncio.to_thread(self.queue.add, f.name, data, repos)
        f.queued.update(repos)
        log.info("archive_queued", file=f.name, repos=repos, queue_bytes=self.queue.total_bytes)
        await self._enforce_queue_cap()

    def _handed_back(self, f: ReadyFile) -> None:
        self._write_marker(f)
        latency = max(0.0, time.time() - f.ready_at)
        self.m_latency.observe(latency)
        self.latencies.append((f.name, latency))
        self.archived_files += 1
        self.archived_bytes += f.size
        self.last_archived = f.name
        self.last_archived_at = time.time()

    async def _drain_one(self, rs: RepoState, name: str) -> None:
        try:
            try:
                data = await asyncio.to_thread(self.queue.read, rs.name, name)
            except FileNotFoundError:
                return  # dropped meanwhile
            outcome, err = await self._put(rs, name, data)
            if outcome == PushOutcome.STORED:
                await asyncio.to_thread(self.queue.remove, rs.name, name)
                log.info(
                    "archive_queue_drained", repo=rs.name, file=name, left=len(self.queue.files_for(rs.name))
                )
            elif outcome == PushOutcome.CONFLICT:
                await self._record_gap([name], [rs.name], "conflict", detail=err)
                await asyncio.to_thread(self.queue.remove, rs.name, name)
        finally:
            rs.draining.discard(name)
            rs.probing = False

    async def _probe(self, rs: RepoState) -> None:
        """Is a down repository (with nothing queued for it) back?  A stat of a name that is
        never stored: 'not found' is an answer."""
        try:
            if not self._allowed_now():
                return
            now = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.repo_timeout):
                    await rs.repo.stat(f"{self.scope}/wal-gaps/probe")
            except NotFound:
                rs.ok(None)
            except TimeoutError:
                rs.failed(f"no answer within {self.cfg.repo_timeout:g} s", now)
            except (RepoError, OSError) as e:
                rs.failed(str(e), now)
            else:
                rs.ok(None)
        finally:
            rs.probing = False

    async def _publish_gap(self, rs: RepoState, rec: GapRecord) -> None:
        try:
            if not self._allowed_now():
                return
            now = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.repo_timeout):
                    await rs.repo.put_unique(gap_key(self.scope, rec.gap_id), rec.body)
            except ContentConflict as e:
                log.error("archive_gap_record_conflict", repo=rs.name, gap=rec.gap_id, error=str(e))
            except TimeoutError:
                rs.failed(f"no answer within {self.cfg.repo_timeout:g} s", now)
                return
            except (RepoError, OSError) as e:
                rs.failed(str(e), now)
                return
            await asyncio.to_thread(self.gaps.published, rec.gap_id, rs.name)
            log.info("archive_gap_published", repo=rs.name, gap=rec.gap_id)
        finally:
            self._publishing.discard((rec.gap_id, rs.name))

    # ------------------------------------------------------------------ caps and gaps

    async def _record_gap(
        self, files: list[str], repos: list[str], reason: str, detail: str | None = None
    ) -> None:
        ordered = sorted(files, key=archive_order)
        doc: dict[str, Any] = {
            "format": GAP_FORMAT,
            "scope": self.scope,
            "node": self.node,
            "reason": reason,
            "repositories": sorted(repos),
            "files": ordered,
            "recorded_at": iso(time.time()),
            "detail": detail,
        }
        rec = await asyncio.to_thread(self.gaps.record, doc)
        self.m_gap_files.labels(reason).inc(len(files))
        log.error(
            "archive_gap_recorded",
            gap=rec.gap_id,
            reason=reason,
            repositories=sorted(repos),
            files=len(files),
            first=ordered[0] if ordered else None,
            last=ordered[-1] if ordered else None,
            detail=detail,
        )

    async def _enforce_queue_cap(self) -> None:
        cap = self.cfg.max_queue_bytes
        sizes = {n: e.size for n, e in self.queue.entries.items()}
        busy = {n for rs in self.repos.values() for n in rs.draining}
        drops = plan_queue_drops(sizes, cap, busy)
        if not drops:
            return
        per_repo: dict[str, list[str]] = {}
        for n in drops:
            for r in self.queue.entries[n].repos:
                per_repo.setdefault(r, []).append(n)
        # the record first (durable), then the drop: a crash in between overstates the gap
        for repo, names in per_repo.items():
            await self._record_gap(names, [repo], "queue_cap", detail=f"local queue over {cap} bytes")
        for repo, names in per_repo.items():
            for n in names:
                await asyncio.to_thread(self.queue.remove, repo, n)

    def _enforce_pg_wal_cap(self, now: float) -> None:
        cap = self.cfg.max_pg_wal_bytes
        if cap is None:
            return
        infos = [
            ReadyInfo(f.name, f.size, f.failed and not f.in_flight and not f.done, f.done)
            for f in self.files.values()
        ]
        victims = plan_give_up(infos, cap)
        if not victims:
            return
        self._spawn(self._give_up([self.files[n] for n in victims]), "archive-give-up")
        for n in victims:
            self.files[n].in_flight = True  # not scheduled meanwhile

    async def _give_up(self, victims: list[ReadyFile]) -> None:
        try:
            per_set: dict[tuple[str, ...], list[str]] = {}
            for f in victims:
                lacking = tuple(sorted(r for r in self.repos if r not in f.stored | f.queued))
                per_set.setdefault(lacking, []).append(f.name)
            for lacking, names in per_set.items():
                await self._record_gap(
                    names,
                    list(lacking),
                    "pg_wal_cap",
                    detail=f".ready WAL in pg_wal over max_pg_wal_bytes={self.cfg.max_pg_wal_bytes}",
                )
            if not self._allowed_now():
                return
            for f in victims:
                if self.files.get(f.name) is f:
                    f.given_up = True
                    self._write_marker(f)
                    self.given_up_files += 1
                    log.error("archive_gave_up", file=f.name, size=f.size, error=f.last_error)
        finally:
            for f in victims:
                f.in_flight = False

    # ------------------------------------------------------------------ after a promotion

    def after_promotion(self, timeline: int | None) -> None:
        """In the background: once this node's ``<timeline>.history`` is archived, check that
        every repository holds the WAL of the earlier timelines up to the switch point (from the
        oldest segment it has on that path), and log what is missing (pgBackRest #626: WAL the
        old primary never archived is not in any archive, though the new primary streamed it)."""
        if not timeline or timeline < 2:
            return
        t = asyncio.create_task(self._check_switch(timeline), name=f"archive-switch-check-{timeline}")
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    async def _check_switch(self, tli: int) -> None:
        hist = layout.history_name(tli)
        try:
            history = layout.parse_history(await asyncio.to_thread((self.pg_wal / hist).read_text))
        except (OSError, ValueError) as e:
            log.warning("archive_switch_check_skipped", timeline=tli, reason=str(e))
            return
        if not history:
            return
        switch = history[-1].switch_lsn
        for _ in range(600):  # until our history file is handed back (at most a minute)
            f = self.files.get(hist)
            if (f is not None and f.done) or not (self.status_dir / f"{hist}{_READY}").exists():
                break
            await asyncio.sleep(0.1)
        seg_size = await asyncio.to_thread(_segment_size, self.pg_wal)
        last = layout.segno_of(switch, seg_size) - 1  # the switch segment itself is on the new timeline
        results: dict[str, Any] = {}
        for name, rs in self.repos.items():
            try:
                async with asyncio.timeout(self.cfg.repo_timeout):
                    objs = await rs.repo.list_objects(layout.wal_prefix(self.scope))
            except (TimeoutError, RepoError, OSError) as e:
                results[name] = {"checked": False, "error": str(e)}
                continue
            have = {o.name.rsplit("/", 1)[1] for o in objs}
            on_path = [
                seg[1]
                for n in have
                if (seg := layout.parse_segment_name(n, seg_size)) is not None
                and seg[1] <= last
                and _on_path(n, seg[1], tli, history, seg_size)
            ]
            if last < 0 or not on_path:
                results[name] = {"checked": True, "missing": 0, "note": "no earlier WAL in this repository"}
                continue
            wanted = layout.wal_segments(
                layout.segment_start_lsn(min(on_path), seg_size),
                layout.segment_start_lsn(last, seg_size),
                tli,
                history,
                seg_size,
            )
            missing = [n for n in wanted if n not in have]
            results[name] = {"checked": True, "from": wanted[0], "to": wanted[-1], "missing": len(missing)}
            if missing:
                results[name]["first_missing"] = missing[0]
                log.warning(
                    "archive_gap_before_switch",
                    repo=name,
                    timeline=tli,
                    switch_lsn=format_lsn(switch),
                    missing=len(missing),
                    first=missing[0],
                    last=missing[-1],
                    hint="the old primary did not archive them; take a new base backup",
                )
            else:
                log.info(
                    "archive_complete_before_switch",
                    repo=name,
                    timeline=tli,
                    first=wanted[0],
                    last=wanted[-1],
                )
        self.switch_check = {"timeline": tli, "switch_lsn": format_lsn(switch), "repositories": results}

    # ------------------------------------------------------------------ archive RPO (issue 6, 5a)

    def _note_durable(self, rs: RepoState, name: str) -> None:
        """``name`` is stored in ``rs``: remember when it became .ready (its content is older)."""
        if is_history(name):
            return  # says nothing about how far WAL is durable
        f = self.files.get(name)
        if f is not None:
            rs.stored_ready[name] = f.ready_at
            return
        with contextlib.suppress(OSError):  # a queued file: its queue copy is as old as .ready or younger
            rs.stored_ready[name] = self.queue.path(rs.name, name).stat().st_mtime
            return
        rs.stored_ready[name] = time.time()

    def _rpo_baseline(self) -> None:
        """At this process's first activation: WAL PostgreSQL marked ``.done`` was archived before
        (by an earlier agent: it hands back only durable files); the newest one's mtime (kept by
        the rename from .ready) starts the RPO of every repository with nothing queued."""
        newest = 0.0
        with contextlib.suppress(OSError), os.scandir(self.status_dir) as it:
            for e in it:
                if e.name.endswith(".done") and layout.parse_segment_name(e.name[:-5]) is not None:
                    with contextlib.suppress(OSError):
                        newest = max(newest, e.stat().st_mtime)
        if newest:
            for rs in self.repos.values():
                if rs.durable_at is None and not self.queue.files_for(rs.name):
                    rs.durable_at = newest

    def rpo_seconds(self, now: float) -> dict[str, float | None]:
        return {
            name: None if rs.durable_at is None else max(0.0, now - rs.durable_at)
            for name, rs in self.repos.items()
        }

    def _refresh_rpo(self, now: float) -> None:
        """Fold stored files into ``durable_at`` up to the oldest WAL file still missing in a
        repository (live and not stored there, or queued for it): restore replays WAL in order,
        so nothing after a hole is restorable from that repository."""
        if not self._allowed:
            self.m_rpo.clear()  # only the archiving primary knows; after a promotion, start afresh
            for rs in self.repos.values():
                rs.durable_at = None
                rs.stored_ready.clear()
            return
        for name, rs in self.repos.items():
            missing = [f.name for f in self.files.values() if name not in f.stored and not is_history(f.name)]
            missing += [n for n in self.queue.files_for(name) if not is_history(n)]
            first_missing = min(missing, default=None)
            for n, t in list(rs.stored_ready.items()):
                if first_missing is None or n < first_missing:
                    rs.durable_at = t if rs.durable_at is None else max(rs.durable_at, t)
                    del rs.stored_ready[n]
            if rs.durable_at is not None:
                self.m_rpo.labels(name).set(max(0.0, now - rs.durable_at))

    # ------------------------------------------------------------------ status

    def latency_quantiles(self, qs: Sequence[float] = (0.5, 0.99)) -> dict[str, float | None]:
        vals = sorted(v for _, v in self.latencies)
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{round(q * 100):d}"
            out[key] = None if not vals else round(vals[min(len(vals) - 1, int(q * len(vals)))], 3)
        return out

    def status(self) -> dict[str, Any]:
        """Counts, last archived file and last error per repository (JSON-able; no I/O)."""
        pending = [f for f in self.files.values() if not f.done]
        conflicted = sorted(f.name for f in self.files.values() if f.conflicts and not f.done)
        now = time.time()
        repos = []
        for name, rs in self.repos.items():
            repos.append(
                {
                    "name": name,
                    "up": rs.up,
                    "archived": rs.archived,
                    "failures": rs.failures,
                    "conflicts": rs.conflicts,
                    "queued_files": len(self.queue.files_for(name)),
                    "queued_bytes": self.queue.bytes_for(name),
                    "last_archived": rs.last_archived,
                    "last_success_at": iso(rs.last_success_at),
                    "last_error": rs.last_error,
                    "last_error_at": iso(rs.last_error_at),
                    "rpo_seconds": None if rs.durable_at is None else round(max(0.0, now - rs.durable_at), 3),
                    "durable_through": iso(rs.durable_at),
                }
            )
        return {
            "active": bool(self._allowed),
            "refused_reason": None if self._allowed else self._reason(),
            "pending_files": len(pending),
            "pending_bytes": sum(f.size for f in pending),
            "in_flight": sum(1 for f in self.files.values() if f.in_flight),
            "archived_files": self.archived_files,
            "archived_bytes": self.archived_bytes,
            "last_archived": self.last_archived,
            "last_archived_at": iso(self.last_archived_at),
            "last_error": self.last_error,
            "latency_seconds": self.latency_quantiles(),
            "queue": {
                "files": len(self.queue.entries),
                "bytes": self.queue.total_bytes,
                "max_bytes": self.cfg.max_queue_bytes,
            },
            "gaps": {"recorded": self.gaps.count, "unpublished": len(self.gaps.records)},
            "given_up_files": self.given_up_files,
            "conflicted_files": conflicted,
            "recent_conflicts": list(self.recent_conflicts),
            "switch_check": self.switch_check,
            "repositories": repos,
        }
