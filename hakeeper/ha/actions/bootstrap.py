"""Bootstrap: win the initialize race and create the cluster, with initdb or from a backup
(``bootstrap.from_backup``, through the backup port)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from hakeeper.core.cluster import ClusterView, MemberState
from hakeeper.core.config import secret_value
from hakeeper.core.errors import BootstrapFailed, BootstrapRefused
from hakeeper.core.pgtypes import Role
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import record_history, start_as_primary, switch_point
from hakeeper.ha.policy.decision import Decision, LocalFacts
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.bootstrap")

# After a refused or failed bootstrap from a backup, the next attempt waits this long (s).
BOOTSTRAP_RETRY_AFTER = 10.0


async def initialize(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    if not await ctx.guard.lease.refresh():
        log.warning("initialize_refused", reason="no valid lease")
        return
    st = ctx.state
    if ctx.cfg.bootstrap.from_backup is not None:
        if time.monotonic() >= st.bootstrap_retry_at:
            await _initialize_from_backup(ctx)
            if st.system_identifier is None:  # refused or failed: not again every loop_wait
                st.bootstrap_retry_at = time.monotonic() + BOOTSTRAP_RETRY_AFTER
        return
    st.activity = MemberState.INITIALIZING
    log.info("initdb_started", data_dir=str(ctx.pg.data_dir))
    try:
        await ctx.pg.initdb(ctx.cfg.bootstrap.initdb)
        sysid = await ctx.pg.system_identifier()
        if sysid is None:
            raise PgError("initdb left no readable pg_control")
        term = await _race(ctx, sysid)
        if term is None:
            return
        await start_as_primary(ctx, ctx.cfg.bootstrap.dcs)
        await _create_roles(ctx)
        await record_history(ctx, term, "bootstrap", None, 1, None)
    except BaseException:
        if st.system_identifier is None and ctx.pg.is_initialized():
            with contextlib.suppress(Exception):
                await ctx.pg.stop("immediate")
                await asyncio.to_thread(ctx.pg.remove_data_dir)
        raise
    finally:
        st.activity = None


async def _race(ctx: Ctx, sysid: str) -> int | None:
    """The initialize race: the initialize, leader and config keys in one transaction, only if
    no member created them first.  The loser throws its data directory away."""
    term = await ctx.store.initialize(
        system_identifier=sysid, leader=ctx.name, lease=ctx.guard.lease.lease, config=ctx.cfg.bootstrap.dcs
    )
    if term is None:
        log.info("initialize_lost", reason="another member initialized the cluster first")
        await asyncio.to_thread(ctx.pg.remove_data_dir)
        ctx.state.system_identifier = None
        return None
    ctx.state.system_identifier = sysid
    log.info("initialize_won", system_identifier=sysid)
    await ctx.resync()
    return term


async def _create_roles(ctx: Ctx) -> None:
    pgc = ctx.cfg.postgresql
    await ctx.pg.create_roles(
        superuser_password=secret_value(pgc.superuser.password),
        replication_user=pgc.replication.username,
        replication_password=secret_value(pgc.replication.password),
    )


async def _initialize_from_backup(ctx: Ctx) -> None:
    """``bootstrap.from_backup`` (docs/backup-bootstrap.md): restore the backup (every check of
    ``hakeeper restore`` first), take the initialize race like initdb, then let PostgreSQL
    recover to the target and promote on a new timeline with this node's own configuration.

    Any failure removes the data directory and, once the race was won, the keys it created, so
    the next attempt starts clean."""
    fb = ctx.cfg.bootstrap.from_backup
    assert fb is not None
    source = fb.scope or ctx.cfg.scope
    st = ctx.state
    st.activity = MemberState.INITIALIZING
    term: int | None = None
    t0 = time.monotonic()
    try:
        try:
            copy = await ctx.backup.bootstrap_restore()
        except BootstrapRefused as e:
            log.error("bootstrap_from_backup_refused", reason=str(e), retry_in=st.config.loop_wait)
            return
        except BootstrapFailed:
            return  # logged and cleaned up by the backup side
        sysid = await ctx.pg.system_identifier()
        if sysid is None:
            raise PgError("the restored backup left no readable pg_control")
        if not await ctx.guard.lease.refresh():
            raise PgError("lease lost while restoring")
        term = await ctx.store.initialize(
            system_identifier=sysid,
            leader=ctx.name,
            lease=ctx.guard.lease.lease,
            config=ctx.cfg.bootstrap.dcs,
        )
        if term is None:
            log.info("initialize_lost", reason="another member initialized the cluster first")
            await asyncio.to_thread(ctx.pg.remove_data_dir)
            return
        log.info("initialize_won", system_identifier=sysid, source="backup")
        await ctx.resync()
        # Our configuration (archive_mode on, our scope's archive_command, port, pg_hba),
        # then the recovery settings on top of it.
        ctx.guard.arm()
        await ctx.pgconf.write(ctx.cfg.bootstrap.dcs, Role.PRIMARY, None)
        st.upstream = None
        await ctx.backup.bootstrap_recover()
        st.system_identifier = sysid
        probe = await ctx.pg.probe()
        st.probe = probe
        switch_lsn = await switch_point(ctx, probe.timeline)
        log.info(
            "bootstrap_from_backup_done",
            backup=copy.backup_id,
            repository=copy.repository,
            source_scope=source,
            target=copy.target,
            new_timeline=probe.timeline,
            switch_lsn=switch_lsn,
            seconds_replay=None if copy.seconds_replay is None else round(copy.seconds_replay, 2),
            seconds=round(time.monotonic() - t0, 2),
        )
        await record_history(
            ctx,
            term,
            f"bootstrap from backup {copy.backup_id} of scope {source} ({copy.target})",
            None,
            probe.timeline or 0,
            switch_lsn,
        )
    except BaseException as e:
        if st.system_identifier is None:
            await _undo_bootstrap(ctx, term, e)
        if isinstance(e, Exception):
            return
        raise
    finally:
        st.activity = None


async def _undo_bootstrap(ctx: Ctx, term: int | None, error: BaseException) -> None:
    log.error(
        "bootstrap_from_backup_failed",
        stage="recovery" if term is not None else "prepare",
        error=str(error) or type(error).__name__,
        action="data directory removed" + (", initialize and leader keys deleted" if term else ""),
    )
    with contextlib.suppress(Exception):
        await ctx.pg.stop("immediate")
    if not ctx.pg.is_running():  # an armed fence stays armed for a PostgreSQL that did not stop
        ctx.guard.disarm()
    with contextlib.suppress(Exception):
        await asyncio.to_thread(ctx.pg.remove_data_dir)
    if term is not None:
        with contextlib.suppress(Exception):
            await ctx.store.undo_initialize(leader=ctx.name, term=term)
            await ctx.resync()
