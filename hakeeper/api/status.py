"""JSON documents describing this node and the cluster, built from the agent's cached state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hakeeper import __version__
from hakeeper.core import timefmt
from hakeeper.core.cluster import ClusterView, HistoryEntry, Member, MemberRole, Switchover
from hakeeper.core.lsn import format_lsn

if TYPE_CHECKING:
    from hakeeper.ha.agent import Agent


def iso(epoch: float | None) -> str | None:
    return timefmt.iso(epoch, timespec="milliseconds", zulu=False)


def lsn(value: int | None) -> str | None:
    return None if value is None or value < 0 else format_lsn(value)


def switchover_doc(sw: Switchover | None) -> dict[str, Any] | None:
    if sw is None:
        return None
    return {
        "kind": sw.kind.value,
        "leader": sw.leader,
        "candidate": sw.candidate,
        "requested_at": iso(sw.requested_at),
        "scheduled_at": iso(sw.scheduled_at),
        "force": sw.force,
        "stage": sw.stage.value,
    }


def local_member(agent: Agent) -> Member:
    """This node as it would publish itself now (role/state from the last probe; no I/O)."""
    return agent.current_member()


def role_of(m: Member) -> str:
    return m.role.value


def node_summary(agent: Agent, me: Member | None = None) -> dict[str, Any]:
    """The small document every health check answers with."""
    me = me or local_member(agent)
    view = agent.last_view
    published = view.members.get(agent.name)
    return {
        "name": agent.name,
        "role": role_of(me),
        "state": me.state.value,
        "writable": agent.is_writable_leader(),
        "leader": view.leader.name if view.leader else None,
        "timeline": me.timeline,
        "lag": published.lag if published is not None else None,
    }


def node_status(agent: Agent) -> dict[str, Any]:
    a = agent
    st = a.state
    view = a.last_view
    me = local_member(a)
    published = view.members.get(a.name)
    d = a.last_decision
    return {
        **node_summary(a, me),
        "scope": a.cfg.scope,
        "term": view.leader.term if view.leader else None,
        "wal_lsn": lsn(me.wal_lsn),
        "received_lsn": lsn(st.received_lsn if st else None),
        "replayed_lsn": lsn(st.replayed_lsn if st else None),
        "streaming_from": me.streaming_from,
        "host": me.host,
        "port": me.port,
        "api_url": a.cfg.api.url,
        "lease_remaining": round(a.lease.remaining(), 3),
        "paused": view.paused,
        "pending_switchover": switchover_doc(view.switchover),
        "last_decision": None if d is None else {"action": d.action.value, "reason": d.why},
        "eligible": published.eligible if published is not None else me.eligible,
        "ineligible_reason": published.ineligible_reason if published is not None else me.ineligible_reason,
        "postgres_error": st.error if st is not None and not st.running else None,
        "loop_age": round(max(0.0, time.monotonic() - a.loop_heartbeat), 3),
        "tags": a.cfg.tags.model_dump(),
        "version": __version__,
        "archive": _archive_doc(a),
    }


def _archive_doc(agent: Agent) -> dict[str, Any] | None:
    """The archiver's status plus the heartbeat that keeps its RPO measurable (issue 6, 5a)."""
    if agent.archiver is None:
        return None
    doc = agent.archiver.status()
    hb = agent.heartbeat
    doc["heartbeat"] = None if hb is None else {**hb.status(), "last_beat_at": iso(hb.last_beat_at)}
    return doc


def _replay_lag_seconds(agent: Agent) -> dict[str, float] | None:
    """Replay lag per replica (application_name = member name), known only on a primary."""
    st = agent.state
    if st is None or not st.running or st.in_recovery is not False:
        return None
    return {r.application_name: lag for r in st.replication if (lag := r.replay_lag_seconds) is not None}


def member_doc(m: Member, view: ClusterView, lag_seconds: dict[str, float] | None) -> dict[str, Any]:
    is_leader = view.leader is not None and view.leader.name == m.name
    lag_s: float | None = None
    if lag_seconds is not None and m.role == MemberRole.REPLICA:
        lag_s = lag_seconds.get(m.name)
    return {
        "name": m.name,
        "role": m.role.value,
        "state": m.state.value,
        "leader": is_leader,
        "host": m.host,
        "port": m.port,
        "api_url": m.api_url,
        "timeline": m.timeline,
        "wal_lsn": lsn(m.wal_lsn),
        "lag": m.lag,
        "lag_seconds": lag_s,
        "streaming_from": m.streaming_from,
        "tags": {
            "nofailover": m.nofailover,
            "failover_priority": m.failover_priority,
            "noloadbalance": m.noloadbalance,
            "nosync": m.nosync,
        },
        "eligible": m.eligible,
        "ineligible_reason": m.ineligible_reason,
        "version": m.version,
        "updated_at": iso(m.updated_at) if m.updated_at else None,
    }


def cluster_status(agent: Agent) -> dict[str, Any]:
    view = agent.last_view
    lag_seconds = _replay_lag_seconds(agent)
    members = [member_doc(m, view, lag_seconds) for m in sorted(view.members.values(), key=lambda m: m.name)]
    return {
        "scope": agent.cfg.scope,
        "leader": view.leader.name if view.leader else None,
        "term": view.leader.term if view.leader else None,
        "timeline": view.status.timeline,
        "paused": view.paused,
        "pending_switchover": switchover_doc(view.switchover),
        "members": members,
        "revision": view.revision,
        "seen_by": agent.name,
    }


def history_doc(entries: tuple[HistoryEntry, ...]) -> dict[str, Any]:
    return {
        "history": [
            {
                "timeline": e.timeline,
                "lsn": lsn(e.lsn),
                "time": iso(e.time),
                "reason": e.reason,
                "old_leader": e.old_leader,
                "new_leader": e.new_leader,
            }
            for e in entries
        ]
    }
