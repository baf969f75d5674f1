"""Pure planners for the decisions the actions make on the way: each is the twin of one I/O
step in ``hakeeper.ha.actions`` (named as a pair: ``rewind`` / :func:`plan_rewind_failure`,
``clone`` / :func:`plan_clone_source`, ``campaign`` / :func:`plan_promotion`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hakeeper.core.cluster import ClusterView, Switchover


class RewindFailure(StrEnum):
    WAIT_FOR_OPERATOR = "waiting for an operator"
    RECLONE = "re-cloning from the leader"


def plan_rewind_failure(remove_data_directory_on_rewind_failure: bool) -> RewindFailure:
    """After pg_rewind failed (or is disabled): the data directory is kept for an operator
    unless the configuration allows throwing it away and cloning again."""
    if remove_data_directory_on_rewind_failure:
        return RewindFailure.RECLONE
    return RewindFailure.WAIT_FOR_OPERATOR


@dataclass(frozen=True, slots=True)
class CloneFromBackup:
    """Restore the newest fitting backup of ``system_identifier`` on the history of ``timeline``,
    at most some WAL behind the leader's ``lsn`` (None: unknown)."""

    system_identifier: str
    timeline: int
    lsn: int | None


def plan_clone_source(view: ClusterView, leader: str | None) -> CloneFromBackup | str:
    """Whether a new replica of ``leader`` may be seeded from a backup: only when the cluster's
    system identifier and the leader's timeline are known (else a backup of another system or
    of an abandoned timeline could be picked).  A string is the reason it may not."""
    lm = view.members.get(leader or "")
    sysid = view.initialized
    timeline = (lm.timeline if lm else None) or (view.status.timeline if view.status else None)
    if lm is None or not sysid or not timeline:
        return "leader's system identifier or timeline unknown"
    lsn = lm.wal_lsn if lm.wal_lsn is not None else (view.status.lsn if view.status else None)
    return CloneFromBackup(sysid, timeline, lsn)


@dataclass(frozen=True, slots=True)
class PromotionPlan:
    kind: str  # the phase metrics' label: failover, switchover
    reason: str  # recorded in the history
    request: Switchover | None  # the request this promotion carries out (to delete), if any


def plan_promotion(view: ClusterView, name: str, why: str) -> PromotionPlan:
    """What the leader key we just took means: a requested switchover or failover to us (recorded
    with its requester and whether the operator accepted data loss), or an automatic failover."""
    old = view.history[-1].new_leader if view.history else None
    sw = view.switchover
    if sw is not None and sw.candidate == name:
        reason = f"{sw.kind.value} from {sw.leader or old}" + (" (data loss accepted)" if sw.force else "")
        return PromotionPlan(sw.kind.value, reason, sw)
    return PromotionPlan("failover", f"failover: {why}", None)
