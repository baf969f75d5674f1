"""Benchmark of issue 16 ("Restore at the speed of the disk"): backup, restore to first write,
delta restore after 5% of the rows changed and PITR over ~2 GB of WAL from S3, with hakeeper and
pgBackRest 2.45 (process-max 2) side by side on the same data, filesystem and SeaweedFS (S3)
repositories, warm and cold page cache, against ``tar | zstd`` / ``zstd -d | tar -x`` as the
disk's own limit.

It reuses the set-up of ``bench/backup.py`` (:class:`bench.backup.Bench`: a 1-node hakeeper
cluster with the baseline's PostgreSQL settings, ``pgbench -i -s SCALE -q``, the stopped data
directory copied for pgBackRest, both sources running side by side, each tool archiving its own
copy's WAL) and adds:

- an S3 repository for both tools: SeaweedFS ``weed mini`` (tests/support/s3_server.py) with its
  S3 gateway also on https (a self-signed CA made with ``openssl``), because pgBackRest speaks only
  https to S3 (``repo2-storage-verify-tls=n``: pgBackRest checks certificates against DNS names,
  the gateway is an IP on loopback); hakeeper uses the same https endpoint, verified with the CA;
  ``--s3-http-for-hakeeper`` gives hakeeper the plain http port instead;
- warm and cold cache: cold = ``sync; echo 3 > /proc/sys/vm/drop_caches`` right before every timed
  backup/restore (and raw run); where that file cannot be written (not root, a container) the run
  says so, records it and measures warm only;
- scenarios, each ``--runs`` times per (repository, cache) with the tools interleaved (the tool
  that goes first alternates):

  ``backup``   ``hakeeper backup create --repo R`` / ``pgbackrest backup --type=full --repo=N``;
  ``restore``  the newest backup into a fresh directory, to the first successful write
               (``pg_is_in_recovery()`` false and an INSERT committed, polled every 50 ms):
               ``hakeeper restore --latest --start --jobs J`` / ``pgbackrest restore`` +
               ``pg_ctl start``;
  ``delta``    ``UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 5% of rows`` on
               both sources, a new full backup with each tool (untimed), then a delta restore into
               the directory of an earlier restore: ``hakeeper restore --delta`` /
               ``pgbackrest restore --delta``, to first write; the changed rows are checked;
  ``pitr``     (S3 only) a base backup, then pgbench until ``--pitr-wal-mb`` of WAL (2 GiB) are
               written and archived, the target time at its end; restores to that time, to first
               write; hakeeper's WAL-fetch idle time (from its ``-o json`` prefetch statistics)
               against the replay time in the PostgreSQL log.

  hakeeper is measured in two backup layouts (``--hk-variants default,client``): as ``backup
  create`` takes them by default and with ``--compress-on client`` (the indexed layout of parallel
  and delta restore while it is not the default); both back up the same cluster into the same
  repositories and every restore names its variant's backup (``--backup ID``).  The delta
  scenario runs with the first variant whose backups carry a file index.

  The options the issue adds to hakeeper (``restore --jobs``, ``restore --delta``, phase timings
  and prefetch statistics in ``-o json``) are detected at run time from ``hakeeper restore
  --help`` / the JSON; a scenario hakeeper cannot run is skipped with the reason printed and
  recorded (without ``--jobs`` the restore runs with today's ``--parallel 2``).

- the issue's targets evaluated (met / missed, with the ratio): restore <= 0.8x pgBackRest and
  <= 1.2x raw ``zstd -d | tar -x``; delta <= 0.3x a full restore; PITR fetch idle < 10% of
  recovery; backup <= 0.5x pgBackRest.

Usage::

    python -m bench.restore_speed [--scale 600] [--runs 3] [--repos fs,s3] [--cache warm,cold]
        [--scenarios backup,restore,delta,pitr] [--pitr-wal-mb 2048] [--update-pct 5]
        [--jobs N] [--work-dir /tmp] [--skip-pgbackrest] [--skip-hakeeper] [--keep]
        [--write-docs] [--out docs/benchmarks.md] [--json FILE]

The work directory needs about five copies of the data directory plus four times the PITR WAL;
the run refuses to start when ``--work-dir`` has less free space.  With ``--write-docs`` only the
section between ``<!-- bench:restore-speed:start -->`` and ``<!-- bench:restore-speed:end -->``
of ``--out`` is written or replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import pgbr
from bench.backup import (
    DB,
    PARALLEL,
    PG_PARAMETERS,
    PGBENCH_LOAD,
    REPO_NAME,
    REPO_ROOT,
    STANZA,
    ZSTD_LEVEL,
    Bench,
    BenchCluster,
    BenchError,
    Ports,
    Results,
    Tracker,
    bash,
    disk_facts,
    find_pg_log,
    hakeeper_cli,
    log,
    log_phases,
    mkdir_for,
    parse_json,
    rmtree,
    run_cmd,
    sql,
    start_pg,
    stop_pg,
    tool_version,
    wait_writable_or_log,
)
from bench.failover import machine_facts
from bench.switchover import write_section  # the section carries its own marks
from hakeeper.localcluster import HOST, SUPERUSER, pg_program, port_is_free
from hakeeper.util.proc import RunAs, child_env
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

MARK_START = "<!-- bench:restore-speed:start -->"
MARK_END = "<!-- bench:restore-speed:end -->"
DEFAULT_BASE_PORT = 34300
SCOPE = "benchspeed"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MIB_PER_SCALE = 15.5  # data directory MiB per pgbench scale unit (2,305 MiB at scale 150)
HK_REPOS = {"fs": REPO_NAME, "s3": "s3"}
PGBR_REPOS = {"fs": 1, "s3": 2}
HK_BUCKET = "bench-hakeeper"
PGBR_BUCKET = "bench-pgbackrest"
WAL_CHUNK_S = 20  # pgbench runs of this length until --pitr-wal-mb are written
PGBR_GET_QUEUE_SEGMENTS = 16  # pgBackRest's async archive-get queue, like hakeeper's prefetch default

# The targets (ratios of medians).
T_RESTORE_VS_PGBR = 0.8
T_RESTORE_VS_RAW = 1.2
T_DELTA_VS_FULL = 0.3
T_PITR_IDLE = 0.10
T_BACKUP_VS_PGBR = 0.5

TOOLS = {"hk": "hakeeper", "hkc": "hakeeper --compress-on client", "pgbr": "pgBackRest", "raw": "raw"}
# hakeeper's backups in two layouts: "hk" as `backup create` takes them by default, "hkc" with
# `--compress-on client` (the indexed layout of issue 16's parallel and delta restore, while it is
# not the default); both back up the same cluster, each restore names its own backup (--backup).
HK_TOOLS = ("hk", "hkc")
HK_CREATE_OPTS = {"hk": [], "hkc": ["--compress-on", "client"]}


def source_of(tool: str) -> str:
    return "hk" if tool in HK_TOOLS else tool


def variant(tool: str) -> str:
    """Suffix of a verdict's label: which of hakeeper's backup layouts."""
    return ", --compress-on client" if tool == "hkc" else ""


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------- environment


@dataclass(frozen=True, slots=True)
class HkCaps:
    """What the installed hakeeper offers of issue 16 (read from ``--help``)."""

    jobs: bool
    delta: bool
    create_parallel: bool
    compress_on: bool = False

    def restore_opts(self, jobs: int) -> list[str]:
        return ["--jobs", str(jobs)] if self.jobs else ["--parallel", str(PARALLEL)]


def help_text(cli: list[str], *sub: str) -> str:
    # Wide and plain: rich would otherwise wrap or cut option names in a narrow pipe.
    r = run_cmd(
        [*cli, *sub, "--help"],
        None,
        timeout=60,
        check=False,
        env={"COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"},
    )
    return r.stdout + r.stderr if r.returncode == 0 else ""


def hk_caps(cli: list[str]) -> HkCaps:
    restore = help_text(cli, "restore")
    create = help_text(cli, "backup", "create")
    return HkCaps(
        jobs=bool(re.search(r"--jobs\b", restore)),
        delta=bool(re.search(r"--delta\b", restore)),
        create_parallel=bool(re.search(r"--parallel\b", create)),
        compress_on=bool(re.search(r"--compress-on\b", create)),
    )


def cold_cache_problem() -> str | None:
    """Why the page cache cannot be dropped here (None: it can; the probe drops it once)."""
    if os.geteuid() != 0:
        return "not running as root"
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError as e:
        return f"{DROP_CACHES} cannot be written ({e.strerror or e})"
    return None


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def need_bytes(scale: int, wal_mb: int, pitr: bool) -> int:
    """Free space the run needs: two sources, a restore target, the two old copies of the delta
    scenario (~5 data directories; repositories hold pgbench data at ~5%), and for PITR the WAL
    in both sources' pg_wal and in the repositories; plus 10%."""
    data = scale * MIB_PER_SCALE * 2**20
    wal = 4 * wal_mb * 2**20 if pitr else 0
    return int((5 * data + wal) * 1.1) + 2 * 2**30


@dataclass(frozen=True, slots=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(d: Path) -> Tls:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    d.mkdir(mode=0o755, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (
        d / n for n in ("ca.key", "ca.pem", "s3.key", "s3.csr", "s3.pem", "ext")
    )
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run_cmd(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "7",
            "-subj",
            "/CN=hakeeper bench CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    run_cmd(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            "/CN=127.0.0.1",
        ]
    )
    run_cmd(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "7",
            "-extfile",
            ext,
        ]
    )
    ca.chmod(0o644)  # restore_command (walfetch) runs as PostgreSQL's OS user and reads it
    return Tls(ca, cert, key)


class SeaweedTLS(SeaweedS3):
    """SeaweedFS whose S3 gateway also serves https on its own port (pgBackRest needs https)."""

    def __init__(self, base_dir: Path, tls: Tls | None) -> None:
        super().__init__(base_dir)
        self.tls = tls
        self.https_port = free_ports(1)[0] if tls else None

    def argv(self) -> list[str]:
        argv = super().argv()
        if self.tls is not None:
            argv += [
                f"-s3.port.https={self.https_port}",
                f"-s3.cert.file={self.tls.cert}",
                f"-s3.key.file={self.tls.key}",
            ]
        return argv

    @property
    def https_endpoint(self) -> str | None:
        return f"https://127.0.0.1:{self.https_port}" if self.https_port else None

    def https_works(self) -> str | None:
        """None when the https gateway answers an S3 request, else why not."""
        if self.tls is None or self.https_port is None:
            return "no certificate"
        r = run_cmd(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                self.tls.ca,
                f"{self.https_endpoint}/",
            ],
            None,
            timeout=30,
            check=False,
        )
        code = r.stdout.strip()
        return None if code and code[0] in "234" else f"https answered {code or r.stderr.strip()[:200]}"


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document as ``{"a.b.c": value}`` (booleans left out)."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix.rstrip(".")] = float(d)
    return out


def pick(row: dict[str, Any], *patterns: str) -> float | None:
    """The first numeric ``hk.*`` value whose key matches every regular expression."""
    for k, v in row.items():
        if k.startswith("hk.") and isinstance(v, int | float) and all(re.search(p, k) for p in patterns):
            return float(v)
    return None


def med(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------------- the bench


class SpeedBench(Bench):
    """:class:`bench.backup.Bench` (data set, sources, helpers) with issue 16's scenarios."""

    def __init__(
        self, args: argparse.Namespace, work: Path, res: Results, s3: SeaweedTLS | None, tls_ok: bool
    ) -> None:
        # Not Bench.__init__: the cluster gets an S3 repository beside the filesystem one.
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
        self.s3 = s3
        self.tls_ok = tls_ok
        self.repos: list[str] = args.repo_list
        self.caches: list[str] = args.cache_list
        keep2 = {"full_count": 2}  # `backup expire` after each backup keeps the disk bounded
        repos: list[dict[str, Any]] = [
            {"name": HK_REPOS["fs"], "type": "fs", "path": str(self.hk_repo), "retention": keep2}
        ]
        if s3 is not None:
            https = tls_ok and not args.s3_http_for_hakeeper
            repos.append(
                {
                    "name": HK_REPOS["s3"],
                    "type": "s3",
                    "endpoint": s3.https_endpoint if https else s3.endpoint,
                    "bucket": HK_BUCKET,
                    "access_key": ACCESS_KEY,
                    "secret_key": SECRET_KEY,
                    "retention": keep2,
                    **({"ca_file": str(s3.tls.ca)} if https and s3.tls else {}),
                }
            )
        backup = None
        if not args.skip_hakeeper:
            backup = {
                "repositories": repos,
                "archive": {"compression_level": ZSTD_LEVEL},
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
        self.caps = HkCaps(False, False, True)
        self.jobs: int = args.jobs
        self.old_copy = {t: self.restore_dir / f"{t}-old" for t in (*HK_TOOLS, "pgbr")}
        self.last_id: dict[tuple[str, str], str] = {}  # (hakeeper variant, repo) -> newest backup id
        self.indexed: dict[str, bool] = {}  # hakeeper variant -> its newest backup has a file index
        self.updates = 0  # UPDATEs of the delta scenario so far (abalance = updates on the range)
        self.pgbr_s3 = tls_ok  # pgBackRest reaches S3 only over https
        self.has_backup: set[tuple[str, str]] = set()  # (tool, repo) with a backup to restore

    # ----------------------------------------------------------------- bookkeeping

    def add(self, scenario: str, repo: str, cache: str, tool: str, row: dict[str, Any]) -> None:
        self.res.rows.setdefault(f"{scenario}|{repo}|{cache}|{tool}", []).append(row)
        shown = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k != "run" and not k.startswith("hk.")
        )
        log(f"  {scenario} {repo} {cache} {TOOLS[tool]} #{row.get('run')}: {shown}")

    def tools_for(self, repo: str, tools: list[str]) -> list[str]:
        return [t for t in tools if not (t == "pgbr" and repo == "s3" and not self.pgbr_s3)]

    def prepare_cache(self, cache: str) -> None:
        if cache == "cold":
            drop_caches()

    def note(self, text: str) -> None:
        self.res.notes.append(text)
        log(text)

    def order(self, tools: list[str], i: int) -> list[str]:
        return tools if i % 2 else list(reversed(tools))

    def groups(self, repos: Sequence[str] | None = None) -> list[tuple[str, str]]:
        return [(r, c) for r in (repos or self.repos) for c in self.caches]

    # ----------------------------------------------------------------- raw reference

    def raw_reference(self) -> None:
        ra = self.run_as
        src = self.pgbr_data  # the stopped copy: identical to the hakeeper node's data directory
        raw = mkdir_for(self.work / "raw", ra, 0o755)
        out = raw / "raw.tar.zst"
        q = shlex.quote
        for cache in self.caches:
            for i in range(1, self.args.runs + 1):
                out.unlink(missing_ok=True)
                self.prepare_cache(cache)
                t0 = time.monotonic()
                bash(
                    f"tar -C {q(str(src))} -cf - . | zstd -q -T{PARALLEL} -{ZSTD_LEVEL} -o {q(str(out))}", ra
                )
                row = {"run": i, "s": time.monotonic() - t0, "bytes": out.stat().st_size}
                self.add("backup", "local", cache, "raw", row)
                target = raw / "extract"
                rmtree(target)
                mkdir_for(target, ra)
                self.prepare_cache(cache)
                t0 = time.monotonic()
                bash(f"zstd -q -d -T{PARALLEL} -c {q(str(out))} | tar -C {q(str(target))} -xf -", ra)
                self.add("restore", "local", cache, "raw", {"run": i, "s": time.monotonic() - t0})
                rmtree(target)
        rmtree(raw)
        if self.args.skip_pgbackrest:
            rmtree(self.pgbr_data)

    # ----------------------------------------------------------------- pgBackRest

    def write_pgbr_conf(self) -> None:
        extra: list[str] = []
        if "s3" in self.repos and self.s3 is not None and self.s3.https_port is not None and self.pgbr_s3:
            extra = pgbr.s3_repo_lines(
                PGBR_REPOS["s3"],
                host="127.0.0.1",
                port=self.s3.https_port,
                bucket=PGBR_BUCKET,
                key=ACCESS_KEY,
                secret=SECRET_KEY,
                ca_file=None,
            )
        sections: list[str] = []
        if not self.args.pgbr_sync_get:
            # WAL fetched ahead by archive-get (pgBackRest's own prefetch), for restores only:
            # archive-push stays synchronous, as in bench/backup.py.
            sections = [
                "[global:archive-get]",
                "archive-async=y",
                f"archive-get-queue-max={PGBR_GET_QUEUE_SEGMENTS * 16 * 2**20}",
                "",
            ]
        self.pgbr_conf.write_text(
            pgbr.conf_text(
                self.pgbr_dir,
                STANZA,
                self.pgbr_data,
                self.ports.pgbr_source,
                process_max=PARALLEL,
                compress_level=ZSTD_LEVEL,
                extra_global=extra,
                extra_sections=sections,
            )
        )
        self.pgbr_conf.chmod(0o644)

    def setup_pgbackrest(self) -> None:
        ra = self.run_as
        for sub in pgbr.SUBDIRS:
            mkdir_for(self.pgbr_dir / sub, ra)
        self.write_pgbr_conf()
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
                    "bench/restore_speed.py: this copy is pgBackRest's source",
                )
            )
        self.tracker.add_pgdata(d)
        run_cmd(
            [pg_program("pg_ctl"), "start", "-D", d, "-l", self.pgbr_dir / "source.log", "-w", "-t", "120"],
            ra,
            timeout=150,
        )
        try:
            self.pgbr("stanza-create")
            self.pgbr("check")
        except BenchError as e:
            if not (self.pgbr_s3 and "s3" in self.repos):
                raise
            # archive_command reads the file on every call: without repo2 it archives to repo1 only
            self.pgbr_s3 = False
            self.note(f"pgBackRest could not use the SeaweedFS repository, filesystem only: {e}")
            self.write_pgbr_conf()
            self.pgbr("stanza-create")
            self.pgbr("check")
        log(f"pgBackRest source on port {self.ports.pgbr_source}, repositories: {', '.join(self.repos)}")

    # ----------------------------------------------------------------- backups

    def hk_backup(
        self, i: int, repo: str = "fs", cache: str = "warm", scenario: str = "backup", tool: str = "hk"
    ) -> None:
        par = ["--parallel", str(PARALLEL)] if self.caps.create_parallel else []
        self.prepare_cache(cache)
        t0 = time.monotonic()
        r = self.hk(
            "backup",
            "create",
            "-c",
            self.node.config_path,
            "--repo",
            HK_REPOS[repo],
            "--from",
            "primary",
            *par,
            *HK_CREATE_OPTS[tool],
            "-o",
            "json",
        )
        el = time.monotonic() - t0
        rec = parse_json(r.stdout)
        if rec.get("id"):
            self.last_id[(tool, repo)] = str(rec["id"])
        row: dict[str, Any] = {"run": i, "s": el, "bytes": rec.get("stored_size"), "id": rec.get("id")}
        row.update({f"hk.{k}": v for k, v in flatten(rec).items()})
        self.indexed[tool] = any(k.startswith("hk.index.") for k in row)  # what --delta needs
        self.add(scenario, repo, cache, tool, row)
        # Untimed: keep the repository at the newest two backups (the disk at scale 600).
        self.hk("backup", "expire", "-c", self.node.config_path, "--repo", HK_REPOS[repo])

    def pgbr_backup(self, i: int, repo: str = "fs", cache: str = "warm", scenario: str = "backup") -> None:
        n = PGBR_REPOS[repo]
        self.prepare_cache(cache)
        t0 = time.monotonic()
        self.pgbr("backup", "--type=full", f"--repo={n}")
        el = time.monotonic() - t0
        info = json.loads(self.pgbr("info", "--output=json", f"--repo={n}").stdout)
        last = pgbr.backups(info)[-1]
        self.add(
            scenario,
            repo,
            cache,
            "pgbr",
            {"run": i, "s": el, "bytes": last["info"]["repository"]["delta"], "label": last["label"]},
        )
        self.pgbr("expire", f"--repo={n}", f"--repo{n}-retention-full=2")

    def backup_any(self, tool: str, i: int, repo: str, cache: str, scenario: str) -> None:
        if tool in HK_TOOLS:
            self.hk_backup(i, repo, cache, scenario, tool)
        else:
            self.pgbr_backup(i, repo, cache, scenario)
        self.has_backup.add((tool, repo))

    # ----------------------------------------------------------------- restores

    def restore_run(
        self,
        tool: str,
        scenario: str,
        repo: str,
        cache: str,
        i: int,
        *,
        target_time: str | None = None,
        into: Path | None = None,
    ) -> None:
        """One restore with ``tool`` to the first successful write.  ``into``: a delta restore
        into that directory (kept, stopped cleanly); else a fresh directory, removed after."""
        ra = self.run_as
        delta = into is not None and scenario == "delta"
        target = into or self.restore_dir / f"{tool}-{scenario}-{i}"
        keep = into is not None
        if not delta:
            rmtree(target)
        self.tracker.add_pgdata(target)
        port = self.ports.hk_restore if tool in HK_TOOLS else self.ports.pgbr_restore
        logfile: Path | None = None
        self.prepare_cache(cache)
        wall0 = time.time()
        t0 = time.monotonic()
        if tool in HK_TOOLS:
            how = ["--target-time", target_time] if target_time else ["--latest"]
            if (tool, repo) in self.last_id:  # this variant's newest backup, not the other's
                how += ["--backup", self.last_id[(tool, repo)]]
            r = self.hk(
                "restore",
                "-c",
                self.node.config_path,
                "--data-dir",
                target,
                *how,
                *(["--delta"] if delta else []),
                "--repo",
                HK_REPOS[repo],
                "--start",
                "--port",
                str(port),
                *self.caps.restore_opts(self.jobs),
                "-o",
                "json",
            )
            t1 = time.monotonic()
            rec = parse_json(r.stdout)
        else:
            if not delta:
                mkdir_for(target, ra)
            logfile = self.restore_dir / f"pgbr-{scenario}-{i}.log"
            sock = mkdir_for(self.restore_dir / "pgbr.sock", ra)
            pitr = (
                ["--type=time", f"--target={target_time}", "--target-action=promote"] if target_time else []
            )
            self.pgbr(
                "restore",
                f"--pg1-path={target}",
                f"--repo={PGBR_REPOS[repo]}",
                "--archive-mode=off",
                *(["--delta"] if delta else []),
                *pitr,
                timeout=3600,
            )
            t1 = time.monotonic()
            start_pg(target, ra, port, sock, logfile, wait=False)
            rec = {}
        off, t2 = wait_writable_or_log(port, self.password, target, logfile)
        row: dict[str, Any] = {
            "run": i,
            "cmd_s" if tool in HK_TOOLS else "copy_s": t1 - t0,
            "total_s": t2 - t0,
            "recovery_off_to_write_s": t2 - off,
        }
        row.update({f"hk.{k}": v for k, v in flatten(rec).items()})
        row.update(self.check_restored(port, target_time))
        if scenario == "delta":
            row.update(self.check_changed_rows(port))
        stop_pg(target, ra, mode="fast" if keep else "immediate")
        row.update(log_phases(logfile or find_pg_log(target), wall0))
        self.reap_helpers(target, f"{tool} {scenario} #{i}")
        self.add(scenario, repo, cache, tool, row)
        if not keep:
            rmtree(target)

    def check_changed_rows(self, port: int) -> dict[str, Any]:
        """The delta scenario's range must hold exactly the UPDATEs made before the backup."""
        n = self.changed_rows()
        got = sql(
            port,
            self.password,
            "SELECT sum(abalance)::bigint FROM pgbench_accounts WHERE aid <= %s",
            DB,
            (n,),
        )
        return {"changed_rows_ok": int(got or 0) == self.updates * n}

    def changed_rows(self) -> int:
        return max(1, int(self.args.scale * 100_000 * self.args.update_pct / 100))

    # ----------------------------------------------------------------- scenarios

    def scenario_backup(self, tools: list[str]) -> None:
        log("scenario backup")
        for repo, cache in self.groups():
            for i in range(1, self.args.runs + 1):
                for t in self.order(self.tools_for(repo, tools), i):
                    self.backup_any(t, i, repo, cache, "backup")

    def scenario_restore(self, tools: list[str]) -> None:
        log("scenario restore (newest backup, to first write)")
        for repo, cache in self.groups():
            for t in self.tools_for(repo, tools):  # the newest backup of this repository must exist
                if (t, repo) not in self.has_backup:
                    self.backup_any(t, 0, repo, "warm", "setup-backup")
            for i in range(1, self.args.runs + 1):
                for t in self.order(self.tools_for(repo, tools), i):
                    self.restore_run(t, "restore", repo, cache, i)

    def scenario_delta(self, tools: list[str]) -> None:
        log(f"scenario delta ({self.args.update_pct}% of the accounts updated, new backup, delta restore)")
        if any(t in HK_TOOLS for t in tools) and not self.caps.delta:
            self.note(
                "delta: skipped for hakeeper: `hakeeper restore --help` has no --delta in this checkout"
            )
            tools = [t for t in tools if t not in HK_TOOLS]
        tools = self.delta_variants(tools)
        if not tools:
            return
        for t in tools:  # the older copy: an untimed full restore of the newest backup, stopped cleanly
            rmtree(self.old_copy[t])
            if (t, self.repos[0]) not in self.has_backup:
                self.backup_any(t, 0, self.repos[0], "warm", "setup-backup")
            self.restore_run(t, "old-copy", self.repos[0], "warm", 0, into=self.old_copy[t])
        n = self.changed_rows()
        for repo, cache in self.groups():
            for i in range(1, self.args.runs + 1):
                self.updates += 1
                # both sources change, even where a tool skips this repository
                for t in sorted({source_of(t) for t in tools}):
                    port = self.ports.hk_pg if t == "hk" else self.ports.pgbr_source
                    t0 = time.monotonic()
                    sql(
                        port,
                        self.password,
                        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s",
                        DB,
                        (n,),
                    )
                    log(f"  {t}: {n} rows updated in {time.monotonic() - t0:.1f} s")
                for t in self.tools_for(repo, tools):
                    self.backup_any(t, i, repo, "warm", "delta-backup")
                for t in self.order(self.tools_for(repo, tools), i):
                    try:
                        self.restore_run(t, "delta", repo, cache, i, into=self.old_copy[t])
                    except BenchError as e:
                        # e.g. --delta refused for a backup without an index (server-compressed)
                        if t not in HK_TOOLS:
                            raise
                        why = str(e).strip().splitlines()[-1][:300]
                        self.res.missing.append(f"delta restore with {TOOLS[t]} failed, not measured: {why}")
                        log(self.res.missing[-1])
                        stop_pg(self.old_copy[t], self.run_as, mode="immediate")
                        rmtree(self.old_copy[t])
                        tools.remove(t)
        for t in (*HK_TOOLS, "pgbr"):
            rmtree(self.old_copy[t])

    def delta_variants(self, tools: list[str]) -> list[str]:
        """One hakeeper variant for the delta scenario: the first whose backups carry a file index
        (the default layout once it is indexed; else --compress-on client).  One old copy per tool
        keeps the disk at five data directories.  Without index information every variant is
        tried (a refusal is then reported as missing)."""
        hk = [t for t in tools if t in HK_TOOLS]
        for t in hk:
            if (t, self.repos[0]) not in self.has_backup:
                self.backup_any(t, 0, self.repos[0], "warm", "setup-backup")
        indexed = [t for t in hk if self.indexed.get(t)]
        if not indexed:
            return tools
        for t in hk:
            if t != indexed[0]:
                why = (
                    "measured with"
                    if self.indexed.get(t)
                    else "its backups have no file index; measured with"
                )
                self.note(f"delta: not measured for {TOOLS[t]} ({why} {TOOLS[indexed[0]]})")
        return [t for t in tools if t not in HK_TOOLS or t == indexed[0]]

    def scenario_pitr(self, tools: list[str]) -> None:
        repo = "s3" if "s3" in self.repos else self.repos[0]
        log(f"scenario pitr ({self.args.pitr_wal_mb} MiB of WAL, repository {repo})")
        if repo != "s3":
            self.note("pitr: no S3 repository in this run (--repos): PITR from the filesystem repository")
        tools = self.tools_for(repo, tools)
        for t in tools:
            self.backup_any(t, 0, repo, "warm", "pitr-base")
        targets = {src: self.make_wal(src, repo) for src in sorted({source_of(t) for t in tools})}
        for _repo, cache in self.groups([repo]):
            for i in range(1, self.args.runs + 1):
                for t in self.order(tools, i):
                    self.restore_run(t, "pitr", repo, cache, i, target_time=targets[source_of(t)])

    def make_wal(self, tool: str, repo: str) -> str:
        """pgbench on ``tool``'s source until --pitr-wal-mb of WAL are written; returns the target
        time (taken at the end) once the last segment is in the repository."""
        port = self.ports.hk_pg if tool == "hk" else self.ports.pgbr_source
        want = self.args.pitr_wal_mb * 2**20
        lsn0 = sql(port, self.password, "SELECT pg_current_wal_lsn()::text")
        t0 = time.monotonic()
        written = 0
        while written < want:
            argv = [
                pg_program("pgbench"),
                "-h",
                HOST,
                "-p",
                str(port),
                "-U",
                SUPERUSER,
                *PGBENCH_LOAD,
                "-T",
                str(WAL_CHUNK_S),
                DB,
            ]
            p = subprocess.Popen(
                argv,
                env=child_env(RunAs(), {"PGPASSWORD": self.password}),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                cwd="/",
            )
            self.tracker.procs.append(p)
            _out, err = p.communicate(timeout=WAL_CHUNK_S + 120)
            if p.returncode != 0:
                raise BenchError(f"pgbench exited {p.returncode}: {err[-500:]}")
            written = int(
                sql(
                    port,
                    self.password,
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint",
                    params=(lsn0,),
                )
            )
            log(f"  {tool}: {written / 2**20:,.0f} of {want / 2**20:,.0f} MiB of WAL")
        gen_s = time.monotonic() - t0
        target = str(
            sql(
                port,
                self.password,
                "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
            )
        )
        # A commit after the target: recovery stops at the first commit past it; without one it
        # reaches the end of the WAL first, and PostgreSQL 14+ refuses to promote ("recovery ended
        # before configured recovery target was reached").
        time.sleep(0.01)
        sql(port, self.password, "CREATE TABLE IF NOT EXISTS bench_after_target (at timestamptz)", DB)
        sql(port, self.password, "INSERT INTO bench_after_target VALUES (clock_timestamp())", DB)
        rows = sql(
            port,
            self.password,
            "SELECT count(*) FROM pgbench_history WHERE mtime <= %s::timestamptz",
            DB,
            (target,),
        )
        last_seg = str(sql(port, self.password, "SELECT pg_walfile_name(pg_current_wal_lsn())"))
        sql(port, self.password, "SELECT pg_switch_wal()")
        t1 = time.monotonic()
        while True:
            archived = sql(port, self.password, "SELECT last_archived_wal FROM pg_stat_archiver")
            done = archived is not None and str(archived)[:24] >= last_seg
            if done and tool == "hk" and repo == "s3":
                done = self.in_bucket(HK_BUCKET, last_seg)  # the archiver may still be pushing to S3
            if done:
                break
            if time.monotonic() - t1 > 900:
                raise BenchError(f"{tool}: {last_seg} not archived into {repo} 900 s after the load")
            time.sleep(0.5)
        self.res.loads[tool] = {
            "wal_bytes": written,
            "generate_s": round(gen_s, 1),
            "archive_wait_s": round(time.monotonic() - t1, 1),
            "target_time": target,
            "rows_to_target_source": rows,
            "last_segment": last_seg,
        }
        log(f"  {tool}: target {target}, {rows} history rows, archived {time.monotonic() - t1:.1f} s after")
        return target

    def hk_variants(self) -> list[str]:
        out = ["hk"] if "default" in self.args.hk_variant_list else []
        if "client" in self.args.hk_variant_list:
            if self.caps.compress_on:
                out.append("hkc")
            else:
                self.note(
                    "hakeeper: `backup create --help` has no --compress-on: no client-compressed variant"
                )
        return out

    def cleanup(self) -> list[str]:
        """Everything stopped, SeaweedFS last (the agent may still push WAL to it while stopping);
        the second pass only lists what is left."""
        super().cleanup()
        if self.s3 is not None:
            self.s3.stop()
        return super().cleanup()

    def in_bucket(self, bucket: str, name: str) -> bool:
        assert self.s3 is not None
        client: Any = self.s3.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            if any(name in o["Key"] for o in page.get("Contents", [])):
                return True
        return False

    # ----------------------------------------------------------------- the whole run

    def run(self) -> None:
        hk_on = not self.args.skip_hakeeper
        pgbr_on = not self.args.skip_pgbackrest
        if hk_on:
            self.check_hakeeper_commands()
            if self.hk_available:
                self.caps = hk_caps(self.hk_cli)
                self.res.dataset["hk_caps"] = {
                    "jobs": self.caps.jobs,
                    "delta": self.caps.delta,
                    "compress_on": self.caps.compress_on,
                }
                if not self.caps.jobs:
                    self.note(
                        "hakeeper: `restore --help` has no --jobs in this checkout: restores run with "
                        f"today's `--parallel {PARALLEL}`"
                    )
        if self.s3 is not None:
            client: Any = self.s3.client()
            for b in (HK_BUCKET, PGBR_BUCKET):
                client.create_bucket(Bucket=b)
        mkdir_for(self.restore_dir, self.run_as, 0o755)
        self.create_dataset()
        self.stop_cluster()
        self.copy_data()
        hk_measured = hk_on and self.hk_available
        if hk_measured:
            self.restart_hakeeper_cluster()
        log("raw reference on the stopped copy: tar | zstd, zstd -d | tar -x")
        self.raw_reference()
        if pgbr_on:
            self.setup_pgbackrest()
        tools = self.hk_variants() if hk_measured else []
        tools += ["pgbr"] if pgbr_on else []
        if not tools:
            return
        steps = {
            "backup": self.scenario_backup,
            "restore": self.scenario_restore,
            "delta": self.scenario_delta,
            "pitr": self.scenario_pitr,
        }
        for name in self.args.scenario_list:
            steps[name](list(tools))


# --------------------------------------------------------------------------------- report

SCENARIO_TITLES = {
    "backup": "full backup (s)",
    "restore": "restore of the newest backup, to first write (s)",
    "delta": "delta restore after {pct:g}% changed, to first write (s)",
    "pitr": "PITR over the WAL, to first write (s)",
}


def rows_of(res: Results, scenario: str, repo: str, cache: str, tool: str) -> list[dict[str, Any]]:
    return res.rows.get(f"{scenario}|{repo}|{cache}|{tool}", [])


def main_value(scenario: str, tool: str) -> str:
    return "s" if scenario == "backup" or tool == "raw" else "total_s"


def cell(rows: Sequence[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    if not vals:
        return "-"
    return f"**{statistics.median(vals):.2f}** ({min(vals):.2f}-{max(vals):.2f}, n={len(vals)})"


def results_table(res: Results, args: argparse.Namespace) -> list[str]:
    out = [
        "| scenario | repository | cache | hakeeper backups | hakeeper median (min-max) "
        "| pgBackRest median (min-max) | raw `tar \\| zstd` / `zstd -d \\| tar` | hakeeper / pgBackRest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scen in ("backup", "restore", "delta", "pitr"):
        for repo in ("fs", "s3"):
            for cache in ("warm", "cold"):
                br = rows_of(res, scen, repo, cache, "pgbr")
                raw = rows_of(res, scen, "local", cache, "raw") if scen in ("backup", "restore") else []
                title = SCENARIO_TITLES[scen].format(pct=args.update_pct)
                hks = [t for t in HK_TOOLS if rows_of(res, scen, repo, cache, t)]
                for t in hks or (["-"] if br else []):
                    hk = rows_of(res, scen, repo, cache, t)
                    h, b = med(hk, main_value(scen, "hk")), med(br, main_value(scen, "pgbr"))
                    ratio = f"{h / b:.2f}x" if h and b else "-"
                    layout = {"hk": "default", "hkc": "`--compress-on client`"}.get(t, "-")
                    out.append(
                        f"| {title} | {repo} | {cache} | {layout} | {cell(hk, main_value(scen, 'hk'))} "
                        f"| {cell(br, main_value(scen, 'pgbr'))} | {cell(raw, 's')} | {ratio} |"
                    )
    return out


def verdict(label: str, value: float | None, limit: float, how: str, below: bool = True) -> str:
    if value is None:
        return f"- {label}: not measured ({how})."
    ok = value <= limit if below else value < limit
    return f"- {label}: **{value:.2f}x** (target <= {limit}x; {how}): **{'met' if ok else 'missed'}**."


def verdicts(res: Results) -> list[str]:
    out: list[str] = []
    for repo in ("fs", "s3"):
        for cache in ("warm", "cold"):
            for t in HK_TOOLS:
                out += group_verdicts(res, repo, cache, t)
            br_d = med(rows_of(res, "delta", repo, cache, "pgbr"), "total_s")
            br_r = med(rows_of(res, "restore", repo, cache, "pgbr"), "total_s")
            if br_d and br_r:
                out.append(
                    f"- pgBackRest's delta restore vs its full restore ({repo}, {cache}; for comparison): "
                    f"{br_d:.2f} s / {br_r:.2f} s = {br_d / br_r:.2f}x."
                )
    for cache in ("warm", "cold"):
        for repo in ("s3", "fs"):
            for t in HK_TOOLS:
                out += pitr_verdicts(res, repo, cache, t)
    return out


def group_verdicts(res: Results, repo: str, cache: str, t: str) -> list[str]:
    """The issue's backup, restore and delta targets for one hakeeper variant."""
    out: list[str] = []
    g = f"{repo}, {cache}{variant(t)}"
    hk_b = med(rows_of(res, "backup", repo, cache, t), "s")
    br_b = med(rows_of(res, "backup", repo, cache, "pgbr"), "s")
    hk_r = med(rows_of(res, "restore", repo, cache, t), "total_s")
    br_r = med(rows_of(res, "restore", repo, cache, "pgbr"), "total_s")
    raw_r = med(rows_of(res, "restore", "local", cache, "raw"), "s")
    hk_d = med(rows_of(res, "delta", repo, cache, t), "total_s")
    if hk_b and br_b:
        out.append(
            verdict(
                f"backup vs pgBackRest ({g})", hk_b / br_b, T_BACKUP_VS_PGBR, f"{hk_b:.2f} s / {br_b:.2f} s"
            )
        )
    if hk_r and br_r:
        out.append(
            verdict(
                f"restore to first write vs pgBackRest ({g})",
                hk_r / br_r,
                T_RESTORE_VS_PGBR,
                f"{hk_r:.2f} s / {br_r:.2f} s",
            )
        )
    if hk_r and raw_r:
        out.append(
            verdict(
                f"restore to first write vs raw `zstd -d | tar -x` ({g})",
                hk_r / raw_r,
                T_RESTORE_VS_RAW,
                f"{hk_r:.2f} s / {raw_r:.2f} s; the raw run has no PostgreSQL start and no fsync",
            )
        )
    rows_d = rows_of(res, "delta", repo, cache, t)
    written = [pick(r, "bytes", "written") for r in rows_d]
    total = [pick(r, "bytes", "total") for r in rows_d]
    fetched = [pick(r, "bytes", "fetched") for r in rows_d]
    stored = med(rows_of(res, "delta-backup", repo, "warm", t), "bytes")  # compressed, as fetched
    if rows_d and all(x is not None for x in written) and all(total):
        w_share = statistics.median((w or 0) / (tt or 1) for w, tt in zip(written, total, strict=True))
        f_med = statistics.median(f for f in fetched if f is not None) if any(fetched) else None
        fetched_txt = (
            f"; fetched {f_med / 2**20:,.1f} MiB of the backup's {stored / 2**20:,.1f} MiB stored "
            f"({f_med / stored * 100:.0f} %)"
            if f_med is not None and stored
            else ""
        )
        out.append(
            f"- hakeeper's delta restore ({g}) wrote a median {w_share * 100:.1f} % of the backup's "
            f"file bytes{fetched_txt}."
        )
    if hk_d and hk_r:
        out.append(
            verdict(
                f"delta restore vs full restore ({g})",
                hk_d / hk_r,
                T_DELTA_VS_FULL,
                f"{hk_d:.2f} s / {hk_r:.2f} s",
            )
        )
    return out


def pitr_verdicts(res: Results, repo: str, cache: str, t: str) -> list[str]:
    rows = rows_of(res, "pitr", repo, cache, t)
    if not rows:
        return []
    g = f"{repo}, {cache}{variant(t)}"
    shares = [s for s in (idle_share(r) for r in rows) if s is not None]
    share = statistics.median(shares) if shares else None
    if share is None:
        out = [
            f"- PITR WAL-fetch idle share ({g}): not measured (hakeeper's `-o json` "
            "has no prefetch waiting time, or the replay time was not in the log)."
        ]
    else:
        ok = "met" if share < T_PITR_IDLE else "missed"
        out = [
            f"- PITR WAL-fetch idle time / recovery ({g}): **{share * 100:.1f} %** "
            f"(target < {T_PITR_IDLE * 100:.0f} %): **{ok}**."
        ]
    hk_p, br_p = med(rows, "total_s"), med(rows_of(res, "pitr", repo, cache, "pgbr"), "total_s")
    if hk_p and br_p:
        out.append(
            f"- PITR to first write ({g}; no target in the issue): hakeeper "
            f"{hk_p:.2f} s, pgBackRest {br_p:.2f} s ({hk_p / br_p:.2f}x)."
        )
    return out


def idle_s(row: dict[str, Any]) -> float | None:
    """Seconds recovery waited for WAL from the repository, from hakeeper's ``-o json``."""
    # walspool.PrefetchStats' seconds_waiting, wherever the restore's JSON puts it
    found = pick(row, r"prefetch|wal_fetch|walfetch", r"wait|idle", r"second|_s$")
    return found if found is not None else pick(row, r"seconds_waiting|fetch_idle")


def recovery_s(row: dict[str, Any]) -> float | None:
    """Redo start -> redo done from the PostgreSQL log, else hakeeper's replay phase."""
    v = row.get("replay_s")
    if isinstance(v, int | float) and v > 0:
        return float(v)
    return pick(row, r"replay", r"second")


def idle_share(row: dict[str, Any]) -> float | None:
    i, r = idle_s(row), recovery_s(row)
    return i / r if i is not None and r else None


def detail_lines(res: Results) -> list[str]:
    """Every run, and what hakeeper's JSON said (phases, prefetch, delta bytes)."""
    out = []
    for key, rows in res.rows.items():
        scen, repo, cache, tool = key.split("|")
        k = main_value(scen, tool)
        vals = ", ".join(f"{r[k]:.2f}" for r in rows if isinstance(r.get(k), int | float))
        extra = []
        if any("rows_to_target" in r for r in rows):
            extra.append("rows up to the target " + ", ".join(str(r.get("rows_to_target")) for r in rows))
        if any("changed_rows_ok" in r for r in rows):
            extra.append("changed rows as expected " + ", ".join(str(r.get("changed_rows_ok")) for r in rows))
        if any("replay_s" in r for r in rows):
            extra.append("replay s " + ", ".join(f"{r.get('replay_s', 0):.2f}" for r in rows))
        shares = [idle_share(r) for r in rows]
        if any(s is not None for s in shares):
            extra.append(
                "WAL-fetch idle share " + ", ".join("-" if s is None else f"{s:.3f}" for s in shares)
            )
        for what in ("fetched", "written", "total"):
            got = [pick(r, r"bytes", what) for r in rows]
            if scen == "delta" and any(f is not None for f in got):
                extra.append(f"bytes {what} " + ", ".join("-" if f is None else f"{f:,.0f}" for f in got))
        out.append(
            f"- `{scen}` {repo} {cache} {TOOLS[tool]} ({k}, run order): {vals}"
            + (f"; {'; '.join(extra)}" if extra else "")
        )
    return out


def hk_phase_lines(res: Results) -> list[str]:
    """Medians of every number hakeeper's ``-o json`` gave per scenario (phases, prefetch...)."""
    out = []
    for key, rows in res.rows.items():
        scen, repo, cache, tool = key.split("|")
        if tool not in HK_TOOLS:
            continue
        keys = sorted(
            {k for r in rows for k in r if k.startswith("hk.") and re.search(r"phase|second|prefetch", k)}
        )
        parts = [f"{k[3:]} {med(rows, k):.2f}" for k in keys if med(rows, k) is not None]
        if parts:
            out.append(f"- `{scen}` {repo} {cache} {TOOLS[tool]}: " + "; ".join(parts[:24]))
    return out


def machine_lines(f: dict[str, str]) -> list[str]:
    return [
        "| | |",
        "|---|---|",
        f"| date | {f['date_utc']} |",
        f"| CPUs (`nproc`) | {f['nproc']} ({f['cpu_model']}) |",
        f"| RAM | {f['memory']} |",
        f"| disk (work directory {f.get('work_dir', '?')}) | {f.get('disk', '?')} |",
        f"| kernel | {f['kernel']} |",
        f"| PostgreSQL | {f['postgresql']} |",
        f"| pgBackRest | {f.get('pgbackrest', '?')} |",
        f"| zstd / tar | {f.get('zstd', '?')} / {f.get('tar', '?')} |",
        f"| load average before / after | {f['load_avg_start']} / {f.get('load_avg_end', '?')} |",
        f"| page cache | {f.get('cache', '?')} |",
        f"| S3 | {f.get('s3', '?')} |",
        f"| hakeeper code under test | {f['hakeeper']} |",
    ]


def setup_lines(res: Results, args: argparse.Namespace) -> list[str]:
    ds = res.dataset
    caps = ds.get("hk_caps", {})
    params = ", ".join(f"`{k}={v}`" for k, v in PG_PARAMETERS.items() if k != "wal_recycle")
    mib = ds.get("data_dir_bytes", 0) / 2**20
    return [
        f"- **Data**: `pgbench -i -s {ds.get('scale', args.scale)} -q` ({ds.get('pgbench_init_s', '?')} s) "
        "on a "
        f"1-node hakeeper cluster, PostgreSQL settings of `bench/backup.py` ({params}); data directory "
        f"{mib:,.0f} MiB, {ds.get('files', '?')} files. The stopped data directory is copied for pgBackRest "
        "(same data, same system identifier); both sources run side by side, each tool archives its own.",
        f"- **Repositories**: hakeeper `local` (fs) and `s3`; pgBackRest repo1 (posix) and repo2 (s3), "
        f"process-max={PARALLEL}, zstd {ZSTD_LEVEL}, WAL archived to both repositories by both tools. S3 is "
        "SeaweedFS `weed mini` on loopback (same machine, same CPUs) over https with a self-signed CA "
        "(pgBackRest: `repo2-storage-verify-tls=n`; hakeeper: `ca_file`). After every backup the repository "
        "is expired to its newest two (untimed).",
        "- **hakeeper**: `backup create --repo R --from primary` as it is (`default`) and with "
        "`--compress-on client` (the indexed layout of parallel and delta restore, not the default at "
        "the time of writing; `--hk-variants`), into the same repositories, each restore naming its "
        "variant's backup with `--backup ID`; "
        f"`restore ... --repo R --start "
        f"{' '.join(HkCaps(bool(caps.get('jobs')), False, True).restore_opts(args.jobs))} -o json` "
        "(`--latest`, `--target-time T` or `--delta --latest`); the restore's own defaults otherwise.",
        "- **pgBackRest**: `backup --type=full --repo=N`; `restore --repo=N --archive-mode=off [--delta] "
        "[--type=time --target=T --target-action=promote]` then `pg_ctl start`"
        + (
            ""
            if args.pgbr_sync_get
            else f"; archive-get async with a {PGBR_GET_QUEUE_SEGMENTS}-segment queue "
            "(`[global:archive-get] archive-async=y`, its WAL prefetch) while archive-push stays synchronous"
        )
        + ".",
        f"- **Raw reference**: `tar -cf - . | zstd -q -T{PARALLEL} -{ZSTD_LEVEL}` of the stopped copy and "
        f"`zstd -q -d -T{PARALLEL} | tar -xf -` into an empty directory (no fsync, no PostgreSQL start).",
        f"- **Delta**: before each run `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= "
        f"{args.update_pct:g}% of the rows` on both sources and a new full backup with each tool (untimed); "
        "the "
        "delta restore goes into the directory of the previous one (the first into an untimed full restore, "
        "stopped cleanly); `sum(abalance)` of the range is checked after the first write.",
        f"- **PITR**: a base backup, then `pgbench {' '.join(PGBENCH_LOAD)}` in {WAL_CHUNK_S} s runs until "
        f"{args.pitr_wal_mb} MiB of WAL are written; the target is the time at the end, once the last "
        "segment is archived; hakeeper's WAL-fetch idle share = the waiting time its `-o json` reports / "
        "(redo start -> redo done in the PostgreSQL log).",
        f"- **Runs**: {args.runs} per (scenario, repository, cache), tools interleaved (hakeeper first in "
        "odd "
        "runs); first successful write = `pg_is_in_recovery()` false and an INSERT committed, polled every "
        "50 ms. Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each timed operation (the sources' "
        "shared_buffers stay warm).",
    ]


def render_section(
    res: Results, args: argparse.Namespace, command: str, leftover: str, aborted: str | None
) -> str:
    f = res.facts
    lines = [
        MARK_START,
        "## Restore at the speed of the disk (issue 16): pgbench scale "
        f"{res.dataset.get('scale', args.scale)}",
        "",
        f"_Generated by `bench/restore_speed.py` on {f['date_utc']} (took {f.get('duration', '?')}); "
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
        "### Setup",
        "",
        *setup_lines(res, args),
        "",
        "### Results",
        "",
        *results_table(res, args),
        "",
        "#### Against the targets of issue 16",
        "",
        *(verdicts(res) or ["- nothing to compare."]),
        "",
        "#### hakeeper's own figures (`-o json`, medians)",
        "",
        *(hk_phase_lines(res) or ["- none"]),
        "",
        "#### Every run",
        "",
        *detail_lines(res),
        "",
    ]
    if res.loads:
        lines += [
            "PITR WAL: "
            + "; ".join(
                f"{TOOLS[t]} {ld['wal_bytes'] / 2**20:,.0f} MiB in {ld['generate_s']} s, archived "
                f"{ld['archive_wait_s']} s after, {ld['rows_to_target_source']} history rows up to the target"
                for t, ld in res.loads.items()
            )
            + ".",
            "",
        ]
    if res.notes:
        lines += ["#### Notes", "", *[f"- {n}" for n in res.notes], ""]
    lines += [f"Processes left after the run: {leftover}.", "", MARK_END]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.restore_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=600, help="pgbench scale (600: ~9 GB)")
    p.add_argument("--runs", type=int, default=3, help="runs of every measurement (3)")
    p.add_argument("--repos", default="fs,s3", help="fs, s3 or both (fs,s3)")
    p.add_argument(
        "--cache", default="warm,cold", help="warm, cold or both (cold needs root and drop_caches)"
    )
    p.add_argument(
        "--scenarios", default="backup,restore,delta,pitr", help="any of backup,restore,delta,pitr"
    )
    p.add_argument("--pitr-wal-mb", type=int, default=2048, help="WAL written for the PITR scenario (MiB)")
    p.add_argument(
        "--update-pct", type=float, default=5.0, help="accounts updated before a delta restore (%%)"
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="hakeeper restore --jobs (nproc)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp"), help="where the work directory is made")
    p.add_argument(
        "--pgbr-sync-get", action="store_true", help="pgBackRest archive-get without async prefetch"
    )
    p.add_argument("--s3-http-for-hakeeper", action="store_true", help="hakeeper on S3 over http, not https")
    p.add_argument(
        "--hk-variants",
        default="default,client",
        help="hakeeper backups measured: default (`backup create` as is) and/or client "
        "(`--compress-on client`: the indexed layout that --delta needs while it is not the default)",
    )
    p.add_argument("--skip-pgbackrest", action="store_true")
    p.add_argument("--skip-hakeeper", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--write-docs", action="store_true", help="write the results into --out")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, default=None, help="also write every result as JSON")
    p.add_argument("--render-json", type=Path, default=None, help="only write --out's section from a --json")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, help="first port (34300); up to +61")
    a = p.parse_args(argv)
    if a.runs < 1 or a.scale < 1 or a.jobs < 1 or a.pitr_wal_mb < 16 or not 0 < a.update_pct <= 100:
        p.error("--runs, --scale, --jobs >= 1, --pitr-wal-mb >= 16, 0 < --update-pct <= 100")
    a.repo_list = [r for r in a.repos.split(",") if r]
    a.cache_list = [c for c in a.cache.split(",") if c]
    a.scenario_list = [s for s in a.scenarios.split(",") if s]
    a.hk_variant_list = [v for v in a.hk_variants.split(",") if v]
    bad = (set(a.repo_list) - {"fs", "s3"}) | (set(a.cache_list) - {"warm", "cold"})
    bad |= set(a.scenario_list) - set(SCENARIO_TITLES)
    bad |= set(a.hk_variant_list) - {"default", "client"}
    if bad or not a.repo_list or not a.cache_list:
        p.error(f"unknown or missing values: {', '.join(sorted(bad)) or '--repos/--cache empty'}")
    return a


def render_json(args: argparse.Namespace) -> int:
    d = json.loads(args.render_json.read_text())
    res = Results(
        facts=d["facts"],
        dataset=d["dataset"],
        rows=d["rows"],
        loads=d["loads"],
        notes=d.get("notes", []),
        missing=d.get("missing", []),
    )
    for k in ("runs", "scale", "update_pct", "pitr_wal_mb", "jobs", "pgbr_sync_get"):
        if k in d:
            setattr(args, k, d[k])
    section = render_section(res, args, d.get("command", "?"), d.get("leftover", "?"), d.get("aborted"))
    write_section(args.out, MARK_START, MARK_END, section)
    log(f"wrote the restore-speed section of {args.out} from {args.render_json}")
    return 0


def preflight(args: argparse.Namespace) -> str | None:
    """Why the run cannot start (None: it can)."""
    busy = [p for p in Ports(args.base_port).all() if not port_is_free(p)]
    if busy:
        return f"ports in use: {busy}; pick another --base-port"
    for prog, why in (
        ("zstd", "apt-get install -y zstd"),
        ("openssl", "apt-get install -y openssl"),
        ("curl", "apt-get install -y curl"),
    ):
        if shutil.which(prog) is None:
            return f"{prog} not found: {why}"
    if not args.skip_pgbackrest and shutil.which("pgbackrest") is None:
        return "pgbackrest not found: make bench-setup (or --skip-pgbackrest)"
    if not args.work_dir.is_dir():
        return f"--work-dir {args.work_dir} is not a directory"
    need = need_bytes(args.scale, args.pitr_wal_mb, "pitr" in args.scenario_list)
    free = shutil.disk_usage(args.work_dir).free
    if free < need:
        return (
            f"{args.work_dir} has {free / 2**30:.1f} GiB free, the run needs about {need / 2**30:.1f} GiB "
            f"(5 copies of a ~{args.scale * MIB_PER_SCALE / 1024:.1f} GiB data directory + 4x the PITR "
            "WAL): "
            "free space or pass --work-dir on a larger filesystem"
        )
    return None


def choose_caches(args: argparse.Namespace, facts: dict[str, str]) -> str | None:
    """Drop ``cold`` from the cache modes where the page cache cannot be dropped (returns why)."""
    cold = cold_cache_problem() if "cold" in args.cache_list else None
    if cold:
        args.cache_list = [c for c in args.cache_list if c != "cold"] or ["warm"]
        facts["cache"] = f"cold cache not available ({cold}): warm only"
        log(facts["cache"])
    else:
        cold_how = " (cold: drop_caches before each timed operation)" if "cold" in args.cache_list else ""
        facts["cache"] = ", ".join(args.cache_list) + cold_how
    return cold


def start_s3(work: Path, res: Results) -> tuple[SeaweedTLS, bool]:
    """Start SeaweedFS with an https port; True when it works (else pgBackRest cannot use S3).
    When weed does not start with the certificate, it is started without (hakeeper over http)."""
    s3 = SeaweedTLS(work / "seaweed", make_tls(work / "tls"))
    try:
        s3.start()
        why = s3.https_works()
    except RuntimeError as e:
        why = f"weed did not start with -s3.port.https: {e}"
        log(why)
        s3 = SeaweedTLS(work / "seaweed-http", None)
        s3.start()
    res.facts["s3"] = f"SeaweedFS {tool_version([s3.argv()[0], 'version'])}, https " + (
        "ok" if why is None else f"NOT working ({why})"
    )
    if why is not None:
        res.notes.append(
            f"SeaweedFS over https did not work ({why}): pgBackRest on the filesystem repository only, "
            "hakeeper on S3 over http"
        )
    return s3, why is None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_json is not None:
        return render_json(args)
    command = "python -m bench.restore_speed " + " ".join(sys.argv[1:] if argv is None else argv)
    problem = preflight(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    facts = machine_facts()  # load average before anything starts
    cold = choose_caches(args, facts)
    work = Path(tempfile.mkdtemp(prefix="hakeeper-bench-restore-", dir=args.work_dir))
    work.chmod(0o755)  # PostgreSQL's OS user traverses it
    facts.update(
        {
            "pgbackrest": tool_version(["pgbackrest", "version"]),
            "zstd": tool_version(["zstd", "--version"]).replace("*", "").strip(),
            "tar": tool_version(["tar", "--version"]),
            "disk": disk_facts(work),
            "work_dir": str(args.work_dir),
        }
    )
    res = Results(facts=facts)
    if cold:
        res.notes.append(f"cold cache not available ({cold}): warm cache only")
    log(f"work dir {work}; " + ", ".join(f"{k}: {v}" for k, v in facts.items()))
    t0 = time.monotonic()
    s3: SeaweedTLS | None = None
    bench: SpeedBench | None = None
    aborted: str | None = None
    code = 0
    left: list[str] = []
    try:
        tls_ok = False
        if "s3" in args.repo_list:
            s3, tls_ok = start_s3(work, res)
        bench = SpeedBench(args, work, res, s3, tls_ok)
        bench.run()
    except KeyboardInterrupt:
        aborted, code = "interrupted", 130
    except Exception as e:
        import traceback

        traceback.print_exc()
        aborted, code = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1
    finally:
        log("stopping everything we started")
        if bench is not None:
            left = bench.cleanup()
        if s3 is not None:
            s3.stop()
        leftover = "none" if not left else ", ".join(left)
        log(f"processes left: {leftover}")
        if args.keep:
            log(f"kept {work}")
        else:
            rmtree(work)
    facts["duration"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    with contextlib.suppress(OSError):
        facts["load_avg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for line in [*results_table(res, args), "", *verdicts(res), "", *res.notes]:
        print(line, flush=True)
    if args.write_docs and res.rows:
        write_section(args.out, MARK_START, MARK_END, render_section(res, args, command, leftover, aborted))
        log(f"wrote the restore-speed section of {args.out}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "runs": args.runs,
                    "scale": args.scale,
                    "update_pct": args.update_pct,
                    "pitr_wal_mb": args.pitr_wal_mb,
                    "jobs": args.jobs,
                    "pgbr_sync_get": args.pgbr_sync_get,
                    "facts": facts,
                    "dataset": res.dataset,
                    "rows": res.rows,
                    "loads": res.loads,
                    "notes": res.notes,
                    "missing": res.missing,
                    "aborted": aborted,
                    "leftover": leftover,
                },
                indent=1,
                default=str,
            )
        )
        log(f"wrote {args.json}")
    if left:
        code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
