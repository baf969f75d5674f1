"""What every executor works with: the node's components, passed explicitly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hakeeper.core.cluster import ClusterView, Member
from hakeeper.core.config import NodeConfig
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.bootmark import BootstrapRecord
from hakeeper.ha.guard import WriteGuard
from hakeeper.ha.metrics import HaMetrics
from hakeeper.ha.pgconfig import PgConfigurator
from hakeeper.ha.policy.decision import Decision, LocalFacts
from hakeeper.ha.ports import BackupHooks
from hakeeper.ha.slots import SlotKeeper
from hakeeper.ha.state import NodeState
from hakeeper.ha.syncer import SyncManager
from hakeeper.pg.postgres import Postgres


@dataclass(frozen=True, slots=True)
class Ctx:
    cfg: NodeConfig
    store: ClusterStore
    pg: Postgres
    state: NodeState
    guard: WriteGuard
    pgconf: PgConfigurator
    sync: SyncManager
    backup: BackupHooks
    metrics: HaMetrics
    wake: asyncio.Event  # set: run the next HA cycle now
    resync: Callable[[], Awaitable[None]]  # re-read etcd now (after a write the loop must see)
    fresh_view: Callable[[], ClusterView]  # the view as the etcd mirror holds it now
    publish: Callable[[ClusterView], Awaitable[Member | None]]  # put our member record now
    bootstrap: BootstrapRecord  # the marker of a bootstrap in progress (ha/bootmark.py)
    slots: SlotKeeper  # permanent slots and slot failover (ha/slots.py)

    @property
    def name(self) -> str:
        return self.cfg.name


Executor = Callable[[Ctx, ClusterView, LocalFacts, Decision], Awaitable[None]]
