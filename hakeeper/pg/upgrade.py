"""Major-version upgrades of one PostgreSQL data directory with ``pg_upgrade``.

This is the PostgreSQL-level foundation of issue 15 (``hakeeper upgrade --to-version N``): it
knows nothing of etcd, the agent, the API or the CLI, and **nothing here is wired into the agent
yet**; the orchestration calls it, member by member.  The steps, in order:

1. :func:`inspect_cluster`: what the old cluster is (major, data checksums, template0's encoding
   and locale, WAL segment size, the install superuser), read while the old server runs.
2. :func:`init_new_cluster`: ``initdb`` of the new major beside the old data directory with the
   same settings (pg_upgrade refuses a mismatch; PostgreSQL 18's initdb turns checksums on by
   default, so the choice is always passed explicitly).
3. :func:`check_upgrade`: our own pre-checks plus ``pg_upgrade --check`` against the running old
   server; a list of :class:`Problem` (empty: go).
4. :func:`run_upgrade`: ``pg_upgrade`` on the cleanly stopped old cluster; the phases with their
   seconds, the new system identifier, the files pg_upgrade left.  :func:`rollback_plan` says
   what can be undone; :func:`rollback_link_upgrade` undoes a ``--link`` upgrade whose new cluster
   never started.

Every PostgreSQL program runs as PostgreSQL's OS user (``RunAs``) with the C locale (we parse
the output)."""

from __future__ import annotations

import asyncio
import enum
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import structlog

from hakeeper.pg.bins import C_LOCALE, read_controldata, run_program
from hakeeper.pg.errors import PgError
from hakeeper.pg.files import mkdir_owned
from hakeeper.pg.version import binaries_version, data_dir_major
from hakeeper.util.proc import RunAs, child_env

__all__ = [
    "ClusterFacts",
    "Method",
    "Problem",
    "Rollback",
    "Step",
    "UpgradeResult",
    "UpgradeState",
    "check_upgrade",
    "continue_timeline",
    "init_new_cluster",
    "initdb_args",
    "inspect_cluster",
    "keep_logs",
    "parse_pg_upgrade_output",
    "rollback_link_upgrade",
    "rollback_plan",
    "run_statistics",
    "run_upgrade",
    "vacuumdb_argv",
]

log = structlog.get_logger(__name__)

PG_UPGRADE_TIMEOUT = 6 * 3600.0  # a --copy of a large cluster; --link takes seconds to minutes
CHECK_TIMEOUT = 1800.0  # --check dumps every database's schema
LINK_SPACE_FRACTION = 0.05  # --link needs the new catalogs plus some slack, not a copy
NEW_CLUSTER_SLACK = 64 * 1024 * 1024  # an empty new cluster, its WAL and pg_upgrade's logs
# what pg_upgrade compares between the clusters for logical slots (17+ sources), and what an old
# cluster with more connections than initdb's default needs in the new one during the upgrade
CARRIED_SETTINGS = ("max_connections", "max_replication_slots", "max_wal_senders", "wal_level")


class Method(enum.StrEnum):
    """How pg_upgrade moves the user data files to the new cluster."""

    LINK = "link"  # hard links: fast, shares files with the old cluster
    COPY = "copy"  # full copy: slow, old cluster untouched
    CLONE = "clone"  # reflinks (btrfs, XFS): fast, old cluster untouched
    SWAP = "swap"  # 18+: moves the old directories into the new cluster


class UpgradeState(enum.StrEnum):
    """Where an upgrade of one data directory stands, for :func:`rollback_plan`."""

    NOT_RUN = "not_run"  # only checks ran (or nothing)
    FAILED = "failed"  # pg_upgrade started the upgrade and exited non-zero
    DONE = "done"  # pg_upgrade succeeded; the new cluster has not been started
    NEW_STARTED = "new_started"  # the new cluster has run outside pg_upgrade


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    """What initdb of the new major must reproduce (pg_upgrade compares them)."""

    data_dir: Path
    bin_dir: Path
    major: int
    checksums: bool
    encoding: str
    locale_provider: str  # "libc", "icu" or "builtin" (template0's)
    lc_collate: str
    lc_ctype: str
    provider_locale: str | None  # the ICU / builtin locale, None for libc
    wal_segment_bytes: int
    superuser: str  # the install user (OID 10): pg_upgrade must run as it
    shared_preload_libraries: tuple[str, ...]
    prepared_xacts: tuple[str, ...]
    logical_slots: tuple[str, ...]  # "name (plugin P, database D, confirmed up to LSN)"
    # settings the new cluster must have for pg_upgrade to carry logical slots over (its checks
    # compare wal_level and max_replication_slots): (name, value) as the old server runs them
    carried: tuple[tuple[str, str], ...] = ()
    timeline: int = 1  # the old cluster's (a running primary's does not change)


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason not to upgrade now: the text (pg_upgrade's or ours), the file pg_upgrade
    named for details, and what to do."""

    check: str
    text: str
    log_file: Path | None = None
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One of pg_upgrade's progress lines: its label, ``ok`` or ``fatal``, its seconds."""

    label: str
    status: str
    seconds: float


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    method: Method
    new_data_dir: Path
    steps: tuple[Step, ...]
    seconds: float
    system_identifier: str
    leftovers: tuple[Path, ...]  # delete_old_cluster.sh, update_extensions.sql, ...


@dataclass(frozen=True, slots=True)
class Rollback:
    possible: bool
    how: str


# ---------------------------------------------------------------- parsing pg_upgrade's output

# "Checking for prepared transactions                            ok": a label padded to 60
# columns, then the status.  A failing step prints the padded label and a newline, then why.
_STEP_RE = re.compile(r"^(?P<label>\S.*?)\s*(?P<status>\bok|\bfatal)?\s*$")
_PADDED_RE = re.compile(r"^\S.*\S {2,}$")
_FILE_RE = re.compile(r"^\s+(?P<path>/\S+)\s*$")
_NOT_STEPS = ("Failure, exiting", "*failure*", "Upgrade Complete", "Performing ")


def _is_step_line(line: str) -> bool:
    if line.startswith(_NOT_STEPS) or line.startswith(("-", " ")):
        return False
    return bool(re.search(r" {2,}(ok|fatal)\s*$", line)) or bool(_PADDED_RE.match(line))


def parse_pg_upgrade_output(lines: Sequence[tuple[float, str]]) -> tuple[list[Step], list[Problem]]:
    """pg_upgrade's stdout (each line with the monotonic time it arrived) as its steps with the
    seconds each took, and the problems: a step that did not end in ``ok`` with the text that
    follows it and the file it names (e.g. ``.../loadable_libraries.txt``)."""
    steps: list[Step] = []
    problems: list[Problem] = []
    prev = lines[0][0] if lines else 0.0
    failing: str | None = None
    text: list[str] = []
    files: list[Path] = []

    def close() -> None:
        nonlocal failing
        if failing is not None:
            problems.append(
                Problem(failing, " ".join(t for t in text if t).strip(), files[0] if files else None)
            )
        failing = None
        text.clear()
        files.clear()

    for at, raw in lines:
        line = raw.rstrip("\n")
        if failing is None and _is_step_line(line):
            m = _STEP_RE.match(line)
            assert m is not None  # _STEP_RE matches any line starting with a non-blank
            status = m.group("status") or "failed"
            steps.append(Step(m.group("label"), status, max(0.0, at - prev)))
            prev = at
            if status != "ok":
                failing = m.group("label")
            continue
        if failing is not None:
            if line.strip() in ("Failure, exiting", ""):
                if line.strip() == "Failure, exiting":
                    close()
                continue
            fm = _FILE_RE.match(line)
            if fm is not None:
                files.append(Path(fm.group("path")))
            else:
                text.append(line.strip())
        elif line.strip() in ("*failure*", "Failure, exiting") and not problems:
            failing = "pg_upgrade"
    close()
    return steps, problems


# ---------------------------------------------------------------- 1. the old cluster


async def inspect_cluster(
    data_dir: Path,
    bin_dir: Path,
    run_as: RunAs,
    *,
    host: str,
    port: int,
    user: str,
    password: str | None = None,
) -> ClusterFacts:
    """The facts of the running old cluster in ``data_dir`` (binaries ``bin_dir``): pg_controldata
    for checksums and WAL segment size, a query for template0's encoding and locale, the install
    user, ``shared_preload_libraries``, prepared transactions and logical slots."""
    major = data_dir_major(data_dir)
    if major is None:
        raise PgError(f"{data_dir} holds no PostgreSQL cluster (no PG_VERSION)")
    if binaries_version(bin_dir).major != major:
        raise PgError(f"{bin_dir} is not PostgreSQL {major}, the major of {data_dir}")
    control = await read_controldata(bin_dir, data_dir, run_as)
    locale_col = "datlocale" if major >= 17 else "daticulocale"
    async with await psycopg.AsyncConnection.connect(
        host=host,
        port=port,
        user=user,
        password=password,
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        cur = await conn.execute(
            "SELECT pg_encoding_to_char(encoding), datlocprovider::text, datcollate, datctype, "
            f"{locale_col}, (SELECT rolname FROM pg_authid WHERE oid = 10), "
            "current_setting('shared_preload_libraries') FROM pg_database WHERE datname = 'template0'"
        )
        row = await cur.fetchone()
        if row is None:
            raise PgError(f"the cluster on port {port} has no template0")
        xacts = [r[0] for r in await (await conn.execute("SELECT gid FROM pg_prepared_xacts")).fetchall()]
        # the name, and where its consumer stands (what it must resume from on a new slot)
        slots = [
            f"{r[0]} (plugin {r[1]}, database {r[2]}, confirmed up to {r[3] or 'nothing'})"
            for r in await (
                await conn.execute(
                    "SELECT slot_name, plugin, database, confirmed_flush_lsn::text "
                    "FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name"
                )
            ).fetchall()
        ]
        carried = [
            (str(n), str(v))
            for n, v in await (
                await conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                    (list(CARRIED_SETTINGS),),
                )
            ).fetchall()
        ]
    encoding, provider, collate, ctype, prov_locale, superuser, preload = row
    return ClusterFacts(
        data_dir=data_dir,
        bin_dir=bin_dir,
        major=major,
        checksums=control.get("Data page checksum version", "0") != "0",
        encoding=str(encoding),
        locale_provider={"c": "libc", "i": "icu", "b": "builtin"}.get(str(provider), "libc"),
        lc_collate=str(collate),
        lc_ctype=str(ctype),
        provider_locale=None if prov_locale is None else str(prov_locale),
        wal_segment_bytes=int(control["Bytes per WAL segment"]),
        superuser=str(superuser),
        shared_preload_libraries=split_libraries(str(preload)),
        prepared_xacts=tuple(xacts),
        logical_slots=tuple(slots),
        carried=tuple(carried),
        timeline=int(control.get("Latest checkpoint's TimeLineID", "1")),
    )


def split_libraries(value: str) -> tuple[str, ...]:
    """``shared_preload_libraries`` (``'pg_stat_statements, "auto_explain"'``) as names."""
    return tuple(p.strip().strip('"') for p in value.split(",") if p.strip().strip('"'))


# ---------------------------------------------------------------- 2. initdb of the new cluster


def initdb_args(facts: ClusterFacts, new_major: int) -> list[str]:
    """initdb options that give the new cluster the old one's settings."""
    args = [
        f"--username={facts.superuser}",
        f"--encoding={facts.encoding}",
        f"--wal-segsize={facts.wal_segment_bytes // (1024 * 1024)}",
        "--auth-local=trust",  # as Postgres.initdb: the agent's pg_hba.conf replaces these
        "--auth-host=scram-sha-256",
        f"--locale-provider={facts.locale_provider}",
        f"--lc-collate={facts.lc_collate}",
        f"--lc-ctype={facts.lc_ctype}",
    ]
    if facts.locale_provider == "icu" and facts.provider_locale:
        args.append(f"--icu-locale={facts.provider_locale}")
    elif facts.locale_provider == "builtin" and facts.provider_locale:
        args.append(f"--builtin-locale={facts.provider_locale}")
    if facts.checksums:
        args.append("--data-checksums")
    elif new_major >= 18:  # 18's initdb enables checksums by default; 17's has no such option
        args.append("--no-data-checksums")
    return args


def default_new_data_dir(old_data_dir: Path, new_major: int) -> Path:
    return old_data_dir.with_name(f"{old_data_dir.name}.{new_major}")


async def init_new_cluster(
    facts: ClusterFacts, new_bin_dir: Path, run_as: RunAs, new_data_dir: Path | None = None
) -> Path:
    """initdb the new major's cluster (default ``<data_dir>.<major>``) with ``facts``' settings.
    No password file: pg_upgrade carries the superuser's password over from the old cluster."""
    new_major = binaries_version(new_bin_dir).major
    if new_major <= facts.major:
        raise PgError(f"{new_bin_dir} is PostgreSQL {new_major}, not newer than the cluster's {facts.major}")
    target = new_data_dir or default_new_data_dir(facts.data_dir, new_major)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        log.warning("upgrade_initdb_refused", target=str(target), reason="exists and is not empty")
        raise PgError(f"cannot initdb the new cluster: {target} exists and is not empty")
    mkdir_owned(target, run_as)
    args = initdb_args(facts, new_major)
    log.info("upgrade_initdb_start", target=str(target), args=" ".join(args))
    r = await run_program(
        [str(new_bin_dir / "initdb"), "-D", str(target), *args],
        run_as=run_as,
        timeout=300,
        env=C_LOCALE,
        what="initdb",
    )
    if not r.ok:
        raise PgError(f"initdb of {target} failed (exit {r.returncode}):\n{r.tail(15)}")
    if facts.carried:
        lines = "".join(f"{n} = '{v}'\n" for n, v in facts.carried)
        with (target / "postgresql.conf").open("a") as f:
            f.write("# carried from the old cluster for pg_upgrade (hakeeper upgrade)\n" + lines)
    log.info("upgrade_initdb_done", target=str(target), carried=dict(facts.carried))
    return target


# ---------------------------------------------------------------- running pg_upgrade


@dataclass(frozen=True, slots=True)
class _Run:
    returncode: int
    lines: list[tuple[float, str]]
    stderr: str


async def _stream(argv: list[str], *, run_as: RunAs, cwd: Path, timeout: float) -> _Run:
    """Run pg_upgrade, noting when each stdout line arrives (it prints no durations itself)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(run_as, C_LOCALE),
        cwd=str(cwd),
        start_new_session=True,
        **run_as.kwargs(),  # type: ignore[arg-type]
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[tuple[float, str]] = [(time.monotonic(), "")]
    err_task = asyncio.ensure_future(proc.stderr.read())
    try:
        async with asyncio.timeout(timeout):
            while raw := await proc.stdout.readline():
                lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
            err = await err_task
            await proc.wait()
    except (TimeoutError, asyncio.CancelledError):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        err_task.cancel()
        await proc.wait()
        raise
    return _Run(proc.returncode or 0, lines[1:] if lines[0][1] == "" else lines, err.decode(errors="replace"))


def _named_file(path: Path | None, limit: int = 1500) -> str:
    """The first ``limit`` characters of a file pg_upgrade names for a problem, as one line."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")[:limit]
    except OSError:
        return ""
    return "[" + " | ".join(ln.strip() for ln in text.splitlines() if ln.strip()) + "]"


def _private_dir(parent: Path, prefix: str, run_as: RunAs) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mkdir_owned(d, run_as)
    return d


def _pg_upgrade_argv(
    facts: ClusterFacts, new_bin_dir: Path, new_data_dir: Path, socket_dir: Path, ports: tuple[int, int]
) -> list[str]:
    return [
        str(new_bin_dir / "pg_upgrade"),
        f"--old-bindir={facts.bin_dir}",
        f"--new-bindir={new_bin_dir}",
        f"--old-datadir={facts.data_dir}",
        f"--new-datadir={new_data_dir}",
        f"--old-port={ports[0]}",
        f"--new-port={ports[1]}",
        f"--socketdir={socket_dir}",
        f"--username={facts.superuser}",
    ]


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # a file removed while walking (a running server's temp files)
                continue
    return total


async def pg_config_pkglibdir(bin_dir: Path, run_as: RunAs) -> Path:
    r = await run_program(
        [str(bin_dir / "pg_config"), "--pkglibdir"], run_as=run_as, timeout=30, env=C_LOCALE, what="pg_config"
    )
    if not r.ok:
        raise PgError(f"pg_config --pkglibdir failed (exit {r.returncode}): {r.tail(5)}")
    return Path(r.stdout.strip())


def _library_file(pkglibdir: Path, name: str) -> Path:
    bare = name.removeprefix("$libdir/")
    if "/" in bare:  # an absolute path stays as it is
        return Path(bare if bare.endswith(".so") else bare + ".so")
    return pkglibdir / (bare if bare.endswith(".so") else bare + ".so")


async def own_checks(
    facts: ClusterFacts,
    new_bin_dir: Path,
    new_data_dir: Path,
    method: Method,
    run_as: RunAs,
    new_preload: Sequence[str] | None = None,
) -> list[Problem]:
    """What pg_upgrade checks late or not at all: prepared transactions, logical slots that will
    not be carried over (source older than 17), free space for the method, the preload
    libraries (``new_preload``, default the old cluster's) in the new binaries' pkglibdir."""
    problems: list[Problem] = []
    if facts.prepared_xacts:
        problems.append(
            Problem(
                "prepared transactions",
                f"{len(facts.prepared_xacts)} prepared transaction(s): {', '.join(facts.prepared_xacts)}",
                fix="COMMIT PREPARED or ROLLBACK PREPARED each (pg_prepared_xacts) before the upgrade",
            )
        )
    new_major = binaries_version(new_bin_dir).major
    if method is Method.SWAP and new_major < 18:
        problems.append(
            Problem("method", f"--swap needs PostgreSQL 18 or later, not {new_major}", fix="use link")
        )
    if facts.logical_slots and facts.major < 17:
        problems.append(
            Problem(
                "logical replication slots",
                f"PostgreSQL {facts.major} logical slots are not carried over: "
                f"{', '.join(facts.logical_slots)}",
                fix="let their consumers catch up and note where they stand, drop the slots, upgrade; "
                "slots declared in hakeeper's dynamic configuration are created again by the new "
                "leader, others by hand; their consumers start from the new slot's position",
            )
        )
    size = await asyncio.to_thread(_dir_bytes, facts.data_dir)
    needed = NEW_CLUSTER_SLACK + (
        int(size * LINK_SPACE_FRACTION) if method in (Method.LINK, Method.SWAP, Method.CLONE) else size
    )
    free = (await asyncio.to_thread(shutil.disk_usage, new_data_dir.parent)).free
    if free < needed:
        problems.append(
            Problem(
                "disk space",
                f"{new_data_dir.parent} has {free // 2**20} MiB free; --{method} of a {size // 2**20} MiB "
                f"cluster needs about {needed // 2**20} MiB",
                fix="free space, or use --link",
            )
        )
    pkglibdir = await pg_config_pkglibdir(new_bin_dir, run_as)
    for lib in facts.shared_preload_libraries if new_preload is None else new_preload:
        path = _library_file(pkglibdir, lib)
        if not path.is_file():
            problems.append(
                Problem(
                    "shared_preload_libraries",
                    f"library {lib!r} is not in PostgreSQL {new_major}'s {pkglibdir} ({path} missing)",
                    fix=f"install the extension's package for PostgreSQL {new_major}, or remove it from "
                    "shared_preload_libraries",
                )
            )
    return problems


async def check_upgrade(
    facts: ClusterFacts,
    new_bin_dir: Path,
    new_data_dir: Path,
    *,
    method: Method,
    run_as: RunAs,
    old_port: int,
    new_port: int,
    socket_dir: Path,
    new_preload: Sequence[str] | None = None,
) -> list[Problem]:
    """Our checks, then ``pg_upgrade --check`` with the old server running on ``old_port``
    (pg_upgrade connects to it through ``socket_dir``, the old server's socket directory).
    Changes nothing; [] means go."""
    problems = await own_checks(facts, new_bin_dir, new_data_dir, method, run_as, new_preload)
    work = _private_dir(new_data_dir.parent, ".pg_upgrade-check-", run_as)
    try:
        argv = [
            *_pg_upgrade_argv(facts, new_bin_dir, new_data_dir, socket_dir, (old_port, new_port)),
            "--check",
            f"--{method}",
        ]
        r = await _stream(argv, run_as=run_as, cwd=work, timeout=CHECK_TIMEOUT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps, found = parse_pg_upgrade_output(r.lines)
    if r.returncode != 0 and not found:
        found = [Problem("pg_upgrade --check", f"exit {r.returncode}: {r.stderr.strip()[-500:]}")]
    # the file a problem names (which libraries, which tables, ...) is in a directory the caller
    # removes: its lines go into the problem itself
    problems.extend(replace(p, text=f"{p.text} {_named_file(p.log_file)}".strip()) for p in found)
    log.info("upgrade_check_done", problems=len(problems), steps=len(steps), exit=r.returncode)
    for p in problems:
        log.warning("upgrade_check_problem", check=p.check, text=p.text, log_file=str(p.log_file), fix=p.fix)
    return problems


# ---------------------------------------------------------------- 4. the upgrade


async def run_upgrade(
    facts: ClusterFacts,
    new_bin_dir: Path,
    new_data_dir: Path,
    *,
    method: Method = Method.LINK,
    run_as: RunAs,
    old_port: int,
    new_port: int,
    work_dir: Path | None = None,
    old_options: str = "-c archive_mode=off",
) -> UpgradeResult:
    """pg_upgrade of the cleanly stopped old cluster into ``new_data_dir`` (from
    :func:`init_new_cluster`).  ``old_options``: for the old server pg_upgrade starts; by
    default it does not archive (its archive_command may answer only to a primary the agent
    runs, and its shutdown would wait for that forever).  Raises :class:`PgError` with
    pg_upgrade's problems on failure; what can then be undone is :func:`rollback_plan`'s
    (``UpgradeState.FAILED``)."""
    control = await read_controldata(facts.bin_dir, facts.data_dir, run_as)
    state = control.get("Database cluster state", "")
    if state != "shut down":
        log.warning("upgrade_refused", data_dir=str(facts.data_dir), reason=f"cluster state {state!r}")
        raise PgError(
            f"{facts.data_dir} is {state!r}, not cleanly 'shut down': stop it with pg_ctl -m fast first"
        )
    if method is Method.SWAP and binaries_version(new_bin_dir).major < 18:
        raise PgError("--swap needs PostgreSQL 18 or later binaries")
    work = work_dir or _private_dir(new_data_dir.parent, ".pg_upgrade-", run_as)
    mkdir_owned(work, run_as)
    sockets = _private_dir(
        Path(tempfile.gettempdir()), "hk-upg-", run_as
    )  # short: a socket path is <108 bytes
    argv = [*_pg_upgrade_argv(facts, new_bin_dir, new_data_dir, sockets, (old_port, new_port)), f"--{method}"]
    if old_options:
        argv.append(f"--old-options={old_options}")
    log.info("upgrade_start", old=str(facts.data_dir), new=str(new_data_dir), method=str(method))
    started = time.monotonic()
    try:
        r = await _stream(argv, run_as=run_as, cwd=work, timeout=PG_UPGRADE_TIMEOUT)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    steps, problems = parse_pg_upgrade_output(r.lines)
    if r.returncode != 0:
        why = "; ".join(f"{p.check}: {p.text} ({p.log_file})" for p in problems) or r.stderr.strip()[-500:]
        log.error("upgrade_failed", exit=r.returncode, reason=why)
        raise PgError(f"pg_upgrade --{method} failed (exit {r.returncode}): {why}")
    new_control = await read_controldata(new_bin_dir, new_data_dir, run_as)
    tli = int(new_control.get("Latest checkpoint's TimeLineID", "1"))
    if tli > 1:  # continue_timeline ran: the timeline needs its history file
        await asyncio.to_thread(_write_first_history, new_data_dir, tli, run_as)
    leftovers = tuple(
        p for name in ("delete_old_cluster.sh", "update_extensions.sql") if (p := work / name).exists()
    )
    result = UpgradeResult(
        method=method,
        new_data_dir=new_data_dir,
        steps=tuple(steps),
        seconds=time.monotonic() - started,
        system_identifier=new_control["Database system identifier"],
        leftovers=leftovers,
    )
    log.info("upgrade_done", seconds=round(result.seconds, 2), system_identifier=result.system_identifier)
    return result


async def continue_timeline(new_bin_dir: Path, new_data_dir: Path, timeline: int, run_as: RunAs) -> str:
    """Put the freshly initdb'ed new cluster on ``timeline`` (the old cluster's + 1), before
    pg_upgrade runs.

    pg_upgrade places the new cluster's WAL at the old cluster's last REDO segment with
    ``pg_resetwal -l 00000001...``, which keeps a higher timeline: on timeline 1 the new
    cluster's first WAL file could carry the very name of one the old cluster archived (the
    repository keeps names unique), and its members' timelines would read as behind the
    cluster's history.  On the next timeline every new name differs from the old ones and
    timelines keep going up; done before pg_upgrade, the logical slots it creates at its end
    point into WAL that exists (a ``pg_resetwal`` after it would remove that WAL).  Returns
    the WAL file name given to pg_resetwal."""
    control = await read_controldata(new_bin_dir, new_data_dir, run_as)
    current = control.get("Latest checkpoint's REDO WAL file", "")
    if not re.fullmatch(r"[0-9A-F]{24}", current):
        raise PgError(f"pg_controldata of {new_data_dir} names no REDO WAL file ({current!r})")
    if control.get("Database cluster state") != "shut down":
        raise PgError(f"{new_data_dir} is not cleanly shut down: not resetting its WAL")
    name = f"{timeline:08X}{current[8:]}"
    r = await run_program(
        [str(new_bin_dir / "pg_resetwal"), "-l", name, "-D", str(new_data_dir)],
        run_as=run_as,
        timeout=120,
        env=C_LOCALE,
        what="pg_resetwal",
    )
    if not r.ok:
        raise PgError(f"pg_resetwal -l {name} of {new_data_dir} failed (exit {r.returncode}): {r.tail(5)}")
    log.info("upgrade_timeline_continued", wal_file=name, timeline=timeline)
    return name


def _write_first_history(data_dir: Path, timeline: int, run_as: RunAs) -> None:
    """``<timeline>.history`` with no parent (comment lines only): a standby's walreceiver asks
    its primary for the history of every timeline but 1 it lacks, and a primary without the
    file answers with an error, so a replica could never stream.  The ``.ready`` file has
    PostgreSQL archive it like a history file of its own."""
    name = f"{timeline:08X}.history"
    text = (
        f"# hakeeper: timeline {timeline} starts the cluster pg_upgrade made (no parent timeline:\n"
        "# the WAL before it belongs to the old major's cluster, another system identifier)\n"
    )
    path = data_dir / "pg_wal" / name
    path.write_text(text)
    ready = data_dir / "pg_wal" / "archive_status" / f"{name}.ready"
    ready.write_text("")
    for p in (path, ready):
        run_as.chown(p)
        p.chmod(0o600)


# ---------------------------------------------------------------- what can be undone


def rollback_plan(method: Method, state: UpgradeState) -> Rollback:
    """Whether the old cluster can be used again after ``method`` reached ``state``, and how."""
    if state is UpgradeState.NOT_RUN:
        return Rollback(
            True, "nothing was changed: keep running the old cluster; remove the new data directory"
        )
    if method in (Method.COPY, Method.CLONE):
        return Rollback(
            True,
            f"--{method} never writes to the old cluster: start it with the old binaries; "
            "remove the new data directory",
        )
    if method is Method.SWAP:
        return Rollback(
            False,
            "--swap moved the old cluster's directories into the new one: "
            "restore the old major from a backup",
        )
    if state is UpgradeState.NEW_STARTED:
        return Rollback(
            False,
            "the new cluster has run, and --link shares the data files: the old cluster cannot start "
            "safely any more; restore the old major from a backup",
        )
    return Rollback(
        True,
        "if global/pg_control.old exists, rename it back to global/pg_control (rollback_link_upgrade), "
        "then start the old cluster with the old binaries; remove the new data directory",
    )


def new_cluster_started(new_data_dir: Path) -> bool:
    """Whether the new cluster has run outside pg_upgrade: a postmaster.pid, or a
    postmaster.opts (written by every start) without pg_upgrade's binary-upgrade ``-b``."""
    if (new_data_dir / "postmaster.pid").exists():
        return True
    try:
        opts = (new_data_dir / "postmaster.opts").read_text()
    except FileNotFoundError:
        return False
    return not re.search(r'"-b"|\s-b(\s|$)', opts)


def rollback_link_upgrade(old_data_dir: Path, *, new_data_dir: Path) -> None:
    """Undo pg_upgrade's rename of the old ``global/pg_control`` after a ``--link`` upgrade whose
    new cluster never started, so that the old cluster starts again.  Refuses (``PgError``, with
    the reason) when the new cluster has started (the shared files may have changed)."""
    old = old_data_dir / "global" / "pg_control.old"
    live = old_data_dir / "global" / "pg_control"
    reason: str | None = None
    if not old.exists():
        reason = f"{old} does not exist" + (" (nothing to undo)" if live.exists() else "")
    elif live.exists():
        reason = f"both {live} and {old} exist: which one is the old cluster's is unclear"
    elif new_cluster_started(new_data_dir):
        reason = f"the new cluster in {new_data_dir} has been started: its --link'ed files may have changed"
    if reason is not None:
        log.warning("upgrade_rollback_refused", data_dir=str(old_data_dir), reason=reason)
        raise PgError(f"cannot roll back the --link upgrade of {old_data_dir}: {reason}")
    old.rename(live)
    log.info("upgrade_rollback_done", data_dir=str(old_data_dir))


# ---------------------------------------------------------------- 5. after


def vacuumdb_argv(new_bin_dir: Path, new_major: int, *, host: str, port: int, user: str) -> list[list[str]]:
    """The statistics commands to run (in the background) once the new cluster is up.  From 18
    pg_upgrade carries most statistics: only the missing ones first, then a full analyze."""
    base = [str(new_bin_dir / "vacuumdb"), f"--host={host}", f"--port={port}", f"--username={user}", "--all"]
    if new_major >= 18:
        return [[*base, "--analyze-in-stages", "--missing-stats-only"], [*base, "--analyze-only"]]
    return [[*base, "--analyze-in-stages"]]


async def run_statistics(
    new_bin_dir: Path, new_major: int, run_as: RunAs, *, host: str, port: int, user: str
) -> bool:
    """:func:`vacuumdb_argv`'s commands, one after the other (each logged with its seconds);
    False when one failed (logged with its output)."""
    for argv in vacuumdb_argv(new_bin_dir, new_major, host=host, port=port, user=user):
        t = time.monotonic()
        r = await run_program(argv, run_as=run_as, timeout=24 * 3600, what="vacuumdb")
        if not r.ok:
            log.warning("upgrade_statistics_failed", exit=r.returncode, output=r.tail(5))
            return False
        log.info("upgrade_statistics_done", argv=" ".join(argv[1:]), seconds=round(time.monotonic() - t, 1))
    return True


def keep_logs(new_dir: Path) -> Path | None:
    """pg_upgrade writes its logs into the new data directory, which a rollback removes: move
    them beside it first (``<new_dir>-logs-<UTC time>``), where an error message can point.
    Blocking (a rename): call it in a thread."""
    logs = new_dir / "pg_upgrade_output.d"
    if not logs.is_dir():
        return None
    dest = new_dir.with_name(f"{new_dir.name}-logs-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.rename(logs, dest)
    return dest
