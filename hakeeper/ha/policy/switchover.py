"""Switchover and manual failover requests: still live?  to whom?

The leader carries out a planned switchover (``Action.SWITCHOVER``); with no leader, a hand-over
or a manual failover names the one member that may campaign.  ``plan_handover_result`` is the
pure twin of the hand-over executor's last choice (``hakeeper/ha/switchover.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class HandoverPlan:
    """What the old primary does once it has stopped and waited for the candidate."""

    hand_over: bool  # release the leader key to the candidate; else drop the request
    needs_rewind: bool  # after handing over: our WAL may have diverged, pg_rewind before following
    abort_reason: str | None = None  # why we do not hand over (logged with switchover_aborted)


# The sentence logged when a hand-over is abandoned.
NOT_CAUGHT_UP = "candidate did not receive our final WAL in time; restarting as primary"


def plan_handover_result(caught_up: bool, force: bool) -> HandoverPlan:
    """After stopping writes: did the candidate receive our shutdown checkpoint (``caught_up``)?

    Not caught up and not forced: abort, so nothing acknowledged can be lost; we still hold the
    key with PostgreSQL down, so the next cycle restarts it in place.  Otherwise hand over; a
    forced hand-over to a candidate that missed some of our WAL leaves us diverged, so we rewind
    before following it.
    """
    if not caught_up and not force:
        return HandoverPlan(hand_over=False, needs_rewind=False, abort_reason=NOT_CAUGHT_UP)
    return HandoverPlan(hand_over=True, needs_rewind=not caught_up)
