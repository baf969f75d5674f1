"""NodeState: the one mutable record of what this node's HA agent knows and is doing.

The loop's observe step and the actions write it; everything else (the API, metrics, backup)
reads frozen :class:`~hakeeper.ha.snapshot.NodeSnapshot` copies built from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from hakeeper.core.cluster import ClusterView, Member, MemberState
from hakeeper.core.config import DynamicConfig
from hakeeper.core.pgtypes import LocalState, Upstream
from hakeeper.ha.policy.decision import Decision
from hakeeper.ha.policy.observe import Clocks


@dataclass(slots=True)
class Promotion:
    """Our promotion in progress, for its phase metrics."""

    kind: str  # failover, switchover, failover (forced)...
    key_taken: float  # monotonic time the leader key was taken


@dataclass(slots=True)
class NodeState:
    view: ClusterView  # the last view decided on (stale while etcd is unreachable)
    probe: LocalState | None = None  # the last probe of PostgreSQL
    activity: MemberState | None = None  # a long action in progress (cloning, promoting, ...)
    upstream: Upstream | None = None  # what our replica configuration points at
    needs_rewind: bool = False  # our data may have diverged from the leader's
    # Why this node waits for an operator (pg_rewind failed and the data directory is kept): the
    # rewind is not retried, the reason is published as the member's ineligible_reason, and
    # POST /reinitialize (or an agent restart, which tries the rewind once more) clears it.
    held: str | None = None
    clocks: Clocks = field(default_factory=Clocks)
    system_identifier: str | None = None  # of our data directory, once read
    decision: Decision | None = None  # the last decision taken
    loop_heartbeat: float = field(default_factory=time.monotonic)  # start of the last cycle
    promotion: Promotion | None = None
    bootstrap_retry_at: float = 0.0  # monotonic; after a refused or failed bootstrap from a backup
    slot_seen: dict[str, float] = field(default_factory=dict)  # slot -> monotonic time its member was seen
    # last member record put: (record without its timestamp, lease, monotonic time)
    published: tuple[Member, int, float] | None = None
    checkpointer_woken_for: int | None = None  # postmaster pid (see PgConfigurator.wake_checkpointer)
    # the newest config key that validated, and its revision: what an invalid one falls back to
    last_valid_config: tuple[DynamicConfig, int] | None = None
    # wall-clock time of a restart an operator scheduled (POST /restart with scheduled_at); kept
    # in this process only: an agent restart forgets it (docs/cli.md says so)
    scheduled_restart: float | None = None
    # the major of this node's binaries (postgres --version of postgresql.bin_dir), read once at
    # the agent's start; None: not known (the decision then checks no leader's major)
    binaries_major: int | None = None

    @property
    def config(self) -> DynamicConfig:
        return self.view.config

    def leads(self, name: str) -> bool:
        """Whether the leader key (in our view) names ``name``."""
        return self.view.leader is not None and self.view.leader.name == name

    def pg_stopped(self) -> None:
        """PostgreSQL was stopped on purpose: no 'down since' clock, and a rewind before it follows."""
        self.needs_rewind = True
        self.clocks = replace(self.clocks, pg_down_since=None)
