"""The agent's start and stop, and the fence firing: what happens to this node's PostgreSQL and
keys outside a regular HA cycle."""

from __future__ import annotations

import contextlib

from hakeeper.core.cluster import ClusterView, MemberState
from hakeeper.dcs.etcd import EtcdError
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import release_key
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.lifecycle")


async def inspect_data_dir(ctx: Ctx) -> None:
    """At start: data that last ran as a primary may have diverged if another node leads now,
    so it rewinds before it follows (a running primary found beside us counts too)."""
    pg = ctx.pg
    if pg.is_initialized() and not pg.is_running():
        with contextlib.suppress(PgError, CommandFailed):
            controldata = await pg.controldata()
            state = controldata.get("Database cluster state", "")
            if state in ("in production", "shut down"):
                ctx.state.needs_rewind = True
                log.info("former_primary_data_found", cluster_state=state)
    elif pg.is_running():
        probe = await pg.probe()
        if probe.running and probe.in_recovery is False:
            ctx.state.needs_rewind = True


async def fenced(ctx: Ctx) -> None:
    """The fence deadline passed (:meth:`WriteGuard.check` disarmed it): stop PostgreSQL now."""
    ctx.metrics.fence_events.inc()
    ctx.state.activity = MemberState.FENCED
    try:
        await ctx.pg.stop("immediate", timeout=10)
    except PgError as e:
        log.error("fence_stop_failed", error=str(e))
    ctx.state.pg_stopped()
    ctx.wake.set()


async def stop_postgres(ctx: Ctx) -> None:
    """The agent stops: a fast shutdown of PostgreSQL (immediate if that fails)."""
    pg = ctx.pg
    try:
        if pg.is_running():
            log.info("postgres_stopping", mode="fast")
            await pg.stop("fast", timeout=60)
    except (PgError, CommandFailed) as e:
        log.error("postgres_stop_failed", error=str(e))
        with contextlib.suppress(Exception):
            await pg.stop("immediate")


async def leave(ctx: Ctx, view: ClusterView) -> None:
    """After PostgreSQL stopped: give up the leader key if we held it, then our member key.  The
    key goes only after PostgreSQL stopped, so nobody is elected while we still accept writes."""
    if view.leader is not None and view.leader.name == ctx.name:
        with contextlib.suppress(EtcdError):
            await release_key(ctx, view)
    with contextlib.suppress(EtcdError):
        await ctx.store.delete_member(ctx.name)
