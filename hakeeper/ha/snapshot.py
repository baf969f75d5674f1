"""NodeSnapshot: what the API and the metrics see of this node, frozen.

Pure data: readers import this module and nothing of the loop.  Snapshots are built by
:class:`hakeeper.ha.snapshots.SnapshotSource`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hakeeper.core.cluster import ClusterView, Member, MemberState
from hakeeper.core.config import DynamicConfig
from hakeeper.core.pgtypes import LocalState
from hakeeper.ha.policy.decision import Decision


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    name: str
    scope: str
    tags: Mapping[str, Any]
    probe: LocalState | None
    view: ClusterView
    member: Member  # this node as it would publish itself now
    activity: MemberState | None
    decision: Decision | None
    loop_heartbeat: float  # monotonic time the last HA cycle started
    lease_remaining: float  # seconds to the fence deadline
    writable: bool  # the lease-holding, fenced-in writable primary (computed live)
    backup: Mapping[str, Any] | None  # the archiver's and heartbeat's status
    # the last valid dynamic config this agent saw and its revision (None: none yet); a PATCH
    # /config repairs an invalid stored config from it
    last_valid_config: tuple[DynamicConfig, int] | None = None

    @property
    def holds_leader_key(self) -> bool:
        return self.view.leader is not None and self.view.leader.name == self.name
