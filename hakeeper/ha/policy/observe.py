"""The observe step, pure: from the last probe and view to this node's clocks, its member
record, and whether an etcd change should wake the loop at once.

These were decisions made inside the agent's I/O code; here they are functions of their inputs,
tested as tables (tests/unit/ha/test_observe.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hakeeper.core.cluster import ClusterView, Member, MemberRole, MemberState
from hakeeper.core.pgtypes import LocalState
from hakeeper.ha.policy.candidates import assess, reference_lsn

# How long a replica may fail to stream from a leader on a newer timeline before we rewind.
NOT_STREAMING_REWIND_AFTER = 8.0

# Activities that end as soon as PostgreSQL is seen running.
_ENDED_BY_RUNNING = frozenset({MemberState.STARTING, MemberState.FENCED, MemberState.CRASHED})

# Activities shown in the member record even while PostgreSQL runs.
_SHOWN_WHILE_RUNNING = frozenset({MemberState.PROMOTING, MemberState.REWINDING, MemberState.CLONING})


@dataclass(frozen=True, slots=True)
class Clocks:
    """Since when something has been so (monotonic seconds), None while it is not."""

    pg_down_since: float | None = None  # PostgreSQL not running
    leaderless_since: float | None = None  # no leader key
    not_streaming_since: float | None = None  # a replica not streaming from its leader
    leader_last_alive: float | None = None  # wall clock of the other leader's last member update


@dataclass(frozen=True, slots=True)
class Observation:
    clocks: Clocks
    activity: MemberState | None
    needs_rewind: bool
    # the facts to log when a rewind became necessary in this step (None: nothing new)
    rewind_needed: Mapping[str, Any] | None = None


def observe(
    *,
    name: str,
    probe: LocalState,
    view: ClusterView,
    clocks: Clocks,
    activity: MemberState | None,
    needs_rewind: bool,
    now: float,
) -> Observation:
    """Advance the clocks from one probe and one view.

    A replica that has not streamed for NOT_STREAMING_REWIND_AFTER seconds from a leader on a
    newer timeline has diverged (it was a primary, or followed one, past the leader's switch
    point) and needs a rewind; a replica that streams does not."""
    pg_down_since = clocks.pg_down_since
    if probe.running:
        pg_down_since = None
        if activity in _ENDED_BY_RUNNING:
            activity = None
    elif pg_down_since is None:
        pg_down_since = now
    leaderless_since = clocks.leaderless_since
    leader_last_alive = clocks.leader_last_alive
    lm = view.leader_member
    if view.leader is None:
        leaderless_since = leaderless_since or now
    else:
        leaderless_since = None
        if lm is not None and lm.name != name:
            leader_last_alive = lm.updated_at
    not_streaming_since = None
    rewind_needed: dict[str, Any] | None = None
    follows_other = view.leader is not None and view.leader.name != name
    if probe.running and probe.in_recovery and follows_other:
        if probe.streaming_from is None:
            not_streaming_since = clocks.not_streaming_since or now
            newer = lm is not None and (lm.timeline or 0) > (probe.timeline or 0)
            if newer and now - not_streaming_since > NOT_STREAMING_REWIND_AFTER:
                if not needs_rewind:
                    rewind_needed = {
                        "reason": "not streaming from a leader on a newer timeline",
                        "our_timeline": probe.timeline,
                        "leader_timeline": lm.timeline if lm else None,
                    }
                needs_rewind = True
        else:
            needs_rewind = False
    return Observation(
        clocks=Clocks(pg_down_since, leaderless_since, not_streaming_since, leader_last_alive),
        activity=activity,
        needs_rewind=needs_rewind,
        rewind_needed=rewind_needed,
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """What this node publishes about itself that does not come from a probe."""

    name: str
    host: str
    port: int
    api_url: str
    nofailover: bool
    failover_priority: int
    noloadbalance: bool
    nosync: bool
    sync_priority: int
    version: str


def member_record(
    me: Identity,
    *,
    probe: LocalState | None,
    activity: MemberState | None,
    initialized: bool,
    view: ClusterView,
    now_wall: float,
    held: str | None = None,
    scheduled_restart: float | None = None,
) -> Member:
    """This node's member record as it would be published now: role and state from the probe
    and the activity in progress, its lag behind the leader's reference position, and whether
    it may be promoted (judged by the same rule every node applies to it)."""
    role = MemberRole.UNKNOWN
    state = MemberState.STOPPED if initialized else MemberState.UNINITIALIZED
    if probe is not None and probe.running:
        if probe.in_recovery:
            role = MemberRole.REPLICA
            state = MemberState.STREAMING if probe.streaming_from else MemberState.IN_RECOVERY
        else:
            role = MemberRole.PRIMARY
            state = MemberState.RUNNING
    elif activity is not None:
        state = activity
    if activity in _SHOWN_WHILE_RUNNING:
        state = activity
    m = Member(
        name=me.name,
        role=role,
        state=state,
        timeline=probe.timeline if probe else None,
        wal_lsn=probe.wal_lsn if probe else None,
        received_lsn=probe.received_lsn if probe else None,
        replayed_lsn=probe.replayed_lsn if probe else None,
        host=me.host,
        port=me.port,
        api_url=me.api_url,
        nofailover=me.nofailover,
        failover_priority=me.failover_priority,
        noloadbalance=me.noloadbalance,
        nosync=me.nosync,
        sync_priority=me.sync_priority,
        streaming_from=probe.streaming_from if probe else None,
        leaderless=view.leader is None,
        updated_at=now_wall,
        version=me.version,
        paused=view.paused,  # what this cycle decided under: the acknowledgement of a pause
        pending_restart=bool(probe.pending_restart) if probe is not None and probe.running else False,
        pending_restart_reasons=probe.pending_restart if probe is not None and probe.running else (),
        scheduled_restart=scheduled_restart,
        server_version=probe.server_version if probe is not None and probe.running else None,
    )
    lag = None if m.wal_lsn is None else max(0, reference_lsn(view) - m.wal_lsn)
    if role == MemberRole.PRIMARY:
        lag = 0
    cand = assess(replace(m, lag=lag), replace(view, members={**view.members, me.name: m}))
    if held is not None:  # waiting for an operator: say why where 'hakeeper list' shows it
        return replace(m, lag=lag, eligible=False, ineligible_reason=held)
    return replace(m, lag=lag, eligible=cand.eligible, ineligible_reason=cand.reason)


def publish_due(
    record: Member, lease: int, published: tuple[Member, int, float] | None, now: float, loop_wait: float
) -> bool:
    """Whether to put our member record now.  Every put wakes the other agents (they watch the
    keys): an unchanged record (but for its timestamp) is written at most once per loop_wait, or
    the agents would wake each other at etcd's round-trip rate."""
    same = replace(record, updated_at=0.0)
    return not (
        published is not None
        and published[0] == same
        and published[1] == lease
        and now - published[2] < loop_wait
    )


def routine_only(
    changed: Collection[str],
    *,
    present: Collection[str],
    leader_name: str | None,
    members_prefix: str,
    name: str,
) -> bool:
    """Whether etcd changes to the keys ``changed`` may wait for the next regular cycle.

    Only routine member updates (positions, timestamps) of non-leaders while there is a leader
    may wait; anything else wakes the loop: a re-list (``""`` among the keys), no leader (every
    member's fresh position matters to the election), other keys, a member that left, or the
    leader's own record (followers react to the leader at once).  ``present``: the keys that
    exist now."""
    if not changed or "" in changed:
        return False
    if leader_name is None:
        return False
    for key in changed:
        if not key.startswith(members_prefix) or key not in present:
            return False
        member = key[len(members_prefix) :]
        if member == leader_name and member != name:
            return False
    return True
