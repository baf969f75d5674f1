"""JSON documents describing this node and the cluster, built from the agent's cached state."""

from __future__ import annotations

import time
from typing import Any

from hakeeper import __version__
from hakeeper.core import timefmt
from hakeeper.core.cluster import ClusterView, HistoryEntry, Member, MemberRole, Switchover
from hakeeper.core.lsn import format_lsn
from hakeeper.core.slots import report_doc, slot_summary
from hakeeper.ha.snapshot import NodeSnapshot


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
        "allow_data_loss": sw.force,
        "stage": sw.stage.value,
    }


def role_of(m: Member) -> str:
    return m.role.value


def node_summary(snap: NodeSnapshot) -> dict[str, Any]:
    """The small document every health check answers with."""
    me = snap.member
    published = snap.view.members.get(snap.name)
    return {
        "name": snap.name,
        "role": role_of(me),
        "state": me.state.value,
        "writable": snap.writable,
        "leader": snap.view.leader.name if snap.view.leader else None,
        "timeline": me.timeline,
        "lag": published.lag if published is not None else None,
    }


def node_status(snap: NodeSnapshot) -> dict[str, Any]:
    st = snap.probe
    view = snap.view
    me = snap.member
    published = view.members.get(snap.name)
    d = snap.decision
    return {
        **node_summary(snap),
        "scope": snap.scope,
        "term": view.leader.term if view.leader else None,
        "wal_lsn": lsn(me.wal_lsn),
        "received_lsn": lsn(st.received_lsn if st else None),
        "replayed_lsn": lsn(st.replayed_lsn if st else None),
        "streaming_from": me.streaming_from,
        "host": me.host,
        "port": me.port,
        "api_url": me.api_url,
        "lease_remaining": round(snap.lease_remaining, 3),
        "paused": view.paused,
        "pending_switchover": switchover_doc(view.switchover),
        "last_decision": None if d is None else {"action": d.action.value, "reason": d.why},
        "eligible": published.eligible if published is not None else me.eligible,
        "ineligible_reason": published.ineligible_reason if published is not None else me.ineligible_reason,
        "postgres_error": st.error if st is not None and not st.running else None,
        "pending_restart": me.pending_restart,
        "pending_restart_reasons": list(me.pending_restart_reasons),
        "scheduled_restart": iso(me.scheduled_restart),
        "loop_age": round(max(0.0, time.monotonic() - snap.loop_heartbeat), 3),
        "tags": dict(snap.tags),
        "version": __version__,
        "server_version": me.server_version,
        "archive": _archive_doc(snap),
    }


def _archive_doc(snap: NodeSnapshot) -> dict[str, Any] | None:
    """The archiver's status plus the heartbeat that keeps its RPO measurable."""
    if snap.backup is None:
        return None
    doc = dict(snap.backup["archive"])
    hb = snap.backup["heartbeat"]
    doc["heartbeat"] = None if hb is None else {**hb, "last_beat_at": iso(hb["last_beat_at"])}
    return doc


def _replay_lag_seconds(snap: NodeSnapshot) -> dict[str, float] | None:
    """Replay lag per replica (application_name = member name), known only on a primary."""
    st = snap.probe
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
        "server_version": m.server_version,
        "updated_at": iso(m.updated_at) if m.updated_at else None,
        "pending_restart": m.pending_restart,
        "pending_restart_reasons": list(m.pending_restart_reasons),
        "scheduled_restart": iso(m.scheduled_restart),
        "slots": member_slots_doc(m, view),
    }


def member_slots_doc(m: Member, view: ClusterView) -> dict[str, Any] | None:
    leader = view.leader_member
    is_leader = leader is not None and leader.name == m.name
    summary = slot_summary(m.slots, leader.slots if leader else None, is_leader=is_leader)
    return report_doc(m.slots, summary)


def cluster_status(snap: NodeSnapshot) -> dict[str, Any]:
    view = snap.view
    lag_seconds = _replay_lag_seconds(snap)
    members = [member_doc(m, view, lag_seconds) for m in sorted(view.members.values(), key=lambda m: m.name)]
    return {
        "scope": snap.scope,
        "leader": view.leader.name if view.leader else None,
        "term": view.leader.term if view.leader else None,
        "timeline": view.status.timeline,
        "paused": view.paused,
        "pending_switchover": switchover_doc(view.switchover),
        "members": members,
        "revision": view.revision,
        "seen_by": snap.name,
        "config_error": view.config_error,
        "invalid_records": [{"key": p.key, "revision": p.revision, "reason": p.reason} for p in view.invalid],
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
