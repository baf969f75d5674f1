"""Benchmark: base backup, restore and point-in-time restore of a pgbench database (scale 150,
about 2.3 GB) with hakeeper, against ``tar | zstd -T2 -3`` of the same stopped data directory
and against pgBackRest 2.45 (process-max=2, zstd level 3, posix repository); WAL archive latency
of every segment under a pgbench write load.

Everything runs on 127.0.0.1 under a fresh directory in /tmp, on ports BASE..BASE+61
(``--base-port``, default 34100):

1. A 1-node hakeeper cluster (:class:`~hakeeper.localcluster.LocalCluster`: etcd + agent) with a
   filesystem repository ``local`` and the PostgreSQL settings of the baseline measurement
   (``shared_buffers=1GB``, ``max_wal_size=4GB``, ...); ``pgbench -i -s 150 -q``, CHECKPOINT.
   The agent archives the load's WAL into the repository.
2. The cluster is stopped.  Raw reference on its data directory, as PostgreSQL's OS user:
   ``tar -cf - . | zstd -q -T2 -3`` (backup), ``tar -cf - . | cat`` (read floor) and
   ``zstd -d -T2 | tar -x`` (restore).  The last extraction is an exact copy of the data directory
   (same data, same postgresql.conf): it becomes pgBackRest's source, started on its own port with
   ``archive_command = pgbackrest archive-push`` (so each tool archives its own cluster's WAL).
3. The hakeeper cluster is started again.  ``--runs`` full backups with each tool, interleaved
   (the tool that goes first alternates): ``hakeeper backup create -c node1.yml --repo local`` and
   ``pgbackrest backup --type=full``.
4. ``--runs`` restores of the newest backup into a fresh directory with each tool, interleaved:
   ``hakeeper restore --latest --start`` and ``pgbackrest restore`` + ``pg_ctl start``; the clock
   stops at the first successful write (``pg_is_in_recovery()`` false and an INSERT committed),
   polled every 50 ms, not at ``pg_ctl -w``.
5. A 60 s ``pgbench -c 4 -j 2`` write load on each source in turn: the archive latency of every
   segment (``.ready`` created -> ``.done``, and -> the object in the repository), and a target
   time taken on the server 30 s into the load.
6. ``--runs`` PITR restores to that time with each tool, interleaved, again to first write;
   the restored ``pgbench_history`` rows up to the target are compared with the source.

Usage::

    python -m bench.backup [--scale 150] [--runs 3] [--skip-pgbackrest] [--skip-hakeeper] [--work-dir DIR]
                           [--keep] [--write-docs] [--out docs/benchmarks.md] [--json FILE]

With ``--write-docs`` only the section between ``<!-- bench:backup:start -->`` and
``<!-- bench:backup:end -->`` of ``--out`` is written or replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from bench import pgbr
from bench.failover import machine_facts, make_base_dir, percentile
from bench.switchover import write_section
from hakeeper.localcluster import (
    HOST,
    SUPERUSER,
    LocalCluster,
    pg_program,
    port_is_free,
    prepare_fs_repository,
)
from hakeeper.util.proc import RunAs, child_env, children_of, pid_alive, postmaster_pid, proc_cmdline

MARK_START = "<!-- bench:backup:start -->"
MARK_END = "<!-- bench:backup:end -->"
DEFAULT_BASE_PORT = 34100
SCOPE = "benchbackup"
STANZA = "bench"
DB = "bench"
REPO_NAME = "local"
ZSTD_LEVEL = 3
PARALLEL = 2  # zstd -T2, pgBackRest process-max=2, hakeeper's parallelism where it has a knob
LOAD_S = 60
TARGET_AT_S = 30
PGBENCH_LOAD = ["-c", "4", "-j", "2"]
POLL_S = 0.05
AGENT_LATENCY_METRIC = "hakeeper_archive_latency_seconds"
BACKUP_TARGET_RATIO = 0.8  # hakeeper backup throughput >= 0.8x that of tar | zstd
BASELINE_DOC = "/work/shared/reference/backup-bench.md"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The PostgreSQL settings of the baseline measurement (BASELINE_DOC), on top of hakeeper's
# defaults.  wal_recycle is off during pgbench -i only (else the checkpoint after the load keeps
# ~1.9 GB of recycled segments in pg_wal); ALTER SYSTEM turns it on afterwards.  wal_keep_size 0:
# a 1-node cluster has no standby, and hakeeper's default 128MB would add 128 MB of old WAL to the
# data directory that tar reads and the backup tools skip.
PG_PARAMETERS: dict[str, Any] = {
    "shared_buffers": "1GB",
    "max_wal_size": "4GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "wal_keep_size": 0,
    "wal_recycle": "off",
    "log_checkpoints": "on",
    "log_line_prefix": "%m [%p] ",
    "log_timezone": "UTC",
}


class BenchError(RuntimeError):
    pass


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------- ports, processes


@dataclass(frozen=True, slots=True)
class Ports:
    base: int

    @property
    def hk_pg(self) -> int:
        return self.base + 11  # LocalCluster: node1's PostgreSQL

    @property
    def pgbr_source(self) -> int:
        return self.base + 50

    @property
    def hk_restore(self) -> int:
        return self.base + 60

    @property
    def pgbr_restore(self) -> int:
        return self.base + 61

    def all(self) -> list[int]:
        b = self.base
        return [b, b + 1, b + 11, b + 21, self.pgbr_source, self.hk_restore, self.pgbr_restore]


class BenchCluster(LocalCluster):
    """LocalCluster with the baseline's PostgreSQL settings."""

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        cfg["postgresql"]["parameters"].update(PG_PARAMETERS)
        return cfg


class Tracker:
    """Everything we start, so that it can be stopped by PID whatever happens: standalone
    PostgreSQL instances (by data directory) and child processes (pgbench)."""

    def __init__(self, run_as: RunAs) -> None:
        self.run_as = run_as
        self.pgdata: list[Path] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.seen_pids: set[int] = set()

    def add_pgdata(self, path: Path) -> None:
        if path not in self.pgdata:
            self.pgdata.append(path)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.seen_pids.add(p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        for d in self.pgdata:
            pid = postmaster_pid(d)
            if pid is not None:
                self.seen_pids.add(pid)
                stop_pg(d, self.run_as, mode="immediate")


def run_cmd(
    argv: Sequence[str | Path],
    run_as: RunAs | None = None,
    *,
    timeout: float | None = 900,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion (as ``run_as`` if given), output captured."""
    ra = run_as or RunAs()
    args = [str(a) for a in argv]
    r: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        args,
        env=child_env(ra, env),
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **ra.kwargs(),  # user/group/extra_groups (dict[str, object] for mypy)
    )
    if check and r.returncode != 0:
        out = (r.stdout + "\n" + r.stderr).strip().splitlines()
        raise BenchError(f"{shlex.join(args)} exited {r.returncode}:\n" + "\n".join(out[-25:]))
    return r


def bash(script: str, run_as: RunAs, timeout: float = 900) -> None:
    run_cmd(["bash", "-c", "set -euo pipefail; " + script], run_as, timeout=timeout)


def mkdir_for(path: Path, run_as: RunAs, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    run_as.chown(path)
    return path


def stop_pg(
    data_dir: Path, run_as: RunAs, mode: str = "fast", timeout: float = 60, major: int | None = None
) -> None:
    """Stop the postmaster running in ``data_dir`` (pg_ctl of PostgreSQL ``major``, then SIGKILL
    by PID)."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired, BenchError):
        run_cmd(
            [pg_program("pg_ctl", major), "stop", "-D", data_dir, "-m", mode, "-w", "-t", str(int(timeout))],
            run_as,
            timeout=timeout + 10,
            check=False,
        )
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        for p in [pid, *children_of(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def start_pg(
    data_dir: Path,
    run_as: RunAs,
    port: int,
    sock: Path,
    logfile: Path,
    *,
    wait: bool,
    major: int | None = None,
) -> None:
    """``pg_ctl start`` (of PostgreSQL ``major``) of a standalone copy on ``port``, never
    archiving (a restored copy must not push WAL into the source's repository)."""
    opts = f"-p {port} -c listen_addresses={HOST} -c unix_socket_directories={sock} -c archive_mode=off"
    run_cmd(
        [
            pg_program("pg_ctl", major),
            "start",
            "-D",
            data_dir,
            "-l",
            logfile,
            "-w" if wait else "-W",
            "-o",
            opts,
        ],
        run_as,
        timeout=120,
    )


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tree_bytes(path: Path, skip: Sequence[str] = ()) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        if Path(root) == path:
            dirs[:] = [d for d in dirs if d not in skip]
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def dsn(port: int, password: str, dbname: str = "postgres") -> str:
    return f"host={HOST} port={port} user={SUPERUSER} password={password} dbname={dbname} connect_timeout=3"


def sql(port: int, password: str, query: str, dbname: str = "postgres", params: Sequence[Any] = ()) -> Any:
    with psycopg.connect(dsn(port, password, dbname), autocommit=True) as c:
        cur = c.execute(query, params)
        row = cur.fetchone() if cur.description is not None else None
    return None if row is None else row[0]


# --------------------------------------------------------------------------------- measurements


def pg_alive(data_dir: Path, grace: float = 20.0) -> Callable[[], bool]:
    """True while the postmaster of ``data_dir`` runs, and during ``grace`` s before it appears."""
    t0 = time.monotonic()
    seen = [False]

    def alive() -> bool:
        if postmaster_pid(data_dir) is not None:
            seen[0] = True
            return True
        return not seen[0] and time.monotonic() - t0 < grace

    return alive


def wait_writable(port: int, password: str, timeout: float, alive: Callable[[], bool]) -> tuple[float, float]:
    """Poll every 50 ms until ``pg_is_in_recovery()`` is false and an INSERT commits.  Returns
    (monotonic time recovery was first seen off, monotonic time of the committed INSERT)."""
    deadline = time.monotonic() + timeout
    conn: psycopg.Connection[Any] | None = None
    off: float | None = None
    last = "no answer"
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(dsn(port, password), autocommit=True, connect_timeout=2)
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    off = off or time.monotonic()
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS bench_probe "
                        "(id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
                    )
                    conn.execute("INSERT INTO bench_probe DEFAULT VALUES")
                    return off, time.monotonic()
                last = "in recovery"
            except psycopg.Error as e:
                last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            if time.monotonic() > deadline:
                raise BenchError(f"port {port} not writable after {timeout:.0f} s ({last})")
            if not alive():
                raise BenchError(f"the server on port {port} is gone ({last})")
            time.sleep(POLL_S)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


_LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[\d+\] \w+:  (.*)$")
_LOG_EVENTS = {
    "starting PostgreSQL": "start",
    "redo starts at": "redo_start",
    "consistent recovery state reached": "consistent",
    "redo done at": "redo_done",
    "database system is ready to accept connections": "ready",
}


def log_phases(path: Path | None, since_wall: float) -> dict[str, float]:
    """Durations from a PostgreSQL log (``log_line_prefix = '%m [%p] '``, UTC): start -> redo
    start, replay, redo done -> ready (new timeline + end-of-recovery checkpoint).  Best effort."""
    if path is None or not path.exists():
        return {}
    seen: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_RE.match(line)
        if not m:
            continue
        ts = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC).timestamp()
        if ts < since_wall - 1:
            continue
        for text, key in _LOG_EVENTS.items():
            if m.group(2).startswith(text):
                seen[key] = ts  # the last of each
    out: dict[str, float] = {}
    if "redo_start" in seen and "start" in seen:
        out["start_to_redo_s"] = seen["redo_start"] - seen["start"]
    if "redo_done" in seen and "redo_start" in seen:
        out["replay_s"] = seen["redo_done"] - seen["redo_start"]
    if "ready" in seen and "redo_done" in seen:
        out["redo_done_to_ready_s"] = seen["ready"] - seen["redo_done"]
    return {k: round(v, 3) for k, v in out.items()}


def wait_writable_or_log(
    port: int, password: str, data_dir: Path, logfile: Path | None
) -> tuple[float, float]:
    """:func:`wait_writable` for a restored copy; on failure the error carries its log's tail."""
    try:
        return wait_writable(port, password, 600, pg_alive(data_dir))
    except BenchError as e:
        path = logfile or find_pg_log(data_dir)
        tail = ""
        with contextlib.suppress(OSError, AttributeError):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-15:])  # type: ignore[union-attr]
        raise BenchError(f"{e}; {path}:\n{tail}") from None


class ArchiveSampler(threading.Thread):
    """Watches ``pg_wal/archive_status`` every 50 ms.  PostgreSQL creates ``SEG.ready`` when a
    segment is complete and renames it to ``SEG.done`` once archive_command succeeded: the
    rename keeps the mtime (= when ``.ready`` was created) and sets the ctime (= when PostgreSQL
    took the segment as archived).  So both times come from the file itself, not from when we
    happened to look; we only need to see each file before a checkpoint removes it."""

    def __init__(self, status_dir: Path) -> None:
        super().__init__(name="archive-sampler", daemon=True)
        self.status_dir = status_dir
        self.ready_ns: dict[str, int] = {}
        self.done_ns: dict[str, int] = {}
        self.max_ready = 0
        self.stop_event = threading.Event()
        self.started_ns = time.time_ns()

    def scan(self) -> None:
        ready = 0
        with contextlib.suppress(OSError):
            for e in os.scandir(self.status_dir):
                seg, _, kind = e.name.partition(".")
                if len(seg) != 24 or kind not in ("ready", "done"):
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                self.ready_ns.setdefault(seg, st.st_mtime_ns)
                if kind == "done":
                    self.done_ns.setdefault(seg, st.st_ctime_ns)
                else:
                    ready += 1
        self.max_ready = max(self.max_ready, ready)

    def run(self) -> None:
        while not self.stop_event.wait(POLL_S):
            self.scan()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self.scan()

    def segments(self) -> list[str]:
        """Segments whose ``.ready`` appeared while we watched."""
        return sorted(s for s, t in self.ready_ns.items() if t >= self.started_ns)


def latency_stats(values_ms: Sequence[float]) -> dict[str, Any]:
    if not values_ms:
        return {"n": 0}
    return {
        "n": len(values_ms),
        "p50_ms": round(percentile(values_ms, 50), 1),
        "p90_ms": round(percentile(values_ms, 90), 1),
        "p99_ms": round(percentile(values_ms, 99), 1),
        "max_ms": round(max(values_ms), 1),
    }


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --------------------------------------------------------------------------------- the bench


@dataclass
class Results:
    facts: dict[str, str] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, op: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(op, []).append(row)
        log(f"  {op} #{row.get('run')}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "run"))


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, res: Results) -> None:
        self.args = args
        self.work = work
        self.res = res
        self.ports = Ports(args.base_port)
        self.hk_repo = work / "hk-repo"
        self.pgbr_dir = work / "pgbr"
        self.pgbr_conf = self.pgbr_dir / "pgbackrest.conf"
        self.pgbr_repo = self.pgbr_dir / "repo"
        self.pgbr_data = self.pgbr_dir / "data"
        self.pgbr_sock = self.pgbr_dir / "sock"
        self.restore_dir = work / "restore"
        backup = None
        if not args.skip_hakeeper:
            backup = {
                "repositories": [{"name": REPO_NAME, "type": "fs", "path": str(self.hk_repo)}],
                # WAL at zstd level 3 like pgBackRest's compress-level (hakeeper's default is 1)
                "archive": {"compression_level": ZSTD_LEVEL},
                # No row counts for restore drills: pgBackRest has nothing like them, and they
                # read every table on the primary after the copy (not part of making the backup).
                "row_counts": {"enabled": False},
            }
        self.cluster = BenchCluster(
            work / "hk", nodes=1, base_port=args.base_port, scope=SCOPE, backup=backup
        )
        self.run_as = self.cluster.run_as
        self.password = self.cluster.superuser_password
        self.tracker = Tracker(self.run_as)
        self.node = self.cluster.nodes["node1"]
        self.hk_cli: list[str] = hakeeper_cli()
        self.hk_available = False

    # ----------------------------------------------------------------- dataset

    def create_dataset(self) -> None:
        a = self.args
        if not a.skip_hakeeper:
            prepare_fs_repository(self.hk_repo, self.run_as)
        mkdir_for(self.restore_dir, self.run_as, 0o755)
        log(f"starting a 1-node hakeeper cluster in {self.cluster.base_dir} (base port {a.base_port})")
        self.cluster.start()
        self.cluster.wait_ready(180)
        port = self.ports.hk_pg
        sql(port, self.password, f"CREATE DATABASE {DB}")
        log(f"pgbench -i -s {a.scale} -q ...")
        t0 = time.monotonic()
        run_cmd(
            [
                pg_program("pgbench"),
                "-h",
                HOST,
                "-p",
                str(port),
                "-U",
                SUPERUSER,
                "-i",
                "-s",
                str(a.scale),
                "-q",
                DB,
            ],
            env={"PGPASSWORD": self.password},
            timeout=1800,
        )
        load_s = time.monotonic() - t0
        t0 = time.monotonic()
        sql(port, self.password, "CHECKPOINT")
        sql(port, self.password, "ALTER SYSTEM SET wal_recycle = on")
        sql(port, self.password, "SELECT pg_reload_conf()")
        ckpt_s = time.monotonic() - t0
        self.res.dataset.update(
            {"scale": a.scale, "pgbench_init_s": round(load_s, 1), "checkpoint_s": round(ckpt_s, 1)}
        )
        self.res.dataset["db_bytes"] = sql(port, self.password, f"SELECT pg_database_size('{DB}')")
        log(f"loaded in {load_s:.1f} s, checkpoint {ckpt_s:.1f} s")
        if not a.skip_hakeeper:
            self.wait_archive_idle(self.node.data_dir, "hakeeper (after pgbench -i)", 600)

    def wait_archive_idle(self, data_dir: Path, what: str, timeout: float) -> None:
        """Wait until no ``.ready`` file is left (the archiver caught up); record how long."""
        status = data_dir / "pg_wal" / "archive_status"
        t0 = time.monotonic()
        first = sum(1 for p in status.glob("*.ready"))
        while True:
            left = sum(1 for p in status.glob("*.ready"))
            if left == 0:
                break
            if time.monotonic() - t0 > timeout:
                self.res.notes.append(
                    f"{what}: {left} WAL files still waiting to be archived after {timeout:.0f} s"
                )
                log(self.res.notes[-1])
                return
            time.sleep(0.2)
        el = time.monotonic() - t0
        if first:
            self.res.notes.append(f"{what}: archive backlog of {first} segments drained in {el:.1f} s")
            log(self.res.notes[-1])

    def stop_cluster(self) -> None:
        log("stopping the hakeeper cluster (agent stops PostgreSQL cleanly)")
        self.tracker.seen_pids.update(pid for _w, pid in self.cluster.processes())
        self.cluster.stop()
        state = run_cmd([pg_program("pg_controldata"), "-D", self.node.data_dir], self.run_as).stdout
        m = re.search(r"Database cluster state:\s+(.*)", state)
        if not m or m.group(1).strip() != "shut down":
            raise BenchError(f"data directory not cleanly shut down: {m.group(1) if m else state[:200]}")
        d = self.node.data_dir
        self.res.dataset.update(
            {
                "data_dir_bytes": tree_bytes(d),
                "base_bytes": tree_bytes(d / "base"),
                "pg_wal_bytes": tree_bytes(d / "pg_wal"),
                "no_wal_bytes": tree_bytes(d, skip=("pg_wal",)),
                "files": sum(len(f) for _r, _d, f in os.walk(d)),
            }
        )
        log(
            "data directory: "
            + ", ".join(
                f"{k}={v}" for k, v in self.res.dataset.items() if k.endswith("bytes") or k == "files"
            )
        )

    # ----------------------------------------------------------------- raw reference

    def copy_data(self) -> None:
        """An exact copy of the stopped data directory (untimed): the raw reference reads it, then
        it becomes pgBackRest's source."""
        mkdir_for(self.pgbr_dir, self.run_as, 0o755)
        t0 = time.monotonic()
        run_cmd(["cp", "-a", self.node.data_dir, self.pgbr_data], self.run_as, timeout=1800)
        log(f"copied the stopped data directory to {self.pgbr_data} in {time.monotonic() - t0:.1f} s")

    def idle_cpu(self, seconds: float = 15.0) -> None:
        """CPU used by the idle hakeeper cluster (agent, etcd): it runs beside every measurement."""
        pids = {"agent": self.cluster.agents["node1"].pid, "etcd": self.cluster.etcd.pid}
        if None in pids.values():
            return
        before = {k: proc_cpu_s(p) for k, p in pids.items() if p}
        puts0 = etcd_puts(self.cluster)
        t0 = time.monotonic()
        time.sleep(seconds)
        el = time.monotonic() - t0
        use = {k: (proc_cpu_s(p) - before[k]) / el for k, p in pids.items() if p}
        puts1 = etcd_puts(self.cluster)
        self.res.dataset["idle_cpu"] = {k: round(v, 3) for k, v in use.items()}
        rate = (puts1 - puts0) / el if puts0 is not None and puts1 is not None else None
        self.res.dataset["idle_etcd_puts_per_s"] = rate
        note = (
            "The idle hakeeper cluster (1 agent + 1 etcd, no client) used "
            f"{use['agent'] * 100:.0f} % of a core (agent) and {use['etcd'] * 100:.0f} % (etcd) over "
            f"{el:.0f} s, from /proc after the restart"
            + (f", while etcd served {rate:.0f} Put requests/s (`etcd_mvcc_put_total`)" if rate else "")
            + "; it runs beside every measurement (the raw reference, pgBackRest and hakeeper alike)."
        )
        self.res.notes.append(note)
        log(note)

    def raw_reference(self) -> None:
        ra = self.run_as
        src = self.pgbr_data  # the stopped copy: identical to the hakeeper node's data directory
        raw = mkdir_for(self.work / "raw", ra, 0o755)
        out = raw / "raw.tar.zst"
        q = shlex.quote
        for i in range(1, self.args.runs + 1):
            out.unlink(missing_ok=True)
            t0 = time.monotonic()
            bash(f"tar -C {q(str(src))} -cf - . | zstd -q -T{PARALLEL} -{ZSTD_LEVEL} -o {q(str(out))}", ra)
            self.res.add("raw_backup", {"run": i, "s": time.monotonic() - t0, "bytes": out.stat().st_size})
            t0 = time.monotonic()
            bash(f"tar -C {q(str(src))} -cf - . | cat > /dev/null", ra)
            self.res.add("raw_read", {"run": i, "s": time.monotonic() - t0})
        for i in range(1, self.args.runs + 1):
            target = raw / "extract"
            rmtree(target)
            mkdir_for(target, ra)
            t0 = time.monotonic()
            bash(f"zstd -q -d -T{PARALLEL} -c {q(str(out))} | tar -C {q(str(target))} -xf -", ra)
            self.res.add("raw_restore", {"run": i, "s": time.monotonic() - t0})
        rmtree(raw)
        if self.args.skip_pgbackrest:
            rmtree(self.pgbr_data)

    # ----------------------------------------------------------------- pgBackRest

    def pgbr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run_cmd(
            ["pgbackrest", f"--config={self.pgbr_conf}", f"--stanza={STANZA}", *args],
            self.run_as,
            timeout=timeout,
        )

    def setup_pgbackrest(self) -> None:
        ra = self.run_as
        for sub in pgbr.SUBDIRS:
            mkdir_for(self.pgbr_dir / sub, ra)
        self.pgbr_conf.write_text(
            pgbr.conf_text(
                self.pgbr_dir,
                STANZA,
                self.pgbr_data,
                self.ports.pgbr_source,
                process_max=PARALLEL,
                compress_level=ZSTD_LEVEL,
            )
        )
        self.pgbr_conf.chmod(0o644)
        d = self.pgbr_data
        for name in ("standby.signal", "recovery.signal", "postmaster.pid"):
            (d / name).unlink(missing_ok=True)
        with open(d / "postgresql.auto.conf", "a") as f:
            f.write(
                pgbr.source_settings(
                    self.pgbr_conf,
                    STANZA,
                    self.ports.pgbr_source,
                    self.pgbr_sock,
                    "bench/backup.py: this copy is pgBackRest's source",
                )
            )
        self.tracker.add_pgdata(d)
        run_cmd(
            [pg_program("pg_ctl"), "start", "-D", d, "-l", self.pgbr_dir / "source.log", "-w", "-t", "120"],
            ra,
            timeout=150,
        )
        self.pgbr("stanza-create")
        self.pgbr("check")
        log(f"pgBackRest source running on port {self.ports.pgbr_source}, stanza {STANZA} created")

    def pgbr_backup(self, i: int) -> None:
        t0 = time.monotonic()
        self.pgbr("backup", "--type=full")
        el = time.monotonic() - t0
        info = json.loads(self.pgbr("info", "--output=json").stdout)
        last = info[0]["backup"][-1]
        self.res.add(
            "pgbr_backup",
            {"run": i, "s": el, "bytes": last["info"]["repository"]["delta"], "label": last["label"]},
        )

    def pgbr_restore(self, i: int, kind: str, target_time: str | None = None) -> None:
        ra = self.run_as
        target = self.restore_dir / f"pgbr-{kind}-{i}"
        rmtree(target)
        mkdir_for(target, ra)
        logfile = self.restore_dir / f"pgbr-{kind}-{i}.log"
        sock = mkdir_for(self.restore_dir / f"pgbr-{kind}-{i}.sock", ra)
        self.tracker.add_pgdata(target)
        extra = ["--type=time", f"--target={target_time}", "--target-action=promote"] if target_time else []
        wall0 = time.time()
        t0 = time.monotonic()
        self.pgbr("restore", f"--pg1-path={target}", "--archive-mode=off", *extra)
        t1 = time.monotonic()
        start_pg(target, ra, self.ports.pgbr_restore, sock, logfile, wait=False)
        off, t2 = wait_writable_or_log(self.ports.pgbr_restore, self.password, target, logfile)
        row = {
            "run": i,
            "copy_s": t1 - t0,
            "total_s": t2 - t0,
            "start_to_write_s": t2 - t1,
            "recovery_off_to_write_s": t2 - off,
        }
        row.update(self.check_restored(self.ports.pgbr_restore, target_time))
        stop_pg(target, ra, mode="immediate")
        # Read after the stop: the postmaster may log "ready to accept connections" after the
        # first INSERT already committed.
        row.update(log_phases(logfile, wall0))
        self.reap_helpers(target, f"pgbr_{kind} #{i}")
        self.res.add(f"pgbr_{kind}", row)
        rmtree(target)
        rmtree(sock)

    # ----------------------------------------------------------------- hakeeper

    def hk(self, *args: str | Path, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return run_cmd([*self.hk_cli, *map(str, args)], None, timeout=timeout)

    def hk_backup(self, i: int) -> None:
        t0 = time.monotonic()
        r = self.hk(
            "backup", "create", "-c", self.node.config_path, "--repo", REPO_NAME,
            "--from", "primary", "--parallel", str(PARALLEL), "-o", "json",
        )  # fmt: skip
        el = time.monotonic() - t0
        rec = parse_json(r.stdout)
        row: dict[str, Any] = {"run": i, "s": el, "bytes": rec.get("stored_size")}
        for k in ("seconds_copy", "seconds_wal_wait", "size", "files", "id"):
            if k in rec:
                row[k] = rec[k]
        self.res.add("hk_backup", row)

    def hk_restore(self, i: int, kind: str, target_time: str | None = None) -> None:
        target = self.restore_dir / f"hk-{kind}-{i}"
        rmtree(target)
        self.tracker.add_pgdata(target)
        how = ["--target-time", target_time] if target_time else ["--latest"]
        wall0 = time.time()
        t0 = time.monotonic()
        r = self.hk(
            "restore", "-c", self.node.config_path, "--data-dir", target, *how,
            "--start", "--port", str(self.ports.hk_restore), "--parallel", str(PARALLEL), "-o", "json",
        )  # fmt: skip
        t1 = time.monotonic()
        off, t2 = wait_writable_or_log(self.ports.hk_restore, self.password, target, None)
        row: dict[str, Any] = {
            "run": i,
            "cmd_s": t1 - t0,
            "total_s": t2 - t0,
            "cmd_to_write_s": t2 - t1,
            "recovery_off_to_write_s": t2 - off,
        }
        secs = parse_json(r.stdout).get("seconds") or {}
        for k, v in secs.items():
            if isinstance(v, int | float):
                row[f"hk_{k}_s"] = v
        row.update(self.check_restored(self.ports.hk_restore, target_time))
        stop_pg(target, self.run_as, mode="immediate")
        row.update(log_phases(find_pg_log(target), wall0))
        self.reap_helpers(target, f"hk_{kind} #{i}")
        self.res.add(f"hk_{kind}", row)
        rmtree(target)

    def reap_helpers(self, target: Path, what: str) -> None:
        """Processes a restored server left behind (e.g. a detached restore_command helper):
        found by the restore directory in their command line, stopped by PID, and noted."""
        time.sleep(0.2)
        left = processes_mentioning(str(target))
        for pid, cmd in left:
            self.tracker.seen_pids.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            note = f"{what}: a process outlived the stopped restored server and was killed: {cmd[:160]}"
            self.res.notes.append(note)
            log(note)

    # ----------------------------------------------------------------- checks, loads

    def check_restored(self, port: int, target_time: str | None) -> dict[str, Any]:
        """Timeline of the restored server; with a target, its pgbench_history rows up to it."""
        out: dict[str, Any] = {}
        with psycopg.connect(dsn(port, self.password, DB), autocommit=True) as c:
            row = c.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
            out["timeline"] = row[0] if row else None
            if target_time is not None:
                row = c.execute(
                    "SELECT count(*) FROM pgbench_history WHERE mtime <= %s::timestamptz", (target_time,)
                ).fetchone()
                out["rows_to_target"] = row[0] if row else None
        return out

    def write_load(
        self,
        tool: str,
        port: int,
        data_dir: Path,
        repo_ctime: Callable[[str], int | None],
        metrics_url: str | None = None,
    ) -> str:
        """pgbench on one source for LOAD_S; archive latency of every segment; a target time at
        TARGET_AT_S.  Returns the target time."""
        hist0 = scrape_histogram(metrics_url, AGENT_LATENCY_METRIC) if metrics_url else None
        sampler = ArchiveSampler(data_dir / "pg_wal" / "archive_status")
        sampler.start()
        lsn0 = sql(port, self.password, "SELECT pg_current_wal_lsn()::text")
        argv = [
            pg_program("pgbench"), "-h", HOST, "-p", str(port), "-U", SUPERUSER,
            *PGBENCH_LOAD, "-T", str(LOAD_S), DB,
        ]  # fmt: skip
        log(f"{tool}: write load {shlex.join(argv)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            env=child_env(RunAs(), {"PGPASSWORD": self.password}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",
        )
        self.tracker.procs.append(proc)
        time.sleep(max(0.0, TARGET_AT_S - (time.monotonic() - t0)))
        target = sql(
            port,
            self.password,
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
        )
        out, _ = proc.communicate(timeout=LOAD_S + 120)
        load_s = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchError(f"pgbench exited {proc.returncode}: {out[-1000:]}")
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        lsn1 = sql(port, self.password, "SELECT pg_current_wal_lsn()::text")
        wal_bytes = sql(port, self.password, "SELECT pg_wal_lsn_diff(%s, %s)::bigint", params=(lsn1, lsn0))
        last_seg = sql(port, self.password, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        sql(port, self.password, "SELECT pg_switch_wal()")
        t_sw = time.monotonic()
        while True:
            archived = sql(port, self.password, "SELECT last_archived_wal FROM pg_stat_archiver")
            if archived is not None and archived[:24] >= last_seg:
                break
            if time.monotonic() - t_sw > 300:
                raise BenchError(f"{tool}: {last_seg} not archived 300 s after the load")
            time.sleep(0.1)
        drain_s = time.monotonic() - t_sw
        sampler.stop()
        hist1 = scrape_histogram(metrics_url, AGENT_LATENCY_METRIC) if metrics_url else None
        rows = sql(
            port,
            self.password,
            "SELECT count(*) FROM pgbench_history WHERE mtime <= %s::timestamptz",
            DB,
            (target,),
        )
        segs = sampler.segments()
        done_ms, repo_ms, missing_done, missing_repo = [], [], 0, 0
        per_seg = []
        for s in segs:
            r_ns = sampler.ready_ns[s]
            d_ns = sampler.done_ns.get(s)
            o_ns = repo_ctime(s)
            if d_ns is None:
                missing_done += 1
            else:
                done_ms.append((d_ns - r_ns) / 1e6)
            if o_ns is None:
                missing_repo += 1
            else:
                repo_ms.append((o_ns - r_ns) / 1e6)
            per_seg.append({"seg": s, "ready_ns": r_ns, "done_ns": d_ns, "repo_ns": o_ns})
        result = {
            "tool": tool,
            "load_s": round(load_s, 1),
            "tps": float(tps.group(1)) if tps else None,
            "wal_bytes": int(wal_bytes),
            "target_time": target,
            "rows_to_target_source": rows,
            "last_segment_archived_after_switch_s": round(drain_s, 2),
            "max_ready_backlog": sampler.max_ready,
            "ready_to_done": latency_stats(done_ms),
            "ready_to_repo": latency_stats(repo_ms),
            "agent_histogram": histogram_delta(hist0, hist1),
            "segments_without_done": missing_done,
            "segments_without_repo_object": missing_repo,
            "segments": per_seg,
        }
        self.res.loads[tool] = result
        log(
            f"{tool}: {result['tps']} tps, WAL {wal_bytes / 2**20:.0f} MiB, target {target} ({rows} rows), "
            f".ready->.done {result['ready_to_done']}, .ready->repo {result['ready_to_repo']}, "
            f"max backlog {sampler.max_ready}"
        )
        return str(target)

    def hk_repo_ctime(self, seg: str) -> int | None:
        try:
            return (self.hk_repo / SCOPE / "wal" / seg).stat().st_ctime_ns
        except OSError:
            return None

    def pgbr_repo_ctime(self, seg: str) -> int | None:
        found = list((self.pgbr_repo / "archive" / STANZA).glob(f"*/{seg[:16]}/{seg}-*"))
        return found[0].stat().st_ctime_ns if found else None

    # ----------------------------------------------------------------- the whole run

    def run(self) -> None:
        hk_on = not self.args.skip_hakeeper
        pgbr_on = not self.args.skip_pgbackrest
        if hk_on:
            self.check_hakeeper_commands()
        self.create_dataset()
        self.stop_cluster()
        self.copy_data()
        hk_measured = hk_on and self.hk_available
        if hk_measured:
            self.restart_hakeeper_cluster()
        log("raw reference on the stopped copy: tar | zstd, tar | cat, zstd -d | tar -x")
        self.raw_reference()
        if pgbr_on:
            self.setup_pgbackrest()
        tools: list[str] = [t for t, on in (("hk", hk_measured), ("pgbr", pgbr_on)) if on]
        if not tools:
            return
        self.measure(tools)
        self.repo_checks(hk_measured, pgbr_on)

    def check_hakeeper_commands(self) -> None:
        compile_hakeeper()
        self.hk_available = hakeeper_commands_available(self.hk_cli)
        if not self.hk_available:
            self.res.missing.append(
                "hakeeper's `backup create` / `restore` commands are not available in this checkout: "
                "hakeeper rows not measured"
            )
            log(self.res.missing[-1])

    def restart_hakeeper_cluster(self) -> None:
        log("starting the hakeeper cluster again")
        self.cluster.start()
        self.cluster.wait_ready(180)
        self.wait_archive_idle(self.node.data_dir, "hakeeper (after restart)", 300)
        self.idle_cpu()

    def measure(self, tools: list[str]) -> None:
        """Backups, restores, a write load and PITR restores for each tool in ``tools`` ("hk",
        "pgbr"), alternating which tool goes first from one run to the next."""
        runs = range(1, self.args.runs + 1)

        def order(i: int) -> list[str]:
            return tools if i % 2 else list(reversed(tools))

        log("full backups")
        for i in runs:
            for t in order(i):
                self.hk_backup(i) if t == "hk" else self.pgbr_backup(i)
        log("restores of the newest backup, to first write")
        for i in runs:
            for t in order(i):
                self.hk_restore(i, "restore") if t == "hk" else self.pgbr_restore(i, "restore")
        targets: dict[str, str] = {}
        if "hk" in tools:
            targets["hk"] = self.write_load(
                "hk",
                self.ports.hk_pg,
                self.node.data_dir,
                self.hk_repo_ctime,
                self.node.api_url + "/metrics",
            )
        if "pgbr" in tools:
            targets["pgbr"] = self.write_load(
                "pgbr", self.ports.pgbr_source, self.pgbr_data, self.pgbr_repo_ctime
            )
        log("PITR restores to the target time, to first write")
        for i in runs:
            for t in order(i):
                if t == "hk":
                    self.hk_restore(i, "pitr", targets["hk"])
                else:
                    self.pgbr_restore(i, "pitr", targets["pgbr"])

    def repo_checks(self, hk_on: bool, pgbr_on: bool) -> None:
        """A restored copy must never archive into the source's repository: no WAL or history
        file of a timeline newer than the source's may be there."""
        q = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
        if hk_on:
            tli = int(sql(self.ports.hk_pg, self.password, q))
            names = [p.name for p in (self.hk_repo / SCOPE / "wal").iterdir()]
            self.res.checks.append(timeline_check("hakeeper", tli, names))
        if pgbr_on:
            tli = int(sql(self.ports.pgbr_source, self.password, q))
            names = [p.name for p in (self.pgbr_repo / "archive" / STANZA).glob("*/*")]
            names += [p.name for p in (self.pgbr_repo / "archive" / STANZA).glob("*/*/*")]
            self.res.checks.append(timeline_check("pgBackRest", tli, names))
        if hk_on and pgbr_on:
            self.res.notes.append(
                "The hakeeper source runs on a newer timeline than pgBackRest's copy: after the stop for "
                "the copy, the agent starts the single node as a replica and promotes it (a "
                "new timeline, same data); pgBackRest's copy was started as a plain server."
            )
        for c in self.res.checks:
            log(c)

    def cleanup(self) -> list[str]:
        self.tracker.seen_pids.update(pid for _w, pid in self.cluster.processes())
        self.tracker.stop_all()
        self.cluster.stop()
        left = [f"{w} (pid {p})" for w, p in self.cluster.processes()]
        left += [f"pid {p}" for p in self.tracker.seen_pids if pid_alive(p)]
        left += [f"postgres in {d}" for d in self.tracker.pgdata if postmaster_pid(d) is not None]
        left += [f"pid {pid}: {cmd[:100]}" for pid, cmd in processes_mentioning(str(self.work))]
        return sorted(set(left))


def etcd_puts(cluster: LocalCluster) -> float | None:
    # The cluster's etcd wants its client certificate (LocalCluster runs etcd over TLS).
    sec = cluster.etcd_security
    ctx = sec.ssl_context() if sec is not None else None
    try:
        with urllib.request.urlopen(cluster.etcd.url + "/metrics", timeout=5, context=ctx) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^etcd_mvcc_put_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes (not us) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmd = " ".join(proc_cmdline(int(entry)))
            if text in cmd and pid_alive(int(entry)):
                found.append((int(entry), cmd))
    return found


def timeline_check(tool: str, source_tli: int, names: Sequence[str]) -> str:
    newer = sorted(n for n in names if re.match(r"^[0-9A-F]{8}", n) and int(n[:8], 16) > source_tli)
    where = f"{tool} repository (source on timeline {source_tli})"
    if newer:
        return f"{where}: **WAL of newer timelines, archived by a restored copy**: {', '.join(newer[:8])}"
    return f"{where}: no WAL of a newer timeline (no restored copy archived into it)"


def parse_json(text: str) -> dict[str, Any]:
    """The JSON document a ``-o json`` command printed (empty if there is none)."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def scrape_histogram(url: str, name: str) -> dict[str, float] | None:
    """``{le: cumulative count, ..., "sum": s, "count": n}`` of a Prometheus histogram at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            m = re.search(r'le="([^"]+)"\}\s+(\S+)', line)
            if m:
                out[m.group(1)] = float(m.group(2))
        elif line.startswith(name + "_sum"):
            out["sum"] = float(line.split()[-1])
        elif line.startswith(name + "_count"):
            out["count"] = float(line.split()[-1])
    return out or None


def histogram_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """Count, mean and the bucket bound that holds the 99th percentile, of what was observed
    between two scrapes."""
    if not after:
        return {}
    b = before or {}
    d = {k: v - b.get(k, 0.0) for k, v in after.items()}
    n = d.get("count", 0.0)
    if n <= 0:
        return {"n": 0}
    bounds = sorted((float(k), v) for k, v in d.items() if k not in ("sum", "count") and k != "+Inf")
    p99 = next((le for le, c in bounds if c >= 0.99 * n), math.inf)
    p50 = next((le for le, c in bounds if c >= 0.5 * n), math.inf)
    return {
        "n": int(n),
        "mean_ms": round(d["sum"] / n * 1000, 1),
        "p50_le_ms": p50 * 1000,
        "p99_le_ms": p99 * 1000,
    }


def find_pg_log(data_dir: Path) -> Path | None:
    for cand in [data_dir / "log" / "postgresql.log", *sorted(data_dir.glob("log/*.log"))]:
        if cand.exists():
            return cand
    return None


def hakeeper_cli() -> list[str]:
    exe = Path(sys.executable).parent / "hakeeper"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "hakeeper"]


def compile_hakeeper() -> None:
    """Write hakeeper's bytecode (``__pycache__``) before anything is timed.

    An installed package has it (pip compiles at install time); an editable checkout writes it on
    first use, unless PYTHONDONTWRITEBYTECODE is set, as in some CI and development shells.  There
    every CLI call would compile hakeeper's sources again (~0.1 s), which no user pays."""
    pkg = REPO_ROOT / "hakeeper"
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(pkg)], capture_output=True, check=False, timeout=300
    )


def hakeeper_commands_available(cli: list[str]) -> bool:
    for sub in (["backup", "create", "--help"], ["restore", "--help"]):
        r = run_cmd([*cli, *sub], None, timeout=60, check=False)
        if r.returncode != 0:
            return False
    return True


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return ((r.stdout or r.stderr).strip().splitlines() or ["unknown"])[0]


def disk_facts(path: Path) -> str:
    src = tool_version(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)])
    dev = src.split()[0] if src and not src.startswith("unknown") else ""
    name = Path(dev).name
    rot = Path(f"/sys/block/{name}/queue/rotational")
    kind = ""
    with contextlib.suppress(OSError):
        kind = "rotational" if rot.read_text().strip() == "1" else "non-rotational"
    size = tool_version(["lsblk", "-dn", "-o", "SIZE", dev]) if dev else ""
    return f"{src} ({', '.join(x for x in (size, kind) if x)})" if src else "unknown"


# --------------------------------------------------------------------------------- report

MiB = 2**20

ROW_SPECS: list[tuple[str, str, str, str]] = [
    # (section, label, op, value key)
    (
        "Raw reference (stopped copy of the data directory, as the PostgreSQL OS user)",
        "`tar -cf - . \\| zstd -q -T2 -3 -o F`",
        "raw_backup",
        "s",
    ),
    ("", "`tar -cf - . \\| cat > /dev/null` (read floor)", "raw_read", "s"),
    ("", "`zstd -q -d -T2 -c F \\| tar -xf -` (restore reference)", "raw_restore", "s"),
    ("Full backup (running server)", "hakeeper `backup create --repo local`", "hk_backup", "s"),
    ("", "pgBackRest `backup --type=full`", "pgbr_backup", "s"),
    (
        "Restore of the newest backup, to first successful write",
        "hakeeper `restore --latest --start`: command",
        "hk_restore",
        "cmd_s",
    ),
    ("", "hakeeper: **total** (command + until writable)", "hk_restore", "total_s"),
    ("", "pgBackRest `restore`: file copy", "pgbr_restore", "copy_s"),
    ("", "pgBackRest: **total** (restore + `pg_ctl start` + until writable)", "pgbr_restore", "total_s"),
    (
        "PITR to a time 30 s into a 60 s pgbench load, to first successful write",
        "hakeeper `restore --target-time T --start`: command",
        "hk_pitr",
        "cmd_s",
    ),
    ("", "hakeeper: **total**", "hk_pitr", "total_s"),
    ("", "pgBackRest `restore --type=time --target-action=promote`: file copy", "pgbr_pitr", "copy_s"),
    ("", "pgBackRest: **total**", "pgbr_pitr", "total_s"),
]


def med(res: Results, op: str, key: str) -> float | None:
    vals = [r[key] for r in res.rows.get(op, []) if isinstance(r.get(key), int | float)]
    return statistics.median(vals) if vals else None


def _mib(n: Any) -> str:
    return f"{n / MiB:,.0f} MiB" if isinstance(n, int | float) else "-"


def results_table(res: Results) -> list[str]:
    basis = res.dataset.get("data_dir_bytes")
    out = [
        "| operation | n | min s | **median s** | max s | MiB/s @median | stored |",
        "|---|---|---|---|---|---|---|",
    ]
    for section, label, op, key in ROW_SPECS:
        vals = [r[key] for r in res.rows.get(op, []) if isinstance(r.get(key), int | float)]
        if section:
            out.append(f"| **{section}** | | | | | | |")
        if not vals:
            out.append(f"| {label} | 0 | - | - | - | - | not measured |")
            continue
        s = stats(vals)
        rate = f"{basis / MiB / s['median']:,.0f}" if basis and s["median"] > 0 else "-"
        sizes = [r["bytes"] for r in res.rows[op] if isinstance(r.get("bytes"), int)]
        stored = _mib(statistics.median(sizes)) if sizes and key in ("s",) else ""
        out.append(
            f"| {label} | {len(vals)} | {s['min']:.2f} | **{s['median']:.2f}** | {s['max']:.2f} "
            f"| {rate} | {stored} |"
        )
    return out


def verdicts(res: Results) -> list[str]:
    out = []
    tar_b, hk_b, br_b = med(res, "raw_backup", "s"), med(res, "hk_backup", "s"), med(res, "pgbr_backup", "s")
    if hk_b and tar_b:
        ratio = tar_b / hk_b
        ok = "**met**" if ratio >= BACKUP_TARGET_RATIO else "**not met**"
        out.append(
            f"- Backup throughput vs `tar | zstd -T2 -3`: {tar_b:.2f} s / {hk_b:.2f} s = "
            f"**{ratio:.2f}x** (target >= {BACKUP_TARGET_RATIO}x): {ok}."
        )
    if hk_b and br_b:
        ok = "**met**" if hk_b <= br_b else "**not met**"
        out.append(
            f"- Backup vs pgBackRest (process-max=2, zstd 3): hakeeper {hk_b:.2f} s, pgBackRest {br_b:.2f} s "
            f"(hakeeper takes {hk_b / br_b:.2f}x the time; target: no slower): {ok}."
        )
    hk_p, br_p = med(res, "hk_pitr", "total_s"), med(res, "pgbr_pitr", "total_s")
    if hk_p and br_p:
        ok = "**met**" if hk_p <= br_p else "**not met**"
        out.append(
            f"- PITR restore to first write vs pgBackRest: hakeeper {hk_p:.2f} s, pgBackRest {br_p:.2f} s "
            f"({hk_p / br_p:.2f}x; target: no slower): {ok}."
        )
    hk_r, br_r, raw_r = (
        med(res, "hk_restore", "total_s"),
        med(res, "pgbr_restore", "total_s"),
        med(res, "raw_restore", "s"),
    )
    if hk_r and br_r:
        out.append(
            f"- Restore of the newest backup to first write (no target in the issue): hakeeper {hk_r:.2f} s, "
            f"pgBackRest {br_r:.2f} s ({hk_r / br_r:.2f}x)"
            + (f"; the raw `zstd -d | tar -x` alone takes {raw_r:.2f} s." if raw_r else ".")
        )
    hk_c, br_c = med(res, "hk_restore", "hk_fetch_decompress_s"), med(res, "pgbr_restore", "copy_s")
    if raw_r and (hk_c or br_c):
        parts = []
        if hk_c:
            parts.append(f"hakeeper fetch + decompress {hk_c:.2f} s (throughput {raw_r / hk_c:.2f}x of it)")
        if br_c:
            parts.append(f"pgBackRest file copy {br_c:.2f} s ({raw_r / br_c:.2f}x)")
        out.append(
            f"- Restore copy phase vs `zstd -d | tar -x` ({raw_r:.2f} s; no target in the issue): "
            + ", ".join(parts)
            + "."
        )
    hk_l = res.loads.get("hk", {}).get("ready_to_done", {})
    if hk_l.get("n"):
        out.append(
            "- Archive latency under load (hakeeper, `.ready` -> `.done`): "
            f"p99 **{hk_l['p99_ms']:.0f} ms** over "
            f"{hk_l['n']} segments (p50 {hk_l['p50_ms']:.0f} ms, max {hk_l['max_ms']:.0f} ms)."
        )
    return out


def load_table(res: Results) -> list[str]:
    names = {"hk": "hakeeper (agent's archiver)", "pgbr": "pgBackRest `archive-push` (sync)"}
    out = [
        "| archiving | segments | WAL MiB/s | pgbench tps | `.ready`→`.done` p50 / p90 / **p99** / max ms "
        "| `.ready`→object in repo p50 / p99 / max ms | max `.ready` backlog "
        "| last segment archived after `pg_switch_wal()` | agent's histogram: n, mean, p50 / p99 bucket |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tool, ld in res.loads.items():
        d, r = ld["ready_to_done"], ld["ready_to_repo"]
        dd = (
            f"{d['p50_ms']:.0f} / {d['p90_ms']:.0f} / **{d['p99_ms']:.0f}** / {d['max_ms']:.0f}"
            if d.get("n")
            else "-"
        )
        rr = f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f}" if r.get("n") else "-"
        rate = ld["wal_bytes"] / MiB / ld["load_s"] if ld["load_s"] else 0
        tps = f"{ld['tps']:.0f}" if ld["tps"] else "-"
        out.append(
            f"| {names.get(tool, tool)} | {d.get('n', 0)} | {rate:.1f} | {tps} | {dd} | {rr} "
            f"| {ld['max_ready_backlog']} | {ld['last_segment_archived_after_switch_s']:.2f} s "
            f"| {agent_hist(ld.get('agent_histogram') or {})} |"
        )
    return out


def agent_hist(h: dict[str, Any]) -> str:
    if not h.get("n"):
        return "-"
    return f"{h['n']}, {h['mean_ms']:.0f} ms, <= {h['p50_le_ms']:.0f} / <= {h['p99_le_ms']:.0f} ms"


def phase_table(res: Results) -> list[str]:
    names = {
        "hk_restore": "hakeeper restore --latest",
        "pgbr_restore": "pgBackRest restore",
        "hk_pitr": "hakeeper PITR",
        "pgbr_pitr": "pgBackRest PITR",
    }
    keys = [
        ("copy_s", "restore copy"),
        ("cmd_s", "restore command"),
        ("start_to_redo_s", "PG start → redo starts"),
        ("replay_s", "redo starts → redo done (fetch + replay)"),
        ("redo_done_to_ready_s", "redo done → ready (end-of-recovery checkpoint)"),
        ("recovery_off_to_write_s", "recovery off → INSERT committed"),
        ("total_s", "total to first write"),
    ]
    out = ["| restore | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for op, name in names.items():
        rows = res.rows.get(op)
        if not rows:
            continue
        cells = []
        for k, _ in keys:
            vals = [r[k] for r in rows if isinstance(r.get(k), int | float)]
            cells.append(
                "/".join(f"{v:.2f}" for v in (min(vals), statistics.median(vals), max(vals))) if vals else "-"
            )
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def hk_split_table(res: Results) -> list[str]:
    """hakeeper's own timing split, from its ``-o json`` output (min/median/max s)."""
    specs = [
        ("hk_backup", "backup create", ["seconds_copy", "seconds_wal_wait"]),
        ("hk_restore", "restore --latest", ["hk_plan_s", "hk_fetch_decompress_s", "hk_wal_replay_s",
                                            "hk_promote_s", "hk_total_s"]),
        ("hk_pitr", "restore --target-time", ["hk_plan_s", "hk_fetch_decompress_s", "hk_wal_replay_s",
                                              "hk_promote_s", "hk_total_s"]),
    ]  # fmt: skip
    out = []
    for op, name, keys in specs:
        rows = res.rows.get(op)
        if not rows:
            continue
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if isinstance(r.get(k), int | float)]
            if vals:
                lo, mid, hi = min(vals), statistics.median(vals), max(vals)
                cells.append(f"{k.removeprefix('hk_').removesuffix('_s')} {lo:.2f}/{mid:.2f}/{hi:.2f}")
        if cells:
            out.append(f"- `{name}`: " + "; ".join(cells))
    return out


def runs_lines(res: Results) -> list[str]:
    out = []
    for op, rows in res.rows.items():
        key = "s" if "s" in rows[0] else "total_s"
        vals = ", ".join(f"{r[key]:.2f}" for r in rows)
        extra = ""
        if any("rows_to_target" in r for r in rows):
            extra = "; rows up to the target: " + ", ".join(str(r.get("rows_to_target")) for r in rows)
        if any("timeline" in r for r in rows):
            extra += "; timeline: " + ", ".join(str(r.get("timeline")) for r in rows)
        out.append(f"- `{op}` ({key}, in run order): {vals}{extra}")
    return out


def setup_lines(res: Results, args: argparse.Namespace) -> list[str]:
    f, ds = res.facts, res.dataset
    params = ", ".join(f"`{k}={v}`" for k, v in PG_PARAMETERS.items() if k != "wal_recycle")
    data = (
        f"data directory {ds.get('data_dir_bytes', 0):,} B ({_mib(ds.get('data_dir_bytes'))}; "
        f"base/ {_mib(ds.get('base_bytes'))}, pg_wal/ {_mib(ds.get('pg_wal_bytes'))}, "
        f"{ds.get('files', '?')} files)"
    )
    bullets = [
        f"**Data**: `pgbench -i -s {ds.get('scale')} -q` ({ds.get('pgbench_init_s', '?')} s) on a 1-node "
        "hakeeper cluster (`LocalCluster`: etcd + agent; hakeeper's default initdb, data checksums on), "
        f"then `CHECKPOINT`. Database {_mib(ds.get('db_bytes'))}; {data}. "
        "MiB/s below = data-directory bytes / median seconds, for every row.",
        "**PostgreSQL settings** (both sources, from the same postgresql.conf): hakeeper's defaults plus "
        f"{params} (`wal_recycle=off` during `pgbench -i` only, as in the baseline).",
        "**Same data for both tools**: after the load the cluster is stopped and its data directory "
        "copied with `cp -a` (untimed; an exact copy: same data, same system identifier, same "
        "postgresql.conf). The hakeeper cluster is started again (its agent archives into the filesystem "
        "repository); the raw reference then reads the stopped copy, with the hakeeper cluster idling "
        "beside it as during every other measurement. The copy then becomes pgBackRest's source, a plain "
        "PostgreSQL on its own port with `archive_command = 'pgbackrest ... archive-push %p'`. Both "
        "sources run side by side, idle except for the tool under test; each tool backs up and archives "
        "its own copy. Two copies rather than one cluster switched between the tools, so that each tool's "
        "WAL archive stays complete and untouched by the other (PITR needs it).",
        f"**hakeeper**: node config `backup: {{repositories: [{{name: {REPO_NAME}, type: fs, path: ...}}]}}` "
        f"and `archive: {{compression_level: {ZSTD_LEVEL}}}` (WAL at level 3 like pgBackRest; hakeeper's "
        "default for WAL is 1) and `row_counts: {enabled: false}` (the per-table row counts recorded "
        "for restore drills read every table on the primary after the copy; pgBackRest has no "
        "counterpart), defaults otherwise (backups compressed by the server at zstd level 3, "
        "archiver `parallel: 4`); "
        "commands run as root, as the agent "
        f"does, with `-o json` (no progress bars): `hakeeper backup create -c node1.yml --repo {REPO_NAME} "
        f"--from primary --parallel {PARALLEL}` and `hakeeper restore -c node1.yml --data-dir DIR "
        f"--latest | --target-time T --start --port P --parallel {PARALLEL}` (its default is 3). "
        "`restore` itself starts the server and waits until it left recovery; before planning it runs "
        "`pg_switch_wal()` on the cluster's primary (found through etcd) and waits until that segment is "
        "archived, so `--latest` includes the WAL of the moment (pgBackRest restores what is already "
        "archived). The agent's archive_command is a shell script that waits for the agent's marker "
        "(polling every 50 ms); the agent's own latency histogram (`hakeeper_archive_latency_seconds` "
        "on `/metrics`, `.ready` mtime to marker) is shown next to the file-time measurement.",
        f"**pgBackRest** ({f.get('pgbackrest', '')}, Debian package), as the PostgreSQL OS user, posix "
        f"repository on the same disk: `process-max={PARALLEL} compress-type=zst "
        f"compress-level={ZSTD_LEVEL} start-fast=y archive-async=n repo1-retention-full=100`; restores "
        "with `--archive-mode=off`, PITR with `--type=time --target=T --target-action=promote`; the copy "
        "is started with `pg_ctl start -W -o '-p P -c archive_mode=off ...'`.",
        f"**Raw reference**: `tar -C DATA -cf - . | zstd -q -T{PARALLEL} -{ZSTD_LEVEL} -o F` of the "
        "stopped data directory, and `zstd -q -d -T2 -c F | tar -C EMPTY -xf -`; no fsync (pgBackRest "
        "fsyncs every file it restores).",
        f"**Runs**: {args.runs} of each; backups, restores and PITR restores interleaved (hakeeper, "
        "pgBackRest; then pgBackRest, hakeeper; ...). Restores go to a fresh directory each time.",
        "**Time to first successful write**: from the start of the restore command until "
        "`SELECT pg_is_in_recovery()` returned false **and** an `INSERT` committed, polled every 50 ms "
        "over TCP (not `pg_ctl -w`, which returns at the consistent point, long before replay ends).",
        f"**Write load, archive latency**: `pgbench {' '.join(PGBENCH_LOAD)} -T {LOAD_S}` on each source "
        f"in turn; the PITR target is `clock_timestamp()` on the server {TARGET_AT_S} s in. Latency of "
        "every segment from `pg_wal/archive_status`, sampled every 50 ms: `SEG.ready`'s mtime "
        "(PostgreSQL created it: the segment is complete) to `SEG.done`'s ctime (the rename after "
        "archive_command succeeded keeps the mtime and sets the ctime), and to the ctime of the "
        "segment's object in the repository. File times have the kernel's timestamp granularity "
        "(a few ms).",
    ]
    return [f"- {b}" for b in bullets]


def busy_note(f: dict[str, str]) -> list[str]:
    """A warning when the 1-minute load average at the start was above 1 per CPU.

    Only the start says something about other work: at the end the load average still holds
    this benchmark's own last minute (the pgbench load of the archive-latency measurement,
    restores), above 2 on 2 CPUs even on an otherwise idle machine."""
    try:
        n = int(f["nproc"])
        start = float(f["load_avg_start"].split()[0])
    except (KeyError, ValueError, IndexError):
        return []
    if start <= n:
        return []
    return [
        f"**The machine was busy with other work when this run started** (1-minute load average "
        f"{start:.1f} on {n} CPUs): absolute times are inflated; compare the tools within the run "
        "(they were interleaved).",
        "",
    ]


def machine_lines(f: dict[str, str]) -> list[str]:
    return [
        "| | |",
        "|---|---|",
        f"| date (`date -u`) | {f['date_utc']} |",
        f"| CPUs (nproc) | {f['nproc']} |",
        f"| CPU model | {f['cpu_model']} |",
        f"| memory | {f['memory']} |",
        f"| disk (work directory under {f.get('work_dir', '?')}) | {f.get('disk', '?')} |",
        f"| kernel | {f['kernel']} |",
        f"| Debian | {f['debian']} |",
        f"| PostgreSQL | {f['postgresql']} |",
        f"| pgBackRest | {f.get('pgbackrest', '?')} |",
        f"| zstd / tar | {f.get('zstd', '?')} / {f.get('tar', '?')} |",
        f"| Python | {f['python']} |",
        f"| load average at start / end | {f['load_avg_start']} / {f.get('load_avg_end', '?')} |",
        f"| hakeeper code under test | {f['hakeeper']} |",
    ]


def render_section(
    res: Results, args: argparse.Namespace, command: str, leftover: str, aborted: str | None
) -> str:
    f = res.facts
    scale = res.dataset.get("scale", args.scale)
    lines = [
        MARK_START,
        f"## Backup, restore and PITR (pgbench scale {scale})",
        "",
        f"_Generated by `bench/backup.py` on {f['date_utc']} (took {f.get('duration', '?')}); "
        f"command: `{command}`._",
        "",
    ]
    if aborted:
        lines += [f"**Run aborted: {aborted}** (the rows below are what was measured before that).", ""]
    for m in res.missing:
        lines += [f"**Missing: {m}.**", ""]
    lines += [
        "### Machine",
        "",
        *machine_lines(f),
        "",
        *busy_note(f),
        "Everything runs on this one machine (shared, noisy: a run-to-run spread of ±30 % is normal "
        f"here, see `{BASELINE_DOC}`). All reads come from the page cache (the data fits in RAM many "
        "times; caches are not dropped): the figures measure CPU, compression and the write path, not "
        "disk reads.",
        "",
        "### Setup",
        "",
        *setup_lines(res, args),
        "",
        "### Results",
        "",
        *results_table(res),
        "",
        "#### Against the targets of issue 5",
        "",
        *(verdicts(res) or ["- nothing to compare (a tool was not measured)."]),
        "",
        "#### Archive latency under a pgbench write load",
        "",
        *(load_table(res) if res.loads else ["not measured"]),
        "",
        "#### Restore phases (min/median/max s; from the PostgreSQL log where present)",
        "",
        *phase_table(res),
        "",
        "hakeeper's own split (from `-o json`; min/median/max s):",
        "",
        *(hk_split_table(res) or ["- not measured"]),
        "",
        "#### Every run",
        "",
        *runs_lines(res),
        "",
    ]
    if res.loads:
        lines += [
            "PITR correctness: `pgbench_history` rows with `mtime <= target` on the source after the load: "
            + ", ".join(f"{t} {ld['rows_to_target_source']}" for t, ld in res.loads.items())
            + " (pgbench's mtime is the transaction start, recovery stops on commit time: a difference of a "
            "few rows at the boundary is expected).",
            "",
        ]
    if (REPO_ROOT / "bench" / "archive.py").exists():
        lines += [
            "The archiver's drain throughput, its latency with S3 and fs+S3 repositories and under a "
            "bulk load are measured by `bench/archive.py` (its own section); the latency above is the "
            "same archiver inside the agent, seen from PostgreSQL, beside pgBackRest on the same data.",
            "",
        ]
    if res.checks or res.notes:
        lines += ["#### Checks and notes", ""]
        lines += [f"- {c}" for c in res.checks + res.notes]
        lines += [""]
    lines += [f"Processes left after the run: {leftover}.", "", MARK_END]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.backup", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=150, help="pgbench scale (150: ~2.3 GB)")
    p.add_argument("--runs", type=int, default=3, help="runs of every measurement (3)")
    p.add_argument("--skip-pgbackrest", action="store_true", help="do not measure pgBackRest")
    p.add_argument("--skip-hakeeper", action="store_true", help="do not measure hakeeper")
    p.add_argument("--keep", action="store_true", help="keep the work directory (data, repositories, logs)")
    p.add_argument("--write-docs", action="store_true", help="write the results into --out")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write every result as JSON")
    p.add_argument(
        "--render-json", type=Path, default=None, help="only write --out's section from an earlier --json"
    )
    p.add_argument(
        "--base-port", type=int, default=DEFAULT_BASE_PORT, help="first port (34100); uses up to +61"
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="where the work directory is made (default: /tmp)"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale < 1:
        p.error("--runs and --scale must be at least 1")
    return args


def render_json(args: argparse.Namespace) -> int:
    """Write the docs section from the JSON of an earlier run (no measurement)."""
    d = json.loads(args.render_json.read_text())
    res = Results(
        facts=d["facts"],
        dataset=d["dataset"],
        rows=d["rows"],
        loads=d["loads"],
        notes=d.get("notes", []),
        checks=d.get("checks", []),
        missing=d.get("missing", []),
    )
    args.runs = d.get("runs", args.runs)
    section = render_section(res, args, d.get("command", "?"), d.get("leftover", "?"), d.get("aborted"))
    write_section(args.out, MARK_START, MARK_END, section)
    log(f"wrote the backup section of {args.out} from {args.render_json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_json is not None:
        return render_json(args)
    command = "python -m bench.backup " + " ".join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    busy = [p for p in Ports(args.base_port).all() if not port_is_free(p)]
    if busy:
        print(f"ports in use: {busy}; pick another --base-port", file=sys.stderr)
        return 2
    if not args.skip_pgbackrest and shutil.which("pgbackrest") is None:
        print("pgbackrest not found: make bench-setup (or --skip-pgbackrest)", file=sys.stderr)
        return 2
    if shutil.which("zstd") is None:
        print("zstd not found: apt-get install -y zstd", file=sys.stderr)
        return 2
    work_parent = args.work_dir or Path("/tmp")
    # Two sources, the raw extraction and one restore at a time (~15.5 MiB per scale unit), the
    # repositories (pgbench data compresses ~20x) and the load's WAL: 4 copies and 2 GiB.
    need = int(4 * args.scale * 15.5 * 2**20) + 2 * 2**30
    free = shutil.disk_usage(work_parent).free if work_parent.is_dir() else 0
    if free < need:
        print(
            f"{work_parent} has {free / 2**30:.1f} GiB free; scale {args.scale} needs about "
            f"{need / 2**30:.1f} GiB: pass --work-dir on a larger filesystem",
            file=sys.stderr,
        )
        return 2
    if args.work_dir is None:
        work = make_base_dir("hakeeper-bench-backup-")
    else:
        work = Path(tempfile.mkdtemp(prefix="hakeeper-bench-backup-", dir=args.work_dir))
        work.chmod(0o755)  # PostgreSQL's OS user traverses it
    facts = machine_facts()
    facts.update(
        {
            "pgbackrest": tool_version(["pgbackrest", "version"]),
            "zstd": tool_version(["zstd", "--version"]).replace("*", "").strip(),
            "tar": tool_version(["tar", "--version"]),
            "disk": disk_facts(work),
            "work_dir": str(work_parent),
        }
    )
    res = Results(facts=facts)
    log(f"work dir {work}; " + ", ".join(f"{k}: {v}" for k, v in facts.items()))
    t0 = time.monotonic()
    bench = Bench(args, work, res)
    aborted: str | None = None
    code = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        aborted, code = "interrupted", 130
    except Exception as e:
        import traceback

        traceback.print_exc()
        aborted, code = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1
    finally:
        log("stopping everything we started")
        left = bench.cleanup()
        leftover = "none" if not left else ", ".join(left)
        log(f"processes left: {leftover}")
        if args.keep:
            log(f"kept {work}")
        else:
            rmtree(work)
    facts["duration"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    with contextlib.suppress(OSError):
        facts["load_avg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for line in results_table(res) + [""] + verdicts(res) + [""] + (load_table(res) if res.loads else []):
        print(line, flush=True)
    if args.write_docs and res.rows:
        write_section(args.out, MARK_START, MARK_END, render_section(res, args, command, leftover, aborted))
        log(f"wrote the backup section of {args.out}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"command": command, "runs": args.runs, "scale": args.scale,
                        "facts": facts, "dataset": res.dataset, "rows": res.rows, "loads": res.loads,
                        "notes": res.notes, "checks": res.checks, "missing": res.missing,
                        "aborted": aborted, "leftover": leftover}, indent=1, default=str)
        )  # fmt: skip
        log(f"wrote {args.json}")
    if left:
        code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
