"""HaLoop: one HA cycle reads as its four phases, observe -> publish -> decide -> execute.

The loop wakes on etcd changes that matter (:func:`~hakeeper.ha.policy.observe.routine_only`),
on ``wake`` (an action or an operator asked for the next cycle now) and every ``loop_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

from hakeeper.core.cluster import ClusterView, Member
from hakeeper.core.config import DynamicConfig
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.mirror import PrefixMirror, stall_timeout_for
from hakeeper.ha.actions.bootstrap import bootstrap_left
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.table import STEPS
from hakeeper.ha.identity import leader_lease_owner, member_conflict, owner_of
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision, LeaseOwner, LocalFacts
from hakeeper.ha.policy.observe import Identity, member_record, observe, publish_due, routine_only
from hakeeper.ha.policy.versions import leader_major_refusal
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.loop")


class HaLoop:
    def __init__(self, ctx: Ctx, mirror: PrefixMirror, identity: Identity, action_lock: asyncio.Lock) -> None:
        self.ctx = ctx
        self.mirror = mirror
        self.identity = identity
        self.action_lock = action_lock  # the HA cycle and operator actions never interleave
        self.stopping = asyncio.Event()
        self._reported: set[tuple[str, int]] = set()  # invalid records already logged (key, revision)
        self._conflict_lease: int | None = None  # the foreign lease last reported on our member key

    def view(self) -> ClusterView:
        """The cluster as the etcd mirror holds it now.

        An invalid (or vanished) config key falls back to the last valid config this process
        saw, never to this node's own bootstrap values: those may differ from node to node, and
        nodes that disagree on replication_mode or pause would act on different rules.  Only
        an agent that never saw a valid config since it started uses its bootstrap values."""
        st = self.ctx.state
        if st.last_valid_config is None:
            fallback = self.ctx.cfg.bootstrap.dcs
            source = "the local bootstrap values (no valid config seen since this agent started)"
        else:
            fallback, rev = st.last_valid_config
            source = f"the last valid config (revision {rev})"
        view = self.ctx.store.view_of(self.mirror.kvs, self.mirror.revision, fallback, source)
        if view.config_revision and view.config_error is None:
            st.last_valid_config = (view.config, view.config_revision)
        return view

    # -- running -------------------------------------------------------------------------------------

    async def run(self) -> None:
        ctx = self.ctx
        while not self.stopping.is_set():
            ctx.state.loop_heartbeat = started = time.monotonic()
            try:
                async with self.action_lock:
                    await self.cycle()
            except (PgError, CommandFailed, EtcdError, OSError) as e:
                log.error("ha_cycle_failed", error=str(e), error_type=type(e).__name__)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ha_cycle_crashed")
            ctx.metrics.loop_duration.observe(time.monotonic() - started)
            ctx.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ctx.state.config.loop_wait):
                    await self._wait_event()

    async def _wait_event(self) -> None:
        """Until something in etcd changed that this agent should act on at once, or ``wake``."""
        wake = self.ctx.wake
        while True:
            mirror_changed = asyncio.ensure_future(self.mirror.changed.wait())
            woke = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({mirror_changed, woke}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                mirror_changed.cancel()
                woke.cancel()
            self.mirror.changed.clear()
            if wake.is_set() or not self._routine_only(self.mirror.take_changed()):
                return

    def _routine_only(self, changed: set[str]) -> bool:
        kvs = self.mirror.kvs
        leader = kvs.get(self.ctx.store.keys.leader)
        return routine_only(
            changed,
            present=kvs.keys(),
            leader_name=None if leader is None else leader.value.decode(errors="replace"),
            members_prefix=self.ctx.store.keys.members,
            name=self.ctx.name,
        )

    # -- one cycle -----------------------------------------------------------------------------------

    async def cycle(self) -> None:
        stale = not self.mirror.synced
        view = self.ctx.state.view if stale else self.view()
        if view.revision == 0:
            log.info("ha_waiting", reason="no etcd view yet (etcd unreachable?)")
            return
        self._take_view(view)
        facts = await self.observe(view, etcd_reachable=not stale)
        view = await self.publish(view)
        decision = decide(view, facts)
        self._log_decision(decision, facts)
        await STEPS[decision.action](self.ctx, view, facts, decision)
        if decision.action in (Action.LEAD, Action.FOLLOW) and not stale:
            await self.ctx.pgconf.apply_changes(view.config)

    def _take_view(self, view: ClusterView) -> None:
        self._report(view)
        self.ctx.state.view = view
        self._apply_timing(view.config)

    def _report(self, view: ClusterView) -> None:
        """Log each invalid record once per revision (the view is rebuilt every cycle)."""
        seen = {(p.key, p.revision) for p in view.invalid}
        for p in view.invalid:
            if (p.key, p.revision) not in self._reported:
                log.warning("etcd_record_invalid", key=p.key, revision=p.revision, reason=p.reason)
                if p.key == self.ctx.store.keys.config and view.config_error:
                    log.warning("dynamic_config_invalid", error=view.config_error)
        if view.config_ignored and ("config-ignored", view.config_revision) not in self._reported:
            log.warning(
                "dynamic_config_fields_ignored",
                revision=view.config_revision,
                fields=list(view.config_ignored),
                reason="unknown to this version (written by a newer agent?)",
            )
        if view.config_ignored:
            seen.add(("config-ignored", view.config_revision))
        self._reported = seen  # forget what was fixed: the set stays as small as the problems

    def _apply_timing(self, dyn: DynamicConfig) -> None:
        lease = self.ctx.guard.lease
        lease.ttl = dyn.ttl
        lease.interval = dyn.keepalive_interval
        lease.margin = dyn.fence_margin
        self.mirror.stall_timeout = stall_timeout_for(dyn.ttl)  # used from the next watch on

    async def observe(self, view: ClusterView, *, etcd_reachable: bool = True) -> LocalFacts:
        """Probe PostgreSQL and advance this node's clocks: the facts decide() needs
        (``etcd_reachable`` False: ``view`` is the last one read before etcd went away)."""
        ctx, st = self.ctx, self.ctx.state
        now = time.monotonic()
        probe = await ctx.pg.probe(timeout=2.0)
        st.probe = probe
        obs = observe(
            name=ctx.name,
            probe=probe,
            view=view,
            clocks=st.clocks,
            activity=st.activity,
            needs_rewind=st.needs_rewind,
            now=now,
        )
        st.clocks, st.activity, st.needs_rewind = obs.clocks, obs.activity, obs.needs_rewind
        if obs.rewind_needed is not None:
            log.warning("rewind_needed", **obs.rewind_needed)
        if probe.running and probe.in_recovery is False:
            await ctx.pgconf.wake_checkpointer()
        await ctx.slots.refresh(probe, view)
        guard, tags = ctx.guard, ctx.cfg.tags
        owner, conflict = await self._identity(view, etcd_reachable)
        sysid = await self._system_identifier()
        return LocalFacts(
            name=ctx.name,
            data_initialized=ctx.pg.is_initialized(),
            system_identifier=sysid,
            pg_running=probe.running,
            in_recovery=probe.in_recovery,
            timeline=probe.timeline,
            wal_lsn=probe.wal_lsn,
            streaming_from=probe.streaming_from,
            pg_down_for=0.0 if st.clocks.pg_down_since is None else now - st.clocks.pg_down_since,
            needs_rewind=st.needs_rewind,
            lease=guard.lease.lease,
            lease_valid=guard.lease.valid(),  # on the fence clock (boottime), not `now`
            leaderless_for=0.0 if st.clocks.leaderless_since is None else now - st.clocks.leaderless_since,
            nofailover=tags.nofailover,
            failover_priority=tags.failover_priority,
            now=time.time(),
            etcd_reachable=etcd_reachable,
            leader_lease_owner=owner,
            name_conflict=conflict,
            bootstrap_left=await bootstrap_left(ctx, sysid, view.initialized),
            binaries_major=st.binaries_major,
        )

    async def _identity(self, view: ClusterView, etcd_reachable: bool) -> tuple[LeaseOwner, bool]:
        """Whose lease the leader key naming us is under, and whether another agent keeps our
        member key alive (:mod:`hakeeper.ha.identity`; no etcd request while both keys are on
        leases of ours).  With etcd unreachable nothing can be checked: UNKNOWN, no conflict."""
        ctx, keeper = self.ctx, self.ctx.guard.lease
        if not etcd_reachable:
            leader = view.leader
            mine = leader is None or leader.name != ctx.name or keeper.is_own(leader.lease)
            return (LeaseOwner.OURS if mine else LeaseOwner.UNKNOWN), False
        owner = await leader_lease_owner(ctx.store, keeper, ctx.name, view)
        conflict = await member_conflict(ctx.store, keeper, ctx.name, view)
        earlier = self._conflict_lease
        if conflict is None and earlier is not None:
            # Sticky until the other agent's lease is gone: our own put may hide it from the
            # next view, and a conflict that came and went every cycle would let us act
            # (campaign, promote) in between.  Unknown counts as alive (fail closed).
            if await owner_of(ctx.store, keeper, earlier) != LeaseOwner.EXPIRED:
                conflict = earlier
        if conflict != earlier:
            self._conflict_lease = conflict
            if conflict is not None:
                log.error(
                    "member_name_conflict",
                    reason="our member key was re-written under a live lease this node never held: "
                    "another agent runs under our name; not writing until it is gone",
                    foreign_lease=hex(conflict),
                    our_lease=hex(keeper.lease),
                )
            else:
                log.warning("member_name_conflict_ended", reason="the other agent's lease expired")
        return owner, conflict is not None

    async def _system_identifier(self) -> str | None:
        st, pg = self.ctx.state, self.ctx.pg
        if st.system_identifier is None and pg.is_initialized():
            try:
                st.system_identifier = await pg.system_identifier()
            except (PgError, CommandFailed) as e:
                log.warning("controldata_failed", error=str(e))
        return st.system_identifier

    async def publish(self, view: ClusterView) -> ClusterView:
        """Put our member record (throttled); the view with what we published in it, which is
        also what the API shows (our own put no longer wakes the loop)."""
        published = await self.publish_member(view)
        if published is None:
            return view
        view = replace(view, members={**view.members, self.ctx.name: published})
        self.ctx.state.view = view
        return view

    async def publish_member(self, view: ClusterView) -> Member | None:
        ctx, st = self.ctx, self.ctx.state
        lease = ctx.guard.lease.lease
        if not lease:
            return None
        m = member_record(
            self.identity,
            probe=st.probe,
            activity=st.activity,
            initialized=ctx.pg.is_initialized(),
            view=view,
            now_wall=time.time(),
            # an operator's hold first; else a leader of another major we cannot follow
            held=st.held or leader_major_refusal(view, ctx.name, st.binaries_major),
            scheduled_restart=st.scheduled_restart,
        )
        m = replace(m, slots=ctx.slots.report)
        now = time.monotonic()
        if not publish_due(m, lease, st.published, now, st.config.loop_wait):
            return m
        try:
            await ctx.store.put_member(m, lease)
        except EtcdError as e:
            log.warning("member_publish_failed", error=str(e))
            return None
        st.published = (replace(m, updated_at=0.0), lease, now)
        return m

    def _log_decision(self, d: Decision, facts: LocalFacts) -> None:
        st = self.ctx.state
        prev, st.decision = st.decision, d
        self.ctx.metrics.decisions.labels(d.action.value).inc()
        if prev is not None and prev.action == d.action and prev.why == d.why:
            return
        level = log.warning if d.action in (Action.WAIT, Action.DEMOTE, Action.RELEASE) else log.info
        level(
            "decision_" + d.action.value,
            why=d.why,
            target=d.target,
            facts=dict(d.facts),
            timeline=facts.timeline,
            wal_lsn=facts.wal_lsn,
        )
