"""Every action ``decide()`` can return, and the executor that carries it out."""

from __future__ import annotations

from collections.abc import Mapping

from hakeeper.core.cluster import ClusterView
from hakeeper.ha.actions import bootstrap, handover, leader, replica
from hakeeper.ha.actions.context import Ctx, Executor
from hakeeper.ha.policy.decision import Action, Decision, LocalFacts


async def wait(ctx: Ctx, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    return None


STEPS: Mapping[Action, Executor] = {
    Action.INITIALIZE: bootstrap.initialize,
    Action.CLONE: replica.clone,
    Action.WAIT: wait,
    Action.START_REPLICA: replica.start_replica,
    Action.FOLLOW: replica.follow,
    Action.REWIND: replica.rewind,
    Action.CAMPAIGN: leader.campaign,
    Action.PROMOTE: leader.promote,
    Action.LEAD: leader.lead,
    Action.TAKEOVER: leader.takeover,
    Action.START_PRIMARY: leader.start_primary,
    Action.RELEASE: leader.release,
    Action.DEMOTE: replica.demote,
    Action.DETACH: replica.detach,
    Action.SWITCHOVER: handover.switchover,
    Action.REJECT_SWITCHOVER: handover.reject_switchover,
    Action.DISCARD_BOOTSTRAP: bootstrap.discard_bootstrap,
    Action.FINISH_BOOTSTRAP: bootstrap.finish_bootstrap,
}
