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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from hakeeper.backup import layout
from hakeeper.backup.archive import LOG_NAME, rpo
from hakeeper.backup.archive.command import DONE_DIR, SCRIPT_NAME, Markers, install_script, reachable_by
from hakeeper.backup.archive.dispatch import claim_gap_publications, claim_live_pushes, claim_queue_work
from hakeeper.backup.archive.gaps import GAP_FORMAT, GAPS_DIR, GapBook, GapRecord, gap_key
from hakeeper.backup.archive.metrics import ArchiveMetrics, latency_quantiles
from hakeeper.backup.archive.permission import Permission
from hakeeper.backup.archive.pgwal import scan_ready, sync_files
from hakeeper.backup.archive.plan import (
    ReadyInfo,
    archive_order,
    auto_pg_wal_cap,
    backoff,
    cap_level,
    plan_give_up,
    plan_queue_drops,
)
from hakeeper.backup.archive.spool import QUEUE_DIR, SpoolQueue
from hakeeper.backup.archive.state import PushOutcome, ReadyFile, RepoState
from hakeeper.backup.archive.switch import SwitchCheck
from hakeeper.backup.binding import BindingMismatch, bind
from hakeeper.backup.errors import ContentConflict, NotFound, RepoError
from hakeeper.core.timefmt import iso
from hakeeper.util.fsutil import UnsafePathError, read_regular
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

if TYPE_CHECKING:
    from hakeeper.backup.repo import Repository
    from hakeeper.core.backup_config import ArchiveConfig, RepositoryConfig

log = get_logger(LOG_NAME)

ORPHAN_SWEEP_EVERY = 5.0


def archive_repository_config(rc: RepositoryConfig, cfg: ArchiveConfig) -> RepositoryConfig:
    """``rc`` as the archiver uses it: with the WAL compression level of ``cfg`` if set."""
    if cfg.compression_level is None or cfg.compression_level == rc.compression_level:
        return rc
    return rc.model_copy(update={"compression_level": cfg.compression_level})


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
    """Archives ``pg_wal`` to ``repositories`` while ``may_archive()`` holds (see the package doc).

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
        system_identifier: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """``system_identifier``: the local cluster's (pg_control); with it, every repository's
        binding (:mod:`hakeeper.backup.binding`) is checked before the first write to it."""
        if not repositories:
            raise ValueError("the archiver needs at least one repository")
        self.scope = scope
        self.pg_wal = pg_wal
        self.status_dir = pg_wal / "archive_status"
        self.spool = spool_dir
        self.script = spool_dir / SCRIPT_NAME
        self.markers = Markers(spool_dir / DONE_DIR)
        self.cfg = cfg
        self.permission = Permission(may_archive, refusal_reason)
        self.run_as = run_as
        self.node = node
        self.system_identifier = system_identifier
        self.pg_wal_cap: int | None = None if cfg.max_pg_wal_bytes == "auto" else cfg.max_pg_wal_bytes
        self._cap_resolved = cfg.max_pg_wal_bytes != "auto"
        self._cap_level = 0
        self.repos: dict[str, RepoState] = {r.name: RepoState(r) for r in repositories}
        self.queue = SpoolQueue(spool_dir / QUEUE_DIR, list(self.repos))
        self.gaps = GapBook(spool_dir / GAPS_DIR, list(self.repos))
        self.files: dict[str, ReadyFile] = {}
        self.unsafe: set[str] = set()  # .ready names refused as not a regular file (logged once)
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
        self.switch_check = SwitchCheck(
            scope=scope, pg_wal=pg_wal, repos=self.repos, files=self.files, repo_timeout=cfg.repo_timeout
        )
        self._wake = asyncio.Event()
        self._last_sweep = 0.0
        self._prepared = False
        self._closed = False
        self._rpo_baselined = False
        self.metrics = ArchiveMetrics(registry or CollectorRegistry())

    # ------------------------------------------------------------------ set-up

    def archive_command(self) -> str:
        """The ``archive_command`` value for postgresql.conf."""
        return f'{shlex.quote(str(self.script))} "%p" "%f"'

    def prepare(self) -> None:
        """Create the spool (the script, ``done/`` owned by PostgreSQL's OS user, the queue and
        gap directories), remove markers of an earlier run, load the queue and gap records."""
        sp = self.spool
        install_script(sp, self.cfg.timeout, self.run_as)
        wiped = self.markers.wipe()
        removed = self.queue.load()
        self.gaps.load()
        if not reachable_by(self.markers.done_dir, self.run_as):
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

    def tick(self) -> None:
        now = time.monotonic()
        allowed = self.permission.granted()
        ready = scan_ready(self.status_dir)
        if not allowed:
            self._refuse(ready)
            self._refresh_metrics()
            return
        if self._allowed is not True:
            if not self._rpo_baselined:
                self._rpo_baselined = True
                rpo.start_from_done_files(self.status_dir, self.repos, self.queue)
            if self._allowed is False:
                log.info("archive_resumed", ready=len(ready), queued=len(self.queue.entries))
            self._allowed = True
            self._refusal_logged = False
        if self.unsafe:  # refused as not a regular file: left .ready until the agent restarts
            ready = {k: v for k, v in ready.items() if k not in self.unsafe}
        sync_files(self.files, ready, self.pg_wal)
        self.markers.put_back(self.files.values(), ready, now)
        self._enforce_pg_wal_cap(now)
        self._watch_pg_wal_cap()
        self._schedule(now)
        if now - self._last_sweep > ORPHAN_SWEEP_EVERY:
            self._last_sweep = now
            self.markers.sweep_orphans(ready, self.status_dir)
        self._refresh_metrics()

    def _refuse(self, ready: Mapping[str, float]) -> None:
        if self._allowed is not False:
            if self._allowed is True:
                wiped = self.markers.wipe()
                log.warning("archive_paused", reason=self.permission.reason(), markers_removed=wiped)
            self._allowed = False
            self.files.clear()  # forget what we knew: re-checked (cheaply) if we archive again
        if not self._refusal_logged and (ready or self.queue.entries):
            self._refusal_logged = True
            log.warning(
                "archive_refused",
                reason=self.permission.reason(),
                ready_files=len(ready),
                queued_files=len(self.queue.entries),
            )

    def _refresh_metrics(self) -> None:
        self.metrics.refresh(self.files.values(), self.repos, self.queue, active=bool(self._allowed))
        rpo.fold_durable(
            self.repos, self.files, self.queue, self.metrics.rpo, time.time(), active=bool(self._allowed)
        )

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, now: float) -> None:
        """Start what may start now: live pushes (keeping a slot for the queue), then drains of
        the queue and probes of repositories that are down, then gap records to publish."""
        slots = self.cfg.parallel - len(self._tasks)
        drain_waiting = any(self.queue.files_for(r) for r in self.repos)
        reserve = 1 if drain_waiting and self.cfg.parallel > 1 else 0
        for f, targets in claim_live_pushes(self.files, self.repos, slots, reserve, now):
            self._spawn(self._push_live(f, targets), f"archive-{f.name}")
        slots = self.cfg.parallel - len(self._tasks)
        for rs, name in claim_queue_work(self.repos, self.queue, slots, now):
            if name is None:
                self._spawn(self._probe(rs), f"probe-{rs.name}")
            else:
                self._spawn(self._drain_one(rs, name), f"drain-{rs.name}-{name}")
        for rs, rec in claim_gap_publications(self.gaps.records.values(), self.repos, self._publishing):
            self._spawn(self._publish_gap(rs, rec), f"gap-{rec.gap_id}-{rs.name}")

    # ------------------------------------------------------------------ pushing

    async def _put(self, rs: RepoState, name: str, data: bytes) -> tuple[str, str | None]:
        if not self.permission.granted():
            rs.probing = False
            return PushOutcome.REFUSED, "archiving not allowed now"
        key = layout.wal_key(self.scope, name)
        now = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.repo_timeout):
                await self._ensure_bound(rs)
                await rs.repo.put_unique(key, data, meta={"node": self.node} if self.node else None)
        except ContentConflict as e:
            rs.conflicts += 1
            self.metrics.conflicts.labels(rs.name).inc()
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
            self.metrics.failures.labels(rs.name).inc()
            rs.failed(err, now)
            return PushOutcome.ERROR, err
        except RepoError as e:
            self.metrics.failures.labels(rs.name).inc()
            rs.failed(str(e), now)
            return PushOutcome.ERROR, str(e)
        except OSError as e:
            self.metrics.failures.labels(rs.name).inc()
            rs.failed(f"{type(e).__name__}: {e}", now)
            return PushOutcome.ERROR, str(e)
        rs.ok(name)
        rpo.note_durable(rs, name, self.files, self.queue)
        self.metrics.files.labels(rs.name).inc()
        self.metrics.last_success.labels(rs.name).set(rs.last_success_at or time.time())
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
            # Never through a link: as root, a link at pg_wal/<name> plus a .ready file would
            # upload any file root can read into the repository.
            data = await asyncio.to_thread(read_regular, self.pg_wal / f.name)
        except FileNotFoundError:
            log.warning("archive_file_vanished", file=f.name)
            self.files.pop(f.name, None)
            return
        except UnsafePathError as e:
            if f.name not in self.unsafe:
                self.unsafe.add(f.name)
                log.error("archive_file_refused", file=f.name, reason=str(e))
            self.files.pop(f.name, None)
            return
        puts = {asyncio.ensure_future(self._put(rs, f.name, data)): rs for rs in targets}
        errors: list[str] = []
        pending, refused = await _await_puts(f, puts, errors, self.cfg.queue_slow_after)
        slow = [puts[t] for t in pending]
        if refused or self.files.get(f.name) is not f or not self.permission.granted():
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
        self.markers.write(f)
        latency = max(0.0, time.time() - f.ready_at)
        self.metrics.latency.observe(latency)
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
            if not self.permission.granted():
                return
            now = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.repo_timeout):
                    await self._ensure_bound(rs)  # a refused repository stays down
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
            if not self.permission.granted():
                return
            now = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.repo_timeout):
                    await self._ensure_bound(rs)
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
        self.metrics.gap_files.labels(reason).inc(len(files))
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
        cap = self._resolve_pg_wal_cap()
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
                    detail=f".ready WAL in pg_wal over max_pg_wal_bytes={self.pg_wal_cap}",
                )
            if not self.permission.granted():
                return
            for f in victims:
                if self.files.get(f.name) is f:
                    f.given_up = True
                    self.markers.write(f)
                    self.given_up_files += 1
                    log.error("archive_gave_up", file=f.name, size=f.size, error=f.last_error)
        finally:
            for f in victims:
                f.in_flight = False

    def _resolve_pg_wal_cap(self) -> int | None:
        """The pg_wal cap in bytes (``auto``: from pg_wal's filesystem, once it exists)."""
        if not self._cap_resolved:
            try:
                st = os.statvfs(self.pg_wal)
            except OSError:
                return None  # no pg_wal yet (before initdb): nothing to cap
            self.pg_wal_cap = auto_pg_wal_cap(st.f_blocks * st.f_frsize)
            self._cap_resolved = True
            log.info(
                "pg_wal_cap_resolved",
                max_pg_wal_bytes=self.pg_wal_cap,
                setting="auto",
                pg_wal=str(self.pg_wal),
            )
        return self.pg_wal_cap

    def pending_bytes(self) -> int:
        """Bytes of the ``.ready`` files not handed back: what the pg_wal cap counts."""
        return sum(f.size for f in self.files.values() if not f.done)

    def _watch_pg_wal_cap(self) -> None:
        """Warn long before the cap gives WAL up: at 50% and 80% of it (once per level
        reached), and say when the WAL waiting fell back under 50%."""
        cap, pending = self.pg_wal_cap, self.pending_bytes()
        level = cap_level(pending, cap)
        self.metrics.pg_wal_cap.set(float("nan") if cap is None else cap)
        self.metrics.pg_wal_cap_ratio.set(float("nan") if not cap else pending / cap)
        if level > self._cap_level:
            log.warning(
                "pg_wal_cap_approaching",
                percent=level,
                pending_bytes=pending,
                max_pg_wal_bytes=cap,
                reason="WAL is not being archived; at the cap the oldest unarchived WAL is given up "
                "(a gap in the archive: no PITR across it)",
                last_error=self.last_error,
            )
        elif level == 0 and self._cap_level > 0:
            log.info("pg_wal_cap_relieved", pending_bytes=pending, max_pg_wal_bytes=cap)
        self._cap_level = level

    async def _ensure_bound(self, rs: RepoState) -> None:
        """Before the first write to a repository: its ``<scope>/`` must belong to this
        cluster (bound on first use if it has no binding yet); :class:`BindingMismatch`
        otherwise, which makes the repository down with that reason (a probe checks again)."""
        if rs.bound or self.system_identifier is None:
            return
        sysid = await self.system_identifier()
        if sysid is None:
            return  # not known yet (no pg_control): checked at the next write
        try:
            await bind(rs.repo, self.scope, sysid, f"archiver {self.node}".strip(), time.time())
        except BindingMismatch as e:
            rs.binding_error = str(e)
            self.metrics.binding_refused.labels(rs.name).set(1)
            raise
        rs.bound = True
        rs.binding_error = None
        self.metrics.binding_refused.labels(rs.name).set(0)

    # ------------------------------------------------------------------ after a promotion

    def after_promotion(self, timeline: int | None) -> None:
        """In the background: once this node's ``<timeline>.history`` is archived, check that
        every repository holds the WAL of the earlier timelines up to the switch point (from the
        oldest segment it has on that path), and log what is missing (pgBackRest #626: WAL the
        old primary never archived is not in any archive, though the new primary streamed it)."""
        if not timeline or timeline < 2:
            return
        t = asyncio.create_task(self.switch_check.run(timeline), name=f"archive-switch-check-{timeline}")
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    # ------------------------------------------------------------------ status

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
                    "binding_error": rs.binding_error,
                }
            )
        return {
            "active": bool(self._allowed),
            "refused_reason": None if self._allowed else self.permission.reason(),
            "pending_files": len(pending),
            "pending_bytes": sum(f.size for f in pending),
            "in_flight": sum(1 for f in self.files.values() if f.in_flight),
            "archived_files": self.archived_files,
            "archived_bytes": self.archived_bytes,
            "last_archived": self.last_archived,
            "last_archived_at": iso(self.last_archived_at),
            "last_error": self.last_error,
            "latency_seconds": latency_quantiles(self.latencies),
            "queue": {
                "files": len(self.queue.entries),
                "bytes": self.queue.total_bytes,
                "max_bytes": self.cfg.max_queue_bytes,
            },
            "gaps": {"recorded": self.gaps.count, "unpublished": len(self.gaps.records)},
            "given_up_files": self.given_up_files,
            "pg_wal_cap": {
                "max_bytes": self.pg_wal_cap,
                "setting": self.cfg.max_pg_wal_bytes,
                "pending_bytes": self.pending_bytes(),
                "percent": None
                if not self.pg_wal_cap
                else round(100.0 * self.pending_bytes() / self.pg_wal_cap, 1),
                "warning_level": self._cap_level,
            },
            "conflicted_files": conflicted,
            "recent_conflicts": list(self.recent_conflicts),
            "switch_check": self.switch_check.report,
            "repositories": repos,
        }
