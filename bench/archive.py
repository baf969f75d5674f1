"""Benchmark: continuous WAL archiving (hakeeper/backup/archive/): throughput and the latency
from a segment's ``.ready`` to its hand-back (durable in every repository).

Per repository target (``fs``: a filesystem repository in the bench directory, same disk;
``s3``: SeaweedFS ``weed mini`` on loopback, tests/support/s3_server.py; ``fs+s3``: both, every
segment to each), a fresh standalone PostgreSQL 15 (initdb as its OS user, fsync on,
``shared_buffers=256MB``, ``max_wal_size=4GB``, ``archive_mode=on``, ``archive_command`` = the
archiver's hand-over script) and the :class:`~hakeeper.backup.archive.archiver.Archiver` -- the code the
agent runs -- in this process (``parallel`` 4 by default):

1. **backlog**: archiving refused (``may_archive`` false) while ``pgbench -i -s SCALE`` loads
   data (very compressible WAL), and again during 20 s of the bulk load of 3 (md5 text, much
   less compressible), and ``pg_switch_wal()`` closes the last segment; then allowed.  Drain throughput = WAL
   bytes of the backlog / time from "allowed" to the last segment handed back; also the time
   until PostgreSQL had taken them all (no ``.ready`` left).
2. **pgbench**: ``pgbench -c 8 -j 2 -N -T SECONDS`` (the reference load of backup-bench.md),
   after a CHECKPOINT (so full-page images are written, as in steady state).
3. **bulk**: two sessions inserting ``generate_series`` batches for SECONDS: as much WAL as the
   machine writes.

For 2 and 3: WAL generated (MB/s, from ``pg_current_wal_lsn()``), the per-segment latency
(mtime of ``.ready`` -> marker written, i.e. durable; p50 / p99 / max over the segments of the
phase), the largest ``.ready`` backlog seen (sampled every 100 ms) and the backlog at the end.

Usage::

    python -m bench.archive [--targets fs,s3,fs+s3] [--scale 60] [--seconds 30] [--parallel 4]
                            [--out docs/benchmarks.md] [--json FILE] [--no-docs]

Only the section between ``<!-- bench:archive:start -->`` and ``<!-- bench:archive:end -->`` of
``--out`` is written (appended when missing).  Everything runs under a fresh directory in /tmp
on free loopback ports; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.failover import machine_facts, make_base_dir, percentile
from bench.switchover import write_section
from hakeeper.backup.archive.archiver import Archiver, archive_repository_config
from hakeeper.backup.repo import Repository
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import ArchiveConfig, RepositoryConfig
from hakeeper.core.config import DynamicConfig, ParamValue, PostgresConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.localcluster import pg_program
from hakeeper.pg import Postgres, Role
from hakeeper.pg.postgres import SOCKET_SUBDIR
from hakeeper.util.proc import run
from tests.support.pg import kill_postmaster
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

MARK_START = "<!-- bench:archive:start -->"
MARK_END = "<!-- bench:archive:end -->"
TARGET_MBPS = 50.0
TARGET_P99_S = 2.0
SCOPE = "bench"
MB = 1_000_000


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    wal_bytes: int = 0
    segments: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    max_backlog: int = 0
    backlog_at_end: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wal_mbps(self) -> float:
        return self.wal_bytes / MB / self.seconds if self.seconds else 0.0


@dataclass
class TargetResult:
    target: str
    phases: list[Phase] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, base: Path, target: str, args: argparse.Namespace, seaweed: SeaweedS3 | None) -> None:
        self.base = base / target.replace("+", "_")
        self.base.mkdir(mode=0o755)
        self.target = target
        self.args = args
        self.seaweed = seaweed
        (port,) = free_ports(1)
        self.cfg = PostgresConfig.model_validate(
            {
                "data_dir": self.base / "data",
                "listen": f"127.0.0.1:{port}",
                "superuser": {"username": "postgres", "password": "bench-secret"},
                "replication": {"username": "replicator", "password": "bench-secret"},
            }
        )
        self.pg = Postgres(self.cfg, member_name="bench")
        self.allowed = False
        self.archiver: Archiver | None = None
        self.task: asyncio.Task[None] | None = None
        self.res = TargetResult(target)

    # ------------------------------------------------------------------ set-up

    def repositories(self) -> list[Repository]:
        out: list[Repository] = []
        for kind in self.target.split("+"):
            if kind == "fs":
                rc = RepositoryConfig(name="fs", type="fs", path=self.base / "repo")
            else:
                assert self.seaweed is not None
                rc = RepositoryConfig.model_validate(
                    {
                        "name": "s3",
                        "type": "s3",
                        "endpoint": self.seaweed.endpoint,
                        "bucket": f"bench-{self.target.replace('+', '-')}",
                        "access_key": ACCESS_KEY,
                        "secret_key": SECRET_KEY,
                    }
                )
            out.append(make_repository(archive_repository_config(rc, self.archive_cfg)))
        return out

    async def start(self) -> None:
        self.archive_cfg = ArchiveConfig(
            parallel=self.args.parallel, timeout=600, compression_level=self.args.level or None
        )
        repos = self.repositories()
        for r in repos:
            await r.initialize()
        self.archiver = Archiver(
            scope=SCOPE,
            pg_wal=self.pg.data_dir / "pg_wal",
            spool_dir=self.base / "spool",
            repositories=repos,
            cfg=self.archive_cfg,
            may_archive=lambda: self.allowed,
            refusal_reason=lambda: None if self.allowed else "bench: backlog being built",
            run_as=self.pg.run_as,
            node="bench",
        )
        await self.pg.initdb(["--encoding=UTF8", "--locale=C"])
        self.archiver.prepare()
        params: dict[str, ParamValue] = {
            **DynamicConfig().cluster_parameters(),
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "15min",
            "max_connections": 30,
            "archive_mode": "on",
            "archive_command": self.archiver.archive_command(),
        }
        await self.pg.write_config(params, Role.PRIMARY, None, replication_password=None)
        await self.pg.start(timeout=120)
        self.task = asyncio.create_task(self.archiver.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.archiver is not None:
            await self.archiver.close()
        with contextlib.suppress(Exception):
            await self.pg.stop("immediate", timeout=30)
        await self.pg.session.close()
        kill_postmaster(self.pg.data_dir)

    # ------------------------------------------------------------------ helpers

    @property
    def status_dir(self) -> Path:
        return self.pg.data_dir / "pg_wal" / "archive_status"

    def ready(self) -> list[str]:
        return [n for n in os.listdir(self.status_dir) if n.endswith(".ready")]

    async def lsn(self) -> int:
        v = parse_lsn(str((await self.pg.session.execute("SELECT pg_current_wal_lsn()"))[0][0]))
        assert v is not None
        return v

    async def pgbench(self, *args: str, timeout: float) -> str:
        sock = str(self.pg.data_dir / SOCKET_SUBDIR)
        argv = [
            pg_program("pgbench"),
            "-h",
            sock,
            "-p",
            str(self.pg.port),
            "-U",
            "postgres",
            *args,
            "postgres",
        ]
        r = await run(argv, run_as=self.pg.run_as, timeout=timeout, check=True)
        return r.stdout + r.stderr

    async def sample_backlog(self, phase: Phase, stop: asyncio.Event) -> None:
        while not stop.is_set():
            phase.max_backlog = max(phase.max_backlog, len(self.ready()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()

    def latency(self, phase: Phase, since: int) -> None:
        assert self.archiver is not None
        lat = [v for _, v in list(self.archiver.latencies)[since:]]
        phase.segments = len(lat)
        if lat:
            phase.p50_s = round(percentile(lat, 50), 3)
            phase.p99_s = round(percentile(lat, 99), 3)
            phase.max_s = round(max(lat), 3)

    # ------------------------------------------------------------------ phases

    async def backlog(self, kind: str) -> Phase:
        """Build a backlog while archiving is refused (``pgbench -i``: very compressible table
        data; ``bulk``: the bulk INSERT load, md5 text, much less so), then drain it."""
        assert self.archiver is not None
        self.allowed = False
        await asyncio.sleep(0.3)
        ph = Phase(f"backlog drain ({kind})")
        await self.pg.session.execute("SELECT pg_switch_wal()")
        start_lsn = await self.lsn()
        if kind == "pgbench -i":
            out = await self.pgbench("-i", "-q", "-s", str(self.args.scale), timeout=1800)
            ph.extra["pgbench_init_tail"] = out.strip().splitlines()[-1:] if out.strip() else []
        else:
            await self.bulk_load(min(self.args.seconds, 20))
        await self.pg.session.execute("SELECT pg_switch_wal()")
        end_lsn = await self.lsn()
        await asyncio.sleep(1)
        names = sorted(n[: -len(".ready")] for n in self.ready())
        sizes = [(self.pg.data_dir / "pg_wal" / n).stat().st_size for n in names]
        ph.wal_bytes = sum(sizes)
        ph.extra["backlog_segments"] = len(names)
        ph.extra["wal_generated_bytes"] = end_lsn - start_lsn
        ph.max_backlog = len(names)
        before = self.archiver.archived_files
        n0 = len(self.archiver.latencies)
        t0 = time.monotonic()
        self.allowed = True
        await self.pg.session.execute("SELECT pg_reload_conf()")  # wakes PostgreSQL's archiver if it sleeps
        while self.archiver.archived_files - before < len(names):
            await asyncio.sleep(0.02)
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("backlog not drained in 30 min")
        ph.seconds = time.monotonic() - t0
        ph.segments = len(list(self.archiver.latencies)[n0:])
        while self.ready():
            await asyncio.sleep(0.02)
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("PostgreSQL did not take the backlog in 30 min")
        ph.extra["postgres_took_all_s"] = round(time.monotonic() - t0, 2)
        return ph

    async def live(self, name: str, load: Any) -> Phase:
        assert self.archiver is not None
        ph = Phase(name)
        await self.pg.session.execute("CHECKPOINT")  # steady state: full-page images after a checkpoint
        n0 = len(self.archiver.latencies)
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_backlog(ph, stop))
        lsn0 = await self.lsn()
        t0 = time.monotonic()
        ph.extra.update(await load())
        ph.seconds = time.monotonic() - t0
        ph.wal_bytes = await self.lsn() - lsn0
        ph.backlog_at_end = len(self.ready())
        # the segments written during the load: wait until they are handed back too
        await self.pg.session.execute("SELECT pg_switch_wal()")
        t_end = time.monotonic()
        for _ in range(6000):  # at most 300 s
            if not self.ready():
                break
            await asyncio.sleep(0.05)
        ph.extra["drained_after_load_s"] = round(time.monotonic() - t_end, 2)
        stop.set()
        await sampler
        self.latency(ph, n0)
        return ph

    async def pgbench_load(self) -> dict[str, Any]:
        s = str(self.args.seconds)
        out = await self.pgbench("-c", "8", "-j", "2", "-N", "-T", s, timeout=self.args.seconds + 120)
        tps = next((ln.split("=")[1].split()[0] for ln in out.splitlines() if ln.startswith("tps")), None)
        return {"tps": tps}

    async def bulk_load(self, seconds: float | None = None) -> dict[str, Any]:
        await self.pg.session.execute("CREATE TABLE IF NOT EXISTS bulk (id bigint, a text, b text)")
        deadline = time.monotonic() + (seconds or self.args.seconds)
        rows = 0

        async def session() -> None:
            nonlocal rows
            import psycopg

            sock = str(self.pg.data_dir / SOCKET_SUBDIR)
            async with await psycopg.AsyncConnection.connect(
                host=sock, port=self.pg.port, user="postgres", dbname="postgres", autocommit=True
            ) as conn:
                while time.monotonic() < deadline:
                    await conn.execute(
                        "INSERT INTO bulk SELECT g, md5(g::text), md5((g * 7)::text) || repeat('x', 40) "
                        "FROM generate_series(1, 50000) g"
                    )
                    rows += 50000

        await asyncio.gather(session(), session())
        return {"rows": rows}

    async def run(self) -> TargetResult:
        await self.start()
        try:
            self.res.phases.append(await self.backlog("pgbench -i"))
            self.res.phases.append(await self.backlog("bulk INSERT"))
            self.res.phases.append(await self.live("pgbench -c 8 -j 2 -N", self.pgbench_load))
            self.res.phases.append(await self.live("bulk INSERT x2", self.bulk_load))
            assert self.archiver is not None
            self.res.status = self.archiver.status()
        except Exception as e:
            self.res.errors.append(f"{type(e).__name__}: {e}")
        finally:
            await self.stop()
        return self.res


# ---------------------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(results: list[TargetResult], facts: dict[str, str], args: argparse.Namespace, cmd: str) -> str:
    lines = [
        MARK_START,
        "## WAL archiving: throughput and segment latency",
        "",
        f"_Generated by `bench/archive.py` on {facts['date_utc']}; command: `{cmd}`._",
        "",
        "| machine | |",
        "|---|---|",
        f"| date (UTC) | {facts['date_utc']} |",
        f"| CPUs | {facts['nproc']} x {facts['cpu_model']} |",
        f"| kernel / Debian | {facts['kernel']} / {facts['debian']} |",
        f"| PostgreSQL | {facts['postgresql']} |",
        f"| load average at start / end | {facts['load_avg_start']} / {facts.get('load_avg_end', '?')} |",
        f"| hakeeper code under test | {facts['hakeeper']} |",
        "",
        "### Method",
        "",
        "- A standalone PostgreSQL 15 (fsync on, `shared_buffers=256MB`, `max_wal_size=4GB`) with "
        "`archive_mode=on` and the hand-over script as `archive_command`; the archiver "
        f"(`parallel={args.parallel}`, zstd level {args.level or 3}) runs in the bench process, "
        "as in the agent.  "
        "`fs`: a filesystem repository on the same disk; `s3`: SeaweedFS `weed mini` on loopback "
        "(same 2 CPUs); `fs+s3`: every segment to both.",
        f"- *backlog drain*: archiving refused during `pgbench -i -s {args.scale}` (very compressible "
        "table data) or 20 s of the *bulk* load (md5 text), then allowed; "
        "MB/s = WAL bytes of the backlog / time to the last hand-back.",
        f"- *pgbench* (`-c 8 -j 2 -N -T {args.seconds}`) and *bulk* (2 sessions of "
        f"`INSERT ... generate_series(1, 50000)` for {args.seconds} s): WAL MB/s generated; latency = "
        "`.ready` mtime -> the segment durable in every repository (marker written), over the "
        "segments of the phase.",
        "",
        "### Results",
        "",
        "| target | phase | WAL MB/s | segments | latency p50 / p99 / max s | max `.ready` backlog | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for ph in r.phases:
            notes = ", ".join(f"{k} {v}" for k, v in ph.extra.items() if k != "pgbench_init_tail")
            lines.append(
                f"| {r.target} | {ph.name} | **{ph.wal_mbps:.1f}** | {ph.segments} | "
                f"{_f(ph.p50_s)} / **{_f(ph.p99_s)}** / {_f(ph.max_s)} | {ph.max_backlog} | {notes} |"
            )
        for e in r.errors:
            lines.append(f"| {r.target} | error | | | | | {e} |")
    drains = [ph.wal_mbps for r in results for ph in r.phases if ph.name.startswith("backlog drain")]
    live_p99 = [
        ph.p99_s for r in results for ph in r.phases if not ph.name.startswith("backlog drain") and ph.p99_s
    ]
    over = [
        f"{r.target} / {ph.name} (p99 {ph.p99_s:.2f} s at {ph.wal_mbps:.0f} MB/s)"
        for r in results
        for ph in r.phases
        if ph.p99_s is not None and ph.p99_s > TARGET_P99_S
    ]
    lines += [
        "",
        f"Targets: >= {TARGET_MBPS:.0f} MB/s archived, segment p99 <= {TARGET_P99_S:.0f} s.  Measured: drain "
        f"{min(drains, default=0):.0f}-{max(drains, default=0):.0f} MB/s; live p99 at most "
        f"{max(live_p99, default=0):.2f} s.",
        "",
        "Over the p99 target: " + ("; ".join(over) if over else "none") + ".  The load average (other "
        "work on the machine) is in the table above; the archiver competes with it and with "
        "PostgreSQL for the 2 CPUs.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.archive", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--targets", default="fs,s3,fs+s3")
    p.add_argument("--scale", type=int, default=60, help="pgbench -i scale of the backlog (~15 MB WAL each)")
    p.add_argument("--seconds", type=int, default=30, help="length of each live load")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument(
        "--level",
        type=int,
        default=ArchiveConfig().compression_level or 0,
        help="zstd level of WAL (0: repository's, 3)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--json", type=Path)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the bench directory")
    p.add_argument("--render-json", type=Path, help="only render the section from an earlier --json file")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> list[TargetResult]:
    base = make_base_dir("hakeeper-bench-archive-")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    seaweed: SeaweedS3 | None = None
    results = []
    try:
        if any("s3" in t for t in targets):
            seaweed = SeaweedS3(base / "seaweed")
            await asyncio.to_thread(seaweed.start)
        for t in targets:
            print(f"== {t}", file=sys.stderr, flush=True)
            r = await Bench(base, t, args, seaweed).run()
            for ph in r.phases:
                print(
                    f"   {ph.name}: {ph.wal_mbps:.1f} MB/s p50 {ph.p50_s} p99 {ph.p99_s} {ph.extra}",
                    file=sys.stderr,
                )
            for e in r.errors:
                print(f"   ERROR {e}", file=sys.stderr)
            results.append(r)
    finally:
        if seaweed is not None:
            await asyncio.to_thread(seaweed.stop)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hakeeper.util.log import setup_logging

    setup_logging("console", "WARNING")
    cmd = "python -m bench.archive " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render_json:
        raw = json.loads(args.render_json.read_text())
        facts = raw["facts"]
        results = [
            TargetResult(r["target"], [Phase(**ph) for ph in r["phases"]], r["errors"], r["status"])
            for r in raw["results"]
        ]
        cmd = raw.get("command", cmd)
    else:
        facts = machine_facts()
        results = asyncio.run(amain(args))
        facts["load_avg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if args.json and not args.render_json:
        args.json.write_text(
            json.dumps(
                {"facts": facts, "command": cmd, "results": [asdict(r) for r in results]},
                indent=1,
                default=str,
            )
        )
    section = render(results, facts, args, cmd.strip())
    print(section)
    if not args.no_docs:
        write_section(args.out, MARK_START, MARK_END, section)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
