"""Real agents over in-memory fakes, on a virtual clock: the executor unit tests and the 3-node
simulation build their nodes here.

Each :class:`SimNode` is a real :class:`hakeeper.node.Node` (so the HaLoop, WriteGuard,
LeaseKeeper, SyncManager, PgConfigurator and Ctx are wired exactly as in production) given a
:class:`~tests.support.fake_pg.FakePostgres`, an :class:`EtcdLink` to one shared
:class:`~tests.support.fake_etcd.FakeEtcd` and a :class:`FakeFence` instead of the real ones.
Nothing runs in the background: :meth:`Sim.step` moves the virtual clock and runs, in a fixed
order, what the node's tasks would have done meanwhile (fence checks, keepalives, one HA cycle).

Virtual time is ``time.monotonic``, ``time.time`` and the fence clock
(:func:`hakeeper.util.clock.boottime`) patched (pytest's monkeypatch) for the test: the agent
reads the clock in a dozen modules, and patching the three functions moves every reader at once
(and any added later) without a clock parameter threaded through production code.
The event loop's own clock follows too, which is harmless because nothing here sleeps.

The etcd mirror is the real :class:`~hakeeper.dcs.mirror.PrefixMirror`, re-listed before each
cycle (what its watch converges to) and whenever an action asks for a resync; its watch is not
run.  A *lagging* agent's mirror is re-listed at the start of the step instead, so it may act
on the same view as an agent that already acted in this step (a late watch: the races the
term-guarded etcd writes exist for).  A node cut off from etcd either loses its mirror (the
re-list fails: ``synced`` False), or, with ``silent_watch``, keeps its last copy as if synced (a
watch silent on an etcd freeze).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

import pytest
import structlog
from structlog.testing import LogCapture

from hakeeper.core.cluster import ClusterView
from hakeeper.core.config import NodeConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV, EtcdClient, EtcdError, EtcdUnavailable, TxnResult
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.actions import handover
from hakeeper.ha.actions import replica as replica_actions
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.lifecycle import fenced, inspect_data_dir
from hakeeper.ha.bootmark import BootstrapMark
from hakeeper.ha.fence import FenceClient, FenceState
from hakeeper.ha.guard import FENCE_POLL
from hakeeper.ha.policy.decision import LocalFacts
from hakeeper.node import Node
from hakeeper.pg import rewind as pg_rewind
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import Postgres
from hakeeper.util import clock
from hakeeper.util.proc import CommandFailed
from tests.support import fake_pg
from tests.support.fake_etcd import FakeEtcd
from tests.support.fake_pg import FakePostgres, World

__all__ = [
    "EtcdLink",
    "FakeFence",
    "MemoryBootstrapRecord",
    "MemoryLeaseRecord",
    "Sim",
    "SimNode",
    "VirtualClock",
    "capture_events",
    "node_config",
]

WALL_CLOCK_OFFSET = 1_700_000_000.0  # time.time() = monotonic + this
KEEPALIVE_EVERY = 1.0  # s, the keepalive_interval of the default dynamic configuration


class VirtualClock:
    """Monotonic seconds that move only when told to; the wall clock moves with them."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return WALL_CLOCK_OFFSET + self.t

    def advance(self, seconds: float) -> None:
        self.t = round(self.t + seconds, 9)  # tenths of a second add up exactly

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(time, "monotonic", self.monotonic)
        monkeypatch.setattr(time, "time", self.time)
        # the fence and lease deadlines run on CLOCK_BOOTTIME, read through this one function
        monkeypatch.setattr(clock, "boottime", self.monotonic)


class FakeFence:
    """:class:`~hakeeper.ha.fence.FenceClient` without its process or state file: what the
    WriteGuard arms and checks.  The fencer process (the last line, for a stalled agent) is not
    modelled; the agent's own check (:meth:`WriteGuard.check`) is."""

    def __init__(self) -> None:
        self.state = FenceState()
        self.started = False

    @property
    def armed(self) -> bool:
        return self.state.armed

    def ensure_running(self) -> None:
        self.started = True

    def arm(self, deadline: float) -> None:
        self.state.armed = True
        self.state.deadline = deadline

    def disarm(self) -> None:
        self.state.armed = False

    def expired(self, now: float | None = None) -> bool:
        return self.state.armed and (now if now is not None else clock.boottime()) >= self.state.deadline

    def inherit(self) -> bool:
        return False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.state.armed = False
        self.started = False


class MemoryLeaseRecord:
    """:class:`~hakeeper.ha.lease.LeaseFile` in memory: what a node's agent persists of its
    lease, handed to the agent that replaces it on a restart (:meth:`Sim.restart_agent`)."""

    def __init__(self) -> None:
        self.lease = 0

    def load(self) -> int:
        return self.lease

    def save(self, lease: int) -> None:
        self.lease = lease


class MemoryBootstrapRecord:
    """:class:`~hakeeper.ha.bootmark.BootstrapFile` in memory: the bootstrap marker, which a
    restarted agent finds as its killed predecessor left it (``saves``: every mark saved)."""

    def __init__(self) -> None:
        self.mark: BootstrapMark | None = None
        self.saves: list[BootstrapMark] = []

    @property
    def current(self) -> BootstrapMark | None:
        return self.mark

    def save(self, mark: BootstrapMark) -> None:
        self.mark = mark
        self.saves.append(mark)

    def clear(self) -> None:
        self.mark = None


class EtcdLink:
    """One agent's connection to the shared FakeEtcd (an EtcdLike).  ``cut``: every call fails as
    if etcd were unreachable from this agent alone (a partition between it and etcd)."""

    timeout = 1.0

    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd = etcd
        self.cut = False
        self.on_request: Any = None  # Node sets its metrics observer here

    async def _reach(self) -> FakeEtcd:
        if self.cut:
            await asyncio.sleep(0)
            raise EtcdUnavailable("etcd unreachable from this agent (the test cut the link)")
        return self.etcd

    async def get(self, key: str, *, timeout: float | None = None) -> KV | None:
        return await (await self._reach()).get(key)

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> tuple[list[KV], int]:
        return await (await self._reach()).get_prefix(prefix)

    async def put(self, key: str, value: bytes | str, *, lease: int = 0, timeout: float | None = None) -> int:
        return await (await self._reach()).put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        return await (await self._reach()).delete(key, prefix=prefix)

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        return await (await self._reach()).txn(compare, success, failure)

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> int:
        return await (await self._reach()).lease_grant(ttl)

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        return await (await self._reach()).lease_keepalive(lease_id)

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        await (await self._reach()).lease_revoke(lease_id)

    async def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        return await (await self._reach()).lease_time_to_live(lease_id)

    async def close(self) -> None:
        return None


def node_config(
    name: str,
    port: int,
    *,
    dcs: dict[str, Any] | None = None,
    postgresql: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> NodeConfig:
    """A node's configuration for the fakes: its address is its FakePostgres's."""
    return NodeConfig.model_validate(
        {
            "scope": "sim",
            "name": name,
            "api": {"listen": f"127.0.0.1:{port + 1000}"},
            "postgresql": {
                "data_dir": f"/nonexistent/hakeeper-fake/{name}/data",
                "listen": f"127.0.0.1:{port}",
                "superuser": {"password": "sim-su"},
                "replication": {"password": "sim-repl"},
                **(postgresql or {}),
            },
            "bootstrap": {"dcs": dcs or {}},
            "tags": tags or {},
        }
    )


@dataclass(eq=False)
class SimNode:
    """A real Node over the fakes, and what the simulation knows about it."""

    name: str
    node: Node
    pg: FakePostgres
    link: EtcdLink
    fence: FakeFence
    record: MemoryLeaseRecord = field(default_factory=MemoryLeaseRecord)
    marker: MemoryBootstrapRecord = field(default_factory=MemoryBootstrapRecord)
    agent_alive: bool = True  # False: the agent process is gone (no keepalives, no cycles)
    silent_watch: bool = False  # see the module doc
    cycle_errors: list[BaseException] = field(default_factory=list)

    @property
    def ctx(self) -> Ctx:
        return self.node.ctx

    async def refresh(self) -> None:
        """Bring the etcd mirror up to date, as its watch would have by now."""
        if self.link.cut and self.silent_watch:
            return
        try:
            await self.node.mirror.resync()
        except EtcdError:
            pass  # the mirror is now unsynced; the loop acts on its stale view

    async def view(self) -> ClusterView:
        """The cluster as this node's mirror holds it, freshly re-listed."""
        await self.refresh()
        return self.node.loop.view()

    async def facts(self, view: ClusterView) -> LocalFacts:
        """The loop's observe step: probe and clocks, as before a decision."""
        self.node.state.view = view
        return await self.node.loop.observe(view)

    async def observe(self) -> tuple[ClusterView, LocalFacts]:
        """The view and facts a decision is taken on, gathered as HaLoop.cycle does: a fresh
        view, the probe and clocks, and our member record published into the view."""
        view = await self.view()
        facts = await self.facts(view)
        return await self.node.loop.publish(view), facts

    async def cycle(self, *, refresh: bool = True) -> None:
        """One HA cycle; the failures HaLoop.run logs and survives are kept, anything else raises.
        ``refresh`` False: the mirror stays as it is (the watch has not delivered since)."""
        if refresh:
            await self.refresh()
        try:
            await self.node.loop.cycle()
        except (PgError, CommandFailed, EtcdError, OSError) as e:
            self.cycle_errors.append(e)

    async def fence_check(self) -> bool:
        """WriteGuard.watch's look at the deadline (it stops PostgreSQL as the node does)."""
        return await self.node.guard.check(lambda: fenced(self.node.ctx))


class Sim:
    """Several real agents on one FakeEtcd and one World, on a virtual clock (see the module doc).

    ``invariants`` run after every fence tick and every HA cycle; by default: at most one
    writable PostgreSQL."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        names: Iterable[str] = ("a", "b", "c"),
        *,
        dcs: dict[str, Any] | None = None,
        postgresql: dict[str, Any] | None = None,
        tags: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.clock = VirtualClock()
        self.clock.install(monkeypatch)
        self.world = World()
        # a switchover asks the candidate's server directly: in this world, the fake answers
        monkeypatch.setattr(handover, "wait_received", self.world.wait_received)
        # pg_basebackup and pg_rewind are functions over a Postgres: route them to the fakes
        monkeypatch.setattr(replica_actions, "clone_from", fake_pg.clone_from)
        monkeypatch.setattr(pg_rewind, "rewind", fake_pg.rewind)
        self.etcd = FakeEtcd(now=self.clock.monotonic)
        self.nodes: dict[str, SimNode] = {}
        self.invariants: list[Callable[[Sim], None]] = [one_writer]
        self.writable_seen: list[tuple[float, list[str]]] = []  # (time, writable members) per check
        for i, name in enumerate(names):
            port = 15432 + i
            cfg = node_config(name, port, dcs=dcs, postgresql=postgresql, tags=(tags or {}).get(name))
            pg = self.world.add(name, "127.0.0.1", port)
            link = EtcdLink(self.etcd)
            fence = FakeFence()
            record = MemoryLeaseRecord()
            marker = MemoryBootstrapRecord()
            node = Node(
                cfg,
                client=cast(EtcdClient, link),
                pg=cast(Postgres, pg),
                fence=cast(FenceClient, fence),
                lease_record=record,
                bootstrap_record=marker,
            )
            self.nodes[name] = SimNode(name, node, pg, link, fence, record, marker)

    def __getitem__(self, name: str) -> SimNode:
        return self.nodes[name]

    @property
    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.agent_alive]

    def check(self) -> None:
        self.writable_seen.append((self.clock.t, self.world.writable()))
        for invariant in self.invariants:
            invariant(self)

    @property
    def keys(self) -> Keys:
        return next(iter(self.nodes.values())).node.store.keys

    async def read_view(self) -> ClusterView:
        """What etcd holds now (not any node's mirror)."""
        return await ClusterStore(self.etcd, self.keys).read_view()

    async def restart_agent(self, name: str, *, lease_record: MemoryLeaseRecord | None = None) -> SimNode:
        """The agent process restarts (its PostgreSQL keeps running): a new Node, with no lease
        and a new fence, that first looks at its data directory as ``Node.run`` does.  It finds
        the lease id its predecessor persisted, unless ``lease_record`` replaces that record (an
        empty one: another agent of the same name, or a lost runtime directory)."""
        old = self.nodes[name]
        fence = FakeFence()
        record = old.record if lease_record is None else lease_record
        node = Node(
            old.node.cfg,
            client=cast(EtcdClient, old.link),
            pg=cast(Postgres, old.pg),
            fence=cast(FenceClient, fence),
            lease_record=record,
            bootstrap_record=old.marker,
        )
        await inspect_data_dir(node.ctx)
        self.nodes[name] = SimNode(name, node, old.pg, old.link, fence, record, old.marker)
        return self.nodes[name]

    def kill(self, name: str) -> None:
        """The host dies: its PostgreSQL and its agent stop at once; its lease is not renewed."""
        n = self.nodes[name]
        n.agent_alive = False
        n.pg.crash()

    async def leader(self) -> str | None:
        kv = await self.etcd.get(self.keys.leader)
        return None if kv is None else kv.value.decode()

    async def pass_time(self, seconds: float = 1.0, order: Iterable[str] | None = None) -> None:
        """``seconds`` of virtual time, in turns of at most KEEPALIVE_EVERY: the fence looks every
        FENCE_POLL (as WriteGuard.watch does), and at the end of each turn every live agent keeps
        its lease alive (LeaseKeeper.run's turn), in ``order`` (default: by name)."""
        turns = max(1, math.ceil(round(seconds / KEEPALIVE_EVERY, 6)))
        for _ in range(turns):
            ticks = max(1, math.ceil(round(seconds / turns / FENCE_POLL, 6)))
            for _ in range(ticks):
                self.clock.advance(seconds / turns / ticks)
                for n in self.live:
                    await n.fence_check()
                self.check()
            for n in self._turn(order):
                await n.node.lease.renew()

    async def step(
        self, seconds: float = 1.0, order: Iterable[str] | None = None, lagging: Iterable[str] = ()
    ) -> None:
        """:meth:`pass_time`, then one HA cycle of every live agent in ``order``, with a client
        writing to the writable primary after each cycle.  Each mirror is refreshed just before
        its agent's cycle, except the ``lagging`` agents': theirs is refreshed once at the start of
        the step, so they act on what etcd held then (a watch that delivers late), possibly on
        the same view as an agent that acted before them in this step."""
        await self.pass_time(seconds, order)
        late = set(lagging)
        turn = self._turn(order)
        for n in turn:
            if n.name in late:
                await n.refresh()
        for n in turn:
            await n.cycle(refresh=n.name not in late)
            self.check()
            for pg in self.world.servers.values():
                if pg.writable:
                    pg.write()

    def _turn(self, order: Iterable[str] | None) -> list[SimNode]:
        names = order if order is not None else sorted(self.nodes)
        return [self.nodes[name] for name in names if self.nodes[name].agent_alive]

    async def run(self, steps: int, **kw: Any) -> None:
        for _ in range(steps):
            await self.step(**kw)

    async def bootstrap(self, max_steps: int = 15) -> str:
        """Steps until one leader runs and every other node streams from it; the leader's name."""
        for _ in range(max_steps):
            await self.step()
            leader = await self.leader()
            if leader is not None and self.converged(leader):
                await self.step()  # every member publishes what it now is
                return leader
        raise AssertionError(
            f"no steady cluster after {max_steps} steps: {list(self.world.servers.values())}"
        )

    def converged(self, leader: str) -> bool:
        """The leader's PostgreSQL is the one writable, and every other live node streams from it."""
        primary = self.world.servers[leader]
        return self.world.writable() == [leader] and all(
            n.pg.upstream_primary() is primary for n in self.live if n.name != leader
        )


def one_writer(sim: Sim) -> None:
    """I1: never two writable PostgreSQL servers at once."""
    writable = sim.world.writable()
    assert len(writable) <= 1, f"two writable primaries at t={sim.clock.t:.1f}: {writable}"


def capture_events(monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> list[MutableMapping[str, Any]]:
    """The structured log events the ``modules`` (each with a module-level ``log``) emit from now
    on, for the test's duration.  Their loggers are replaced rather than structlog reconfigured,
    so it works whatever configuration (and logger cache) earlier tests left behind."""
    capture = LogCapture()
    for module in modules:
        logger = structlog.wrap_logger(
            None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
        )
        monkeypatch.setattr(module, "log", logger)
    return capture.entries
