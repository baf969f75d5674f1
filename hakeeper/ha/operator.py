"""Operator: the actions an operator asks of this node through the API (restart, reinitialize,
reload).  Each runs under the HA loop's action lock, so it never interleaves with a cycle, and
refuses with a :class:`~hakeeper.core.errors.Refused` that says why.

A restart can also be scheduled (``POST /restart`` with ``scheduled_at``): one per node, kept in
this process (an agent restart forgets it), published in the member record so ``hakeeper list
-e`` shows it, and cancelled by ``DELETE /restart`` (``hakeeper flush restart``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from hakeeper.core import timefmt
from hakeeper.core.cluster import ClusterView, MemberState
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.pgtypes import Role
from hakeeper.dcs.etcd import EtcdError
from hakeeper.ha.actions import replica
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import start_as_primary
from hakeeper.ha.policy.decision import Action, Decision, LocalFacts
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.operator")


class Operator:
    def __init__(
        self,
        ctx: Ctx,
        action_lock: asyncio.Lock,
        observe: Callable[[ClusterView], Awaitable[LocalFacts]],
    ) -> None:
        self.ctx = ctx
        self.action_lock = action_lock
        self.observe = observe
        self._scheduled: asyncio.Task[None] | None = None  # the scheduled restart, waiting

    async def _run(self, what: str, action: Callable[[], Awaitable[str]]) -> str:
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

    async def close(self) -> None:
        """At shutdown: a scheduled restart that has not started is dropped."""
        task, self._scheduled = self._scheduled, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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

    async def reinitialize(self) -> str:
        """Throw this replica's data away and clone it again from the leader."""
        return await self._run("reinitialize", self._reinitialize)

    async def _reinitialize(self) -> str:
        ctx = self.ctx
        # Decided on a fresh linearizable read, not the cached view: right after a promotion the
        # cached view may still name another leader while this node already is the primary.
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
        log.warning("reinitialize_requested", leader=view.leader.name)
        if ctx.pg.is_running():
            await ctx.pg.stop("immediate", timeout=60)
        ctx.guard.disarm()  # only now: a fence that is armed must still fire if the stop failed
        await asyncio.to_thread(ctx.pg.remove_data_dir)
        ctx.state.system_identifier = None
        ctx.state.needs_rewind = False
        ctx.state.held = None
        d = Decision(Action.CLONE, "reinitialize requested", target=view.leader.name)
        await replica.clone(ctx, view, await self.observe(view), d)
        ctx.wake.set()
        return f"reinitialized from {view.leader.name}"

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
        """Rewrite the configuration files from the current dynamic config and reload PostgreSQL."""
        return await self._run("reload", self._reload)

    async def _reload(self) -> str:
        ctx = self.ctx
        if not ctx.pg.is_running():
            raise Refused(RefusalKind.CONFLICT, "postgres is not running")
        probe = await ctx.pg.probe()
        role = Role.REPLICA if probe.in_recovery else Role.PRIMARY
        await ctx.pgconf.write(ctx.state.config, role, ctx.state.upstream if role == Role.REPLICA else None)
        await ctx.pg.reload()
        log.info("reload_done", role=role.value)
        return "configuration reloaded"


def _utc(epoch: float | None) -> str:
    return timefmt.iso(epoch, timespec="seconds") or "-"
