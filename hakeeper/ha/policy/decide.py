"""``decide(view, local) -> Decision``: the whole HA policy as a pure function.

No I/O, no clock: everything it needs arrives in the arguments, so it is tested as a truth
table and with generated views.  The executor (``hakeeper.ha.agent``) carries decisions out;
anything risky it does (taking the leader key, promoting) is re-checked against etcd there.

Invariants kept here (see docs/architecture.md):

* I1: only the holder of the leader key *with its current lease* is told to run read-write
  (``LEAD``, ``PROMOTE``, ``START_PRIMARY``); a writable node without the key is told to
  ``DEMOTE`` unless it is itself the best candidate and may ``CAMPAIGN`` for the key.
* I4: eligible candidates are ranked by (timeline, WAL LSN, failover_priority, name), the same
  order on every node; only the best campaigns, the k-th only after ``k * candidate_grace``
  seconds without a leader.  A node that does not campaign says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hakeeper.core.cluster import (
    ClusterView,
    MemberRole,
    MemberState,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
)
from hakeeper.ha.policy.candidates import assess, rank
from hakeeper.ha.policy.switchover import switchover_live, switchover_target


class Action(StrEnum):
    INITIALIZE = "initialize"  # race for the initialize key; the winner runs initdb
    CLONE = "clone"  # pg_basebackup from the leader
    WAIT = "wait"  # nothing safe to do now; `why` says what we wait for
    START_REPLICA = "start_replica"  # start PostgreSQL read-only (following the leader, if any)
    FOLLOW = "follow"  # running replica: make sure it streams from the leader
    REWIND = "rewind"  # former primary: pg_rewind from the leader, then follow
    CAMPAIGN = "campaign"  # try to take the leader key; then promote if needed
    PROMOTE = "promote"  # we hold the key but PostgreSQL is still in recovery
    LEAD = "lead"  # we hold the key and run read-write: publish status, keep slots
    TAKEOVER = "takeover"  # the key names us under an old lease (agent restarted): re-attach it
    START_PRIMARY = "start_primary"  # we hold the key, PostgreSQL is down: restart in place
    RELEASE = "release"  # we hold the key but cannot run a primary: give it up now
    DEMOTE = "demote"  # we run read-write without the key: stop writes, become a replica
    DETACH = "detach"  # synchronous/quorum mode, no leader: stop streaming from the old primary first
    SWITCHOVER = "switchover"  # leader: hand over to `target` (stop writes, wait, release)
    REJECT_SWITCHOVER = "reject_switchover"  # leader: drop an impossible or stale request


@dataclass(frozen=True, slots=True)
class LocalFacts:
    """What the agent knows about its own node, gathered fresh before every decision."""

    name: str
    data_initialized: bool
    system_identifier: str | None = None
    pg_running: bool = False
    in_recovery: bool | None = None
    timeline: int | None = None
    wal_lsn: int | None = None
    streaming_from: str | None = None
    pg_down_for: float = 0.0  # seconds PostgreSQL has been down while it should have run
    needs_rewind: bool = False  # set after we stopped being primary, or found a primary's data
    lease: int = 0  # our etcd lease id (0: none)
    lease_valid: bool = False  # keepalive succeeded and the fence deadline is in the future
    leaderless_for: float = 0.0  # seconds since we first saw no leader key
    nofailover: bool = False
    failover_priority: int = 1
    now: float = 0.0  # wall clock (epoch s), for scheduled and stale switchover requests

    @property
    def writable(self) -> bool:
        return self.pg_running and self.in_recovery is False


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    why: str
    target: str | None = None  # the leader to clone/follow/rewind from
    facts: Mapping[str, Any] = field(default_factory=dict)


def _manual_candidate(view: ClusterView, local: LocalFacts, sw: Switchover) -> Decision:
    """No leader and a switchover hand-over or manual failover names a candidate: only it may
    campaign (whatever the automatic ranking says); everyone else waits for it."""
    if sw.candidate != local.name:
        return Decision(Action.WAIT, f"{sw.kind} to {sw.candidate} in progress")
    me = view.members.get(local.name)
    if me is None:
        return Decision(Action.WAIT, "our member key is not published yet")
    mine = assess(me, view)
    if not mine.eligible and not sw.force:
        return Decision(
            Action.WAIT,
            f"{sw.kind} to us refused: {mine.reason} (an operator may force it)",
            facts={"reason": mine.reason},
        )
    why = f"{sw.kind} to us" + (" (forced)" if sw.force and not mine.eligible else "")
    return Decision(Action.CAMPAIGN, why, facts={"kind": sw.kind.value, "forced": sw.force})


def _campaign_or_wait(view: ClusterView, local: LocalFacts) -> Decision:
    me = view.members.get(local.name)
    if me is None:
        return Decision(Action.WAIT, "our member key is not published yet")
    mine = assess(me, view)
    if not mine.eligible:
        return Decision(
            Action.WAIT, f"not a failover candidate: {mine.reason}", facts={"reason": mine.reason}
        )
    order = rank(view)
    pos = next(i for i, c in enumerate(order) if c.name == local.name)
    best = order[0]
    facts = {"position": pos, "best": best.name, "timeline": mine.timeline, "wal_lsn": mine.wal_lsn}
    grace = view.config.candidate_grace
    if pos == 0:
        return Decision(Action.CAMPAIGN, "no leader and we are the best candidate", facts=facts)
    if local.leaderless_for >= pos * grace:
        return Decision(
            Action.CAMPAIGN,
            f"no leader for {local.leaderless_for:.1f}s and better candidates did not take over",
            facts=facts,
        )
    return Decision(
        Action.WAIT,
        f"{best.name} is a better candidate (timeline {best.timeline}, lsn {best.wal_lsn})",
        facts=facts,
    )


def decide(view: ClusterView, local: LocalFacts) -> Decision:
    leader = view.leader
    # -- no data directory yet ------------------------------------------------------------------
    if not local.data_initialized:
        if leader is not None and leader.name == local.name:
            return Decision(Action.RELEASE, "we hold the leader key but have no data directory")
        if view.initialized is None:
            return Decision(Action.INITIALIZE, "cluster not initialized")
        lm = view.leader_member
        if lm is not None and lm.role == MemberRole.PRIMARY and lm.state == MemberState.RUNNING:
            if view.paused:
                return Decision(Action.WAIT, "paused: not cloning")
            return Decision(Action.CLONE, "empty data directory", target=lm.name)
        return Decision(Action.WAIT, "empty data directory and no running leader to clone from")

    if (
        view.initialized is not None
        and local.system_identifier is not None
        and view.initialized != local.system_identifier
    ):
        return Decision(
            Action.WAIT,
            "data directory belongs to another cluster; refusing to touch it",
            facts={"ours": local.system_identifier, "cluster": view.initialized},
        )

    # -- we are the leader ------------------------------------------------------------------------
    if leader is not None and leader.name == local.name:
        if leader.lease != local.lease:
            return Decision(Action.TAKEOVER, "leader key names us under an earlier lease")
        if not local.lease_valid:
            # The keepalive is failing; the fence will stop writes.  Never (re)start read-write.
            if local.writable:
                return Decision(Action.DEMOTE, "leader lease could not be confirmed")
            if not local.pg_running:
                return Decision(
                    Action.START_REPLICA, "leader lease could not be confirmed; serving read-only until it is"
                )
            return Decision(Action.WAIT, "leader lease could not be confirmed; not going read-write")
        if not local.pg_running:
            if view.paused:
                return Decision(Action.WAIT, "paused: not restarting postgres on the leader")
            timeout = view.config.primary_start_timeout
            if local.pg_down_for < timeout:
                return Decision(
                    Action.START_PRIMARY,
                    "postgres is down on the leader; restarting it in place",
                    facts={"down_for": round(local.pg_down_for, 1), "primary_start_timeout": timeout},
                )
            return Decision(
                Action.RELEASE,
                "postgres did not come back within primary_start_timeout",
                facts={"down_for": round(local.pg_down_for, 1), "primary_start_timeout": timeout},
            )
        if local.in_recovery:
            return Decision(Action.PROMOTE, "we hold the leader key and postgres is in recovery")
        sw = view.switchover
        if sw is not None:
            if sw.stage != SwitchoverStage.REQUESTED or sw.leader not in (None, local.name):
                return Decision(Action.REJECT_SWITCHOVER, "stale request: we lead and did not hand over")
            if not switchover_live(sw, view, local.now):
                return Decision(Action.REJECT_SWITCHOVER, "request abandoned after switchover_timeout")
            if sw.due(local.now):
                target, refusal = switchover_target(view, sw, local.name)
                if target is None:
                    return Decision(Action.REJECT_SWITCHOVER, f"{sw.kind} refused: {refusal}")
                return Decision(
                    Action.SWITCHOVER,
                    f"{sw.kind} requested",
                    target=target,
                    facts={"kind": sw.kind.value, "force": sw.force},
                )
        return Decision(Action.LEAD, "we hold the leader key")

    # -- another node leads ---------------------------------------------------------------------
    if leader is not None:
        if local.writable:
            return Decision(Action.DEMOTE, f"{leader.name} holds the leader key", target=leader.name)
        lm = view.leader_member
        leader_up = lm is not None and lm.role == MemberRole.PRIMARY and lm.state == MemberState.RUNNING
        if view.paused and (local.needs_rewind or not local.pg_running):
            return Decision(Action.WAIT, "paused: not starting or rewinding postgres")
        if local.needs_rewind:
            if leader_up:
                return Decision(
                    Action.REWIND, "our data may have diverged from the leader", target=leader.name
                )
            return Decision(Action.WAIT, f"need a rewind but leader {leader.name} is not running yet")
        if not local.pg_running:
            return Decision(Action.START_REPLICA, f"following {leader.name}", target=leader.name)
        return Decision(Action.FOLLOW, f"following {leader.name}", target=leader.name)

    # -- nobody leads -------------------------------------------------------------------------------
    if not local.pg_running:
        if view.paused:
            return Decision(Action.WAIT, "paused: not starting postgres")
        return Decision(Action.START_REPLICA, "no leader; starting read-only to take part in the election")
    if view.config.replication_mode != "async" and local.in_recovery and local.streaming_from:
        # The old primary may still run (partitioned from etcd, not from us): stop acknowledging
        # its commits before anyone is elected, so it can never collect another acknowledgement.
        return Decision(Action.DETACH, "no leader: stop streaming from the old primary before the election")
    sw = view.switchover
    if (
        sw is not None
        and sw.candidate is not None
        and (sw.stage == SwitchoverStage.HANDOVER or sw.kind == SwitchoverKind.FAILOVER)
        and switchover_live(sw, view, local.now)
    ):
        decision = _manual_candidate(view, local, sw)
    elif view.paused:
        decision = Decision(Action.WAIT, "paused: no automatic failover")
    else:
        decision = _campaign_or_wait(view, local)
    if local.writable and decision.action != Action.CAMPAIGN:
        return Decision(Action.DEMOTE, f"running read-write without the leader key ({decision.why})")
    return decision
