"""Benchmark: write downtime of ``hakeeper upgrade`` 17 -> 18 (``--method link``) of a running
3-node cluster (issue 15), against PostgreSQL's documented by-hand procedure on the same data.

Everything runs on 127.0.0.1 under a fresh directory in /tmp (removed afterwards), on a free
block of ports; every process started is stopped by PID.  Per run (``--runs``, default 3):

1. A fresh 3-node LocalCluster of PostgreSQL 17 (its nodes' ``postgresql.bin_dirs`` name 18's
   build) with a filesystem backup repository, so that the whole sequence runs, including the
   base backup of the new major after the upgrade.  ``pgbench -i -s SCALE`` (17's pgbench)
   through the primary, CHECKPOINT, then a wait until both replicas replayed it.
2. A writer thread: one single-row INSERT every 20 ms through the multi-host read-write DSN
   (``LocalCluster.write_dsn()``), each acknowledged write's time recorded.  The
   **client-observed write downtime** is the longest gap between two consecutive acknowledged
   writes during the upgrade command; it does not rely on the agent's own ``downtime_s``
   (fast shutdown start -> new primary accepting writes).
3. ``hakeeper upgrade --to-version 18 --force -o json``: its ``downtime_s``, ``phases`` and each
   replica's rejoin seconds; the command's wall time.  Afterwards every node must run 18, one
   primary with both replicas streaming, and every acknowledged row must be on the new primary
   (the run fails otherwise).
4. The clone baseline: ``hakeeper reinit <replica> --force --wait`` of one replica of the
   upgraded cluster (same data), timed; the replicas' rejoin (both cloned in parallel by the
   upgrade) is reported against it.

The by-hand baseline (``--manual-runs``, default 1; no HA manager offers a one-command major
upgrade, so the peer is an operator following PostgreSQL's documentation): a standalone
PostgreSQL 17 server, initdb'd like a hakeeper node and loaded with the same ``pgbench -i -s
SCALE``; initdb of 18 with the same settings (before the stop, as the documented procedure
orders it; its time is reported apart), then, timed from the stop to the first acknowledged
INSERT: ``pg_ctl stop -m fast``, ``pg_upgrade --link``, ``pg_ctl start``, polled every 50 ms.
The binaries are run directly (no hakeeper code).

Usage::

    python -m bench.upgrade [--scale 150] [--runs 3] [--manual-runs 1] [--quick]
                            [--out docs/benchmarks.md] [--json FILE] [--no-docs]

The section between ``<!-- bench:upgrade:start -->`` and ``<!-- bench:upgrade:end -->`` of
``--out`` is written or replaced (not with ``--no-docs``; ``--quick`` never writes it).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from bench.backup import BenchError, hakeeper_cli, log, mkdir_for, run_cmd, sql
from bench.docs import write_section
from bench.failover import machine_facts, make_base_dir, pick_base_port
from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.localcluster.layout import HOST, SUPERUSER
from hakeeper.localcluster.pgbuilds import reachable_bin_dir
from hakeeper.util.proc import RunAs, children_of, pid_alive, postmaster_pid, resolve_run_as
from tests.support.load import RowWriter

REPO_ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- bench:upgrade:start -->"
MARK_END = "<!-- bench:upgrade:end -->"
OLD, NEW = 17, 18
DB = "bench"
SCOPE = "benchupg"
WRITE_EVERY = 0.02
DOWNTIME_TARGET = 15.0  # s of write downtime
REJOIN_TARGET = 2.0  # replicas' rejoin <= 2x a clone
PHASES = ("prepare", "checkpoint", "stop", "pg_upgrade", "switch", "start", "backup", "replicas")
# initdb of the by-hand server: hakeeper's defaults (postgresql.initdb_args, pg/postgres.py)
INITDB_ARGS = [
    "--data-checksums",
    "--encoding=UTF8",
    "--locale=C",
    "--auth-local=trust",
    "--auth-host=scram-sha-256",
]
MANUAL_PARAMETERS = {"shared_buffers": "64MB", "wal_level": "replica", "wal_log_hints": "on"}


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def longest_gap(acks: Sequence[float], start: float, end: float) -> tuple[float, float | None]:
    """The longest gap between two consecutive acknowledgements that overlaps [start, end], and
    when (s after ``start``) it began."""
    best, at = 0.0, None
    for a, b in itertools.pairwise(acks):
        if b >= start and a <= end and b - a > best:
            best, at = b - a, a - start
    return best, at


def last_json(text: str) -> dict[str, Any]:
    """The last JSON object a ``-o json`` command printed.  ``hakeeper upgrade -o json`` prints
    two documents: the preflight's ``{"ok": ..., "problems": [...]}``, then the report."""
    dec = json.JSONDecoder()
    docs: list[Any] = []
    i = text.find("{")
    while i >= 0:
        try:
            doc, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        docs.append(doc)
        i = text.find("{", end)
    found = [d for d in docs if isinstance(d, dict)]
    return found[-1] if found else {}


def stop_postmaster(data_dir: Path, sig: int = signal.SIGQUIT, timeout: float = 30) -> None:
    """Stop the postmaster of a server this bench started, by its PID (then SIGKILL)."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        for p in [pid, *children_of(pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def pgbench_init(bin_dir: Path, port: int, password: str, scale: int) -> float:
    log(f"port {port}: pgbench -i -s {scale} ...")
    t0 = time.monotonic()
    run_cmd(
        [bin_dir / "pgbench", "-h", HOST, "-p", str(port), "-U", SUPERUSER, "-i", "-s", str(scale), "-q", DB],
        env={"PGPASSWORD": password},
        timeout=7200,
    )
    sql(port, password, "CHECKPOINT", dbname=DB)
    took = time.monotonic() - t0
    log(f"port {port}: loaded in {took:.0f} s")
    return took


def wait_writable(port: int, password: str, timeout: float = 600) -> float:
    """Poll every 50 ms until an INSERT commits on ``port``; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    dsn = f"host={HOST} port={port} user={SUPERUSER} password={password} dbname={DB} connect_timeout=2"
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("INSERT INTO bench_writes (id) VALUES (-1)")
            return time.monotonic()
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise BenchError(f"port {port}: not writable within {timeout:.0f} s") from None
            time.sleep(0.05)


# ---------------------------------------------------------------------- hakeeper


class UpgradeRun:
    """One run: a fresh 17 cluster, loaded, upgraded to 18 under the writer, then a reinit."""

    def __init__(self, args: argparse.Namespace, work: Path, i: int, scale: int) -> None:
        self.args = args
        self.i = i
        self.scale = scale
        self.repo = work / "repo"
        self.base_port = pick_base_port(3)
        backup = {
            "repositories": [{"name": "local", "type": "fs", "path": str(self.repo)}],
            "row_counts": {"enabled": False},
            "schedules": [],
        }
        self.cluster = LocalCluster(
            work / "hk", nodes=3, base_port=self.base_port, scope=SCOPE, backup=backup, pg_version=OLD
        )
        self.password = self.cluster.superuser_password
        self.cli = hakeeper_cli()
        self.res: dict[str, Any] = {"run": i, "scale": scale}

    def hk(self, *args: str, timeout: float = 3600, check: bool = True) -> tuple[float, Any]:
        cfg = str(self.cluster.nodes["node1"].config_path)
        t0 = time.monotonic()
        r = run_cmd([*self.cli, *args, "-c", cfg], None, timeout=timeout, check=False)
        took = time.monotonic() - t0
        if check and r.returncode != 0:
            logs = "\n".join(f"--- {n}\n{self.cluster.tail_log(n, 40)}" for n in self.cluster.names)
            raise BenchError(
                f"hakeeper {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n{logs}"
            )
        return took, last_json(r.stdout)

    def port(self, name: str) -> int:
        return self.cluster.nodes[name].pg_port

    def majors(self) -> dict[str, int]:
        return {
            n: int(sql(self.port(n), self.password, "SHOW server_version_num")) // 10000
            for n in self.cluster.names
        }

    def wait_replayed(self, primary: str, timeout: float = 3600) -> float:
        """Until both replicas replayed everything the primary wrote so far."""
        t0 = time.monotonic()
        p = self.port(primary)
        target = sql(p, self.password, "SELECT pg_current_wal_lsn()::text")
        q = "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn >= %s::pg_lsn"
        while sql(p, self.password, q, params=(target,)) < self.cluster.n_nodes - 1:
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"replicas did not replay {target} within {timeout:.0f} s")
            time.sleep(0.5)
        return time.monotonic() - t0

    def run(self) -> dict[str, Any]:
        c, res = self.cluster, self.res
        prepare_fs_repository(self.repo, c.run_as)
        log(f"run {self.i}: 3-node cluster of PostgreSQL {OLD} in {c.base_dir} (ports {self.base_port}+)")
        c.start()
        primary = c.wait_ready(300)
        pp = self.port(primary)
        sql(pp, self.password, f"CREATE DATABASE {DB}")
        sql(
            pp,
            self.password,
            "CREATE TABLE bench_writes (id int PRIMARY KEY, at timestamptz DEFAULT now())",
            dbname=DB,
        )
        res["load_s"] = round(pgbench_init(c.bin_dir, pp, self.password, self.scale), 1)
        res["replay_wait_s"] = round(self.wait_replayed(primary), 1)
        res["db_bytes"] = sql(pp, self.password, f"SELECT pg_database_size('{DB}')")
        res["cluster_bytes"] = sql(
            pp, self.password, "SELECT sum(pg_database_size(datname))::bigint FROM pg_database"
        )
        log(
            f"run {self.i}: {res['db_bytes'] / 2**30:.2f} GiB in {DB}, replicas caught up; "
            "the upgrade under the writer"
        )

        writer = RowWriter(c.write_dsn(DB), table="bench_writes", every=WRITE_EVERY)
        writer.start()
        time.sleep(3)
        res["load_avg"] = round(os.getloadavg()[0], 1)  # a shared machine: the 1-min load at the start
        t0 = time.monotonic()
        try:
            wall, doc = self.hk("upgrade", "--to-version", str(NEW), "--force", "-o", "json")
        finally:
            t1 = time.monotonic()
            time.sleep(3)
            writer.stop.set()
            writer.join(30)
        acks = [t for _, t in writer.acked]
        gap, gap_at = longest_gap(acks, t0, t1)
        res.update(
            wall_s=round(wall, 2),
            downtime_s=doc.get("downtime_s"),
            client_downtime_s=round(gap, 2),
            client_gap_at_s=None if gap_at is None else round(gap_at, 1),
            phases=doc.get("phases") or {},
            replicas={k: v.get("seconds") for k, v in (doc.get("replicas") or {}).items()},
            backup=(doc.get("backup") or {}).get("id")
            if isinstance(doc.get("backup"), dict)
            else doc.get("backup"),
            writes_acked=len(acks),
            write_errors=writer.failures,
        )
        log(
            f"run {self.i}: upgrade wall {res['wall_s']} s, agent downtime {res['downtime_s']} s, "
            f"client downtime {res['client_downtime_s']} s"
        )
        log(f"run {self.i}: phases {json.dumps(res['phases'])}, replicas {json.dumps(res['replicas'])}")

        primary = c.wait_ready(600)
        majors = self.majors()
        if set(majors.values()) != {NEW}:
            raise BenchError(f"not every node runs {NEW} after the upgrade: {majors}")
        with psycopg.connect(c.dsn(primary, DB), autocommit=True) as conn:
            rows = {r[0] for r in conn.execute("SELECT id FROM bench_writes").fetchall()}
        lost = {i for i, _ in writer.acked} - rows
        if lost:
            raise BenchError(f"{len(lost)} acknowledged writes missing on {primary}: {sorted(lost)[:10]}")
        res["acked_present"] = True

        replica = next(n for n in c.names if n != primary)
        log(f"run {self.i}: clone baseline: hakeeper reinit {replica} --force --wait")
        res["clone_load_avg"] = round(os.getloadavg()[0], 1)
        took, _ = self.hk("reinit", replica, "--force", "--wait", "-o", "json")
        c.wait_ready(600)
        res["clone_s"] = round(took, 2)
        rejoin = [s for s in res["replicas"].values() if isinstance(s, int | float)]
        res["rejoin_s"] = round(max(rejoin), 2) if rejoin else None
        res["rejoin_over_clone"] = round(max(rejoin) / took, 2) if rejoin else None
        log(f"run {self.i}: clone {took:.1f} s, rejoin {res['rejoin_s']} s: {res['rejoin_over_clone']}x")
        return res

    def close(self) -> None:
        self.cluster.stop()
        left = self.cluster.stop_leftovers()
        if left:
            log(f"run {self.i}: stopped leftovers: {left}")


# ---------------------------------------------------------------------- by hand


class ManualRun:
    """PostgreSQL's documented procedure on a standalone server with the same data."""

    def __init__(self, args: argparse.Namespace, work: Path, i: int, scale: int, password: str) -> None:
        self.args = args
        self.i = i
        self.scale = scale
        self.base = work / "manual"
        self.old = self.base / f"data{OLD}"
        self.new = self.base / f"data{NEW}"
        self.sock = self.base / "sock"
        self.run_as: RunAs = resolve_run_as(self.old)
        self.bins = {m: reachable_bin_dir(m, self.run_as) for m in (OLD, NEW)}
        self.port = pick_base_port(1)
        self.password = password

    def pg_ctl(self, major: int, data: Path, *args: str) -> None:
        run_cmd([self.bins[major] / "pg_ctl", *args, "-D", data], self.run_as, timeout=600)

    def start(self, major: int, data: Path) -> None:
        opts = f"-p {self.port} -c listen_addresses={HOST} -c unix_socket_directories={self.sock}"
        self.pg_ctl(
            major, data, "start", "-w", "-t", "300", "-l", str(self.base / f"pg{major}.log"), "-o", opts
        )

    def run(self) -> dict[str, Any]:
        ra = self.run_as
        mkdir_for(self.base, ra, 0o755)
        mkdir_for(self.sock, ra)
        pwfile = self.base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        ra.chown(pwfile)
        log(f"by hand {self.i}: PostgreSQL {OLD} in {self.old} (port {self.port})")
        run_cmd(
            [self.bins[OLD] / "initdb", "-D", self.old, "-U", SUPERUSER, f"--pwfile={pwfile}", *INITDB_ARGS],
            ra,
        )
        pwfile.unlink()
        with open(self.old / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = '{v}'\n" for k, v in MANUAL_PARAMETERS.items())
        self.start(OLD, self.old)
        sql(self.port, self.password, f"CREATE DATABASE {DB}")
        sql(
            self.port,
            self.password,
            "CREATE TABLE bench_writes (id int, at timestamptz DEFAULT now())",
            dbname=DB,
        )
        res: dict[str, Any] = {"run": self.i, "scale": self.scale}
        res["load_s"] = round(pgbench_init(self.bins[OLD], self.port, self.password, self.scale), 1)
        res["db_bytes"] = sql(self.port, self.password, f"SELECT pg_database_size('{DB}')")

        # documented order: initdb of the new cluster while the old one still runs
        t = time.monotonic()
        run_cmd([self.bins[NEW] / "initdb", "-D", self.new, "-U", SUPERUSER, *INITDB_ARGS], ra)
        with open(self.new / "postgresql.auto.conf", "a") as f:  # the old settings carried over
            f.writelines(f"{k} = '{v}'\n" for k, v in MANUAL_PARAMETERS.items())
        res["initdb_s"] = round(time.monotonic() - t, 2)

        t0 = time.monotonic()
        self.pg_ctl(OLD, self.old, "stop", "-m", "fast", "-w", "-t", "300")
        t1 = time.monotonic()
        upg = [
            self.bins[NEW] / "pg_upgrade", "-b", self.bins[OLD], "-B", self.bins[NEW], "-d", self.old,
            "-D", self.new, "-p", str(self.port), "-P", str(self.port), "-s", self.sock, "-U", SUPERUSER,
            "--link",
        ]  # fmt: skip
        # in a directory of its own: pg_upgrade writes its scripts into the current directory
        run_cmd(["sh", "-c", 'cd "$0" && exec "$@"', str(self.base), *map(str, upg)], ra, timeout=3600)
        t2 = time.monotonic()
        self.start(NEW, self.new)
        t3 = time.monotonic()
        t4 = wait_writable(self.port, self.password)
        res.update(
            stop_s=round(t1 - t0, 2),
            pg_upgrade_s=round(t2 - t1, 2),
            start_s=round(t3 - t2, 2),
            first_write_s=round(t4 - t3, 2),
            downtime_s=round(t4 - t0, 2),
            downtime_with_initdb_s=round(t4 - t0 + res["initdb_s"], 2),
        )
        log(f"by hand {self.i}: {json.dumps(res)}")
        return res

    def close(self) -> None:
        for d in (self.new, self.old):
            stop_postmaster(d)


# ---------------------------------------------------------------------- report


def _med(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return round(statistics.median(vals), 2) if vals else None


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _gib(r: dict[str, Any]) -> str:
    return f"{r['db_bytes'] / 2**30:.2f} GiB"


def run_row(label: str, r: dict[str, Any]) -> str:
    ph = r.get("phases", {})
    cells = [
        label,
        f"{r['scale']} ({_gib(r)})",
        r["load_s"],
        _f(r["wall_s"]),
        f"**{_f(r['downtime_s'])}**",
        f"**{_f(r['client_downtime_s'])}**",
        *(_f(ph.get(p)) for p in PHASES),
        _f(r["clone_s"]),
        f"{_f(r['rejoin_over_clone'])}x",
        f"{r['writes_acked']} ({r['write_errors']})",
        f"{r.get('load_avg', '-')} / {r.get('clone_load_avg', '-')}",
    ]
    return "| " + " | ".join(map(str, cells)) + " |"


def median_row(runs: Sequence[dict[str, Any]]) -> str:
    meds = []
    for p in PHASES:
        vals = [r["phases"][p] for r in runs if isinstance(r.get("phases", {}).get(p), int | float)]
        meds.append(_f(round(statistics.median(vals), 2)) if vals else "-")
    cells = [
        "**median**",
        "",
        "",
        _f(_med(runs, "wall_s")),
        f"**{_f(_med(runs, 'downtime_s'))}**",
        f"**{_f(_med(runs, 'client_downtime_s'))}**",
        *meds,
        _f(_med(runs, "clone_s")),
        f"{_f(_med(runs, 'rejoin_over_clone'))}x",
        "",
        "",
    ]
    return "| " + " | ".join(cells) + " |"


def manual_row(label: str, r: dict[str, Any]) -> str:
    cells = [
        label,
        f"{r['scale']} ({_gib(r)})",
        r["initdb_s"],
        r["stop_s"],
        r["pg_upgrade_s"],
        r["start_s"],
        r["first_write_s"],
        f"**{r['downtime_s']}**",
        r["downtime_with_initdb_s"],
    ]
    return "| " + " | ".join(map(str, cells)) + " |"


def verdicts(res: dict[str, Any]) -> list[str]:
    runs, manual, small = res["runs"], res["manual"], res.get("small", [])
    out: list[str] = []
    if runs:
        worst = max(max(r["downtime_s"] or 0, r["client_downtime_s"]) for r in runs)
        ok = worst <= DOWNTIME_TARGET
        out.append(
            f"- Write downtime <= {DOWNTIME_TARGET:.0f} s: median agent {_f(_med(runs, 'downtime_s'))} s, "
            f"client {_f(_med(runs, 'client_downtime_s'))} s; worst of any run, either measure, "
            f"{worst:.2f} s: **{'pass' if ok else 'miss'}**."
        )
    if runs and small:
        big, little = _med(runs, "downtime_s"), _med(small, "downtime_s")
        bu, lu = (
            _med([r["phases"] for r in runs], "pg_upgrade"),
            _med([r["phases"] for r in small], "pg_upgrade"),
        )
        if big is not None and little is not None:
            out.append(
                f"- Independent of the database size with `--link`: agent downtime {big:.2f} s at scale "
                f"{runs[0]['scale']} ({_gib(runs[0])}) against {little:.2f} s at scale {small[0]['scale']} "
                f"({_gib(small[0])}): {big / little:.2f}x for "
                f"{runs[0]['db_bytes'] / small[0]['db_bytes']:.0f}x the data "
                f"(pg_upgrade phase {_f(bu)} s against {_f(lu)} s; one run at the small scale, on a "
                "shared machine: the spread between runs is of the same order)."
            )
        sm, bm = res.get("small_manual", []), _med(res["manual"], "downtime_s")
        if sm and bm is not None:
            out.append(
                f"  By hand: {bm:.2f} s at scale {runs[0]['scale']} against {sm[0]['downtime_s']:.2f} s at "
                f"scale {sm[0]['scale']}: with `--link` neither copies the data files."
            )
    ratio = _med(runs, "rejoin_over_clone")
    if ratio is not None:
        out.append(
            f"- Replicas back in sync within {REJOIN_TARGET:.0f}x the time of a clone: median "
            f"{ratio:.2f}x (rejoin {_f(_med(runs, 'rejoin_s'))} s, clone {_f(_med(runs, 'clone_s'))} s): "
            f"**{'pass' if all((r['rejoin_over_clone'] or 99) <= REJOIN_TARGET for r in runs) else 'miss'}** "
            "(every run)."
        )
    if manual and runs:
        out.append(
            f"- By hand, the same data: {_f(_med(manual, 'downtime_s'))} s from `pg_ctl stop` to the first "
            f"write (no replicas, no client reconnect, no backup); hakeeper's agent downtime "
            f"{_f(_med(runs, 'downtime_s'))} s, client-observed {_f(_med(runs, 'client_downtime_s'))} s, "
            "and the replicas and a new backup of 18 come with it."
        )
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    m = res["machine"]
    runs, manual = res["runs"], res["manual"]
    small, small_manual = res.get("small", []), res.get("small_manual", [])
    lines = [
        f"## Major upgrade (issue 15): `hakeeper upgrade` {OLD} -> {NEW} --link (`python -m bench.upgrade`)",
        "",
        f"{m['date_utc']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, load {m['load_avg_start']} "
        f"at the start, hakeeper {m['hakeeper']}. pgbench scale {args.scale}: {len(runs)} run(s) of "
        f"{args.runs} asked, each on a fresh 3-node LocalCluster of PostgreSQL {OLD} (nodes on one "
        "machine, one disk) with a filesystem backup repository; during the upgrade a writer INSERTs "
        f"one row every {WRITE_EVERY * 1000:.0f} ms through the multi-host read-write DSN."
        + (f" One more run at scale {small[0]['scale']} for the size comparison." if small else ""),
        "",
        "- **agent downtime**: the primary agent's `downtime_s` (fast shutdown start -> the new primary "
        "accepts writes); **client downtime**: the longest gap between two acknowledged INSERTs of "
        "the writer during `hakeeper upgrade` (includes reconnecting through the DSN).",
        "- Phases (s) are the `-o json` report's; the downtime is stop + pg_upgrade + switch + start, "
        "prepare (initdb of 18) and checkpoint come before it, backup and replicas after it "
        "(`replicas`: from the new primary's start until both replicas stream again, cloned in "
        "parallel with the new binaries; the base backup of 18 follows, read from a standby). "
        "**clone**: `hakeeper reinit <replica> --force --wait` of one replica of the upgraded "
        "cluster right after the upgrade, same data, alone. **load**: the 1-minute load average "
        "when the upgrade and the clone started (the machine is shared with other work).",
        "- The client's gap is a little shorter than the agent's `downtime_s`: the agent starts its "
        "clock just before it asks for the fast shutdown (a write can still commit meanwhile) and "
        "stops it when its own probe (every 50 ms) finds the new server out of recovery.",
        "- After each run every node ran 18, one primary with both replicas streaming, and every "
        "acknowledged write was on the new primary (checked; a run fails otherwise). Writes acked "
        "(errors): the writer's INSERTs during the whole run and its failed attempts (during the "
        "downtime, one every 20 ms).",
        "",
        "| run | scale (data) | load s | upgrade wall s | agent downtime s | client downtime s | "
        + " | ".join(PHASES)
        + " | clone s | rejoin / clone | writes acked (errors) | load at upgrade / clone |",
        "|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|",
        *(run_row(str(r["run"]), r) for r in runs),
    ]
    if runs:
        lines.append(median_row(runs))
    lines += [run_row("size check", r) for r in small]
    lines += [
        "",
        f"By hand (PostgreSQL's documented procedure; binaries run directly, no hakeeper code): a "
        f"standalone {OLD} server initdb'd like a hakeeper node, the same pgbench load; initdb of {NEW} "
        "with the same settings before the stop (the documentation's order; its time apart), then "
        "`pg_ctl stop -m fast`, `pg_upgrade --link`, `pg_ctl start -w`, and the first INSERT (polled "
        "every 50 ms). No replicas, no backup, no client reconnect.",
        "",
        "| run | scale (data) | initdb s (before) | stop s | pg_upgrade s | start s | to first write s | "
        "downtime s (stop -> write) | with initdb s |",
        "|---|---|---|---|---|---|---|---|---|",
        *(manual_row(str(r["run"]), r) for r in manual),
        *(manual_row("size check", r) for r in small_manual),
        "",
        "Verdicts:",
        "",
        *verdicts(res),
        *(f"- {note}" for note in res.get("notes", [])),
    ]
    fails = res.get("failures", [])
    if fails:
        lines += ["", f"Failed runs ({len(fails)}; not in the tables above):", ""]
        for f in fails:
            err = " ".join(x.strip() for x in f["error"] if x.strip())[:600].replace("|", "\\|")
            lines.append(f"- {f['what']} run {f['run']} (scale {f['scale']}): {err}")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> None:
    write_section(path, MARK_START, MARK_END, section)


def manual_run(args: argparse.Namespace, i: int, scale: int) -> dict[str, Any]:
    work = make_base_dir("hk-bench-upgm-")
    man = ManualRun(args, work, i, scale, "bench-" + os.urandom(8).hex())
    try:
        return man.run()
    finally:
        man.close()
        shutil.rmtree(work, ignore_errors=True)


def upgrade_run(args: argparse.Namespace, i: int, scale: int) -> dict[str, Any]:
    work = make_base_dir("hk-bench-upg-")
    run = UpgradeRun(args, work, i, scale)
    try:
        return run.run()
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--scale", type=int, default=150)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--manual-runs", type=int, default=1, help="runs of the by-hand baseline (0: none)")
    p.add_argument(
        "--small-scale",
        type=int,
        default=10,
        help="one more run (and by hand) at this scale, for comparison (0: none)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: scale 10, 1 run; never writes the docs")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line added to the report")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.scale, args.runs, args.manual_runs, args.small_scale, args.no_docs = 10, 1, 1, 0, True
    if args.scale < 1 or args.runs < 0 or args.manual_runs < 0:
        p.error("--scale must be at least 1, --runs and --manual-runs at least 0")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    res: dict[str, Any] = {"machine": machine_facts(), "runs": [], "manual": [], "notes": args.note}
    status = 0
    res["failures"] = []

    def attempt(key: str, fn: Any, i: int, scale: int) -> None:
        """A failed run is a result too: recorded (first lines of its error) and reported."""
        try:
            res.setdefault(key, []).append(fn(args, i, scale))
        except BenchError as e:
            print(f"run {i} ({key}, scale {scale}) failed: {e}", file=sys.stderr)
            res["failures"].append({"what": key, "run": i, "scale": scale, "error": str(e).splitlines()[:8]})

    try:
        for i in range(1, max(args.runs, args.manual_runs) + 1):
            if i <= args.manual_runs:
                attempt("manual", manual_run, i, args.scale)
            if i <= args.runs:
                attempt("runs", upgrade_run, i, args.scale)
            if args.json:
                args.json.write_text(json.dumps(res, indent=1, default=str))
        if args.small_scale and args.small_scale != args.scale:
            # the same at a small scale: does the downtime depend on the size of the data?
            attempt("small", upgrade_run, 0, args.small_scale)
            if args.manual_runs:
                attempt("small_manual", manual_run, 0, args.small_scale)
    except KeyboardInterrupt as e:
        print(f"bench interrupted: {e}", file=sys.stderr)
        status = 1
    if res["failures"]:
        status = 1
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    section = report(res, args)
    print(section)
    if not args.no_docs and res["runs"]:
        write_docs(args.out, section)
    return status


if __name__ == "__main__":
    sys.exit(main())
