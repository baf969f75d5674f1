"""Switchover hand-over, run by the leader (``Action.SWITCHOVER``), and request rejection.

The leader stops writes, waits until the candidate has received all of its WAL, releases the
leader key to the candidate in one term-guarded transaction and follows it.  The candidate's
side is an ordinary campaign (``decide()`` lets only the named candidate campaign during a
hand-over).  Nothing acknowledged is lost and no rewind is needed: the candidate has received
everything up to our shutdown checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from hakeeper.core.cluster import ClusterView, SwitchoverStage
from hakeeper.core.config import secret_value
from hakeeper.core.lsn import parse_lsn
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.replica import start_as_replica
from hakeeper.ha.policy.decision import Decision, LocalFacts
from hakeeper.ha.policy.switchover import plan_handover_result
from hakeeper.pg.errors import PgError
from hakeeper.pg.remote import wait_received
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.handover")


async def reject_switchover(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    sw = view.switchover
    assert view.leader is not None and sw is not None
    log.warning("switchover_refused", reason=d.why, kind=sw.kind.value, candidate=sw.candidate)
    await ctx.store.drop_switchover(view.leader.term, sw)
    await ctx.resync()


async def switchover(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    """Planned hand-over: stop writes, wait until the candidate has all our WAL, release the
    leader key to it, and follow it."""
    sw = view.switchover
    assert view.leader is not None and sw is not None and d.target is not None
    cand = view.members[d.target]
    term = view.leader.term
    pg = ctx.pg
    t0 = time.monotonic()
    log.info("switchover_started", candidate=d.target, kind=sw.kind.value, force=sw.force)
    with contextlib.suppress(PgError):
        await pg.checkpoint(timeout=60)  # makes the shutdown checkpoint short
    t_ckpt = time.monotonic()
    await pg.stop("fast", timeout=60)  # terminates sessions, writes the shutdown checkpoint
    t_stopped = time.monotonic()
    ctl = await pg.controldata()
    final_lsn = parse_lsn(ctl.get("Latest checkpoint location"))
    pgc = ctx.cfg.postgresql
    caught_up = await wait_received(
        name=cand.name,
        host=cand.host,
        port=cand.port,
        user=pgc.superuser.username,
        password=secret_value(pgc.superuser.password),
        lsn=final_lsn,
        timeout=max(5.0, view.config.ttl),
        tls=pgc.tls,
    )
    plan = plan_handover_result(caught_up, sw.force)
    if not plan.hand_over:
        log.error(
            "switchover_aborted",
            reason=plan.abort_reason,
            candidate=d.target,
            final_lsn=ctl.get("Latest checkpoint location"),
        )
        await ctx.store.drop_switchover(term, sw)
        return  # next cycle: we still hold the key, postgres is down -> restart in place
    handover = replace(sw, stage=SwitchoverStage.HANDOVER, candidate=d.target, handover_at=time.time())
    if not await ctx.store.hand_over(ctx.name, term, sw, handover):
        log.error("switchover_aborted", reason="leader key or request changed under us")
        return
    ctx.guard.disarm()
    ctx.metrics.handovers.inc()
    t_released = time.monotonic()
    log.info(
        "leader_released_to_candidate",
        candidate=d.target,
        final_lsn=ctl.get("Latest checkpoint location"),
        checkpoint_s=round(t_ckpt - t0, 3),
        stop_s=round(t_stopped - t_ckpt, 3),
        catch_up_s=round(t_released - t_stopped, 3),
    )
    st = ctx.state
    st.needs_rewind = plan.needs_rewind
    st.clocks = replace(st.clocks, pg_down_since=None)
    await start_as_replica(ctx, view, d.target)
    await ctx.resync()
