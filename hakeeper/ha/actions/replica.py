"""Replica actions: clone from the leader (or seed from a backup), start read-only, follow the
leader, rewind diverged data, stop streaming before an election, demote a writable non-leader."""

from __future__ import annotations

import asyncio
import time

from hakeeper.core.cluster import ClusterView, MemberState, slot_name_for
from hakeeper.core.config import secret_value
from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.policy.decision import Decision, LocalFacts
from hakeeper.ha.policy.plans import CloneFromBackup, RewindFailure, plan_clone_source, plan_rewind_failure
from hakeeper.pg import rewind as pg_rewind
from hakeeper.pg.clone import clone_from
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.replica")


def upstream_for(ctx: Ctx, view: ClusterView, leader: str | None) -> Upstream | None:
    """Where a replica of ``leader`` streams from: its published address, through our slot."""
    if leader is None:
        return None
    m = view.members.get(leader)
    if m is None or not m.host:
        return None
    return Upstream(m.host, m.port, slot_name_for(ctx.name))


def _addr(u: Upstream | None) -> str | None:
    return None if u is None else f"{u.host}:{u.port}"


async def start_as_replica(ctx: Ctx, view: ClusterView, leader: str | None) -> None:
    up = upstream_for(ctx, view, leader)
    await ctx.pgconf.write(view.config, Role.REPLICA, up)
    ctx.state.upstream = up
    ctx.state.activity = MemberState.STARTING
    await ctx.pg.start(timeout=120, wait=False)  # see Postgres.start: keep publishing


async def clone(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    try:
        cloned = await fill_data_dir(ctx, view, d)
    except (PgError, CommandFailed) as e:
        log.warning("clone_failed", source=d.target, error=str(e), retry_in=view.config.loop_wait)
        return
    if cloned:
        await start_as_replica(ctx, view, d.target)


async def fill_data_dir(ctx: Ctx, view: ClusterView, d: Decision) -> bool:
    """Fill the empty data directory from the leader ``d.target`` (from a backup, or with
    pg_basebackup); False when the leader has published no address to clone from.  Raises
    PgError or CommandFailed when the copy failed (the partial copy is removed)."""
    up = upstream_for(ctx, view, d.target)
    if up is None:
        return False
    st = ctx.state
    st.activity = MemberState.CLONING
    await ctx.publish(view)
    pgc = ctx.cfg.postgresql
    t0 = time.monotonic()
    try:
        seeded = await _seed_from_backup(ctx, view, d)
        if not seeded:
            log.info("clone_started", source=d.target, host=up.host, port=up.port, slot=up.slot_name)
            await clone_from(
                ctx.pg,
                up,
                replication_user=pgc.replication.username,
                replication_password=secret_value(pgc.replication.password),
            )
    finally:
        st.activity = None
    st.system_identifier = None
    log.info("clone_finished", source=d.target, seconds=round(time.monotonic() - t0, 2))
    st.needs_rewind = False
    return True


async def _seed_from_backup(ctx: Ctx, view: ClusterView, d: Decision) -> bool:
    """``backup.replica_from_backup``: restore the newest complete backup of this cluster into
    the empty data directory; start_as_replica then makes it a standby of the leader, which
    replays the archive and then streams.  False (logged with the reason) means: pg_basebackup."""
    if not ctx.backup.seeds_replicas():
        return False
    plan = plan_clone_source(view, d.target)
    if not isinstance(plan, CloneFromBackup):
        log.info("clone_from_backup_skipped", reason=plan)
        return False
    return await ctx.backup.seed_replica(d.target or "", plan.system_identifier, plan.timeline, plan.lsn)


async def delta_from_backup(ctx: Ctx, view: ClusterView, target: str) -> bool:
    """``hakeeper reinit --delta``: bring the stopped replica's own data directory to the newest
    backup of this cluster, fetching and writing only the blocks that differ; start_as_replica
    then makes it a standby that replays the archive and streams.  False (logged with the
    reason: no usable backup, none with a file index, too far behind the leader, another
    system) means: remove and clone as a plain reinitialize does."""
    plan = plan_clone_source(view, target)
    if not isinstance(plan, CloneFromBackup):
        log.info("reinitialize_delta_skipped", reason=plan, fallback="clone")
        return False
    st = ctx.state
    st.activity = MemberState.CLONING
    await ctx.publish(view)
    try:
        sysid, tli, lsn = plan.system_identifier, plan.timeline, plan.lsn
        return await ctx.backup.seed_replica(target, sysid, tli, lsn, delta=True)
    finally:
        st.activity = None


async def start_replica(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    ctx.guard.disarm()
    if facts.pg_down_for > 0 and ctx.pg.is_running():
        return  # the postmaster is up but not accepting connections yet
    await start_as_replica(ctx, view, d.target)


async def follow(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    ctx.guard.disarm()
    if facts.streaming_from:
        await ctx.backup.on_streaming()
    up = upstream_for(ctx, view, d.target)
    st = ctx.state
    if up is None or up == st.upstream:
        return
    log.info("upstream_changed", old=_addr(st.upstream), new=_addr(up), leader=d.target)
    await ctx.pgconf.write(view.config, Role.REPLICA, up)
    st.upstream = up
    await ctx.pg.reload()


async def rewind(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    lm = view.members.get(d.target or "")
    st = ctx.state
    if lm is None or st.held is not None:
        return  # held: a rewind failed and the data directory is kept for an operator
    pgc = ctx.cfg.postgresql
    st.activity = MemberState.REWINDING
    await ctx.publish(view)
    try:
        if ctx.pg.is_running():
            await ctx.pg.stop("fast", timeout=60)
        # Only now: an armed fence must still fire if PostgreSQL did not stop (the stop raised).
        ctx.guard.disarm()
        if not pgc.use_pg_rewind:
            raise PgError("use_pg_rewind is off")
        log.info("rewind_started", source=d.target)
        t0 = time.monotonic()
        await pg_rewind.rewind(
            ctx.pg,
            Upstream(lm.host, lm.port, None),
            superuser=pgc.superuser.username,
            superuser_password=secret_value(pgc.superuser.password),
        )
        log.info("rewind_finished", source=d.target, seconds=round(time.monotonic() - t0, 2))
    except (PgError, CommandFailed) as e:
        plan = plan_rewind_failure(pgc.remove_data_directory_on_rewind_failure)
        if plan is RewindFailure.WAIT_FOR_OPERATOR:
            _hold(ctx, f"pg_rewind from {d.target} failed: {e}", plan)
            return
        await ctx.pg.stop("immediate")
        ctx.guard.disarm()  # PostgreSQL has stopped
        try:
            # Moved aside, never deleted: in asynchronous mode the old primary may hold the only
            # copy of commits the new one never received.
            moved = await asyncio.to_thread(ctx.pg.move_data_dir_aside)
        except OSError as oe:
            _hold(
                ctx,
                f"pg_rewind from {d.target} failed: {e}; could not move the data directory aside: {oe}",
                plan,
            )
            return
        log.warning("rewind_failed", source=d.target, error=str(e), action=plan.value, moved_to=str(moved))
        st.system_identifier = None
        st.needs_rewind = False
        return
    finally:
        st.activity = None
    st.needs_rewind = False
    await start_as_replica(ctx, view, d.target)


def _hold(ctx: Ctx, reason: str, plan: RewindFailure) -> None:
    """Stay down with the data directory as it is until an operator acts; ``hakeeper list``
    shows ``reason`` (the member's ineligible_reason)."""
    ctx.state.held = f"{reason}; waiting for 'hakeeper reinit {ctx.name}'"
    log.error(
        "rewind_failed",
        reason=ctx.state.held,
        action=RewindFailure.WAIT_FOR_OPERATOR.value,
        configured=plan.value,
    )


async def detach(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    log.warning("replication_detached", old_upstream=facts.streaming_from, why=d.why)
    await ctx.pgconf.write(view.config, Role.REPLICA, None)
    ctx.state.upstream = None
    await ctx.pg.reload()
    ctx.wake.set()


async def demote(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    log.warning("demoting", why=d.why, mode="immediate")
    await ctx.pg.stop("immediate", timeout=30)
    ctx.guard.disarm()
    ctx.state.pg_stopped()
    ctx.wake.set()
