"""Backup schedules (issue 6, item 2): jobs the leader runs once per cron slot.

Each entry of ``backup.schedules`` (:class:`~hakeeper.core.backup_config.ScheduleConfig`) has one
record in etcd, ``<prefix>/schedules/<name>`` (:class:`ScheduleRecord`): when the schedule was
armed, the runs of its recent slots (slot, attempt, term, leader, start, end, result, error,
details) and the time of its last success.  The record is the claim: a slot runs only after the
leader wrote "slot S, attempt A, running" with a transaction that compares the record's
``mod_revision`` (nobody else claimed it meanwhile) and the leader key's ``create_revision`` (the
term: we still lead).  So a slot runs once in the cluster, whoever leads when it comes.

The pure part, :func:`plan`, turns (record, cron, now, who we are) into a :class:`Plan`:

* no record: *arm* it (slots count from then on; nothing runs for the past);
* the last run is ``running`` but not by a task of this process under the current term: the
  leader that ran it is gone (failover, or this agent restarted): mark it ``interrupted`` (the
  record says by whom and under which term);
* a slot passed after the last claimed one: run the newest such slot, once, however many were
  missed (``missed`` counts the others, logged);
* the last run was interrupted and no newer slot has come: run that slot again, once
  (``attempt`` 2): a base backup cut off by a failover left no usable backup behind, and users
  expect a missed slot to run when the cluster is back.  A slot is never tried a third time.

:class:`ScheduleRunner` is the agent's task: once a second it plans every schedule from the
agent's mirror of etcd, claims and starts due jobs as tasks (the HA loop never waits for them),
and refuses, logging why, while this node is not the lease-holding primary or the cluster is
paused.  A job that outlives our leadership finishes; its result is written to the record it
claimed, guarded by the record's ``mod_revision`` only (the truth about a run is worth
recording, whoever leads now).  See docs/schedules.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from croniter import croniter
from prometheus_client import CollectorRegistry, Counter, Gauge

from hakeeper.backup.phases import phases_dict
from hakeeper.core import timefmt
from hakeeper.core.backup_config import RepositoryConfig, ScheduleConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV, EtcdError
from hakeeper.dcs.store import ClusterStore, EtcdLike
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.core.cluster import ClusterView
    from hakeeper.core.config import NodeConfig

log = get_logger(__name__)

MAX_ATTEMPTS = 2  # an interrupted slot runs once more, never a third time
KEEP_RUNS = 20  # runs kept in a record
MISSED_COUNT_CAP = 10_000  # counting missed slots stops here (a seconds cron after a long outage)


class RunResult(StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class ScheduleStep(StrEnum):
    IDLE = "idle"
    ARM = "arm"
    RUN = "run"
    INTERRUPTED = "interrupted"


def iso(epoch: float | None) -> str | None:
    return timefmt.iso(epoch, timespec="seconds")


# ====================================================================== records


@dataclass(frozen=True, slots=True)
class Run:
    slot: float  # epoch of the cron slot
    attempt: int
    term: int
    leader: str
    started_at: float
    result: RunResult = RunResult.RUNNING
    finished_at: float | None = None
    error: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "attempt": self.attempt,
            "term": self.term,
            "leader": self.leader,
            "started_at": self.started_at,
            "result": self.result.value,
            "finished_at": self.finished_at,
            "error": self.error,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Run:
        return cls(
            slot=float(d["slot"]),
            attempt=int(d.get("attempt", 1)),
            term=int(d.get("term", 0)),
            leader=str(d.get("leader", "")),
            started_at=float(d.get("started_at", 0.0)),
            result=RunResult(d.get("result", RunResult.RUNNING)),
            finished_at=None if d.get("finished_at") is None else float(d["finished_at"]),
            error=d.get("error"),
            details=dict(d.get("details") or {}),
        )


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    name: str
    since: float  # armed at: slots before this never run
    runs: tuple[Run, ...] = ()
    last_success_at: float | None = None

    @property
    def last(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    def with_run(self, run: Run) -> ScheduleRecord:
        """The record with ``run`` replacing the run of the same slot and attempt, or appended."""
        runs = list(self.runs)
        for i, r in enumerate(runs):
            if r.slot == run.slot and r.attempt == run.attempt:
                runs[i] = run
                break
        else:
            runs.append(run)
        ok = self.last_success_at
        if run.result is RunResult.OK and run.finished_at is not None:
            ok = max(ok or 0.0, run.finished_at)
        return replace(self, runs=tuple(runs[-KEEP_RUNS:]), last_success_at=ok)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "since": self.since,
                "last_success_at": self.last_success_at,
                "runs": [r.to_dict() for r in self.runs],
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ScheduleRecord:
        d = json.loads(raw)
        return cls(
            name=str(d["name"]),
            since=float(d["since"]),
            runs=tuple(Run.from_dict(r) for r in d.get("runs") or ()),
            last_success_at=None if d.get("last_success_at") is None else float(d["last_success_at"]),
        )


# ====================================================================== slots (pure)


def _cron(expr: str, tz: str, start: float) -> croniter:
    return croniter(expr, dt.datetime.fromtimestamp(start, ZoneInfo(tz)))


def next_slot(expr: str, tz: str, after: float) -> float:
    """The first slot strictly after ``after`` (epoch seconds)."""
    return float(_cron(expr, tz, after).get_next(dt.datetime).timestamp())


def due_slots(expr: str, tz: str, after: float, now: float) -> tuple[float | None, int]:
    """(the newest slot in ``(after, now]``, how many slots that interval holds), or (None, 0)."""
    it = _cron(expr, tz, after)
    newest: float | None = None
    count = 0
    while count < MISSED_COUNT_CAP:
        t = float(it.get_next(dt.datetime).timestamp())
        if t > now:
            break
        newest = t
        count += 1
    if count >= MISSED_COUNT_CAP:  # jump to the newest directly
        newest = float(_cron(expr, tz, now + 1e-3).get_prev(dt.datetime).timestamp())
    return newest, count


@dataclass(frozen=True, slots=True)
class Plan:
    action: ScheduleStep
    why: str
    slot: float | None = None
    attempt: int = 1
    missed: int = 0


def plan(
    record: ScheduleRecord | None,
    expr: str,
    tz: str,
    now: float,
    *,
    me: str,
    term: int,
    running_here: bool,
) -> Plan:
    """What the leader (``me`` under ``term``) does about one schedule now.  No I/O."""
    if record is None:
        return Plan(ScheduleStep.ARM, "first seen: armed; slots count from now on")
    last = record.last
    if last is not None and last.result is RunResult.RUNNING:
        if last.leader == me and last.term == term:
            if running_here:
                return Plan(ScheduleStep.IDLE, "running", last.slot, last.attempt)
            why = f"this agent restarted while running it (term {term})"
        else:
            why = f"interrupted by failover (it ran on {last.leader or '?'}, term {last.term})"
        return Plan(ScheduleStep.INTERRUPTED, why, last.slot, last.attempt)
    base = record.since if last is None else max(record.since, last.slot)
    newest, count = due_slots(expr, tz, base, now)
    if newest is not None:
        missed = count - 1
        why = "slot due" if missed == 0 else f"slot due; {missed} earlier slot(s) missed, run once"
        return Plan(ScheduleStep.RUN, why, newest, 1, missed)
    if last is not None and last.result is RunResult.INTERRUPTED and last.attempt < MAX_ATTEMPTS:
        return Plan(ScheduleStep.RUN, "re-run once: the slot was interrupted", last.slot, last.attempt + 1)
    return Plan(ScheduleStep.IDLE, "no slot due")


# ====================================================================== jobs


class JobError(Exception):
    """A job failed; the message is recorded as the run's error."""


@dataclass(frozen=True, slots=True)
class JobContext:
    cfg: NodeConfig
    view: ClusterView
    slot: float
    repositories: list[RepositoryConfig]


JobFn = Callable[[ScheduleConfig, JobContext], Awaitable[dict[str, Any]]]


async def run_full(sched: ScheduleConfig, ctx: JobContext) -> dict[str, Any]:
    """A base backup (from the source ``hakeeper backup create --from`` would pick) into the
    first of the schedule's repositories that takes it, copied byte for byte (with its WAL, and
    read back) into each of the others (``backup copy``: one backup's load on the source, the
    same backup id everywhere for the 3-2-1 check); then each repository's retention."""
    from hakeeper.backup import retention
    from hakeeper.backup.basebackup import BackupError
    from hakeeper.backup.copy import CopyError, copy_item
    from hakeeper.backup.errors import RepoError
    from hakeeper.backup.repos import make_repository
    from hakeeper.backup.source import backup_node, choose_source
    from hakeeper.core.backup_config import RetentionConfig
    from hakeeper.pg.bins import node_bin_dir
    from hakeeper.pg.errors import PgError

    cfg = ctx.cfg
    try:
        bin_dir = node_bin_dir(cfg.postgresql)
        choice = choose_source(ctx.view, sched.source)
    except (PgError, BackupError) as e:
        raise JobError(str(e)) from None
    details: dict[str, Any] = {"source": choice.what, "repositories": {}}
    errors: list[str] = []
    taken: tuple[str, RepositoryConfig] | None = None  # (backup id, the repository it went to)
    for rc in ctx.repositories:
        one: dict[str, Any] = {}
        details["repositories"][rc.name] = one
        try:
            async with make_repository(rc) as r:
                if taken is None:
                    rec = await backup_node(
                        r,
                        cfg,
                        choice,
                        bin_dir=bin_dir,
                        label=f"schedule {sched.name} {iso(ctx.slot)}",
                        backup_type=sched.type,
                    )
                    taken = (rec.id, rc)
                    one["backup"] = rec.id
                    one["type"] = rec.kind
                    one["phases"] = phases_dict(rec.phases)  # exported by every agent (phase_metrics)
                    if rec.parent is not None:
                        one["parent"] = rec.parent
                    if rec.became_full is not None:
                        one["became_full"] = rec.became_full
                else:
                    async with make_repository(taken[1]) as src:
                        await copy_item(src, r, cfg.scope, taken[0])
                    one["backup"] = taken[0]
                    one["copied_from"] = taken[1].name
                kept = sched.retention
                rule = rc.retention
                if kept.count is not None or kept.days is not None:
                    rule = RetentionConfig(
                        full_count=kept.count, full_days=kept.days, wal_days=rc.retention.wal_days
                    )
                if kept.wal_days is not None:
                    rule = rule.model_copy(update={"wal_days": kept.wal_days})
                if rule.full_count is not None or rule.full_days is not None or rule.wal_days is not None:
                    p = await retention.expire(r, cfg.scope, rule)
                    one["expired_backups"] = [b.id for b in p.backups]
                    one["expired_wal"] = len(p.wal)
        except (BackupError, CopyError, RepoError, OSError) as e:
            one["error"] = str(e)
            errors.append(f"{rc.name}: {e}")
    if errors:
        raise JobError("; ".join(errors))
    return details


async def run_verify(sched: ScheduleConfig, ctx: JobContext) -> dict[str, Any]:
    """A restore drill (``hakeeper verify --latest``, docs/verify.md) of the newest backup of each
    repository in turn; a drill that fails fails the run."""
    from hakeeper.backup.basebackup import BackupError
    from hakeeper.backup.source import choose_source
    from hakeeper.backup.verify import DrillError, run_drill
    from hakeeper.dcs.etcd import EtcdClient

    cfg = ctx.cfg
    try:
        primary = choose_source(ctx.view, "primary").source  # where WAL is switched for the target
    except BackupError:
        primary = None
    details: dict[str, Any] = {"repositories": {}}
    errors: list[str] = []
    client = EtcdClient.from_config(cfg.etcd, min_timeout=2.0)
    try:
        for rc in ctx.repositories:
            try:
                res = await run_drill(cfg, repository=rc.name, primary=primary, etcd=client)
            except DrillError as e:
                details["repositories"][rc.name] = {"error": str(e)}
                errors.append(f"{rc.name}: {e}")
                continue
            details["repositories"][rc.name] = {
                "drill": res.id,
                "backup": res.backup_id,
                "ok": res.ok,
                "rto_seconds": res.rto.total if res.rto else None,
                "phases": phases_dict(res.phases),
                "error": res.error,
                "failed_object": res.failed_object,
            }
            if not res.ok:
                errors.append(f"{rc.name}: drill {res.id} of backup {res.backup_id} failed: {res.error}")
    finally:
        await client.close()
    if errors:
        raise JobError("; ".join(errors))
    return details


async def run_dump(sched: ScheduleConfig, ctx: JobContext) -> dict[str, Any]:
    """A logical dump on the primary (every database, or the schedule's ``databases``, in its
    ``format``; the globals too) labelled with the schedule, into the first of the schedule's
    repositories that takes it, copied (and read back) into each of the others; then, in each
    repository, the schedule's retention over the dumps of this schedule only
    (``expire_dumps(..., schedule=name)``: a daily dump's 30 days never expire a monthly
    export's dumps of the same databases, nor dumps taken by hand)."""
    from hakeeper.backup.basebackup import BackupError
    from hakeeper.backup.copy import CopyError, copy_item
    from hakeeper.backup.dump import DumpError, create_dump, expire_dumps, node_dump_request
    from hakeeper.backup.errors import RepoError
    from hakeeper.backup.repos import make_repository
    from hakeeper.backup.source import choose_source
    from hakeeper.pg.bins import node_bin_dir
    from hakeeper.pg.errors import PgError

    cfg = ctx.cfg
    try:
        bin_dir = node_bin_dir(cfg.postgresql)
        primary = choose_source(ctx.view, "primary").source
    except (PgError, BackupError) as e:
        raise JobError(str(e)) from None
    req = node_dump_request(
        cfg,
        primary,
        bin_dir,
        databases=tuple(sched.databases or ()),
        all_databases=sched.databases is None,
        dump_format=sched.format,
        schedule=sched.name,
        label=f"schedule {sched.name} {iso(ctx.slot)}",
    )
    kept = sched.retention
    details: dict[str, Any] = {"source": f"the primary {primary.name}", "repositories": {}}
    errors: list[str] = []
    dumped: tuple[str, RepositoryConfig] | None = None  # (dump id, the repository it went to)
    for rc in ctx.repositories:
        one: dict[str, Any] = {}
        details["repositories"][rc.name] = one
        try:
            async with make_repository(rc) as r:
                if dumped is None:
                    rec = await create_dump(r, cfg.scope, req)
                    dumped = (rec.id, rc)
                    one["dump"] = rec.id
                    one["phases"] = phases_dict(rec.phases)
                else:
                    async with make_repository(dumped[1]) as src:
                        await copy_item(src, r, cfg.scope, dumped[0])
                    one["dump"] = dumped[0]
                    one["copied_from"] = dumped[1].name
                if kept.count is not None or kept.days is not None:
                    p = await expire_dumps(r, cfg.scope, kept.count, kept.days, schedule=sched.name)
                    one["expired_dumps"] = [d.id for d in p.dumps]
        except (DumpError, CopyError, RepoError, OSError) as e:
            one["error"] = str(e)
            errors.append(f"{rc.name}: {e}")
    if errors:
        raise JobError("; ".join(errors))
    return details


JOBS: dict[str, JobFn] = {"full": run_full, "dump": run_dump, "verify": run_verify}


def unavailable(kind: str) -> str | None:
    """Why schedules of ``kind`` cannot run in this build (None: they can)."""
    return None if kind in JOBS else f"unknown kind {kind}"


# ====================================================================== the runner


@dataclass(slots=True)
class _Job:
    task: asyncio.Task[None]
    run: Run


class ScheduleRunner:
    """Runs ``schedules`` while ``refusal()`` is None (see the module doc).

    ``lookup(key)`` returns the agent's mirrored copy of an etcd key; ``view()`` the agent's
    latest cluster view (leader term, paused, members)."""

    def __init__(
        self,
        *,
        cfg: NodeConfig,
        schedules: list[ScheduleConfig],
        client: EtcdLike,
        lookup: Callable[[str], KV | None],
        view: Callable[[], ClusterView],
        refusal: Callable[[], str | None],
        registry: CollectorRegistry | None = None,
        tick: float = 1.0,
        jobs: Mapping[str, JobFn] | None = None,
    ) -> None:
        self.cfg = cfg
        self.schedules = schedules
        self.store = ClusterStore(client, Keys(cfg.prefix))
        self.lookup = lookup
        self.view = view
        self.refusal = refusal
        self.tick_interval = tick
        self.jobs = dict(JOBS if jobs is None else jobs)
        self.node = cfg.name
        self.prefix = cfg.prefix
        self.running: dict[str, _Job] = {}
        self._written: dict[str, KV] = {}  # our own writes, until the mirror has them
        self._logged: dict[str, tuple[float | None, str]] = {}  # last refusal logged per schedule
        self._init_metrics(registry or CollectorRegistry())

    def _init_metrics(self, r: CollectorRegistry) -> None:
        self.m_last_success = Gauge(
            "hakeeper_schedule_last_success_timestamp_seconds",
            "Unix time the last successful run of each schedule finished (from etcd)",
            ["schedule"],
            registry=r,
        )
        self.m_last_result = Gauge(
            "hakeeper_schedule_last_result",
            "1 for the result of each schedule's last run (running, ok, failed, interrupted)",
            ["schedule", "result"],
            registry=r,
        )
        self.m_next = Gauge(
            "hakeeper_schedule_next_run_timestamp_seconds",
            "Unix time of each schedule's next slot",
            ["schedule"],
            registry=r,
        )
        self.m_runs = Counter(
            "hakeeper_schedule_runs",
            "Runs finished by this node, by schedule and result",
            ["schedule", "result"],
            registry=r,
        )

    # ------------------------------------------------------------------ records

    def _kv(self, name: str) -> KV | None:
        key = Keys(self.prefix).schedule(name)
        kv = self.lookup(key)
        mine = self._written.get(key)
        if mine is not None and (kv is None or kv.mod_revision < mine.mod_revision):
            return mine
        self._written.pop(key, None)
        return kv

    def record(self, name: str) -> ScheduleRecord | None:
        kv = self._kv(name)
        if kv is None or not kv.value:
            return None
        try:
            return ScheduleRecord.from_json(kv.value)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("schedule_record_invalid", schedule=name, error=str(e))
            return None

    async def _write(self, name: str, rec: ScheduleRecord, mod_revision: int, term: int | None) -> bool:
        """Put ``rec`` if the key is still at ``mod_revision`` (and, with ``term``, we still lead)."""
        key = self.store.keys.schedule(name)
        value = rec.to_json()
        revision = await self.store.write_schedule(name, value, mod_revision, term)
        if revision is not None:
            self._written[key] = KV(key, value.encode(), 0, revision, 0, 0)
        else:
            log.info("schedule_write_refused", schedule=name, mod_revision=mod_revision, term=term)
        return revision is not None

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        log.info("scheduler_started", schedules=[s.name for s in self.schedules])
        try:
            while True:
                try:
                    await self.tick(time.time())
                except EtcdError as e:
                    log.warning("scheduler_etcd_failed", error=str(e))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scheduler_tick_failed")
                self.refresh_metrics(time.time())
                await asyncio.sleep(self.tick_interval)
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel running jobs (the agent is stopping); each records itself as interrupted."""
        jobs = [j.task for j in self.running.values()]
        for t in jobs:
            t.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    def _term(self, view: ClusterView) -> int | None:
        leader = view.leader
        if leader is None or leader.name != self.node:
            return None
        return leader.term

    async def tick(self, now: float) -> None:
        view = self.view()
        term = self._term(view)
        if term is None:
            return  # not the leader: nothing to do, nothing to refuse
        refusal = self.refusal()
        if refusal is None and view.paused:
            refusal = "the cluster is paused"
        for s in self.schedules:
            why_not = unavailable(s.kind)
            if why_not is not None:
                self._log_once(s.name, None, why_not, "schedule_unavailable", kind=s.kind)
                continue
            kv = self._kv(s.name)
            rec = self.record(s.name)
            p = plan(
                rec, s.cron, s.timezone, now, me=self.node, term=term, running_here=s.name in self.running
            )
            if p.action is ScheduleStep.IDLE:
                continue
            if refusal is not None:
                self._log_once(s.name, p.slot, refusal, "schedule_refused", action=p.action.value)
                continue
            mod = kv.mod_revision if kv is not None else 0
            if p.action is ScheduleStep.ARM:
                armed = ScheduleRecord(s.name, since=now)
                if await self._write(s.name, armed, mod, term):
                    log.info(
                        "schedule_armed",
                        schedule=s.name,
                        cron=s.cron,
                        next=iso(next_slot(s.cron, s.timezone, now)),
                    )
            elif p.action is ScheduleStep.INTERRUPTED:
                assert rec is not None and rec.last is not None
                last = replace(rec.last, result=RunResult.INTERRUPTED, error=p.why)
                if await self._write(s.name, rec.with_run(last), mod, term):
                    log.warning(
                        "schedule_run_interrupted",
                        schedule=s.name,
                        slot=iso(p.slot),
                        attempt=p.attempt,
                        why=p.why,
                    )
                    self.m_runs.labels(s.name, RunResult.INTERRUPTED.value).inc()
            elif p.action is ScheduleStep.RUN:
                assert rec is not None and p.slot is not None
                await self._claim_and_start(s, rec, mod, term, p, view)

    def _log_once(self, name: str, slot: float | None, reason: str, event: str, **kw: Any) -> None:
        if self._logged.get(name) == (slot, reason):
            return
        self._logged[name] = (slot, reason)
        log.warning(event, schedule=name, slot=iso(slot), reason=reason, **kw)

    async def _claim_and_start(
        self, s: ScheduleConfig, rec: ScheduleRecord, mod: int, term: int, p: Plan, view: ClusterView
    ) -> None:
        assert p.slot is not None
        run = Run(slot=p.slot, attempt=p.attempt, term=term, leader=self.node, started_at=time.time())
        claimed = rec.with_run(run)
        if not await self._write(s.name, claimed, mod, term):
            log.info(
                "schedule_claim_lost", schedule=s.name, slot=iso(p.slot), reason="record changed or term lost"
            )
            return
        log.info(
            "schedule_run_started",
            schedule=s.name,
            kind=s.kind,
            slot=iso(p.slot),
            attempt=p.attempt,
            missed=p.missed,
            why=p.why,
            term=term,
        )
        repos = [
            r for r in self.cfg.backup.repositories if s.repositories is None or r.name in s.repositories
        ]
        ctx = JobContext(self.cfg, view, p.slot, repos)
        task = asyncio.create_task(self._execute(s, run, ctx), name=f"schedule-{s.name}")
        self.running[s.name] = _Job(task, run)

    async def _execute(self, s: ScheduleConfig, run: Run, ctx: JobContext) -> None:
        t0 = time.monotonic()
        result, error, details = RunResult.FAILED, None, {}
        try:
            details = await self.jobs[s.kind](s, ctx)
            result = RunResult.OK
        except JobError as e:
            error = str(e)
        except asyncio.CancelledError:
            result, error = RunResult.INTERRUPTED, "the agent stopped while it ran"
            raise
        except Exception as e:
            log.exception("schedule_job_crashed", schedule=s.name)
            error = f"{type(e).__name__}: {e}"
        finally:
            done = replace(run, result=result, error=error, details=details, finished_at=time.time())
            self.m_runs.labels(s.name, result.value).inc()
            (log.info if result is RunResult.OK else log.error)(
                "schedule_run_finished",
                schedule=s.name,
                slot=iso(run.slot),
                attempt=run.attempt,
                result=result.value,
                error=error,
                seconds=round(time.monotonic() - t0, 1),
                details=details or None,
            )
            try:
                await asyncio.shield(self._record_result(s.name, done))
            finally:  # only now: until the result is in etcd the record says "running" (ours)
                self.running.pop(s.name, None)

    async def _record_result(self, name: str, done: Run) -> None:
        """Write a finished run into the record: not guarded by the term (a job that outlived
        our leadership still tells the truth), only by the record's mod_revision."""
        for _ in range(5):
            try:
                async with asyncio.timeout(10):
                    kv = await self.store.read_schedule(name)
                    if kv is None or not kv.value:
                        return
                    rec = ScheduleRecord.from_json(kv.value)
                    prior = next(
                        (r for r in rec.runs if r.slot == done.slot and r.attempt == done.attempt), None
                    )
                    if prior is not None and prior.result is RunResult.INTERRUPTED:
                        # a new leader gave up on it meanwhile; say both
                        done = replace(
                            done, error=f"{done.error or done.result.value}; marked meanwhile: {prior.error}"
                        )
                    if await self._write(name, rec.with_run(done), kv.mod_revision, None):
                        return
            except (EtcdError, TimeoutError, ValueError) as e:
                log.warning("schedule_result_write_failed", schedule=name, error=str(e))
                await asyncio.sleep(1)
        log.error("schedule_result_lost", schedule=name, slot=iso(done.slot), result=done.result.value)

    # ------------------------------------------------------------------ status and metrics

    def status(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every schedule with its record (JSON-able; no I/O)."""
        now = time.time() if now is None else now
        return [describe(s, self.record(s.name), now) for s in self.schedules]

    def refresh_metrics(self, now: float) -> None:
        for s in self.schedules:
            rec = self.record(s.name)
            if rec is None:
                continue
            if rec.last_success_at is not None:
                self.m_last_success.labels(s.name).set(rec.last_success_at)
            last = rec.last
            for r in RunResult:
                self.m_last_result.labels(s.name, r.value).set(
                    1 if last is not None and last.result is r else 0
                )
            if unavailable(s.kind) is None:
                self.m_next.labels(s.name).set(next_run(s, rec, now))


def next_run(s: ScheduleConfig, rec: ScheduleRecord | None, now: float) -> float:
    """When the schedule runs next: a due (or interrupted) slot runs now, else the next slot."""
    if rec is None:
        return next_slot(s.cron, s.timezone, now)
    p = plan(rec, s.cron, s.timezone, now, me="", term=-1, running_here=False)
    if p.action is ScheduleStep.RUN:
        return now
    last = rec.last
    base = rec.since if last is None else max(rec.since, last.slot)
    return next_slot(s.cron, s.timezone, max(base, now))


def describe(s: ScheduleConfig, rec: ScheduleRecord | None, now: float) -> dict[str, Any]:
    """One schedule for ``hakeeper schedule list`` and the agent's /status."""
    last = rec.last if rec is not None else None
    why_not = unavailable(s.kind)
    return {
        "name": s.name,
        "kind": s.kind,
        "cron": s.cron,
        "timezone": s.timezone,
        "repositories": s.repositories,
        "retention": s.retention.model_dump(),
        "type": s.type if s.kind == "full" else None,
        "databases": s.databases if s.kind == "dump" else None,
        "format": s.format if s.kind == "dump" else None,
        "available": why_not is None,
        "unavailable_reason": why_not,
        "armed_at": iso(rec.since) if rec is not None else None,
        "last_slot": iso(last.slot) if last else None,
        "last_attempt": last.attempt if last else None,
        "last_result": last.result.value if last else None,
        "last_error": last.error if last else None,
        "last_leader": last.leader if last else None,
        "last_started_at": iso(last.started_at) if last else None,
        "last_finished_at": iso(last.finished_at) if last else None,
        "last_duration": None if last is None or last.duration is None else round(last.duration, 1),
        "last_details": dict(last.details) if last else None,
        "last_success_at": iso(rec.last_success_at) if rec is not None else None,
        "next_run": None if why_not else iso(next_run(s, rec, now)),
    }


def records_from(kvs: Mapping[str, bytes], prefix: str) -> dict[str, ScheduleRecord]:
    """Schedule records by name from ``{key: value}`` (unreadable ones are left out)."""
    out: dict[str, ScheduleRecord] = {}
    head = Keys(prefix).schedules
    for k, v in kvs.items():
        if k.startswith(head):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out[k[len(head) :]] = ScheduleRecord.from_json(v)
    return out
