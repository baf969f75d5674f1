"""Leader actions: take the leader key and promote, lead (status, slots, sync set), restart the
primary in place, and give the key up.

Every path that makes PostgreSQL writable first confirms the lease with a fresh keepalive and
arms the fence (:class:`~hakeeper.ha.guard.WriteGuard`)."""

from __future__ import annotations

import time

from hakeeper.core.cluster import ClusterView, HistoryEntry, MemberState, Status, slot_name_for
from hakeeper.core.config import DynamicConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.core.pgtypes import Role
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.policy.decision import Decision, LocalFacts
from hakeeper.ha.policy.plans import plan_promotion
from hakeeper.ha.state import Promotion
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.leader")


async def start_as_primary(ctx: Ctx, dyn: DynamicConfig) -> None:
    ctx.guard.arm()
    await ctx.pgconf.write(dyn, Role.PRIMARY, None)
    ctx.state.upstream = None
    ctx.state.activity = MemberState.STARTING
    await ctx.pg.start(timeout=max(30.0, dyn.primary_start_timeout))


async def switch_point(ctx: Ctx, timeline: int | None) -> int | None:
    """Where ``timeline`` branched off its parent, from its history file (None: unknown)."""
    if not timeline or timeline < 2:
        return None
    try:
        rows = await ctx.pg.session.execute(
            "SELECT pg_read_file('pg_wal/' || lpad(upper(to_hex(%s::int)), 8, '0') || '.history')",
            (timeline,),
        )
        last = [ln for ln in str(rows[0][0]).splitlines() if ln.strip() and not ln.startswith("#")][-1]
        return parse_lsn(last.split()[1])
    except (PgError, IndexError, ValueError) as e:
        log.warning("switch_point_unknown", error=str(e))
        return None


async def record_history(
    ctx: Ctx, term: int, reason: str, old: str | None, timeline: int, lsn: int | None
) -> None:
    entry = HistoryEntry(timeline, lsn, time.time(), reason, old, ctx.name)
    if not await ctx.store.append_history(term, entry):
        log.warning("history_write_failed", reason="lost the leader key or concurrent writes")


async def campaign(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    if not await ctx.guard.confirm_lease():
        return
    term = await ctx.store.take_leader(ctx.name, ctx.guard.lease.lease)
    if term is None:
        log.info("campaign_lost", reason="another member took the leader key first")
        await ctx.resync()
        return
    log.info("leader_acquired", term=term, why=d.why, facts=dict(d.facts))
    ctx.guard.arm()
    plan = plan_promotion(view, ctx.name, d.why)
    old = view.history[-1].new_leader if view.history else None
    now_m, now_w = time.monotonic(), time.time()
    st = ctx.state
    noticed = st.clocks.leaderless_since or now_m
    st.promotion = Promotion(plan.kind, now_m)
    ctx.metrics.phase.labels(plan.kind, "elect").observe(now_m - noticed)
    if st.clocks.leader_last_alive is not None:
        detect = (now_w - (now_m - noticed)) - st.clocks.leader_last_alive
        ctx.metrics.phase.labels(plan.kind, "detect").observe(max(0.0, detect))
    ctx.metrics.promotions.labels(plan.kind).inc()
    if plan.request is not None:
        await ctx.store.drop_switchover(term, plan.request)
    if facts.in_recovery:
        await _promote(ctx, term, plan.reason, old)
    await ctx.resync()


async def promote(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    if not await ctx.guard.confirm_lease():
        return
    assert view.leader is not None
    ctx.guard.arm()
    old = view.history[-1].new_leader if view.history else None
    await _promote(ctx, view.leader.term, d.why, old)


async def _promote(ctx: Ctx, term: int, reason: str, old_leader: str | None) -> None:
    st = ctx.state
    dyn = st.config
    st.activity = MemberState.PROMOTING
    ctx.sync.new_term(dyn)
    t0 = time.monotonic()
    if dyn.replication_mode != "async":
        await _arm_sync_guard(ctx, dyn)
    try:
        await ctx.pg.promote(timeout=30)
    finally:
        st.activity = None
    kind = st.promotion.kind if st.promotion else "failover"
    ctx.metrics.phase.labels(kind, "promote").observe(time.monotonic() - t0)
    probe = await ctx.pg.probe()
    st.probe = probe
    st.upstream = None
    switch_lsn = await switch_point(ctx, probe.timeline)
    log.info(
        "promoted",
        timeline=probe.timeline,
        switch_lsn=switch_lsn,
        seconds=round(time.monotonic() - t0, 3),
        reason=reason,
    )
    await ctx.pgconf.write(dyn, Role.PRIMARY, None)
    await record_history(ctx, term, reason, old_leader, probe.timeline or 0, switch_lsn)
    ctx.backup.after_promotion(probe.timeline)  # is the old timeline's WAL archived up to the switch?
    await _lead(ctx, ctx.fresh_view(), term)


async def _arm_sync_guard(ctx: Ctx, dyn: DynamicConfig) -> None:
    """Before promoting in synchronous or quorum mode: ``synchronous_standby_names = '*'``,
    reloaded while still a standby (where it has no effect), so that no commit of the new
    primary is acknowledged before a standby has it -- not even in the cycles before the
    SyncManager has formed the new term's sync set.  Without a standby, non-strict mode stops
    waiting after 2 x ttl (logged); strict mode waits on."""
    try:
        await ctx.pgconf.write(dyn, Role.REPLICA, ctx.state.upstream)
        await ctx.pg.reload()
    except (PgError, CommandFailed, OSError) as e:
        log.warning("sync_guard_failed", error=str(e))


async def takeover(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    """The key names us under an earlier lease of ours or an expired one (decide() never picks
    this for a live lease another agent holds): move it onto our lease, same term, and only from
    the lease the decision was taken on."""
    leader = view.leader
    assert leader is not None
    if not await ctx.guard.confirm_lease():
        return
    if await ctx.store.take_over_leader(ctx.name, leader.term, leader.lease, ctx.guard.lease.lease):
        log.info(
            "leader_key_reattached",
            term=leader.term,
            old_lease=hex(leader.lease),
            old_lease_was=facts.leader_lease_owner.value,
        )
        if facts.writable:
            ctx.guard.arm()
    else:
        log.warning(
            "leader_takeover_refused", reason="the leader key changed (holder, term or lease) since decided"
        )
    await ctx.resync()


async def lead(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    assert view.leader is not None
    ctx.guard.arm()
    await _lead(ctx, view, view.leader.term)


async def _lead(ctx: Ctx, view: ClusterView, term: int) -> None:
    st = ctx.state
    probe = st.probe
    p = st.promotion
    if p is not None and probe is not None and any(r.state == "streaming" for r in probe.replication):
        ctx.metrics.phase.labels(p.kind, "reconfigure").observe(time.monotonic() - p.key_taken)
        st.promotion = None
    if probe is not None and probe.wal_lsn is not None:
        status = Status(lsn=probe.wal_lsn, timeline=probe.timeline, term=term)
        if status != view.status:
            await ctx.store.write_status(term, status)
    await _manage_slots(ctx, view)
    await ctx.sync.manage(view, term)
    await ctx.slots.manage(view, term, st.probe)


async def _manage_slots(ctx: Ctx, view: ClusterView) -> None:
    """A physical slot per member, kept member_slots_ttl after the member was last seen.

    Only slots of members this agent has seen (``slot_seen``: the slots it creates) may be
    dropped; a physical slot hakeeper did not make -- a user's, another tool's, or one whose
    member left before this agent started -- is left alone (docs/decisions.md)."""
    now = time.monotonic()
    seen = ctx.state.slot_seen
    for name in view.members:
        if name != ctx.name:
            seen[slot_name_for(name)] = now
    ttl = view.config.member_slots_ttl
    wanted = {s for s in seen if now - seen[s] <= ttl}
    created, dropped = await ctx.pg.ensure_slots(wanted, droppable=set(seen))
    if created or dropped:
        log.info("slots_changed", created=created, dropped=dropped)
    for s in dropped:
        seen.pop(s, None)


async def start_primary(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    if not await ctx.guard.confirm_lease():
        return
    log.warning("primary_restarting", down_for=round(facts.pg_down_for, 1))
    try:
        await start_as_primary(ctx, view.config)
    except (PgError, CommandFailed) as e:
        log.error("primary_restart_failed", error=str(e))


async def release(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    if ctx.pg.is_running():
        await ctx.pg.stop("immediate")
    # Disarmed only once PostgreSQL has stopped: if the stop fails (raises), the fence still fires.
    ctx.guard.disarm()
    await release_key(ctx, view)


async def release_key(ctx: Ctx, view: ClusterView) -> None:
    if view.leader is None or view.leader.name != ctx.name:
        return
    succeeded = await ctx.store.release_leader(ctx.name, view.leader.term)
    log.warning("leader_released", term=view.leader.term, succeeded=succeeded)
    await ctx.resync()
