"""Who may be promoted, and in what order (invariant I4).

A member is a candidate when PostgreSQL runs, it is not tagged ``nofailover``, its timeline is
not behind the cluster's, it lags the furthest known position by at most
``maximum_lag_on_failover`` and, in synchronous or quorum mode, promoting it cannot lose an
acknowledged commit.  Candidates are ranked by (timeline, WAL LSN, failover_priority, name), the
same order on every node.
"""

from __future__ import annotations

from dataclasses import dataclass

from hakeeper.core.cluster import ClusterView, Member, MemberState, SwitchoverStage


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    eligible: bool
    reason: str | None
    timeline: int
    wal_lsn: int
    priority: int


RUNNING_STATES = frozenset({MemberState.RUNNING, MemberState.STREAMING, MemberState.IN_RECOVERY})


def reference_lsn(view: ClusterView) -> int:
    """The furthest WAL position the cluster is known to have reached on its newest timeline.

    Positions on older timelines do not count: a former primary's WAL past the switch point has
    diverged and says nothing about how far behind the current timeline's members are.
    """
    tl = view.max_timeline
    lsns = [m.wal_lsn for m in view.members.values() if m.wal_lsn is not None and (m.timeline or 0) >= tl]
    if view.status.lsn is not None and (view.status.timeline is None or view.status.timeline >= tl):
        lsns.append(view.status.lsn)
    return max(lsns, default=0)


def assess(member: Member, view: ClusterView) -> Candidate:
    """Can ``member`` be promoted, and if not, why not."""
    tl = member.timeline or 0
    lsn = member.wal_lsn or 0
    reason: str | None = None
    cfg = view.config
    if member.state not in RUNNING_STATES:
        reason = f"postgres is not running (state {member.state})"
    elif member.nofailover:
        reason = "tagged nofailover"
    elif member.failover_priority <= 0:
        reason = "failover_priority is 0"
    elif member.timeline is None or member.wal_lsn is None:
        reason = "WAL position unknown"
    elif tl < view.max_timeline:
        reason = f"timeline {tl} is behind the cluster's timeline {view.max_timeline}"
    elif (refusal := sync_refusal(member, view)) is not None:
        reason = refusal
    else:
        lag = max(0, reference_lsn(view) - lsn)
        if lag > cfg.maximum_lag_on_failover:
            reason = f"lag {lag} bytes exceeds maximum_lag_on_failover {cfg.maximum_lag_on_failover}"
    return Candidate(member.name, reason is None, reason, tl, lsn, member.failover_priority)


def _position(m: Member) -> tuple[int, int]:
    return (m.timeline or 0, m.wal_lsn or 0)


def sync_refusal(member: Member, view: ClusterView) -> str | None:
    """Synchronous and quorum modes: why promoting ``member`` could lose an acknowledged commit
    according to the ``sync`` key (``hakeeper/ha/sync.py``), or None."""
    sync = view.sync
    if view.sync_invalid and view.config.replication_mode != "async":
        # The key exists but does not validate: which standbys have every acknowledged commit
        # is unknown, and reading it as "no key" would let any replica promote.
        return "the sync key in etcd is invalid; promoting could lose acknowledged writes"
    if view.config.replication_mode == "async" or sync is None or not sync.members:
        return None  # an empty key: the leader ran without waiting for anyone
    if member.name == sync.leader:
        return None  # the old primary itself has every commit it acknowledged
    voters = ", ".join(sync.members)
    if member.name not in sync.members:
        if sync.is_quorum:
            return f"not a quorum voter (voters: {voters}); promoting it could lose acknowledged writes"
        return f"not a synchronous standby (sync set: {voters}); promoting it could lose acknowledged writes"
    sw = view.switchover
    handed_over = sw is not None and sw.stage == SwitchoverStage.HANDOVER and sw.candidate == member.name
    if not sync.is_quorum or view.leader is not None or handed_over:
        # FIRST: every member has every commit.  A switchover (with a leader) hands over only
        # once the candidate has received the old primary's last WAL.
        return None
    # Quorum, leader gone: every acknowledged commit is on `quorum` voters, so any `need` of them
    # include one that has it, and the most advanced of those has them all.  Only positions read
    # after the leader key disappeared count (the old primary had stopped by then).
    need = len(sync.members) - sync.quorum + 1
    present = [view.members[n] for n in sync.members if n in view.members]
    usable = [m for m in present if m.timeline is not None and m.wal_lsn is not None]
    reached = [m for m in usable if m.leaderless]
    if len(reached) < need:
        waiting = sorted(m.name for m in usable if not m.leaderless)
        if len(reached) + len(waiting) >= need:
            return f"waiting for quorum voters {', '.join(waiting)} to report their WAL position"
        names = ", ".join(sorted(m.name for m in reached)) or "none"
        return (
            f"only {len(reached)} of {len(sync.members)} quorum voters reachable ({names}); "
            f"{need} needed (quorum {sync.quorum}); promoting could lose acknowledged writes"
        )
    if member.name not in {m.name for m in reached}:
        return "WAL position not reported since the leader was lost"
    best = max(reached, key=_position)
    if _position(member) < _position(best):
        return (
            f"quorum voter {best.name} is further ahead (timeline {best.timeline}, lsn {best.wal_lsn}); "
            "promoting us could lose acknowledged writes"
        )
    return None


def rank(view: ClusterView) -> list[Candidate]:
    """Eligible candidates, best first: higher timeline, higher LSN, higher priority, then name."""
    cands = [c for c in (assess(m, view) for m in view.members.values()) if c.eligible]
    cands.sort(key=lambda c: (-c.timeline, -c.wal_lsn, -c.priority, c.name))
    return cands
