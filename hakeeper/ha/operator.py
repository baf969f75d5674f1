"""Operator: the actions an operator asks of this node through the API (restart, reinitialize,
reload; reload also on SIGHUP).  Each runs under the HA loop's action lock, so it never
interleaves with a cycle, and refuses with a :class:`~hakeeper.core.errors.Refused` that says why."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from hakeeper.core.cluster import ClusterView, MemberState
from hakeeper.core.config_diff import ConfigDiff
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
        reconfigure: Callable[[], Awaitable[ConfigDiff]],
    ) -> None:
        """``reconfigure``: re-read the node file and apply what may change at run time, or
        raise :class:`Refused` having applied nothing (the composition root's, hakeeper/node.py)."""
        self.ctx = ctx
        self.action_lock = action_lock
        self.observe = observe
        self.reconfigure = reconfigure

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

    async def restart(self) -> str:
        """Restart PostgreSQL in its current role (a primary re-confirms its lease first)."""
        return await self._run("restart", self._restart)

    async def _restart(self) -> str:
        ctx = self.ctx
        if not ctx.pg.is_initialized():
            raise Refused(RefusalKind.CONFLICT, "postgres has no data directory yet")
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
