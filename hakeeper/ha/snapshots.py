"""SnapshotSource: builds :class:`~hakeeper.ha.snapshot.NodeSnapshot` copies on demand.

From the last cycle's record (:class:`NodeState`) plus live readings of the
:class:`WriteGuard`: a snapshot taken after the fence deadline says "not writable" even when the
HA loop has not run since (a stalled loop must not keep ``/primary`` green).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from hakeeper.core.cluster import ClusterView, Member, MemberState
from hakeeper.core.config import NodeConfig
from hakeeper.core.pgtypes import LocalState
from hakeeper.ha.guard import WriteGuard
from hakeeper.ha.policy.observe import Identity, member_record
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.ha.state import NodeState


class SnapshotSource:
    def __init__(
        self,
        cfg: NodeConfig,
        identity: Identity,
        state: NodeState,
        guard: WriteGuard,
        *,
        initialized: Callable[[], bool],
        backup_status: Callable[[], Mapping[str, Any] | None],
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.state = state
        self.guard = guard
        self.initialized = initialized
        self.backup_status = backup_status
        self._tags = cfg.tags.model_dump()
        self._member: (
            tuple[LocalState | None, ClusterView, MemberState | None, Member, str | None, float | None] | None
        ) = None

    def retag(self, identity: Identity) -> None:
        """A reload changed this node's tags: the next snapshot and member record show them."""
        self.identity = identity
        self._tags = self.cfg.tags.model_dump()
        self._member = None

    def member(self) -> Member:
        """This node's member record, rebuilt only when what it is made of changed (a new probe,
        another activity, a new view): health checks stay cheap."""
        st = self.state
        cached = self._member
        # Holding the objects themselves (not their ids) keeps their identities unique.
        if (
            cached is None
            or cached[0] is not st.probe
            or cached[1] is not st.view
            or cached[2] != st.activity
            or cached[4] != st.held
            or cached[5] != st.scheduled_restart
        ):
            record = member_record(
                self.identity,
                probe=st.probe,
                activity=st.activity,
                initialized=self.initialized(),
                view=st.view,
                now_wall=time.time(),
                held=st.held,
                scheduled_restart=st.scheduled_restart,
            )
            cached = self._member = (st.probe, st.view, st.activity, record, st.held, st.scheduled_restart)
        return cached[3]

    def snapshot(self) -> NodeSnapshot:
        st = self.state
        return NodeSnapshot(
            name=self.cfg.name,
            scope=self.cfg.scope,
            tags=self._tags,
            probe=st.probe,
            view=st.view,
            member=self.member(),
            activity=st.activity,
            decision=st.decision,
            loop_heartbeat=st.loop_heartbeat,
            lease_remaining=self.guard.lease.remaining(),
            writable=self.guard.writable_leader(),
            backup=self.backup_status(),
            last_valid_config=st.last_valid_config,
        )
