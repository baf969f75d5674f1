"""Switchover and manual failover requests: still live?  to whom?

The leader carries out a planned switchover (``Action.SWITCHOVER``); with no leader, a hand-over
or a manual failover names the one member that may campaign.
"""

from __future__ import annotations

from hakeeper.core.cluster import ClusterView, MemberState, Switchover, SwitchoverKind, SwitchoverStage
from hakeeper.ha.policy.candidates import assess, rank


def switchover_live(sw: Switchover, view: ClusterView, now: float) -> bool:
    """False once a request has waited longer than ``switchover_timeout`` since it was due (or
    since the handover began): it is then abandoned and normal elections resume."""
    start = sw.handover_at or sw.scheduled_at or sw.requested_at
    return now - start <= view.config.switchover_timeout


def switchover_target(view: ClusterView, sw: Switchover, leader: str) -> tuple[str | None, str | None]:
    """(candidate, None) or (None, why the request cannot be carried out)."""
    if sw.candidate is not None:
        m = view.members.get(sw.candidate)
        if m is None:
            return None, f"candidate {sw.candidate} is not a member"
        if sw.candidate == leader:
            return None, f"candidate {sw.candidate} is already the leader"
        c = assess(m, view)
        if not c.eligible and not sw.force:
            return None, f"candidate {sw.candidate} is not eligible: {c.reason}"
        # assess() already keeps non-sync members out once the sync set is non-empty; a planned
        # switchover in synchronous (quorum) mode also refuses them while the set is forming.
        mode = view.config.replication_mode
        if (
            sw.kind == SwitchoverKind.SWITCHOVER
            and mode != "async"
            and view.sync is not None
            and sw.candidate not in view.sync.members
            and not sw.force
        ):
            what = "quorum voter" if mode == "quorum" else "synchronous standby"
            return None, f"candidate {sw.candidate} is not a {what}"
        if m.state != MemberState.STREAMING and not sw.force:
            return None, f"candidate {sw.candidate} is not streaming (state {m.state})"
        return sw.candidate, None
    best = [c for c in rank(view) if c.name != leader and view.members[c.name].state == MemberState.STREAMING]
    if not best:
        return None, "no healthy streaming replica within maximum_lag_on_failover"
    return best[0].name, None


def manual_request(view: ClusterView, now: float) -> Switchover | None:
    """With no leader: the live hand-over or manual failover request that names the one member
    allowed to campaign (whatever the automatic ranking says), or None."""
    sw = view.switchover
    if (
        sw is not None
        and sw.candidate is not None
        and (sw.stage == SwitchoverStage.HANDOVER or sw.kind == SwitchoverKind.FAILOVER)
        and switchover_live(sw, view, now)
    ):
        return sw
    return None
