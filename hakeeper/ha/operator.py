"""Operator: the actions an operator asks of this node through the API (restart, reinitialize,
reload; reload also on SIGHUP).  Each runs under the HA loop's action lock, so it never
interleaves with a cycle, and refuses with a :class:`~hakeeper.core.errors.Refused` that says why.
A reinitialize runs in the background (:mod:`hakeeper.ha.reinit`): the request returns its handle
once it has started.

A restart can also be scheduled (``POST /restart`` with ``scheduled_at``): one per node, kept in
this process (an agent restart forgets it), published in the member record so ``hakeeper list
-e`` shows it, and cancelled by ``DELETE /restart`` (``hakeeper flush restart``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hakeeper.core import timefmt
from hakeeper.core.cluster import ClusterView, MemberState
from hakeeper.core.config_diff import ConfigDiff
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.pgtypes import Role
from hakeeper.dcs.etcd import EtcdError
from hakeeper.ha.actions import replica
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import start_as_primary
from hakeeper.ha.policy.decision import Action, Decision, LocalFacts
from hakeeper.ha.reinit import (
    STREAMING_TIMEOUT,
    ReinitPhase,
    ReinitState,
    ReinitStatus,
    dir_size,
)
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.operator")

PROGRESS_EVERY = 2.0  # s between two measures of the bytes cloned so far
STREAMING_POLL = 1.0  # s between two probes while waiting for the new copy to stream


class Operator:
    def __init__(
        self,
        ctx: Ctx,
        action_lock: asyncio.Lock,
        observe: Callable[[ClusterView], Awaitable[LocalFacts]],
        reconfigure: Callable[[], Awaitable[ConfigDiff]],
    ) -> None:
        """``reconfigure``: re-read the node file and apply what may change at run time, or
        raise :class:`Refused` having applied nothing (the composition root's, hakeeper/node.py)."""
        self.ctx = ctx
        self.action_lock = action_lock
        self.observe = observe
        self.reconfigure = reconfigure
        self._reinit: ReinitStatus | None = None  # the running or the last reinitialize
        self._starting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled: asyncio.Task[None] | None = None  # the scheduled restart, waiting

    async def _run(self, what: str, action: Callable[[], Awaitable[str]]) -> str:
        if self._reinit is not None and self._reinit.running:
            # It holds the action lock for as long as the clone takes: refuse, not wait for it.
            reason = f"a reinitialize ({self._reinit.id}) is running, phase {self._reinit.phase}"
            log.warning("operator_request_refused", request=what, reason=reason)
            raise Refused(RefusalKind.CONFLICT, reason)
        async with self.action_lock:
            try:
                return await action()
            except (PgError, CommandFailed) as e:
                log.warning("operator_request_failed", request=what, reason=str(e))
                raise Refused(RefusalKind.UNAVAILABLE, f"{what} failed: {e}") from e
            except Refused as e:
                log.warning("operator_request_refused", request=what, reason=e.message)
                raise

    async def restart(self, *, pending_only: bool = False) -> str:
        """Restart PostgreSQL in its current role (a primary re-confirms its lease first).
        ``pending_only``: only if PostgreSQL has parameter changes waiting for a restart."""
        return await self._run("restart", lambda: self._restart(pending_only))

    # -- scheduled restart ---------------------------------------------------------------------------

    async def schedule_restart(self, at: float, *, pending_only: bool = False) -> str:
        """Restart at wall-clock time ``at`` (in the background); refused while one is scheduled."""
        st = self.ctx.state
        if self._scheduled is not None and not self._scheduled.done():
            raise Refused(
                RefusalKind.CONFLICT,
                f"a restart is already scheduled for {_utc(st.scheduled_restart)}; cancel it first "
                "(DELETE /restart, `hakeeper flush MEMBER restart`)",
            )
        st.scheduled_restart = at
        self._scheduled = asyncio.create_task(self._restart_at(at, pending_only))
        log.info("restart_scheduled", at=_utc(at), pending_only=pending_only)
        self.ctx.wake.set()  # publish it in the member record now
        return f"restart scheduled for {_utc(at)}"

    def cancel_scheduled_restart(self) -> str:
        """Cancel the scheduled restart; refused when there is none (or it has started)."""
        task, at = self._scheduled, self.ctx.state.scheduled_restart
        if task is None or task.done() or at is None:
            raise Refused(RefusalKind.CONFLICT, "no restart is scheduled on this node")
        if at <= time.time():
            raise Refused(RefusalKind.CONFLICT, "the scheduled restart has already started")
        task.cancel()
        self._scheduled = None
        self.ctx.state.scheduled_restart = None
        log.info("restart_schedule_cancelled", at=_utc(at))
        self.ctx.wake.set()
        return f"scheduled restart ({_utc(at)}) cancelled"

    async def _restart_at(self, at: float, pending_only: bool) -> None:
        try:
            await asyncio.sleep(max(0.0, at - time.time()))
            log.info("scheduled_restart_starting", at=_utc(at))
            message = await self.restart(pending_only=pending_only)
            log.info("scheduled_restart_done", result=message)
        except Refused as e:  # already logged by _run, with its reason
            log.warning("scheduled_restart_not_done", reason=e.message)
        finally:
            if self.ctx.state.scheduled_restart == at:
                self.ctx.state.scheduled_restart = None
                self.ctx.wake.set()

    async def _restart(self, pending_only: bool = False) -> str:
        ctx = self.ctx
        if not ctx.pg.is_initialized():
            raise Refused(RefusalKind.CONFLICT, "postgres has no data directory yet")
        if pending_only:
            # asked now, not from the last cycle's probe: a change may have been applied since
            probe = await ctx.pg.probe()
            if not probe.running:
                raise Refused(RefusalKind.CONFLICT, "postgres is not running; nothing is pending a restart")
            if not probe.pending_restart:
                raise Refused(RefusalKind.CONFLICT, "no parameter change is pending a restart")
        view = ctx.state.view
        leading = ctx.state.leads(ctx.name)
        log.info("restart_requested", leader=leading)
        if ctx.pg.is_running():
            await ctx.pg.stop("fast", timeout=120)
        if leading:
            if not await ctx.guard.confirm_lease():
                raise Refused(
                    RefusalKind.UNAVAILABLE, "could not confirm our leader lease; not restarting read-write"
                )
            await start_as_primary(ctx, view.config)
        else:
            await replica.start_as_replica(ctx, view, view.leader.name if view.leader else None)
        ctx.state.clocks = replace(ctx.state.clocks, pg_down_since=None)
        ctx.wake.set()
        return "postgres restarted"

    # -- reinitialize: in the background, with a handle ------------------------------------------

    def reinit_status(self) -> ReinitStatus | None:
        """The running reinitialize, else the last one since the agent started (None: none)."""
        return self._reinit

    async def reinitialize(
        self, *, binaries: tuple[Path, int] | None = None, delta: bool = False
    ) -> ReinitStatus:
        """Throw this replica's data away and clone it again from the leader, in the background.
        ``binaries``: the clone and everything after it run with these (bin_dir, major): a
        replica's part of a major upgrade.  ``delta``: keep the old copy and bring it to the
        newest backup block by block (a clone when no backup fits).

        Returns once the request is checked and the job holds the action lock (its handle, state
        running); raises Refused when it may not run, or while another one runs."""
        async with self._starting:  # two requests at once: the second sees the first's job
            cur = self._reinit
            if cur is not None and cur.running:
                reason = f"a reinitialize of {cur.member} ({cur.id}) is already running, phase {cur.phase}"
                log.warning("operator_request_refused", request="reinitialize", reason=reason)
                raise Refused(RefusalKind.CONFLICT, reason, reinitialize=cur.doc())
            accepted: asyncio.Future[ReinitStatus] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._reinit_job(accepted, binaries, delta), name="reinitialize")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return await accepted

    async def close(self) -> None:
        """The agent stops: a scheduled restart that has not started is dropped (it must not
        start PostgreSQL again), and a reinitialize still running ends here (reported failed)."""
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is not None and not scheduled.done():
            scheduled.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduled
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reinit_job(
        self, accepted: asyncio.Future[ReinitStatus], binaries: tuple[Path, int] | None, delta: bool
    ) -> None:
        ctx = self.ctx
        try:
            async with self.action_lock:
                try:
                    view = await self._check_reinit()
                except (PgError, CommandFailed) as e:
                    log.warning("operator_request_failed", request="reinitialize", reason=str(e))
                    accepted.set_exception(Refused(RefusalKind.UNAVAILABLE, f"reinitialize failed: {e}"))
                    return
                except Refused as e:
                    log.warning("operator_request_refused", request="reinitialize", reason=e.message)
                    accepted.set_exception(e)
                    return
                leader = view.leader.name if view.leader else ""
                self._reinit = ReinitStatus(
                    id=uuid.uuid4().hex[:12],
                    member=ctx.name,
                    source=leader,
                    state=ReinitState.RUNNING,
                    phase=ReinitPhase.STOPPING,
                    started_at=time.time(),
                    delta=delta,
                )
                log.warning("reinitialize_started", id=self._reinit.id, leader=leader, delta=delta)
                accepted.set_result(self._reinit)
                await self._rebuild(view, leader, binaries, delta)
            # The action lock is free again: the HA loop follows the leader (or a new one) while
            # we watch for the WAL receiver.
            self._update(phase=ReinitPhase.STREAMING)
            await self._await_streaming()
        except (PgError, CommandFailed, OSError, Refused) as e:
            reason = e.message if isinstance(e, Refused) else str(e)
            self._finish(reason, accepted)
        except asyncio.CancelledError:
            self._finish("cancelled: the agent is stopping", accepted)
            raise
        except Exception as e:  # a bug: end the job and say so rather than leave it "running"
            log.exception("reinitialize_crashed")
            self._finish(f"internal error: {type(e).__name__}: {e}", accepted)
        finally:
            ctx.wake.set()

    async def _check_reinit(self) -> ClusterView:
        """The refusals: decided on a fresh linearizable read, not the cached view (right after a
        promotion the cached view may still name another leader while this node already is the
        primary), and on the local server's own answer."""
        ctx = self.ctx
        try:
            view = await ctx.store.read_view(ctx.state.view.config)
        except EtcdError as e:
            raise Refused(RefusalKind.UNAVAILABLE, f"cannot read the cluster from etcd: {e}") from e
        if view.leader is None:
            raise Refused(RefusalKind.UNAVAILABLE, "no leader to clone from")
        if view.leader.name == ctx.name or ctx.state.leads(ctx.name):
            raise Refused(RefusalKind.CONFLICT, "this node is the leader; it cannot be reinitialized")
        lm = view.leader_member
        if lm is None or lm.state != MemberState.RUNNING:
            raise Refused(RefusalKind.UNAVAILABLE, f"leader {view.leader.name} is not running")
        await self._refuse_if_local_primary()
        return view

    async def _rebuild(
        self, view: ClusterView, leader: str, binaries: tuple[Path, int] | None, delta: bool
    ) -> None:
        """Under the action lock: stop, remove, clone (with ``binaries`` if given), start as a
        replica; with ``delta``, first try to bring the old copy to the newest backup instead."""
        ctx = self.ctx
        if ctx.pg.is_running():
            await ctx.pg.stop("immediate", timeout=60)
        ctx.guard.disarm()  # only now: a fence that is armed must still fire if the stop failed
        if delta and binaries is None:
            self._update(phase=ReinitPhase.DELTA, method="delta")
            ctx.state.system_identifier = None
            ctx.state.needs_rewind = False
            ctx.state.held = None
            if await replica.delta_from_backup(ctx, view, leader):
                self._update(bytes_copied=await asyncio.to_thread(dir_size, ctx.pg.data_dir))
                self._update(phase=ReinitPhase.STARTING)
                await replica.start_as_replica(ctx, view, leader)
                return
            log.warning("reinitialize_delta_fell_back", reason="no usable backup (see the log above)")
        self._update(phase=ReinitPhase.REMOVING, method="clone")
        await asyncio.to_thread(ctx.pg.remove_data_dir)
        if binaries is not None:
            ctx.pg.bin_dir, ctx.state.binaries_major = binaries
            log.warning("reinitialize_binaries_switched", bin_dir=str(binaries[0]), major=binaries[1])
        ctx.state.system_identifier = None
        ctx.state.needs_rewind = False
        ctx.state.held = None
        self._update(phase=ReinitPhase.CLONING, bytes_copied=0)
        d = Decision(Action.CLONE, "reinitialize requested", target=leader)
        sampler = asyncio.create_task(self._sample_bytes(), name="reinitialize-progress")
        try:
            cloned = await replica.fill_data_dir(ctx, view, d)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if not cloned:
            raise Refused(RefusalKind.UNAVAILABLE, f"leader {leader} has published no address to clone from")
        self._update(bytes_copied=await asyncio.to_thread(dir_size, ctx.pg.data_dir))
        self._update(phase=ReinitPhase.STARTING)
        await replica.start_as_replica(ctx, view, leader)

    async def _sample_bytes(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self._update(bytes_copied=await asyncio.to_thread(dir_size, self.ctx.pg.data_dir))

    async def _await_streaming(self) -> None:
        """Succeeded once the local WAL receiver streams from the upstream the HA loop points us
        at (the leader's address, :attr:`NodeState.upstream`), the signal ``hakeeper list``
        shows as ``streaming``; failed after STREAMING_TIMEOUT."""
        ctx = self.ctx
        deadline = time.monotonic() + STREAMING_TIMEOUT
        while True:
            probe = await ctx.pg.probe(timeout=2.0)
            up = ctx.state.upstream
            if probe.in_recovery and up is not None and probe.streaming_from == up.address:
                self._finish(None)
                return
            if time.monotonic() >= deadline:
                raise Refused(
                    RefusalKind.UNAVAILABLE,
                    f"the new copy did not stream from the leader within {STREAMING_TIMEOUT:.0f} s "
                    f"({probe.error or 'no WAL receiver streaming'}); the agent keeps trying, see its log",
                )
            await asyncio.sleep(STREAMING_POLL)

    def _update(self, **changes: Any) -> None:
        if self._reinit is not None:
            self._reinit = replace(self._reinit, **changes)

    def _finish(self, error: str | None, accepted: asyncio.Future[ReinitStatus] | None = None) -> None:
        """End the job: succeeded (``error`` None) or failed with ``error`` (logged).  Failed
        before it was accepted: the request that started it is refused with ``error``."""
        if accepted is not None and not accepted.done():
            log.warning("operator_request_failed", request="reinitialize", reason=error)
            accepted.set_exception(Refused(RefusalKind.UNAVAILABLE, f"reinitialize failed: {error}"))
            return
        job = self._reinit
        if job is None or not job.running:
            return
        state = ReinitState.FAILED if error else ReinitState.SUCCEEDED
        self._update(state=state, error=error, finished_at=time.time())
        seconds = round(time.time() - job.started_at, 1)
        if error:
            log.warning(
                "reinitialize_failed", id=job.id, phase=job.phase.value, reason=error, seconds=seconds
            )
        else:
            log.info("reinitialize_succeeded", id=job.id, source=job.source, seconds=seconds)

    async def _refuse_if_local_primary(self) -> None:
        """Ask the local PostgreSQL itself (pg_is_in_recovery) before anything is removed: a
        running primary, or one whose role cannot be told, is never thrown away."""
        if not self.ctx.pg.is_running():
            return
        probe = await self.ctx.pg.probe()
        if probe.in_recovery is None:
            # The node's state, not a fault of the agent (e.g. PostgreSQL still starting up after
            # a previous reinitialize): a conflict the caller may retry once the server answers.
            raise Refused(
                RefusalKind.CONFLICT,
                f"postgres runs but whether it is a primary cannot be told ({probe.error or 'no answer'}); "
                "nothing was removed: try again once it answers",
            )
        if not probe.in_recovery:
            raise Refused(
                RefusalKind.CONFLICT, "postgres here is a running primary; it cannot be reinitialized"
            )

    async def reload(self) -> str:
        """Re-read the node file and apply what may change at run time (all or nothing), then
        rewrite PostgreSQL's files and reload it.  The API's POST /reload and SIGHUP both come
        here, under the action lock."""
        return await self._run("reload", self._reload)

    async def _reload(self) -> str:
        ctx = self.ctx
        try:
            d = await self.reconfigure()
        except Refused as e:
            # the agent goes on with the configuration it has; nothing of the file was applied
            log.warning("reload_refused", reason=e.message, errors=e.facts.get("errors"))
            raise
        said = f"reloaded: {d.summary()}" if d.changes else "no change in the node file"
        if d.touches("tags"):
            await ctx.publish(ctx.state.view)  # the member record shows the new tags at once
        if ctx.pg.is_running():
            probe = await ctx.pg.probe()
            role = Role.REPLICA if probe.in_recovery else Role.PRIMARY
            await ctx.pgconf.write(
                ctx.state.config, role, ctx.state.upstream if role == Role.REPLICA else None
            )
            await ctx.pg.reload()
            pending = await ctx.pgconf.pending_restart()
            pg_said = "PostgreSQL reloaded" + (
                f" (pending restart: {', '.join(pending)}; `hakeeper restart` applies it)" if pending else ""
            )
        else:
            role, pending = None, []
            pg_said = "PostgreSQL is not running: its files are written when it starts"
        ctx.wake.set()  # the next cycle decides with the new tags
        log.info(
            "reload_done",
            changes=[c.describe() for c in d.changes],
            role=None if role is None else role.value,
            pending_restart=pending,
        )
        return f"{said}. {pg_said}."


def _utc(epoch: float | None) -> str:
    return timefmt.iso(epoch, timespec="seconds") or "-"
