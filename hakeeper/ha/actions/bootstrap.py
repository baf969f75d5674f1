"""Bootstrap: win the initialize race and create the cluster, with initdb or from a backup
(``bootstrap.from_backup``, through the backup port); and what a restarted agent does with a
bootstrap it was killed in the middle of (the marker of :mod:`hakeeper.ha.bootmark`)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from hakeeper.core.cluster import ClusterView, HistoryEntry, MemberState
from hakeeper.core.config import secret_value
from hakeeper.core.errors import BootstrapFailed, BootstrapRefused
from hakeeper.core.pgtypes import Role
from hakeeper.ha import bootmark
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.leader import record_history, start_as_primary, switch_point
from hakeeper.ha.bootmark import BootstrapMark, Phase, initdb_running
from hakeeper.ha.policy.decision import BootstrapLeft, Decision, LocalFacts
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.bootstrap")

# After a refused or failed bootstrap from a backup, the next attempt waits this long (s).
BOOTSTRAP_RETRY_AFTER = 10.0

BOOTSTRAP_REASON = "bootstrap"  # the history entry of an initdb bootstrap


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
            else:
                ctx.wake.set()  # publish the new primary's member record now
        return
    if await _initdb_left_running(ctx, "initialize_refused"):
        return
    # Written (durably) before initdb creates anything: from here on a kill leaves a directory
    # only this marker can prove to be an abandoned bootstrap (hakeeper/ha/bootmark.py).
    mark = await asyncio.to_thread(bootmark.begin, ctx.bootstrap, ctx.pg.data_dir)
    st.activity = MemberState.INITIALIZING
    log.info("initdb_started", data_dir=str(ctx.pg.data_dir))
    try:
        await ctx.pg.initdb(ctx.cfg.bootstrap.initdb)
        sysid = await ctx.pg.system_identifier()
        if sysid is None:
            raise PgError("initdb left no readable pg_control")
        mark = await asyncio.to_thread(bootmark.advance, ctx.bootstrap, mark, Phase.RACE, sysid)
        term = await _race(ctx, sysid, mark)
        if term is None:
            return
        await start_as_primary(ctx, ctx.cfg.bootstrap.dcs)
        await _create_roles(ctx)
        if await _record_bootstrap(ctx, term):
            await asyncio.to_thread(ctx.bootstrap.clear)
        # The member record was last published (if at all) before the lease existed: publish the
        # new primary's now, not a loop_wait later (`list` would show a leader without members).
        ctx.wake.set()
    except BaseException:
        if st.system_identifier is None and ctx.pg.is_initialized():
            with contextlib.suppress(Exception):
                await ctx.pg.stop("immediate")
                await asyncio.to_thread(ctx.pg.remove_data_dir)
        if st.system_identifier is None and not ctx.pg.is_initialized():
            # Nothing of this bootstrap is left for the marker to vouch for.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(ctx.bootstrap.clear)
        raise
    finally:
        st.activity = None


async def _race(ctx: Ctx, sysid: str, mark: BootstrapMark) -> int | None:
    """The initialize race: the initialize, leader and config keys in one transaction, only if
    no member created them first.  The loser throws its data directory away."""
    term = await ctx.store.initialize(
        system_identifier=sysid, leader=ctx.name, lease=ctx.guard.lease.lease, config=ctx.cfg.bootstrap.dcs
    )
    if term is None:
        log.info("initialize_lost", reason="another member initialized the cluster first")
        await asyncio.to_thread(ctx.pg.remove_data_dir)
        ctx.state.system_identifier = None
        await asyncio.to_thread(ctx.bootstrap.clear)
        return None
    ctx.state.system_identifier = sysid
    log.info("initialize_won", system_identifier=sysid)
    # The directory is the cluster's now: never discarded as an abandoned bootstrap, even if
    # the initialize key should change later.  (A kill before this line leaves phase "race"
    # with the initialize key's identifier, which counts as won too.)
    await asyncio.to_thread(bootmark.advance, ctx.bootstrap, mark, Phase.WON, sysid)
    await ctx.resync()
    return term


async def _record_bootstrap(ctx: Ctx, term: int) -> bool:
    entry = HistoryEntry(1, None, time.time(), BOOTSTRAP_REASON, None, ctx.name)
    if await ctx.store.append_history(term, entry):
        return True
    log.warning("history_write_failed", reason="lost the leader key or concurrent writes")
    return False


async def _initdb_left_running(ctx: Ctx, event: str) -> bool:
    """Whether an initdb an earlier (killed) agent started still works on our data directory
    (logged as ``event``): nothing may touch the directory until it has ended."""
    pid = await asyncio.to_thread(initdb_running, ctx.pg.data_dir)
    if pid is None:
        return False
    log.warning(
        event,
        reason="an initdb an earlier agent started still runs on the data directory; waiting for it",
        pid=pid,
        data_dir=str(ctx.pg.data_dir),
    )
    return True


# -- a bootstrap the agent was killed in the middle of -----------------------------------------------


async def bootstrap_left(
    ctx: Ctx, system_identifier: str | None, cluster: str | None
) -> BootstrapLeft | None:
    """The observe step's fact (``system_identifier``: our data directory's; ``cluster``: the
    initialize key's).  A marker that can no longer be about our data directory is removed, so
    that it never vouches for a directory made later by other means:

    * the directory is gone (removed, or never made);
    * the directory is a copy of the cluster's (a clone) that the marker did not record;
    * a marker without a system identifier, and the directory's PG_VERSION was not written
      while that initdb ran."""
    mark = ctx.bootstrap.current
    left = bootmark.leftover(ctx.bootstrap, ctx.pg.data_dir)
    if mark is None or left is None:
        return None
    data_dir = ctx.pg.data_dir
    stale = None
    if not ctx.pg.is_initialized():
        if await asyncio.to_thread(initdb_running, data_dir) is not None:
            return None  # initdb has not written PG_VERSION yet: the marker still has a job
        stale = "its data directory does not exist (any more)"
    elif system_identifier is not None and system_identifier == cluster != left.system_identifier:
        stale = "the data directory is the cluster's, not the one the marker recorded"
    elif left.system_identifier is None and not await asyncio.to_thread(
        bootmark.made_during, data_dir, mark.started_at
    ):
        stale = "the data directory was not made by the initdb the marker recorded"
    if stale is None:
        if (
            mark.phase == Phase.RACE
            and left.system_identifier is not None
            and left.system_identifier == cluster
        ):
            # Killed between the race and its record: we won.  Recorded now, so that the
            # directory is never taken for an abandoned one, whatever the initialize key says later.
            mark = await asyncio.to_thread(bootmark.advance, ctx.bootstrap, mark, Phase.WON, cluster)
            log.info("bootstrap_marker_updated", phase=mark.phase.value, reason="the initialize key is ours")
            return mark.left()
        return left
    log.info("bootstrap_marker_removed", reason=stale, phase=mark.phase.value)
    await asyncio.to_thread(ctx.bootstrap.clear)
    return None


async def discard_bootstrap(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    """Remove the data directory our interrupted bootstrap left; the next cycle initializes
    again or clones.  The decision's proof is checked once more on fresh readings: the marker,
    the directory's system identifier and the initialize key in etcd (not the mirror)."""
    if await _initdb_left_running(ctx, "bootstrap_discard_deferred"):
        return
    pg, st = ctx.pg, ctx.state
    mark = ctx.bootstrap.current
    try:
        sysid = await pg.system_identifier()
    except (PgError, CommandFailed):
        sysid = None  # half made: initdb never wrote pg_control
    cluster = (await ctx.store.read_view()).initialized
    refusal = None
    if mark is None or mark.data_dir != str(pg.data_dir) or mark.phase == Phase.WON:
        refusal = "the bootstrap marker no longer says so"
    elif mark.system_identifier is not None and mark.system_identifier != sysid:
        refusal = "the data directory's system identifier is not the one the marker recorded"
    elif mark.system_identifier is None and not await asyncio.to_thread(
        bootmark.made_during, pg.data_dir, mark.started_at
    ):
        refusal = "the data directory was not made by the initdb the marker recorded"
    elif sysid is not None and sysid == cluster:
        refusal = "the initialize key holds this data directory's system identifier"
    elif pg.is_running():
        refusal = "PostgreSQL runs on it"
    if refusal is not None:
        log.warning("bootstrap_discard_refused", reason=refusal, ours=sysid, cluster=cluster)
        return
    log.warning(
        "bootstrap_abandoned",
        reason=d.why,
        sysid=sysid,
        cluster=cluster,
        phase=mark.phase.value if mark is not None else None,
        data_dir=str(pg.data_dir),
    )
    await asyncio.to_thread(pg.remove_data_dir)
    st.system_identifier = None
    st.needs_rewind = False  # found by the look at start; nothing is left to rewind
    await asyncio.to_thread(ctx.bootstrap.clear)
    ctx.wake.set()


async def finish_bootstrap(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    """We won the initialize race and run as the primary, but the agent was killed before the
    roles were created (replicas then fail "password authentication failed") or the history
    entry was written: do both now (creating the roles is idempotent: ALTER or CREATE)."""
    if not await ctx.guard.confirm_lease():
        return
    assert view.leader is not None
    ctx.guard.arm()
    await _create_roles(ctx)
    history = "present"
    if not view.history:
        if not await _record_bootstrap(ctx, view.leader.term):
            return  # the marker stays: the next cycle tries again
        history = "recorded"
    elif not any(h.reason == BOOTSTRAP_REASON for h in view.history):
        history = "not recorded: the history has later entries"
    await asyncio.to_thread(ctx.bootstrap.clear)
    log.warning(
        "bootstrap_completed_after_restart",
        system_identifier=facts.system_identifier,
        roles="created",
        history=history,
    )
    ctx.wake.set()


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
