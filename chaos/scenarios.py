"""The faults.  Each scenario injects its fault into a ready cluster under load, heals it, and
returns; the runner then waits for the cluster to settle and checks what the clients saw.

A scenario marks ``fault`` (when the fault hit) and ``heal`` (when it was undone) on the run's
clock.  ``expect_refusal`` scenarios must *not* promote anybody while the fault lasts (in sync
and quorum modes) and must log why.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.cluster import ChaosCluster
from chaos.workload import Recorder
from hakeeper.localcluster import API_USER, fencer_pids
from hakeeper.util.proc import children_of


@dataclass
class Ctx:
    cluster: ChaosCluster
    rec: Recorder
    mode: str
    primary: str
    ttl: float
    marks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # later faults of a multi-fault scenario
    echo: Callable[[str], None] | None = None  # notes also go to the runner's log as they happen
    killed: set[str] = field(default_factory=set)  # nodes whose agent got a SIGKILL, not yet restarted

    @property
    def replicas(self) -> list[str]:
        return [n for n in self.cluster.names if n != self.primary]

    def mark(self, what: str) -> None:
        self.marks.setdefault(what, self.rec.now())

    def another_fault(self) -> None:
        """A scenario with several faults (kill storm): each one's recovery is measured."""
        self.mark("fault")
        self.faults.append(self.rec.now())

    def note(self, text: str) -> None:
        self.notes.append(f"{self.rec.now():.2f}s {text}")
        if self.echo is not None:
            self.echo(f"  {self.rec.now():.2f}s {text}")

    # -------------------------------------------------------------- processes

    def kill_postgres(self, name: str) -> None:
        pm = self.cluster.postmaster_pid(name)
        if pm is None:
            self.note(f"{name}: postgres not running")
            return
        os.kill(pm, signal.SIGKILL)
        self.note(f"{name}: kill -9 postmaster {pm}")

    def kill_agent(self, name: str) -> None:
        pid = self.cluster.agents[name].pid
        if pid is None:
            self.note(f"{name}: agent not running")
            return
        os.kill(pid, signal.SIGKILL)
        self.killed.add(name)
        self.note(f"{name}: kill -9 agent {pid}")

    def kill_node(self, name: str) -> None:
        """The machine dies: agent, fencer, postmaster and its children, all at once."""
        pids = []
        agent = self.cluster.agents[name].pid
        if agent is not None:
            pids.append(agent)
        pids += fencer_pids(self.cluster.nodes[name].node_dir)
        pm = self.cluster.postmaster_pid(name)
        if pm is not None:
            pids += [pm, *children_of(pm)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent is not None:
            self.killed.add(name)
        self.note(f"{name}: node killed (pids {pids})")

    async def restart_agent(self, name: str) -> None:
        """Start the agent of ``name`` again if it is not running.  An agent we killed is
        waited for first: SIGKILL is asynchronous, and a process inside an fsync can take a
        while to go -- a restart that looked too early once left a node down for a whole run."""
        proc = self.cluster.agents[name].proc
        if proc is not None and name in self.killed:
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.note(f"{name}: agent {proc.pid} still alive 30 s after SIGKILL; not restarted")
                return
        if proc is not None and proc.poll() is None:
            self.note(f"{name}: agent {proc.pid} is running; not restarted")
            return
        self.killed.discard(name)
        self.cluster.agents[name].start()
        self.note(f"{name}: agent restarted")

    def signal_agent(self, name: str, sig: int) -> None:
        pid = self.cluster.agents[name].pid
        if pid is not None:
            os.kill(pid, sig)
            self.note(f"{name}: {signal.Signals(sig).name} to agent {pid}")

    # -------------------------------------------------------------- observation

    async def primaries(self) -> list[str]:
        states = await asyncio.to_thread(self.cluster.states)
        return [s.name for s in states.values() if s.role == "primary"]

    async def wait_primary(self, exclude: str | None, timeout: float) -> str | None:
        """A node other than ``exclude`` that is the one writable node, within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            ps = await self.primaries()
            if len(ps) == 1 and ps[0] != exclude:
                return ps[0]
            await asyncio.sleep(0.25)
        return None

    async def sql(self, name: str, query: str) -> list[tuple[Any, ...]]:
        import psycopg

        def run() -> list[tuple[Any, ...]]:
            with psycopg.connect(self.cluster.dsn(name), autocommit=True, connect_timeout=3) as conn:
                cur = conn.execute(query)
                return cur.fetchall() if cur.description else []

        return await asyncio.to_thread(run)

    async def sync_standbys(self) -> list[str]:
        rows = await self.sql(
            self.primary,
            "SELECT application_name FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') "
            "ORDER BY application_name",
        )
        return [str(r[0]) for r in rows]

    async def api_post(self, name: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = self.cluster.api_url(name) + path
        auth = base64.b64encode(f"{API_USER}:{self.cluster.api_password}".encode()).decode()
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
        )

        def call() -> tuple[int, Any]:
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(errors="replace")
            except OSError as e:
                return 0, str(e)

        return await asyncio.to_thread(call)


Inject = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    inject: Inject
    partition: bool = False  # needs network namespaces
    etcd_members: int = 1
    expect_refusal: bool = False  # in sync and quorum modes
    # A self-test: the fault breaks safety behind hakeeper's back on purpose, and the run passes
    # only if the checkers report these violations (proof that they can fail).
    expect_violations: tuple[str, ...] = ()


async def _after_failover_restart(ctx: Ctx, victim: str, timeout: float = 60.0) -> None:
    new = await ctx.wait_primary(exclude=victim, timeout=timeout)
    ctx.note(f"new primary: {new}")
    await ctx.restart_agent(victim)
    ctx.mark("heal")


async def kill_postgres(ctx: Ctx) -> None:
    ctx.mark("fault")
    ctx.kill_postgres(ctx.primary)
    ctx.mark("heal")  # the agent restarts it (or the cluster fails over)


async def kill_agent(ctx: Ctx) -> None:
    ctx.mark("fault")
    ctx.kill_agent(ctx.primary)
    await _after_failover_restart(ctx, ctx.primary)


async def kill_both(ctx: Ctx) -> None:
    ctx.mark("fault")
    ctx.kill_node(ctx.primary)
    await _after_failover_restart(ctx, ctx.primary)


def sigstop(factor: float) -> Inject:
    async def inject(ctx: Ctx) -> None:
        ctx.mark("fault")
        ctx.signal_agent(ctx.primary, signal.SIGSTOP)
        await asyncio.sleep(factor * ctx.ttl)
        ctx.signal_agent(ctx.primary, signal.SIGCONT)
        ctx.mark("heal")

    return inject


def partition(targets: str) -> Inject:
    async def inject(ctx: Ctx) -> None:
        c = ctx.cluster
        peers: list[str] = []
        if targets in ("all", "replicas"):
            peers += ctx.replicas
        if targets in ("all", "etcd"):
            peers += [m.name for m in c.etcd.members]
        ctx.mark("fault")
        for p in peers:
            c.net.block(ctx.primary, p)
        ctx.note(f"{ctx.primary} cut off from {', '.join(peers)}")
        await asyncio.sleep(3 * ctx.ttl)
        c.net.heal()
        ctx.mark("heal")
        ctx.note("network healed")

    return inject


async def etcd_leader_kill(ctx: Ctx) -> None:
    leader = ctx.cluster.etcd.leader()
    if leader is None:
        ctx.note("no etcd leader found")
        return
    ctx.mark("fault")
    leader.kill()
    ctx.note(f"etcd leader {leader.name} killed")
    await asyncio.sleep(2 * ctx.ttl)
    leader.start()
    ctx.mark("heal")


async def etcd_quorum_loss(ctx: Ctx) -> None:
    victims = ctx.cluster.etcd.members[:2]
    ctx.mark("fault")
    for m in victims:
        m.kill()
    ctx.note(f"etcd members {', '.join(m.name for m in victims)} killed (quorum lost)")
    await asyncio.sleep(2 * ctx.ttl)
    for m in victims:
        m.start()
    ctx.mark("heal")


async def lagging_candidate(ctx: Ctx) -> None:
    sync = await _current_sync_standbys(ctx) if ctx.mode != "async" else []
    best = sync[0] if sync else ctx.replicas[0]
    await ctx.sql(best, "SELECT pg_wal_replay_pause()")
    ctx.note(f"replay paused on {best}")
    await asyncio.sleep(3)
    ctx.mark("fault")
    ctx.kill_node(ctx.primary)
    new = await ctx.wait_primary(exclude=ctx.primary, timeout=60)
    ctx.note(f"new primary: {new}")
    try:
        rows = await ctx.sql(best, "SELECT pg_is_in_recovery()")
        if rows and rows[0][0]:
            await ctx.sql(best, "SELECT pg_wal_replay_resume()")
            ctx.note(f"replay resumed on {best}")
    except Exception as e:
        ctx.note(f"could not resume replay on {best}: {e}")
    await ctx.restart_agent(ctx.primary)
    ctx.mark("heal")


async def double_fault(ctx: Ctx) -> None:
    sync = await _current_sync_standbys(ctx) if ctx.mode != "async" else []
    second = sync[0] if sync else ctx.replicas[0]
    ctx.mark("fault")
    ctx.kill_node(ctx.primary)
    ctx.kill_node(second)
    ctx.note(f"primary {ctx.primary} and standby {second} lost together")
    await asyncio.sleep(4 * ctx.ttl)
    ctx.mark("heal")
    await ctx.restart_agent(second)
    await ctx.restart_agent(ctx.primary)


async def _current_sync_standbys(ctx: Ctx, timeout: float = 30.0) -> list[str]:
    """The primary's synchronous standbys, waited for: right after the previous run settled, the
    rejoined standby may not be synchronous yet.  Killing a standby that is not the synchronous
    one would leave a safe candidate, and its legitimate promotion would read as a failure to
    refuse; so the scenario does not start on a guess (a timeout fails the injection, saying so)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        sync = await ctx.sync_standbys()
        if sync:
            return sync
        if loop.time() >= deadline:
            raise RuntimeError(f"no synchronous standby on {ctx.primary} after {timeout:.0f}s")
        await asyncio.sleep(0.5)


async def crash_during_switchover(ctx: Ctx) -> None:
    sync = await _current_sync_standbys(ctx) if ctx.mode != "async" else []
    candidate = sync[0] if sync else ctx.replicas[0]
    task = asyncio.create_task(
        ctx.api_post(ctx.primary, "/switchover", {"leader": ctx.primary, "candidate": candidate})
    )
    delay = random.uniform(0.05, 1.0)
    await asyncio.sleep(delay)
    ctx.mark("fault")
    ctx.kill_node(ctx.primary)
    ctx.note(f"switchover to {candidate} requested; node {ctx.primary} killed {delay:.2f}s later")
    status, body = await task
    ctx.note(f"switchover answer: {status} {str(body)[:200]}")
    await _after_failover_restart(ctx, ctx.primary)


async def kill_new_primary(ctx: Ctx) -> None:
    """A second failure right after a failover: the new primary dies the moment it has
    acknowledged a write, before its own sync set can have formed; both victims come back
    after 3 x ttl.  Nothing acknowledged may be lost, and no second primary may appear."""
    ctx.mark("fault")
    first = ctx.primary
    ctx.kill_node(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    second = None
    while second is None and loop.time() < deadline:
        acked = [a.node for a in ctx.rec.attempts[-50:] if a.outcome == "ok" and a.node not in (None, first)]
        second = acked[-1] if acked else None
        await asyncio.sleep(0.02)
    if second is None:
        ctx.note("no new primary acknowledged a write within 60 s")
    else:
        ctx.kill_node(second)
        ctx.note(f"new primary {second} killed right after its first acknowledgement")
        await asyncio.sleep(3 * ctx.ttl)
    ctx.mark("heal")
    await ctx.restart_agent(first)
    if second is not None:
        await ctx.restart_agent(second)


async def old_primary_restart(ctx: Ctx) -> None:
    ctx.mark("fault")
    ctx.kill_node(ctx.primary)
    await asyncio.sleep(random.uniform(0.2, ctx.ttl))
    await ctx.restart_agent(ctx.primary)  # back while its leader key may still live
    ctx.mark("heal")


async def kill_storm(ctx: Ctx) -> None:
    loop = asyncio.get_running_loop()
    victim = ctx.primary
    for _ in range(3):
        t = loop.time()
        ctx.another_fault()
        ctx.kill_node(victim)
        new = await ctx.wait_primary(exclude=victim, timeout=60)
        ctx.note(f"new primary: {new}")
        await ctx.restart_agent(victim)
        if new is None:
            break
        await asyncio.sleep(max(0.0, 20 - (loop.time() - t)))
        victim = new
    ctx.mark("heal")


async def rogue_promote(ctx: Ctx) -> None:
    """Promote a replica with plain SQL, as a buggy HA manager would: two writable nodes until
    the agents notice the member without the leader key and demote and rewind it."""
    rogue = ctx.replicas[-1]
    ctx.signal_agent(rogue, signal.SIGSTOP)  # or its agent demotes it within a second
    ctx.mark("fault")
    try:
        # Its own synchronous_standby_names may name a standby (left from an earlier term): then
        # the rogue could never acknowledge anything.  The agent strips this at its next start.
        await ctx.sql(rogue, "ALTER SYSTEM SET synchronous_standby_names = ''")
        await ctx.sql(rogue, "SELECT pg_reload_conf()")
        await ctx.sql(rogue, "SELECT pg_promote(true, 30)")
        ctx.note(f"{rogue} promoted behind the agents' back")
        await asyncio.sleep(3)
    finally:
        ctx.signal_agent(rogue, signal.SIGCONT)
    ctx.mark("heal")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("kill-postgres", "kill -9 of the primary's postmaster", kill_postgres),
        Scenario("kill-agent", "kill -9 of the primary's agent (its fencer stays)", kill_agent),
        Scenario("kill-both", "the primary's node dies: agent, fencer and postgres", kill_both),
        Scenario("sigstop-0.5ttl", "SIGSTOP of the primary's agent for 0.5 x ttl", sigstop(0.5)),
        Scenario("sigstop-1.5ttl", "SIGSTOP of the primary's agent for 1.5 x ttl", sigstop(1.5)),
        Scenario("sigstop-3ttl", "SIGSTOP of the primary's agent for 3 x ttl", sigstop(3.0)),
        Scenario(
            "partition-all", "primary cut off from replicas and etcd for 3 x ttl", partition("all"), True
        ),
        Scenario("partition-etcd", "primary cut off from etcd only for 3 x ttl", partition("etcd"), True),
        Scenario(
            "partition-replicas",
            "primary cut off from the replicas only for 3 x ttl",
            partition("replicas"),
            True,
        ),
        Scenario(
            "etcd-leader-kill", "kill -9 of the etcd leader (3 members)", etcd_leader_kill, etcd_members=3
        ),
        Scenario(
            "etcd-quorum-loss", "2 of 3 etcd members down for 2 x ttl", etcd_quorum_loss, etcd_members=3
        ),
        Scenario(
            "lagging-candidate", "replay paused on the best replica, then the primary dies", lagging_candidate
        ),
        Scenario(
            "double-fault",
            "primary and sync standby lost at once (sync/quorum: must refuse)",
            double_fault,
            expect_refusal=True,
        ),
        Scenario("crash-during-switchover", "the primary dies during a switchover", crash_during_switchover),
        Scenario(
            "kill-new-primary",
            "the primary dies, then the new one the moment it acknowledges a write",
            kill_new_primary,
        ),
        Scenario(
            "old-primary-restart", "the dead primary's agent comes back within the ttl", old_primary_restart
        ),
        Scenario("kill-storm", "the primary's node killed every 20 s, three times", kill_storm),
        Scenario(
            "selftest-rogue-promote",
            "checker self-test: a replica promoted behind hakeeper's back must be reported",
            rogue_promote,
            expect_violations=("dual-primary", "writes lost", "off the final timeline"),
        ),
    ]
}

SMOKE = [
    "kill-both",
    "sigstop-3ttl",
    "partition-all",
    "double-fault",
    "crash-during-switchover",
    "selftest-rogue-promote",
]
