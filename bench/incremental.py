"""Benchmark: incremental base backups (PostgreSQL 17/18) against full ones.

Everything runs on 127.0.0.1 under a fresh directory in /tmp, on ports BASE..BASE+21
(``--base-port``, default 34300):

1. A 1-node hakeeper cluster of PostgreSQL ``--pg-version`` (17) with a filesystem repository;
   ``pgbench -i -s SCALE``, then ``VACUUM (FREEZE)`` and CHECKPOINT, so that the first
   incremental does not carry the all-visible/frozen marks of the load's pages.
2. ``hakeeper backup create --type full``, then ``--links`` (3) times: ``--update-pct`` (5) % of
   ``pgbench_accounts`` updated (one contiguous range of ``aid`` per round, as a hot range of a
   real table) and ``backup create --type incremental``; then a full backup of the same state
   as the last incremental.  Wall time of each command and its data / stored size.
3. ``hakeeper restore --backup <last incremental> --latest --start`` (the chain: full + links,
   pg_combinebackup, pg_verifybackup) against ``restore --backup <that full> --latest --start``,
   each to a writable server (the command returns once pg_is_in_recovery() is false).
4. pg_combinebackup's modes on plain-format copies (``pg_basebackup -Fp``, full + one
   incremental after another update round): ``--copy``, ``--copy-file-range``, ``--clone``,
   ``--link`` (18+), each into a fresh directory on the same filesystem.

pgBackRest side by side is not possible here: Debian 12's pgBackRest 2.45 supports PostgreSQL up
to 16.

Usage::

    python -m bench.incremental [--scale 150] [--pg-version 17] [--links 3] [--update-pct 5]
                                [--keep] [--write-docs] [--out docs/benchmarks.md] [--json FILE]

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

from bench.backup import BenchError, hakeeper_cli, log, parse_json, run_cmd, sql
from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.localcluster.layout import HOST, REPLICATION_USER, SUPERUSER
from hakeeper.util.proc import postmaster_pid

REPO_ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- bench:incremental:start -->"
MARK_END = "<!-- bench:incremental:end -->"
DB = "bench"
SCOPE = "bincr"
REPO_NAME = "local"


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
        log(f"pgbench -i -s {a.scale} ...")
        t0 = time.monotonic()
        run_cmd(
            [
                self.pg("pgbench"),
                "-h",
                HOST,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-i",
                "-s",
                str(a.scale),
                "-q",
                DB,
            ],
            env={"PGPASSWORD": self.password},
            timeout=3600,
        )
        self.q("VACUUM (FREEZE)")
        self.q("CHECKPOINT")
        self.results["dataset"] = {
            "scale": a.scale,
            "load_s": round(time.monotonic() - t0, 1),
            "db_bytes": self.q(f"SELECT pg_database_size('{DB}')"),
        }

    def update_round(self, i: int) -> int:
        """``update-pct`` % of the accounts, the i-th contiguous range of aid."""
        rows = 100_000 * self.args.scale
        n = max(1, rows * self.args.update_pct // 100)
        lo = (i * n) % max(1, rows - n)
        t0 = time.monotonic()
        self.q(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {lo} AND aid <= {lo + n}")
        log(f"updated {n} rows (aid {lo + 1}..{lo + n}) in {time.monotonic() - t0:.1f} s")
        return int(n)

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
        }
        self.results["backups"].append(row)
        log(f"backup {kind}: {row}")
        return row

    def restore(self, what: str, backup_id: str, port: int) -> None:
        dest = self.restore_dir / what
        self.started.append(dest)
        t0 = time.monotonic()
        res = self.hk(
            "restore", "-c", self.node.config_path, "-D", dest, "--backup", backup_id, "--latest",
            "--start", "--port", str(port),
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
        self.load()
        full = self.backup("full")
        incr: list[dict[str, Any]] = []
        for i in range(self.args.links):
            self.update_round(i)
            incr.append(self.backup("incremental"))
        same = self.backup("full")
        (p1, p2) = (self.args.base_port + 30, self.args.base_port + 31)
        self.restore(f"chain-{len(incr) + 1}-links", str(incr[-1]["id"]), p1)
        self.restore("full", str(same["id"]), p2)
        self.results["full_first"] = full
        self.combine_modes()

    def close(self) -> None:
        for d in self.started:
            self.stop(d)
        self.cluster.stop()


# ---------------------------------------------------------------------- report


def _mib(n: Any) -> str:
    return "-" if not isinstance(n, int) else f"{n / 2**20:.1f} MiB"


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
        f"({_mib(res['dataset']['db_bytes'])}), {args.update_pct}% of pgbench_accounts updated "
        "(a contiguous aid range) before each incremental.",
        "",
        "| backup | type | wall s | copy s | data | stored |",
        "|---|---|---|---|---|---|",
    ]
    for b in res["backups"]:
        lines.append(
            f"| {b['id']} | {b['type']}{' (parent ' + str(b['parent']) + ')' if b['parent'] else ''} | "
            f"{b['s']} | {b['copy_s']} | {_mib(b['size'])} | {_mib(b['stored'])} |"
        )
    fulls = [b for b in res["backups"] if b["type"] == "full"]
    incs = [b for b in res["backups"] if b["type"] == "incremental"]
    if fulls and incs:
        f_s = sum(b["s"] for b in fulls) / len(fulls)
        i_s = sum(b["s"] for b in incs) / len(incs)
        lines += ["", f"Incremental / full backup time: {i_s / f_s:.2f}x (target <= 0.3x)."]
    lines += [
        "",
        "| restore (to a writable server) | wall s | pg_combinebackup | phases |",
        "|---|---|---|---|",
    ]
    for r in res["restores"]:
        lines.append(f"| {r['what']} | {r['s']} | {r['combine_mode'] or '-'} | {json.dumps(r['seconds'])} |")
    if len(res["restores"]) == 2:
        ratio = res["restores"][0]["s"] / res["restores"][1]["s"]
        lines += ["", f"Restore of the chain / of a full backup: {ratio:.2f}x (target <= 1.3x)."]
    lines += [
        "",
        "| pg_combinebackup mode (full + 1 incremental, plain copies) | s | result |",
        "|---|---|---|",
    ]
    for c in res["combine"]:
        lines.append(f"| `{c['mode']}` | {c['s']} | {'ok' if c['ok'] else c['error']} |")
    lines += [
        "",
        "pgBackRest's incremental/differential backups are not measured beside them: Debian 12's "
        "pgBackRest 2.45 supports PostgreSQL up to 16.",
    ]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MARK_START}\n{section}{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


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
    args = p.parse_args(argv)
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
    section = report(bench.results, args)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1, default=str))
    if args.write_docs:
        write_docs(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
