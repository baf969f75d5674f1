"""A major-version upgrade as this node's agent carries it out (``hakeeper upgrade``).

The CLI drives the cluster (:mod:`hakeeper.cli.upgrade_cmds`); each agent does its part on
request, and only while the etcd ``upgrade`` key names that upgrade (the cluster then counts as
paused: no agent starts, stops or fails over PostgreSQL on its own):

* :meth:`Upgrader.check`: what would keep this member from the upgrade (the target major's
  binaries, disk, streaming; on the primary ``pg_upgrade --check`` against the live server).
  Changes nothing.
* :meth:`Upgrader.upgrade_primary`: in the background, under the HA loop's action lock (the
  lease keeps being renewed, so the leader key stays ours): initdb of the new cluster beside the
  old one, CHECKPOINT, fast shutdown (writes stop: the downtime starts), ``pg_upgrade``, the WAL
  continued on the next timeline, the two data directories swapped by rename (the agent's
  ``data_dir`` never changes), the cluster's new system identifier in etcd, the backup
  repositories told, the new primary started (writes resume).  Any failure before that start
  undoes everything and starts the old primary again (:func:`~hakeeper.pg.upgrade.rollback_plan`
  says what pg_upgrade's method allows); after it, the job says what state the cluster is in.
* :meth:`Upgrader.stop_replica`: wait until the replica has replayed the old primary's final
  checkpoint, then stop it: a complete copy of the old cluster stays until the new one runs.
* :meth:`Upgrader.rejoin`: throw the replica's old-major data away and clone the new primary
  with the new binaries (a reinitialize, :class:`~hakeeper.ha.operator.Operator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hakeeper.core.cluster import ClusterView, MemberState, Succession, Upgrade
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.lsn import format_lsn, parse_lsn
from hakeeper.dcs.etcd import EtcdError
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import start_as_primary
from hakeeper.ha.operator import Operator
from hakeeper.ha.reinit import ReinitStatus, dir_size
from hakeeper.ha.upgrade_check import free_port, inspect, member_problems
from hakeeper.ha.upgradejob import JobState, UpgradeJob
from hakeeper.pg import upgrade as pgu
from hakeeper.pg.bins import bin_dir_for_major
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.upgrade")

REPLAY_TIMEOUT = 120.0  # s a replica may take to replay the old primary's last WAL
ARCHIVE_WAIT = 30.0  # s the old primary's last complete segment may take to be archived
WRITABLE_TIMEOUT = 120.0  # s the new primary may take to accept writes after its start
REPLICAS_WAIT = 3600.0  # s the backup after the upgrade waits for the replicas to stream again


@dataclass(slots=True)
class _Undo:
    """What the primary's job has changed so far, for the rollback."""

    new_dir: Path | None = None
    upgraded: bool = False  # pg_upgrade ran (its changes to the old directory may need undoing)
    swapped: Path | None = None  # where the old data directory was moved
    identity: tuple[str, str, int] | None = None  # (old, new, term) written to etcd
    binaries: tuple[Path, int | None] | None = None  # the old bin_dir and major
    started: bool = False  # the new primary was started: from here nothing is undone


class Upgrader:
    def __init__(
        self,
        ctx: Ctx,
        action_lock: asyncio.Lock,
        operator: Operator,
        backup_after: Callable[[], Awaitable[dict[str, Any]]],
        rebind: Callable[[Succession], Awaitable[list[str]]],
    ) -> None:
        """``backup_after``: a full backup of the new cluster into every repository;
        ``rebind``: tell the repositories the cluster's new identity
        (:meth:`~hakeeper.ha.ports.BackupHooks.rebind_after_upgrade`): the problems, if any."""
        self.ctx = ctx
        self.action_lock = action_lock
        self.operator = operator
        self.backup_after = backup_after
        self.rebind = rebind
        self._job: UpgradeJob | None = None
        self._checking = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what the API calls ---------------------------------------------------------------------

    def status(self) -> UpgradeJob | None:
        return self._job

    async def check(self, to_major: int, method: str) -> dict[str, Any]:
        """This member's problems for an upgrade to ``to_major`` with ``method`` (none: go)."""
        m = self._method(method)
        async with self._checking:
            problems, facts = await member_problems(self.ctx, to_major, m)
        for p in problems:
            log.warning("upgrade_check_problem", check=p["check"], text=p["text"], fix=p.get("fix"))
        return {"member": self.ctx.name, **facts, "problems": problems}

    async def upgrade_primary(self, upgrade_id: str, to_major: int, method: str) -> UpgradeJob:
        """Start the primary's part in the background; its handle once it holds the action lock."""
        m = self._method(method)
        cur = self._job
        if cur is not None and cur.running:
            raise Refused(
                RefusalKind.CONFLICT, f"upgrade {cur.id} is already running here, phase {cur.phase}"
            )
        await self._require_upgrade(upgrade_id, to_major)
        accepted: asyncio.Future[UpgradeJob] = asyncio.get_running_loop().create_future()
        self._spawn(self._primary_job(upgrade_id, to_major, m, accepted), "upgrade-primary")
        return await accepted

    async def stop_replica(
        self, upgrade_id: str, lsn: int, timeout: float = REPLAY_TIMEOUT
    ) -> dict[str, Any]:
        """Wait (up to ``timeout``) until this replica has replayed ``lsn``, then stop it."""
        await self._require_upgrade(upgrade_id, None)
        ctx = self.ctx
        async with self.action_lock:
            if ctx.state.leads(ctx.name):
                raise Refused(RefusalKind.CONFLICT, "this node leads: the primary's part stops it")
            replayed = await self._wait_replay(lsn, timeout)
            reached = replayed is not None and replayed >= lsn
            try:
                if ctx.pg.is_running():
                    await ctx.pg.stop("fast", timeout=60)
            except (PgError, CommandFailed) as e:
                log.warning("upgrade_replica_stop_failed", reason=str(e))
                raise Refused(RefusalKind.UNAVAILABLE, f"could not stop PostgreSQL here: {e}") from e
            ctx.state.pg_stopped()
            ctx.wake.set()
        log.info(
            "upgrade_replica_stopped",
            id=upgrade_id,
            lsn=format_lsn(lsn),
            replayed=None if replayed is None else format_lsn(replayed),
            reached=reached,
        )
        return {
            "member": ctx.name,
            "reached": reached,
            "replayed_lsn": None if replayed is None else format_lsn(replayed),
            "message": "replayed the old primary's last WAL and stopped"
            if reached
            else "stopped before it had replayed the old primary's last WAL (it is cloned again anyway)",
        }

    async def rejoin(self, upgrade_id: str, to_major: int) -> ReinitStatus:
        """Clone this replica again from the upgraded primary with ``to_major``'s binaries."""
        await self._require_upgrade(upgrade_id, to_major)
        new_bin, looked = await asyncio.to_thread(
            bin_dir_for_major, to_major, self.ctx.cfg.postgresql.bin_dir, self.ctx.cfg.postgresql.bin_dirs
        )
        if new_bin is None:
            raise Refused(
                RefusalKind.PRECONDITION, f"no PostgreSQL {to_major} binaries here (looked in {looked})"
            )
        view = await self._fresh_view()
        lm = view.leader_member
        if lm is None or not (lm.server_version or "").startswith(f"{to_major}."):
            found = "no leader" if lm is None else f"{lm.name} runs {lm.server_version or 'nothing'}"
            raise Refused(
                RefusalKind.PRECONDITION, f"the leader does not run PostgreSQL {to_major} yet ({found})"
            )
        return await self.operator.reinitialize(binaries=(new_bin, to_major))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- checks ---------------------------------------------------------------------------------

    @staticmethod
    def _method(method: str) -> pgu.Method:
        try:
            return pgu.Method(method)
        except ValueError:
            choices = ", ".join(m.value for m in pgu.Method)
            raise Refused(RefusalKind.INVALID, f"unknown method {method!r} (one of {choices})") from None

    async def _require_upgrade(self, upgrade_id: str, to_major: int | None) -> Upgrade:
        """The etcd ``upgrade`` key, read now, must name this upgrade: no agent upgrades
        anything unless the whole cluster is paused for it."""
        view = await self._fresh_view()
        up = view.upgrade
        if up is None or up.id != upgrade_id:
            found = "none" if up is None else f"{up.id} (to {up.to_major})"
            raise Refused(
                RefusalKind.PRECONDITION,
                f"no upgrade {upgrade_id} is in progress in etcd (found: {found}); run `hakeeper upgrade`",
            )
        if to_major is not None and up.to_major != to_major:
            raise Refused(RefusalKind.INVALID, f"upgrade {upgrade_id} goes to {up.to_major}, not {to_major}")
        return up

    async def _fresh_view(self) -> ClusterView:
        try:
            return await self.ctx.store.read_view(self.ctx.state.view.config)
        except EtcdError as e:
            raise Refused(RefusalKind.UNAVAILABLE, f"cannot read the cluster from etcd: {e}") from e

    async def _wait_replay(self, lsn: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        replayed: int | None = None
        while True:
            probe = await self.ctx.pg.probe(timeout=2.0)
            if not probe.running:
                return replayed
            replayed = probe.replayed_lsn
            if (replayed is not None and replayed >= lsn) or time.monotonic() >= deadline:
                return replayed
            await asyncio.sleep(0.1)

    # -- the primary's part -----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _update(self, **changes: Any) -> None:
        if self._job is not None:
            self._job = replace(self._job, **changes)

    def _phase(self, name: str) -> None:
        log.info("upgrade_phase", id=self._job.id if self._job else None, phase=name)
        self._update(phase=name)

    def _timed(self, name: str, started: float) -> None:
        if self._job is not None:
            self._update(phases={**self._job.phases, name: time.monotonic() - started})

    async def _primary_job(
        self, upgrade_id: str, to_major: int, method: pgu.Method, accepted: asyncio.Future[UpgradeJob]
    ) -> None:
        ctx = self.ctx
        undo = _Undo()
        try:
            async with self.action_lock:
                try:
                    new_bin, facts, term = await self._prepare_primary(to_major)
                except Refused as e:
                    log.warning("upgrade_refused", id=upgrade_id, reason=e.message)
                    accepted.set_exception(e)
                    return
                self._job = UpgradeJob(
                    id=upgrade_id,
                    member=ctx.name,
                    from_major=facts.major,
                    to_major=to_major,
                    method=method.value,
                    state=JobState.RUNNING,
                    phase="preparing",
                    started_at=time.time(),
                )
                log.warning("upgrade_started", id=upgrade_id, from_major=facts.major, to_major=to_major)
                accepted.set_result(self._job)
                try:
                    await self._upgrade_primary(facts, new_bin, method, term, undo)
                except (PgError, CommandFailed, OSError, Refused, EtcdError) as e:
                    reason = e.message if isinstance(e, Refused) else str(e)
                    if undo.started:
                        raise
                    await self._roll_back(facts, method, undo, reason)
                    return
            await self._after_start()
            self._finish(None)
        except asyncio.CancelledError:
            self._finish("cancelled: the agent is stopping", accepted)
            raise
        except (PgError, CommandFailed, OSError, Refused, EtcdError) as e:
            reason = e.message if isinstance(e, Refused) else str(e)
            self._update(
                state_after=f"the new PostgreSQL {to_major} cluster has started, so the old one cannot "
                "come back; see this agent's log, fix the cause and run `hakeeper upgrade` again"
            )
            self._finish(reason, accepted)
        except Exception as e:  # a bug: end the job and say so rather than leave it "running"
            log.exception("upgrade_crashed")
            self._finish(f"internal error: {type(e).__name__}: {e}", accepted)
        finally:
            ctx.wake.set()

    async def _prepare_primary(self, to_major: int) -> tuple[Path, pgu.ClusterFacts, int]:
        """Refusals before anything changes: we lead, PostgreSQL runs read-write, the binaries."""
        ctx = self.ctx
        view = await self._fresh_view()
        if view.leader is None or view.leader.name != ctx.name or not ctx.state.leads(ctx.name):
            raise Refused(
                RefusalKind.CONFLICT, f"{ctx.name} is not the leader: only the leader upgrades first"
            )
        probe = await ctx.pg.probe()
        if not probe.running or probe.in_recovery is not False:
            raise Refused(RefusalKind.PRECONDITION, "PostgreSQL here is not a running primary")
        pgc = ctx.cfg.postgresql
        new_bin, looked = await asyncio.to_thread(bin_dir_for_major, to_major, pgc.bin_dir, pgc.bin_dirs)
        if new_bin is None:
            raise Refused(
                RefusalKind.PRECONDITION, f"no PostgreSQL {to_major} binaries here (looked in {looked})"
            )
        try:
            facts = await inspect(self.ctx)
        except PgError as e:
            raise Refused(RefusalKind.UNAVAILABLE, f"cannot inspect the running cluster: {e}") from e
        if facts.major >= to_major:
            raise Refused(RefusalKind.INVALID, f"the cluster already runs PostgreSQL {facts.major}")
        return new_bin, facts, view.leader.term

    def _new_dir(self, to_major: int) -> Path:
        d = self.ctx.pg.data_dir
        return d.with_name(f"{d.name}.upgrade-{to_major}")

    async def _upgrade_primary(
        self, facts: pgu.ClusterFacts, new_bin: Path, method: pgu.Method, term: int, undo: _Undo
    ) -> None:
        """Everything up to the new primary accepting writes (``undo.started`` once it has
        started: from then on nothing is undone)."""
        ctx = self.ctx
        pg = ctx.pg
        job = self._job
        assert job is not None
        to_major = job.to_major
        t = time.monotonic()
        new_dir = self._new_dir(to_major)
        await self._clear_leftover(new_dir)
        self._update(data_bytes=await asyncio.to_thread(dir_size, pg.data_dir))
        undo.new_dir = await pgu.init_new_cluster(facts, new_bin, pg.run_as, new_dir)
        await pgu.continue_timeline(new_bin, new_dir, facts.timeline + 1, pg.run_as)
        old_sysid = await pg.system_identifier()
        self._update(old_system_identifier=old_sysid)
        self._timed("prepare", t)

        self._phase("checkpoint")
        t = time.monotonic()
        await pg.checkpoint()
        archived_end = await self._archive_the_end()
        self._timed("checkpoint", t)

        self._phase("stopping")
        down = time.monotonic()
        await pg.stop("fast", timeout=300)
        ctx.state.pg_stopped()
        ctx.guard.disarm()  # only now: an armed fence must still fire if the stop failed
        control = await pg.controldata()
        stop_lsn = parse_lsn(control["Latest checkpoint location"])
        old_tli = int(control["Latest checkpoint's TimeLineID"])
        self._update(stop_lsn=stop_lsn)
        self._timed("stop", down)

        self._phase("pg_upgrade")
        t = time.monotonic()
        undo.upgraded = True
        port = free_port()
        result = await pgu.run_upgrade(
            facts, new_bin, new_dir, method=method, run_as=pg.run_as, old_port=port, new_port=port + 1
        )
        self._update(
            steps=[
                {"step": s.label, "status": s.status, "seconds": round(s.seconds, 3)} for s in result.steps
            ]
        )
        self._timed("pg_upgrade", t)

        self._phase("switching")
        t = time.monotonic()
        await self._swap(new_dir, facts.major, undo)
        undo.binaries = (pg.bin_dir, ctx.state.binaries_major)
        pg.bin_dir = new_bin
        ctx.state.binaries_major = to_major
        ctx.state.system_identifier = None
        ctx.state.needs_rewind = False
        new_sysid = result.system_identifier
        self._update(system_identifier=new_sysid)
        if old_sysid is None or not await ctx.store.upgrades.replace_initialize(
            old_sysid, new_sysid, term=term
        ):
            raise Refused(
                RefusalKind.CONFLICT,
                "could not record the new system identifier in etcd (the leader key or the "
                "initialize key changed): not starting the new cluster",
            )
        undo.identity = (old_sysid, new_sysid, term)
        problems = await self.rebind(
            Succession(old_sysid, new_sysid, facts.major, to_major, time.time(), archived_end, old_tli)
        )
        for p in problems:
            log.warning("upgrade_repository_not_rebound", problem=p)
        self._timed("switch", t)

        self._phase("starting")
        t = time.monotonic()
        if not await ctx.guard.confirm_lease():
            raise Refused(
                RefusalKind.UNAVAILABLE, "could not confirm our leader lease: not starting read-write"
            )
        undo.started = True
        await start_as_primary(ctx, ctx.state.view.config)
        await self._await_writable()
        up = time.monotonic()
        self._update(downtime_s=up - down)
        self._timed("start", t)
        log.warning(
            "upgrade_primary_started",
            id=job.id,
            to_major=to_major,
            downtime_s=round(up - down, 3),
            system_identifier=new_sysid,
        )

    async def _archive_the_end(self) -> int | None:
        """Close the current WAL segment and wait (up to ARCHIVE_WAIT) until it is archived: the
        old cluster's archive then reaches this point (what PITR of its backups can reach).
        The old server pg_upgrade starts archives nothing, and the last segment before the stop
        is never complete: commits in the instant between this switch and the stop are in the
        new cluster, not in the old one's archive.  None: archiving is off or did not catch up."""
        pg = self.ctx.pg
        try:
            rows = await pg.session.execute(
                "SELECT current_setting('archive_mode') <> 'off', pg_walfile_name(lsn), lsn::text "
                "FROM pg_switch_wal() AS lsn"
            )
            archiving, walfile, lsn = rows[0]
            if not archiving:
                return None
            deadline = time.monotonic() + ARCHIVE_WAIT
            while time.monotonic() < deadline:
                done = await pg.session.execute(
                    "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"
                )
                if str(done[0][0]) >= str(walfile):
                    return parse_lsn(str(lsn))
                await asyncio.sleep(0.05)
        except PgError as e:
            log.warning("upgrade_archive_end_unknown", reason=str(e))
            return None
        log.warning("upgrade_archive_behind", waited_s=ARCHIVE_WAIT, segment=str(walfile))
        return None

    async def _clear_leftover(self, new_dir: Path) -> None:
        """A new directory left by an earlier attempt that never ran as a server is ours to drop."""
        if not await asyncio.to_thread(new_dir.exists):
            return
        if await asyncio.to_thread(pgu.new_cluster_started, new_dir):
            raise Refused(
                RefusalKind.PRECONDITION,
                f"{new_dir} holds a cluster that has run: move it away first (nothing was changed)",
            )
        log.info("upgrade_leftover_removed", path=str(new_dir))
        await asyncio.to_thread(shutil.rmtree, new_dir)

    async def _swap(self, new_dir: Path, old_major: int, undo: _Undo) -> None:
        data_dir = self.ctx.pg.data_dir
        aside = data_dir.with_name(f"{data_dir.name}.{old_major}.old")
        if aside.exists():
            aside = data_dir.with_name(f"{data_dir.name}.{old_major}.old-{int(time.time())}")
        os.rename(data_dir, aside)
        undo.swapped = aside
        os.rename(new_dir, data_dir)
        log.info("upgrade_data_dirs_swapped", data_dir=str(data_dir), old=str(aside))

    async def _await_writable(self) -> None:
        deadline = time.monotonic() + WRITABLE_TIMEOUT
        while True:
            probe = await self.ctx.pg.probe(timeout=2.0)
            if probe.running and probe.in_recovery is False:
                return
            if time.monotonic() >= deadline:
                raise PgError(f"the new primary did not accept writes within {WRITABLE_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)

    async def _after_start(self) -> None:
        """Statistics in the background; a full backup of the new cluster, waited for."""
        job = self._job
        assert job is not None
        self._spawn(self._vacuumdb(job.to_major), "upgrade-vacuumdb")
        self._phase("replicas")
        t = time.monotonic()
        await self._await_replicas(job.to_major)
        self._timed("replicas", t)
        self._phase("backup")
        t = time.monotonic()
        try:
            result = await self.backup_after()
        except Exception as e:  # the upgrade is done either way: report, do not fail it
            log.exception("upgrade_backup_failed")
            result = {"error": f"{type(e).__name__}: {e}"}
        self._update(backup=result)
        self._timed("backup", t)

    async def _await_replicas(self, to_major: int) -> None:
        """Until every other member streams on the new major (the command clones them meanwhile),
        at most REPLICAS_WAIT: the backup then reads a standby, not the primary, and does not
        compete with the clones for the disk (it made them 1.7x slower in the benchmark)."""
        deadline = time.monotonic() + REPLICAS_WAIT
        while time.monotonic() < deadline:
            others = [m for m in self.ctx.fresh_view().members.values() if m.name != self.ctx.name]
            if all(
                m.state == MemberState.STREAMING and (m.server_version or "").startswith(f"{to_major}.")
                for m in others
            ):
                return
            await asyncio.sleep(1.0)
        log.warning("upgrade_replicas_not_back", waited_s=REPLICAS_WAIT, reason="backing up all the same")

    async def _vacuumdb(self, to_major: int) -> None:
        pg = self.ctx.pg
        user = self.ctx.cfg.postgresql.superuser.username
        await pgu.run_statistics(
            pg.bin_dir, to_major, pg.run_as, host=str(pg.socket_dir), port=pg.port, user=user
        )

    async def _roll_back(self, facts: pgu.ClusterFacts, method: pgu.Method, undo: _Undo, reason: str) -> None:
        """Undo everything before the new primary's first start and start the old one again."""
        ctx, pg = self.ctx, self.ctx.pg
        log.error("upgrade_failed", id=self._job.id if self._job else None, reason=reason, rolling_back=True)
        self._phase("rolling back")
        state = pgu.UpgradeState.FAILED if undo.upgraded else pgu.UpgradeState.NOT_RUN
        plan = pgu.rollback_plan(method, state)
        try:
            if pg.is_running():
                await pg.stop("fast", timeout=60)  # the new cluster, if it got that far
            if undo.identity is not None:
                old, new, term = undo.identity
                if not await ctx.store.upgrades.replace_initialize(new, old, term=term):
                    raise PgError("could not put the old system identifier back in etcd")
            if undo.binaries is not None:
                pg.bin_dir, ctx.state.binaries_major = undo.binaries
            ctx.state.system_identifier = None
            if undo.swapped is not None:
                os.rename(pg.data_dir, self._new_dir(self._job_to()))
                os.rename(undo.swapped, pg.data_dir)
            if undo.upgraded and not plan.possible:
                raise PgError(f"cannot be undone: {plan.how}")
            if undo.upgraded and method is pgu.Method.LINK:
                with contextlib.suppress(PgError):  # nothing to undo when pg_upgrade stopped early
                    pgu.rollback_link_upgrade(pg.data_dir, new_data_dir=self._new_dir(self._job_to()))
            if undo.new_dir is not None:
                kept = await asyncio.to_thread(pgu.keep_logs, self._new_dir(self._job_to()))
                if kept is not None:
                    reason = f"{reason} (pg_upgrade's logs: {kept})"
                await asyncio.to_thread(shutil.rmtree, self._new_dir(self._job_to()), True)
            if not await ctx.guard.confirm_lease():
                raise PgError("could not confirm our leader lease: the old primary stays down")
            await start_as_primary(ctx, ctx.state.view.config)
            await self._await_writable()
        except (PgError, CommandFailed, OSError, EtcdError) as e:
            state_after = (
                f"the upgrade failed ({reason}) and the old cluster could not be started again ({e}); "
                f"{plan.how}"
            )
            log.error("upgrade_rollback_failed", reason=str(e), state_after=state_after)
            self._update(state_after=state_after)
            self._finish(reason)
            return
        log.warning("upgrade_rolled_back", reason=reason, how=plan.how)
        self._update(rolled_back=True)
        self._finish(reason)

    def _job_to(self) -> int:
        assert self._job is not None
        return self._job.to_major

    def _finish(self, error: str | None, accepted: asyncio.Future[UpgradeJob] | None = None) -> None:
        if accepted is not None and not accepted.done():
            accepted.set_exception(Refused(RefusalKind.UNAVAILABLE, f"upgrade failed: {error}"))
            return
        job = self._job
        if job is None or not job.running:
            return
        self._update(
            state=JobState.FAILED if error else JobState.SUCCEEDED,
            error=error,
            finished_at=time.time(),
            phase="failed" if error else "done",
        )
        log.info("upgrade_finished", id=job.id, error=error, seconds=round(time.time() - job.started_at, 1))
