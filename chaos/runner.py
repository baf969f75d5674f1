"""Run scenarios against a fresh chaos cluster and write one JSON report per run.

Runs of one mode and etcd size share a cluster: each run starts from a settled cluster (one
primary, both replicas streaming, a synchronous standby in sync/quorum mode) and must leave one.
A run that does not settle fails, and the next run gets a new cluster.

In namespace mode the runner moves itself into the hub namespace (``setns``) before it starts
its event loop, so the writer, the probes and the checks reach every host over the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from chaos import checks
from chaos.cluster import ChaosCluster
from chaos.net import Loopback, Namespaces, namespaces_available
from chaos.scenarios import SCENARIOS, Ctx, Scenario
from chaos.workload import PROBE_ID_OFFSET, RUN_ID_SPAN, SCHEMA, Recorder, probe, writer
from hakeeper.core.config import DynamicConfig
from hakeeper.localcluster import pgbuilds

CLONE_NEWNET = 0x40000000
MODES = ("async", "sync", "quorum")
SETTLE_TIMEOUT = 120.0
INJECT_TIMEOUT = 300.0  # the longest scenario (kill storm) takes about a minute
WARMUP = 3.0
TAIL = 2.0


def mode_config(mode: str) -> dict[str, Any]:
    if mode == "async":
        return {"replication_mode": "async"}
    if mode == "sync":
        return {"replication_mode": "synchronous", "synchronous_node_count": 1}
    if mode == "quorum":
        return {"replication_mode": "quorum", "synchronous_node_count": 1}
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Plan:
    scenario: Scenario
    runs: int


def _free_base_port() -> int:
    import random
    import socket

    for _ in range(500):
        base = random.randrange(30000, 39000)
        ok = True
        for p in (
            [base + 10 + i for i in range(1, 4)]
            + [base + 20 + i for i in range(1, 4)]
            + list(range(base + 32, base + 38))
        ):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


class Runner:
    def __init__(
        self,
        mode: str,
        out_dir: Path,
        net_kind: str = "auto",
        log: Callable[[str], None] = print,
        keep: bool = False,
        pg_version: int | None = None,
    ) -> None:
        mode_config(mode)
        self.mode = mode
        # The major every cluster of this runner runs (`make chaos-smoke` runs some scenarios on
        # 17 and 18 too); None: $TEST_PG_VERSION, else 15, as LocalCluster decides.
        self.pg_version = pgbuilds.check_major(
            pg_version if pg_version is not None else pgbuilds.default_major()
        )
        self.out_dir = out_dir
        self.log = log
        self.keep = keep
        why_not = namespaces_available() if net_kind in ("auto", "netns") else "loopback requested"
        if net_kind == "netns" and why_not is not None:
            raise RuntimeError(f"network namespaces unavailable: {why_not}")
        self.use_netns = why_not is None
        self.why_no_netns = why_not
        self.ttl = DynamicConfig().ttl
        self.run_counter = int(time.time()) % 1000 * 1000
        self.failed_dirs: set[Path] = set()  # clusters where a run failed: kept for the logs

    # ------------------------------------------------------------------ cluster lifecycle

    def _new_cluster(self, etcd_members: int) -> tuple[ChaosCluster, Namespaces | Loopback, Path]:
        net: Namespaces | Loopback = Namespaces() if self.use_netns else Loopback()
        parent = "/tmp" if os.geteuid() == 0 else None
        base = Path(tempfile.mkdtemp(prefix="hakeeper-chaos-", dir=parent))
        base.chmod(0o755)
        cluster = ChaosCluster(
            base,
            net,
            _free_base_port(),
            etcd_members,
            dynamic=mode_config(self.mode),
            pg_version=self.pg_version,
        )
        return cluster, net, base

    def execute(self, plans: list[Plan]) -> list[dict[str, Any]]:
        """Run every plan; returns the reports (also written to out_dir)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        reports: list[dict[str, Any]] = []
        runnable: list[Plan] = []
        for p in plans:
            if p.scenario.partition and not self.use_netns:
                self.log(f"skip {p.scenario.name}: needs network namespaces ({self.why_no_netns})")
                reports.append(self._skipped(p.scenario))
            else:
                runnable.append(p)
        for members in sorted({p.scenario.etcd_members for p in runnable}):
            group = [p for p in runnable if p.scenario.etcd_members == members]
            reports += self._execute_group(group, members)
        return reports

    def _skipped(self, sc: Scenario) -> dict[str, Any]:
        rep = {
            "scenario": sc.name,
            "mode": self.mode,
            "pg_version": self.pg_version,
            "skipped": f"needs network namespaces ({self.why_no_netns})",
            "passed": None,
        }
        self._write(rep, f"{sc.name}-{self.mode}-skipped")
        return rep

    def _execute_group(self, plans: list[Plan], etcd_members: int) -> list[dict[str, Any]]:
        reports: list[dict[str, Any]] = []
        todo = [(p.scenario, i) for p in plans for i in range(1, p.runs + 1)]
        while todo:
            cluster, net, base = self._new_cluster(etcd_members)
            own_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
            try:
                net.setup()
                if isinstance(net, Namespaces):
                    _setns(f"/var/run/netns/{net.hub}")
                todo = asyncio.run(self._group(cluster, todo, reports))
            finally:
                try:
                    cluster.stop()
                finally:
                    libc = ctypes.CDLL(None, use_errno=True)
                    libc.setns(own_ns, CLONE_NEWNET)
                    os.close(own_ns)
                    net.teardown()
                    if self.keep or base in self.failed_dirs:
                        self.log(f"cluster directory kept (logs): {base}")
                    else:
                        shutil.rmtree(base, ignore_errors=True)
        return reports

    async def _group(
        self, cluster: ChaosCluster, todo: list[tuple[Scenario, int]], reports: list[dict[str, Any]]
    ) -> list[tuple[Scenario, int]]:
        """Run ``todo`` on ``cluster``; returns what is left if the cluster had to be given up."""
        self.log(
            f"starting a {self.mode} cluster of PostgreSQL {self.pg_version} "
            f"({'netns' if self.use_netns else 'loopback'}) in {cluster.base_dir}"
        )
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.wait_ready, 240.0)
        ok, detail = await self._wait_settled(cluster, 120.0)
        if not ok:
            raise RuntimeError(f"a new chaos cluster did not become ready: {detail}")
        primary = await asyncio.to_thread(cluster.primary)
        assert primary is not None
        await asyncio.to_thread(_sql, cluster, primary, SCHEMA)
        while todo:
            sc, i = todo.pop(0)
            self.run_counter += 1
            rep = await self._one_run(cluster, sc, i, self.run_counter)
            reports.append(rep)
            attempts = rep.pop("_attempts")
            stem = f"{sc.name}-{self.mode}-{i:03d}"
            if not rep["passed"]:  # every attempt and the cluster's logs, for the post-mortem
                self.failed_dirs.add(cluster.base_dir)
                rep["cluster_dir"] = str(cluster.base_dir)
                lines = "".join(json.dumps(a.to_json()) + "\n" for a in attempts)
                (self.out_dir / f"{stem}.attempts.jsonl").write_text(lines)
            self._write(rep, stem)
            verdict = "PASS" if rep["passed"] else "FAIL: " + "; ".join(rep["violations"])
            self.log(
                f"{sc.name} [{self.mode}] run {i}: {verdict} "
                f"(rto {rep['rto_s']}, lost {rep['lost_count']}, dual {len(rep['dual_primary'])}, "
                f"unknown {rep['unknown']})"
            )
            if not rep["settled"]:
                return todo
        return todo

    def _write(self, rep: dict[str, Any], stem: str) -> None:
        path = self.out_dir / f"{stem}.json"
        path.write_text(json.dumps(rep, indent=1, sort_keys=False) + "\n")

    # ------------------------------------------------------------------ one run

    async def _wait_settled(self, cluster: ChaosCluster, timeout: float) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        detail = ""
        while True:
            ok, detail = await asyncio.to_thread(_settled, cluster, self.mode)
            if ok or loop.time() >= deadline:
                return ok, detail
            for name in cluster.names:  # an agent that died on its own gets restarted, and noted
                if cluster.agents[name].returncode is not None:
                    detail += f"; {name} agent had exited ({cluster.agents[name].returncode})"
            await asyncio.sleep(0.5)

    async def _one_run(self, cluster: ChaosCluster, sc: Scenario, index: int, run_no: int) -> dict[str, Any]:
        rec = Recorder(time.monotonic())
        stop = asyncio.Event()
        base_id = run_no * RUN_ID_SPAN
        log_offsets = {n: _size(cluster.nodes[n].log_path) for n in cluster.names}
        primary = await asyncio.to_thread(cluster.primary)
        assert primary is not None
        tasks = [asyncio.create_task(writer(cluster.write_dsn(), rec, base_id, stop, cluster.node_of))]
        for i, name in enumerate(cluster.names, start=1):
            tasks.append(
                asyncio.create_task(
                    probe(name, cluster.dsn(name), rec, base_id + PROBE_ID_OFFSET * i, stop, cluster.node_of)
                )
            )
        ctx = Ctx(cluster, rec, self.mode, primary, self.ttl, echo=self.log)
        started = time.time()
        error: str | None = None
        await asyncio.sleep(WARMUP)
        try:
            await asyncio.wait_for(sc.inject(ctx), INJECT_TIMEOUT)
        except TimeoutError:
            error = f"the injection did not finish within {INJECT_TIMEOUT:.0f}s (see the notes)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        ctx.mark("fault")
        ctx.mark("heal")
        for name in cluster.names:  # whatever the scenario left down comes back now
            if name in ctx.killed or cluster.agents[name].pid is None:
                await ctx.restart_agent(name)
        ok, detail = await self._wait_settled(cluster, SETTLE_TIMEOUT)
        settled_at = rec.now()
        if not ok:
            detail += await asyncio.to_thread(_post_mortem, cluster)
        await asyncio.sleep(TAIL)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        final = await asyncio.to_thread(cluster.primary) if ok else None
        return await asyncio.to_thread(
            self._judge,
            cluster,
            sc,
            index,
            ctx,
            rec,
            ok,
            detail,
            settled_at,
            final,
            base_id,
            started,
            error,
            log_offsets,
        )

    def _judge(
        self,
        cluster: ChaosCluster,
        sc: Scenario,
        index: int,
        ctx: Ctx,
        rec: Recorder,
        settled: bool,
        detail: str,
        settled_at: float,
        final: str | None,
        base_id: int,
        started: float,
        error: str | None,
        log_offsets: dict[str, int],
    ) -> dict[str, Any]:
        violations: list[str] = []
        atts = rec.attempts
        acked = [a for a in atts if a.outcome == "ok"]
        fault, heal = ctx.marks["fault"], ctx.marks["heal"]
        strict_loss = self.mode in ("sync", "quorum")
        if error:
            violations.append(f"injection failed: {error}")
        if not settled or final is None:
            violations.append(f"did not settle within {SETTLE_TIMEOUT:.0f}s: {detail}")
        lost: list[int] = []
        lost_bytes = 0
        audit = checks.Audit(0)
        if final is not None:
            rows = _sql(
                cluster,
                final,
                f"SELECT id FROM chaos_acks WHERE id >= {base_id} AND id < {base_id + RUN_ID_SPAN}",
            )
            present = {int(r[0]) for r in rows}
            lost = checks.lost_ids(acked, present)
            tli_row = _sql(cluster, final, "SELECT pg_walfile_name(pg_current_wal_lsn())")
            final_tli = int(str(tli_row[0][0])[:8], 16)
            history = checks.parse_history(_history_text(cluster, final, final_tli))
            audit = checks.timeline_audit(acked, final_tli, history)
            lost_set = set(lost)
            lost_bytes = checks.lost_bytes([a for a in acked if a.id in lost_set], history)
            if lost and strict_loss:
                violations.append(f"{len(lost)} acknowledged writes lost")
            if audit.off_history and strict_loss:
                violations.append(
                    f"{len(audit.off_history)} acknowledged writes off the final timeline history"
                )
            max_lag = DynamicConfig().maximum_lag_on_failover
            if not strict_loss and lost_bytes > max_lag:
                violations.append(
                    f"lost {lost_bytes} bytes of WAL, more than maximum_lag_on_failover {max_lag}"
                )
        dual = checks.dual_primary_windows(atts)
        if dual:
            violations.append(f"{len(dual)} dual-primary windows")
        refusals = _count_refusals(cluster, log_offsets)
        if sc.expect_refusal and strict_loss:
            during = checks.acks_between(atts, fault + 0.5, heal)
            if during:
                violations.append(f"{len(during)} writes acknowledged while no safe candidate existed")
            if refusals == 0:
                violations.append("no refusal logged")
        caught: list[str] = []
        if sc.expect_violations:
            # A self-test passes when the checkers caught the sabotage, and fails when they did not
            # (judged on what they detected, in every mode: async mode tolerates lost writes).
            detected = {
                "dual-primary": bool(dual),
                "writes lost": bool(lost),
                "off the final timeline": bool(audit.off_history),
            }
            caught = [x for x in sc.expect_violations if detected.get(x)]
            missed = [x for x in sc.expect_violations if not detected.get(x)]
            violations = [v for v in violations if not any(x in v for x in sc.expect_violations)]
            violations += [f"self-test: the checkers did not report {x}" for x in missed]
        writer_atts = [a for a in atts if a.src == "writer"]
        # Several faults (kill storm): the worst recovery, each measured up to the next fault.
        starts = sorted({fault, *ctx.faults})
        recoveries = [
            checks.recovery_time([a for a in atts if nxt is None or a.done < nxt], f)
            for f, nxt in zip(starts, [*starts[1:], None], strict=True)
        ]
        rto = max((r for r in recoveries if r is not None), default=None)
        first = checks.first_ack_after(atts, fault)
        return {
            "scenario": sc.name,
            "about": sc.about,
            "mode": self.mode,
            "pg_version": self.pg_version,
            "run": index,
            "net": "netns" if self.use_netns else "loopback",
            "etcd_members": sc.etcd_members,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "primary_before": ctx.primary,
            "primary_after": final,
            "marks": {k: round(v, 3) for k, v in ctx.marks.items()},
            "settled": settled,
            "settle_s": round(settled_at - heal, 3),
            "rto_s": None if rto is None else round(rto, 3),
            "first_ack_s": None if first is None else round(first, 3),
            "write_outage_s": round(checks.longest_gap(atts), 3),
            "writer": {o: sum(1 for a in writer_atts if a.outcome == o) for o in ("ok", "failed", "unknown")},
            "probe_acks": sum(1 for a in acked if a.src != "writer"),
            "unknown": sum(1 for a in atts if a.outcome == "unknown"),
            "lost_count": len(lost),
            "lost": lost[:50],
            "lost_bytes": lost_bytes,
            "dual_primary": [d.to_json() for d in dual],
            "timeline_audit": {"final_timeline": audit.final_tli, "off_history": audit.off_history[:20]},
            "streams": [
                {
                    "node": s.node,
                    "timeline": s.tli,
                    "first_ack": round(s.first_done, 3),
                    "last_send": round(s.last_send, 3),
                    "acks": s.count,
                }
                for s in checks.streams(atts)
            ],
            "refusals": refusals,
            "notes": ctx.notes,
            "violations": violations,
            "caught_by_design": caught,
            "passed": not violations,
            "_attempts": atts,
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _sql(
    cluster: ChaosCluster, name: str, query: str, params: tuple[Any, ...] | None = None
) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(name), autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _post_mortem(cluster: ChaosCluster) -> str:
    """For a run that did not settle: which agents still run, and their thread stacks in their
    logs (the agent dumps them on SIGUSR1), so a hung agent can be told from a dead one."""
    found = []
    for name in cluster.names:
        pid = cluster.agents[name].pid
        if pid is None:
            found.append(f"{name} agent not running (exit {cluster.agents[name].returncode})")
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
            found.append(f"{name} agent {pid} alive (stacks dumped to its log)")
        except ProcessLookupError:
            found.append(f"{name} agent {pid} gone")
    time.sleep(1.0)
    return "; post-mortem: " + ", ".join(found)


def _settled(cluster: ChaosCluster, mode: str) -> tuple[bool, str]:
    states = cluster.states()
    desc = ", ".join(f"{s.name}: {s.role}" for s in states.values())
    primaries = [s.name for s in states.values() if s.role == "primary"]
    if len(primaries) != 1 or any(s.role not in ("primary", "replica") for s in states.values()):
        return False, desc
    # Streaming is not enough: a replica that diverged keeps reconnecting on its old timeline.
    # Each must receive the primary's current timeline past the primary's position of now.
    try:
        tli, lsn = _sql(
            cluster,
            primaries[0],
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, "
            "pg_current_wal_lsn()",
        )[0]
        for s in states.values():
            if s.name == primaries[0]:
                continue
            row = _sql(
                cluster,
                s.name,
                "SELECT received_tli, pg_last_wal_receive_lsn() >= %s::pg_lsn FROM pg_stat_wal_receiver",
                (str(lsn),),
            )
            if not row or row[0][0] != tli or not row[0][1]:
                return False, f"{desc}; {s.name} has not received timeline {tli} up to {lsn} yet"
    except psycopg.Error as e:
        return False, f"{desc}; {e}"
    if mode != "async":
        try:
            rows = _sql(
                cluster,
                primaries[0],
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
            )
        except psycopg.Error as e:
            return False, f"{desc}; {e}"
        if not rows or int(rows[0][0]) < 1:
            return False, f"{desc}; no synchronous standby yet"
    return True, desc


def _history_text(cluster: ChaosCluster, name: str, tli: int) -> str:
    if tli <= 1:
        return ""
    path = cluster.nodes[name].data_dir / "pg_wal" / f"{tli:08X}.history"
    with contextlib.suppress(OSError):
        return path.read_text()
    return ""


def _count_refusals(cluster: ChaosCluster, offsets: dict[str, int]) -> int:
    """Decisions not to promote for safety reasons, logged by the agents during the run."""
    n = 0
    for name, off in offsets.items():
        try:
            with open(cluster.nodes[name].log_path, "rb") as f:
                f.seek(off)
                data = f.read()
        except OSError:
            continue
        for line in data.splitlines():
            if b"decision_wait" in line and (b"not a failover candidate" in line or b"refused" in line):
                n += 1
    return n


def plans_for(names: list[str], runs: int) -> list[Plan]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise KeyError(", ".join(unknown))
    return [Plan(SCENARIOS[n], runs) for n in names]
