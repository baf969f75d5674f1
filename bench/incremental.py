"""Benchmark: incremental base backups (PostgreSQL 17/18) against full ones.

Everything runs on 127.0.0.1 under a fresh directory in /tmp, on ports BASE..BASE+42
(``--base-port``, default 34300):

1. A 1-node hakeeper cluster of PostgreSQL ``--pg-version`` (17) with a filesystem repository;
   ``pgbench -i -s SCALE``, then ``VACUUM (FREEZE)`` and CHECKPOINT, so that the first
   incremental does not carry the all-visible/frozen marks of the load's pages.
2. ``hakeeper backup create --type full``, then ``--links`` (3) times: ``--update-pct`` (5) % of
   ``pgbench_accounts`` updated (one contiguous range of ``aid`` per round, as a hot range of a
   real table) and ``backup create --type incremental``; then a full backup of the same state
   as the last incremental.  Wall time of each command and its data / stored size.
3. ``hakeeper restore --backup <incremental> --target-lsn <its stop LSN> --start`` of the chain
   of 3 links (full + 2 incrementals, the target's) and of the longest one (full + links;
   applied in place, restore's default) against the same of the last full backup,
   each to a writable server (the command returns once pg_is_in_recovery() is false).
4. pg_combinebackup's modes on plain-format copies (``pg_basebackup -Fp``, full + one
   incremental after another update round): ``--copy``, ``--copy-file-range``, ``--clone``,
   ``--link`` (18+), each into a fresh directory on the same filesystem.

Beside it, in the same run (unless ``--skip-pgbackrest``): pgBackRest (Debian 12's 2.45, which
supports PostgreSQL only up to 16, so on Debian's PostgreSQL 15) on a standalone server initdb'd
like a hakeeper node, loaded, frozen, checkpointed and updated the same way (same aid ranges),
step by step after the hakeeper side: ``backup --type=full``, ``--type=incr`` after each round,
``--type=diff`` after the last one, ``--type=full`` of that state; sizes from ``pgbackrest info
--output=json`` (bytes each backup added to the repository); ``pgbackrest restore --set=<incr>
--type=immediate`` of the same chains against ``--set=<that full>``, each started with ``pg_ctl``
and timed until pg_is_in_recovery() is false (and to the first INSERT).

After each update round, both sides wait (untimed, logged) until the round's WAL is archived and,
on 17+, summarized, then run CHECKPOINT (:func:`settle`): a backup then costs what it costs on a
system whose archiving keeps up and whose checkpoints come on time, not the 3 s backlog of ~360 MB
of WAL and dirty pages it would otherwise wait for.  Settings of bench/backup.py:
process-max=2, zstd level 3, a posix repository.  pgBackRest 2.45 has no block incremental: it
stores a changed file whole, where hakeeper's incrementals (PostgreSQL's) are page-level.

Usage::

    python -m bench.incremental [--scale 150] [--pg-version 17] [--links 3] [--update-pct 5]
                                [--skip-pgbackrest] [--keep] [--write-docs] [--out docs/benchmarks.md]
                                [--json FILE]

With ``--write-docs`` only the section between ``<!-- bench:incremental:start -->`` and
``<!-- bench:incremental:end -->`` of ``--out`` is written or replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import pgbr
from bench.backup import (
    PARALLEL,
    ZSTD_LEVEL,
    BenchError,
    hakeeper_cli,
    log,
    mkdir_for,
    parse_json,
    run_cmd,
    sql,
    start_pg,
    stop_pg,
    wait_writable_or_log,
)
from bench.docs import write_section
from hakeeper.localcluster import LocalCluster, pg_program, prepare_fs_repository
from hakeeper.localcluster.layout import HOST, REPLICATION_USER, SUPERUSER
from hakeeper.util.proc import RunAs, postmaster_pid

REPO_ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- bench:incremental:start -->"
MARK_END = "<!-- bench:incremental:end -->"
DB = "bench"
SCOPE = "bincr"
REPO_NAME = "local"
STANZA = "bincr"
PGBR_MAJOR = 15  # Debian 12's pgBackRest 2.45 supports PostgreSQL up to 16
# initdb of the pgBackRest side: hakeeper's defaults (postgresql.initdb_args, pg/postgres.py)
INITDB_ARGS = [
    "--data-checksums",
    "--encoding=UTF8",
    "--locale=C",
    "--auth-local=trust",
    "--auth-host=scram-sha-256",
]
# The settings of a LocalCluster node that matter for a backup (cluster.py, DEFAULT_CLUSTER_PARAMETERS)
PGBR_SOURCE_PARAMETERS = {"shared_buffers": "64MB", "wal_level": "replica", "wal_log_hints": "on"}
TIME_TARGET = 0.3  # incremental backup time <= 0.3x the full backup's
RESTORE_TARGET = 1.3  # restore of a 3-link chain <= 1.3x the restore of a full
CHAIN_TARGET = 3  # the chain length the restore target is about (a full and 2 incrementals)


def aid_range(scale: int, update_pct: int, i: int) -> tuple[int, int]:
    """(lo, n): round ``i`` updates aid lo+1..lo+n, ``update_pct`` % of the accounts, the i-th
    contiguous range; the same ranges on both sides."""
    rows = 100_000 * scale
    n = max(1, rows * update_pct // 100)
    return (i * n) % max(1, rows - n), n


def update_accounts(port: int, password: str, scale: int, update_pct: int, i: int) -> int:
    lo, n = aid_range(scale, update_pct, i)
    t0 = time.monotonic()
    sql(
        port,
        password,
        f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {lo} AND aid <= {lo + n}",
        dbname=DB,
    )
    log(f"port {port}: updated {n} rows (aid {lo + 1}..{lo + n}) in {time.monotonic() - t0:.1f} s")
    settle(port, password)
    return n


SETTLE_READY_SQL = "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE right(name, 6) = '.ready'"
SETTLE_SUMMARY_SQL = "SELECT pending_lsn >= %s::pg_lsn FROM pg_get_wal_summarizer_state()"


def settle(port: int, password: str, timeout: float = 600) -> float:
    """Wait until the WAL written so far is archived (no ``.ready`` file left) and, on 17+ with
    summarize_wal, read by the WAL summarizer, then CHECKPOINT: the state of a system whose
    archiving keeps up and whose checkpoints come every checkpoint_timeout (a scheduled
    backup's), not one that wrote ~360 MB of WAL in the last 3 s.  Without it, a backup taken
    right after an update round waits for all three before it ends (pg_backup_stop waits for the
    archiving of every segment up to its own, an incremental for the summaries, every backup
    for its start checkpoint to write the round's dirty pages): the round's backlog, not the
    backup's cost -- and only the incrementals paid it (the first full follows the load's
    CHECKPOINT, the last one the third incremental's).  Same rule on both sides; the wait is
    logged, not timed into any backup."""
    t0 = time.monotonic()
    end = sql(port, password, "SELECT pg_current_wal_lsn()::text", dbname=DB)
    summarizing = sql(
        port,
        password,
        "SELECT current_setting('server_version_num')::int >= 170000"
        " AND current_setting('summarize_wal', true) = 'on'",
        dbname=DB,
    )
    while True:
        ready = sql(port, password, SETTLE_READY_SQL, dbname=DB)
        summarized = not summarizing or sql(port, password, SETTLE_SUMMARY_SQL, dbname=DB, params=(end,))
        if ready == 0 and summarized:
            break
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"port {port}: WAL not archived/summarized within {timeout:.0f}s")
        time.sleep(0.05)
    waited = time.monotonic() - t0
    # and the round's dirty pages written, as the next checkpoint_timeout would on a steady
    # system: a backup's own start checkpoint is then its own cost, not the round's 360 MB
    t1 = time.monotonic()
    sql(port, password, "CHECKPOINT", dbname=DB)
    took = time.monotonic() - t1
    log(f"port {port}: WAL archived and summarized in {waited:.2f} s, CHECKPOINT {took:.2f} s")
    return waited


def pgbench_init(pgbench: str, port: int, password: str, scale: int) -> dict[str, Any]:
    """``pgbench -i -s scale``, VACUUM (FREEZE), CHECKPOINT: the same on both sides."""
    log(f"port {port}: pgbench -i -s {scale} ...")
    t0 = time.monotonic()
    run_cmd(
        [pgbench, "-h", HOST, "-p", str(port), "-U", SUPERUSER, "-i", "-s", str(scale), "-q", DB],
        env={"PGPASSWORD": password},
        timeout=3600,
    )
    sql(port, password, "VACUUM (FREEZE)", dbname=DB)
    sql(port, password, "CHECKPOINT", dbname=DB)
    return {
        "scale": scale,
        "load_s": round(time.monotonic() - t0, 1),
        "db_bytes": sql(port, password, f"SELECT pg_database_size('{DB}')", dbname=DB),
    }


class PgbrSide:
    """pgBackRest 2.45 on a standalone PostgreSQL 15 server (Debian's), loaded and updated like the
    hakeeper side: full, an ``incr`` after each update round, a ``diff`` after the last one, then
    a full of that same state; restores of the last incremental's set and of that full."""

    def __init__(self, args: argparse.Namespace, work: Path, run_as: RunAs, password: str) -> None:
        self.args = args
        self.run_as = run_as
        self.password = password
        self.base = work / "pgbr"
        self.conf = self.base / "pgbackrest.conf"
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.restore_dir = self.base / "restore"
        self.port = args.base_port + 40
        self.restore_ports = (args.base_port + 41, args.base_port + 42)
        self.results: dict[str, Any] = {"backups": [], "restores": []}
        self.started: list[Path] = []  # every data directory we start (stopped by PID at the end)

    def pg(self, name: str) -> str:
        return pg_program(name, PGBR_MAJOR)

    def pgbr(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return run_cmd(
            ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args], self.run_as, timeout=timeout
        )

    def setup(self) -> None:
        """initdb, pgBackRest's archive_command, start, stanza-create, load."""
        ra = self.run_as
        mkdir_for(self.base, ra, 0o755)
        for sub in pgbr.SUBDIRS:
            mkdir_for(self.base / sub, ra)
        mkdir_for(self.restore_dir, ra, 0o755)
        pwfile = self.base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        ra.chown(pwfile)
        log(f"PostgreSQL {PGBR_MAJOR} for pgBackRest in {self.data}")
        run_cmd(
            [self.pg("initdb"), "-D", self.data, "-U", SUPERUSER, f"--pwfile={pwfile}", *INITDB_ARGS],
            ra,
            timeout=300,
        )
        pwfile.unlink()
        self.conf.write_text(
            pgbr.conf_text(
                self.base, STANZA, self.data, self.port, process_max=PARALLEL, compress_level=ZSTD_LEVEL
            )
        )
        self.conf.chmod(0o644)
        with open(self.data / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = '{v}'\n" for k, v in PGBR_SOURCE_PARAMETERS.items())
            f.write(pgbr.source_settings(self.conf, STANZA, self.port, self.sock, "bench/incremental.py"))
        self.started.append(self.data)
        run_cmd(
            [self.pg("pg_ctl"), "start", "-D", self.data, "-l", self.base / "source.log", "-w", "-t", "120"],
            ra,
            timeout=150,
        )
        self.pgbr("stanza-create")
        self.pgbr("check")
        sql(self.port, self.password, f"CREATE DATABASE {DB}")
        self.results["dataset"] = pgbench_init(self.pg("pgbench"), self.port, self.password, self.args.scale)

    def update_round(self, i: int) -> int:
        return update_accounts(self.port, self.password, self.args.scale, self.args.update_pct, i)

    def backup(self, kind: str) -> dict[str, Any]:
        t0 = time.monotonic()
        self.pgbr("backup", f"--type={kind}")
        el = time.monotonic() - t0
        last = pgbr.backups(json.loads(self.pgbr("info", "--output=json").stdout))[-1]
        row = {"asked": kind, "s": round(el, 2), **pgbr.backup_row(last)}
        if row["type"] != kind:  # pgBackRest makes a full when it finds no usable prior backup
            raise BenchError(f"pgbackrest backup --type={kind} made a {row['type']} backup ({row['label']})")
        self.results["backups"].append(row)
        log(f"pgbackrest {kind}: {row}")
        return row

    def restore(self, what: str, label: str, port: int) -> None:
        """``pgbackrest restore --set=label --type=immediate`` (to the backup's end), ``pg_ctl start``;
        timed until pg_is_in_recovery() is false (polled every 50 ms), and to the first INSERT."""
        ra = self.run_as
        dest = mkdir_for(self.restore_dir / what, ra)
        sock = mkdir_for(self.restore_dir / f"{what}.sock", ra)
        logfile = self.restore_dir / f"{what}.log"
        self.started.append(dest)
        t0 = time.monotonic()
        self.pgbr(
            "restore",
            f"--set={label}",
            f"--pg1-path={dest}",
            "--archive-mode=off",
            "--type=immediate",
            "--target-action=promote",
        )
        t1 = time.monotonic()
        start_pg(dest, ra, port, sock, logfile, wait=False, major=PGBR_MAJOR)
        off, t2 = wait_writable_or_log(port, self.password, dest, logfile)
        # "s" stops where hakeeper's `restore --start` returns: pg_is_in_recovery() false
        row = {
            "what": what,
            "set": label,
            "s": round(off - t0, 2),
            "restore_cmd_s": round(t1 - t0, 2),
            "first_write_s": round(t2 - t0, 2),
        }
        self.results["restores"].append(row)
        log(f"pgbackrest restore {what}: {row}")
        stop_pg(dest, ra, mode="immediate", major=PGBR_MAJOR)
        if not self.args.keep:  # at scale 150 each restored copy is ~2.3 GB more in /tmp
            shutil.rmtree(dest, ignore_errors=True)

    def close(self) -> None:
        for d in reversed(self.started):
            stop_pg(d, self.run_as, mode="immediate", major=PGBR_MAJOR)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.repo = work / "repo"
        self.restore_dir = work / "restore"
        backup = {
            "repositories": [{"name": REPO_NAME, "type": "fs", "path": str(self.repo)}],
            "row_counts": {"enabled": False},  # not part of making a backup
            "schedules": [],
        }
        self.cluster = LocalCluster(
            work / "hk",
            nodes=1,
            base_port=args.base_port,
            scope=SCOPE,
            backup=backup,
            pg_version=args.pg_version,
        )
        self.node = self.cluster.nodes["node1"]
        self.port = self.node.pg_port
        self.password = self.cluster.superuser_password
        self.cli = hakeeper_cli()
        self.results: dict[str, Any] = {"backups": [], "restores": [], "combine": []}
        self.started: list[Path] = []  # restored data directories (stopped by PID at the end)
        self.pgbr_side = (
            None if args.skip_pgbackrest else PgbrSide(args, work, self.cluster.run_as, self.password)
        )

    def hk(self, *args: str | Path, timeout: float = 3600) -> dict[str, Any]:
        r = run_cmd([*self.cli, *map(str, args), "-o", "json"], None, timeout=timeout)
        return parse_json(r.stdout)

    def q(self, query: str) -> Any:
        return sql(self.port, self.password, query, dbname=DB)

    def pg(self, name: str) -> str:
        return str(self.cluster.bin_dir / name)

    # ------------------------------------------------------------------ steps

    def load(self) -> None:
        a = self.args
        prepare_fs_repository(self.repo, self.cluster.run_as)
        self.restore_dir.mkdir(mode=0o755)
        log(f"1-node cluster of PostgreSQL {a.pg_version} in {self.cluster.base_dir}")
        self.cluster.start()
        self.cluster.wait_ready(180)
        sql(self.port, self.password, f"CREATE DATABASE {DB}")
        self.results["dataset"] = pgbench_init(self.pg("pgbench"), self.port, self.password, a.scale)

    def update_round(self, i: int) -> int:
        """``update-pct`` % of the accounts, the i-th contiguous range of aid."""
        return update_accounts(self.port, self.password, self.args.scale, self.args.update_pct, i)

    def backup(self, kind: str) -> dict[str, Any]:
        t0 = time.monotonic()
        rec = self.hk("backup", "create", "-c", self.node.config_path, "--from", "primary", "--type", kind)
        row = {
            "type": rec.get("kind"),
            "asked": kind,
            "id": rec.get("id"),
            "parent": rec.get("parent"),
            "s": round(time.monotonic() - t0, 2),
            "copy_s": rec.get("seconds_copy"),
            "size": rec.get("size"),
            "stored": rec.get("stored_size"),
            "became_full": rec.get("became_full"),
            "stop_lsn": rec.get("stop_lsn"),
        }
        self.results["backups"].append(row)
        log(f"backup {kind}: {row}")
        return row

    def restore(self, what: str, backup_id: str, stop_lsn: str, port: int) -> None:
        """To the backup's own end (``--target-lsn`` its stop LSN, as pgBackRest's
        ``--type=immediate``): the WAL of later update rounds is not part of the measure."""
        dest = self.restore_dir / what
        self.started.append(dest)
        t0 = time.monotonic()
        res = self.hk(
            "restore", "-c", self.node.config_path, "-D", dest, "--backup", backup_id,
            "--target-lsn", stop_lsn, "--start", "--port", str(port),
        )  # fmt: skip
        row = {
            "what": what,
            "backup": backup_id,
            "s": round(time.monotonic() - t0, 2),
            "chain": res.get("chain"),
            "combine_mode": res.get("combine_mode"),
            "seconds": res.get("seconds"),
        }
        self.results["restores"].append(row)
        log(f"restore {what}: {row}")
        self.stop(dest)

    def stop(self, data_dir: Path) -> None:
        pid = postmaster_pid(data_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 3)  # SIGQUIT: immediate shutdown of a server we started
            deadline = time.monotonic() + 30
            while postmaster_pid(data_dir) is not None and time.monotonic() < deadline:
                time.sleep(0.1)

    def combine_modes(self) -> None:
        """pg_combinebackup's modes on plain copies: full + one incremental."""
        plain = self.work / "plain"
        plain.mkdir()
        env = {"PGPASSWORD": self.cluster.replication_password}
        conn = [
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            REPLICATION_USER,
            "-X",
            "none",
            "-c",
            "fast",
            "--no-sync",
        ]
        run_cmd([self.pg("pg_basebackup"), *conn, "-D", str(plain / "full")], env=env, timeout=3600)
        self.update_round(self.args.links + 1)
        run_cmd(
            [
                self.pg("pg_basebackup"),
                *conn,
                "-D",
                str(plain / "incr"),
                f"--incremental={plain / 'full' / 'backup_manifest'}",
            ],
            env=env,
            timeout=3600,
        )
        modes = ["--copy", "--copy-file-range", "--clone"] + (
            ["--link"] if self.args.pg_version >= 18 else []
        )
        for mode in modes:
            out = plain / f"out{mode}"
            t0 = time.monotonic()
            r = run_cmd(
                [self.pg("pg_combinebackup"), "-o", str(out), mode, str(plain / "full"), str(plain / "incr")],
                timeout=3600,
                check=False,
            )
            row = {
                "mode": mode,
                "ok": r.returncode == 0,
                "s": round(time.monotonic() - t0, 2),
                "error": None if r.returncode == 0 else " ".join(r.stderr.strip().splitlines()[-2:-1]),
            }
            self.results["combine"].append(row)
            log(f"pg_combinebackup {mode}: {row}")
            shutil.rmtree(out, ignore_errors=True)

    def run(self) -> None:
        """Both sides step by step, hakeeper first at each step: the same machine state for both."""
        side = self.pgbr_side
        self.load()
        if side:
            side.setup()
        full = self.backup("full")
        if side:
            side.backup("full")
        incr: list[dict[str, Any]] = []
        pincr: list[dict[str, Any]] = []
        for i in range(self.args.links):
            self.update_round(i)
            incr.append(self.backup("incremental"))
            if side:
                side.update_round(i)
                pincr.append(side.backup("incr"))
        if side:
            side.backup("diff")  # against the first full: every round's changes
        same = self.backup("full")
        psame = side.backup("full") if side else None
        # the chains restored: of 3 links (the target: full + 2 incrementals) and the
        # longest one, then the full of the last state
        ends = sorted({min(len(incr), CHAIN_TARGET - 1), len(incr)})
        for k, n in enumerate(ends):
            link = incr[n - 1]
            self.restore(
                f"chain-{n + 1}-links", str(link["id"]), str(link["stop_lsn"]), self.args.base_port + 30 + k
            )
        self.restore("full", str(same["id"]), str(same["stop_lsn"]), self.args.base_port + 33)
        if side and psame:
            for n in ends:
                side.restore(f"chain-{n + 1}-links", str(pincr[n - 1]["label"]), side.restore_ports[0])
            side.restore("full", str(psame["label"]), side.restore_ports[1])
        self.results["full_first"] = full
        self.combine_modes()

    def close(self) -> None:
        for d in self.started:
            self.stop(d)
        if self.pgbr_side:
            self.pgbr_side.close()
        self.cluster.stop()


# ---------------------------------------------------------------------- report


def _mib(n: Any) -> str:
    return "-" if not isinstance(n, int) else f"{n / 2**20:.1f} MiB"


def _ratio(a: Any, b: Any) -> str:
    ok = isinstance(a, int | float) and isinstance(b, int | float) and b
    return f"{a / b:.2f}x" if ok else "-"


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target <= {target}x): **{'pass' if ratio <= target else 'miss'}**"


def hakeeper_lines(res: dict[str, Any]) -> list[str]:
    """One table: every backup (time and stored size against the first full), the two restores."""
    first = res["backups"][0] if res["backups"] else {}
    lines = [
        f"### hakeeper (PostgreSQL {res.get('pg_version', '?')}, pg_basebackup --incremental, "
        "the chain applied in place at restore)",
        "",
        "| backup | type | wall s | time / 1st full | copy s | data | stored | stored / 1st full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in res["backups"]:
        lines.append(
            f"| {b['id']} | {b['type']}{' (parent ' + str(b['parent']) + ')' if b['parent'] else ''} | "
            f"{b['s']} | {_ratio(b['s'], first.get('s'))} | {b['copy_s']} | {_mib(b['size'])} | "
            f"{_mib(b['stored'])} | {_ratio(b['stored'], first.get('stored'))} |"
        )
    lines += [
        "",
        "| restore (to a writable server) | wall s | chain rebuilt | phases |",
        "|---|---|---|---|",
    ]
    for r in res["restores"]:
        lines.append(f"| {r['what']} | {r['s']} | {r['combine_mode'] or '-'} | {json.dumps(r['seconds'])} |")
    lines += [""]
    fulls = [b for b in res["backups"] if b["type"] == "full"]
    incs = [b for b in res["backups"] if b["type"] == "incremental"]
    if fulls and incs:
        f_s = sum(b["s"] for b in fulls) / len(fulls)
        i_s = sum(b["s"] for b in incs) / len(incs)
        lines.append(
            f"- Incremental / full backup time (mean of the {len(incs)} incrementals / mean of the "
            f"{len(fulls)} fulls): {_verdict(i_s / f_s, TIME_TARGET)}."
        )
    else:
        lines.append("- Incremental / full backup time: not measured (no incremental or no full).")
    full = next((r for r in res["restores"] if r["what"] == "full"), None)
    for r in res["restores"]:
        if full is None or r is full:
            continue
        ratio = r["s"] / full["s"]
        if r["what"] == f"chain-{CHAIN_TARGET}-links":
            lines.append(
                f"- Restore of the {r['what']} chain / of a full backup: {_verdict(ratio, RESTORE_TARGET)}."
            )
        else:
            lines.append(f"- Restore of the {r['what']} chain / of a full backup: {ratio:.2f}x.")
    return lines


def pgbackrest_lines(p: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """One table for pgBackRest: every backup against the first full, then the two restores."""
    bk = p.get("backups", [])
    first = bk[0] if bk else {}
    lines = [
        f"### pgBackRest 2.45 (PostgreSQL {PGBR_MAJOR}, process-max={PARALLEL}, zstd level {ZSTD_LEVEL}, "
        "posix repository)",
        "",
        f"pgbench scale {args.scale} ({_mib(p.get('dataset', {}).get('db_bytes'))}), loaded, frozen, "
        "checkpointed and updated exactly like the hakeeper side (same aid ranges).",
        "",
        "| backup | type | wall s | time / 1st full | data copied | stored | stored / 1st full |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in bk:
        lines.append(
            f"| {b['label']} | {b['type']}{' (prior ' + str(b['prior']) + ')' if b['prior'] else ''} | "
            f"{b['s']} | {_ratio(b['s'], first.get('s'))} | {_mib(b['delta'])} | {_mib(b['stored'])} | "
            f"{_ratio(b['stored'], first.get('stored'))} |"
        )
    lines += [
        "",
        "| restore (to a writable server) | set | wall s | `pgbackrest restore` s | to first INSERT s |",
        "|---|---|---|---|---|",
    ]
    for r in p.get("restores", []):
        lines.append(
            f"| {r['what']} | {r['set']} | {r['s']} | {r['restore_cmd_s']} | {r.get('first_write_s', '-')} |"
        )
    fulls = [b for b in bk if b["type"] == "full"]
    incs = [b for b in bk if b["type"] == "incr"]
    lines += [""]
    if fulls and incs:
        f_s = sum(b["s"] for b in fulls) / len(fulls)
        i_s = sum(b["s"] for b in incs) / len(incs)
        lines.append(f"- Incremental / full backup time (means, as for hakeeper): {i_s / f_s:.2f}x.")
    rs = p.get("restores", [])
    full = next((r for r in rs if r["what"] == "full"), None)
    for r in rs:
        if full is not None and r is not full:
            lines.append(f"- Restore of the {r['what']} chain / of a full backup: {r['s'] / full['s']:.2f}x.")
    return lines


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines = [
        f"## Incremental base backups (PostgreSQL {args.pg_version}, `python -m bench.incremental`)",
        "",
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, load "
        f"{load[0]:.1f}, commit {commit}; pgbench scale {args.scale} "
        f"({_mib(res['dataset']['db_bytes'])}), `VACUUM (FREEZE)` and CHECKPOINT after the load, "
        f"{args.update_pct}% of pgbench_accounts updated (a contiguous aid range, a different one each "
        "round) before each incremental; after the last incremental a full backup of the same state. "
        "Restores go to a fresh directory, to a writable server: wall s until `pg_is_in_recovery()` is "
        "false (hakeeper: `restore --start` returns then; pgBackRest: `pgbackrest restore`, `pg_ctl start`, "
        "polled every 50 ms). Wall times include starting the command. Both sides run step by step in "
        "the same run, hakeeper first at each step.",
        "",
        *hakeeper_lines(res),
        "",
    ]
    p = res.get("pgbackrest")
    if p:
        lines += [*pgbackrest_lines(p, args), ""]
    lines += [
        "pgBackRest ran against PostgreSQL 15 (Debian's), in the same run and on the same machine, "
        f"because Debian 12's pgBackRest 2.45 supports PostgreSQL only up to 16, not {args.pg_version}. "
        "The sizes differ by granularity: hakeeper's incrementals are page-level (PostgreSQL's WAL "
        "summaries, `pg_basebackup --incremental`, the chain applied in place at restore), "
        "pgBackRest 2.45's are file-level (no block incremental, which came in 2.46): every 1 GB "
        "segment file of `pgbench_accounts` with a changed page is stored whole."
        + ("" if p else " (This run did not measure pgBackRest: `--skip-pgbackrest`.)"),
        "",
        "| pg_combinebackup mode (full + 1 incremental, plain copies) | s | result |",
        "|---|---|---|",
    ]
    for c in res["combine"]:
        lines.append(f"| `{c['mode']}` | {c['s']} | {'ok' if c['ok'] else c['error']} |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> None:
    write_section(path, MARK_START, MARK_END, section)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--scale", type=int, default=150)
    p.add_argument("--pg-version", type=int, default=17, choices=(17, 18))
    p.add_argument("--links", type=int, default=3, help="incrementals after the full backup")
    p.add_argument("--update-pct", type=int, default=5)
    p.add_argument("--base-port", type=int, default=34300)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--skip-pgbackrest", action="store_true", help="do not run pgBackRest on PostgreSQL 15 beside it"
    )
    args = p.parse_args(argv)
    if args.links < 1 or args.scale < 1 or not 0 < args.update_pct <= 100:
        p.error("--links and --scale must be at least 1, --update-pct in 1..100")
    if not args.skip_pgbackrest and shutil.which("pgbackrest") is None:
        print("pgbackrest not found: make bench-setup (or --skip-pgbackrest)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="hk-bench-incr-"))
    work.chmod(0o755)
    bench = Bench(args, work)
    try:
        bench.run()
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    bench.results["pg_version"] = args.pg_version
    if bench.pgbr_side:
        bench.results["pgbackrest"] = bench.pgbr_side.results
    section = report(bench.results, args)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1, default=str))
    if args.write_docs:
        write_docs(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
