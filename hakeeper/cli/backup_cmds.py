"""Backup and restore commands: ``hakeeper backup create|list|info|expire`` and ``hakeeper restore``.

Every command reads the repositories, the scope and the database credentials from a node's
YAML (``-c``).  ``backup create`` asks etcd which member to back up (a streaming standby by
default); ``restore`` asks etcd for the primary so that it can switch WAL there before a
point-in-time restore.  Exit codes: 0 done, 1 the operation failed or was refused, 2 usage or
configuration error.  User errors never print a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from hakeeper.backup import catalog, layout
from hakeeper.backup.basebackup import BackupError, Endpoint, create_backup, query
from hakeeper.backup.catalog import COMBINE_IN_PLACE, COMBINE_MODES, BackupRecord, RestoreRefused, Target
from hakeeper.backup.errors import RepoError
from hakeeper.backup.phases import parse_phases, phases_dict
from hakeeper.backup.repos import make_repository
from hakeeper.backup.walfetch import DEFAULT_PREFETCH, DEFAULT_PREFETCH_MAX_BYTES
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.cluster_cmds import (
    OutputOpt,
    check_output,
    emit_data,
    etcd_client_for,
    fetch_view,
    quiet_logging,
)
from hakeeper.cli.progress import Label, ProgressFn, QuietOpt, phases_text, progress_display
from hakeeper.cli.progress import human_bytes as human_bytes  # re-exported: repo_cmds uses it
from hakeeper.core import timefmt
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.cluster import ClusterView, MemberRole
from hakeeper.core.config import NodeConfig
from hakeeper.core.config import parse_target_time as config_time
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.etcd import EtcdError
from hakeeper.pg.bins import find_bin_dir, node_bin_dir
from hakeeper.pg.errors import PgError

backup_app = typer.Typer(
    help="Physical base backups in the configured repositories: create, list, info, expire, "
    "copy (to another repository), policy (the 3-2-1 check), keygen (an encryption key).",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")

ConfigReq = Annotated[
    Path, typer.Option("-c", "--config", help="Node YAML file (scope, repositories, credentials).")
]
RepoOpt = Annotated[str | None, typer.Option("--repo", help="Repository name (default: see each command).")]

if TYPE_CHECKING:
    from hakeeper.backup.catalog import RestorePlan
    from hakeeper.backup.restore import RestoreResult


# --------------------------------------------------------------------------------- helpers


def rate(size: int, seconds: float | None) -> str:
    if not seconds:
        return ""
    return f" ({size / seconds / 2**20:.0f} MiB/s)"


def _repo_configs(cfg: NodeConfig, name: str | None) -> list[RepositoryConfig]:
    repos = cfg.backup.repositories
    if not repos:
        raise fail("no backup repositories configured (backup.repositories in the node YAML)", 2)
    if name is None:
        return list(repos)
    for r in repos:
        if r.name == name:
            return [r]
    raise fail(f"unknown repository {name!r} (configured: {', '.join(r.name for r in repos)})", 2)


async def _view(cfg: NodeConfig) -> ClusterView:
    try:
        async with asyncio.timeout(10):
            return await fetch_view(etcd_client_for(cfg), cfg.prefix)
    except (EtcdError, TimeoutError) as e:
        raise BackupError(f"cannot read the cluster from etcd: {e or 'timed out'}") from None


def _local(cfg: NodeConfig) -> Endpoint:
    host, port = cfg.postgresql.connect_host_port
    if host in ("", "*", "0.0.0.0"):
        host = "127.0.0.1"
    return Endpoint(cfg.name, host, port)


async def pick_source(cfg: NodeConfig, mode: str) -> tuple[Endpoint, Endpoint | None, str]:
    """(server to back up, primary for pg_switch_wal or None, a note for the user)."""
    from hakeeper.backup.source import NoStandby, choose_source

    if mode == "local":
        return _local(cfg), None, f"backing up this node ({cfg.name})"
    view = await _view(cfg)
    try:
        c = choose_source(view, mode)
    except NoStandby as e:
        raise BackupError(f"{e} (try --from primary)") from None
    return c.source, c.primary, f"backing up {c.what}"


async def find_primary(cfg: NodeConfig) -> Endpoint | None:
    """The cluster's primary (leader in etcd), else this node if it is a primary; None if neither."""
    with contextlib.suppress(BackupError):
        view = await _view(cfg)
        leader = view.leader_member
        if leader is not None and leader.host and leader.role == MemberRole.PRIMARY:
            return Endpoint(leader.name, leader.host, leader.port)
    local = _local(cfg)
    with contextlib.suppress(BackupError):
        rows = await query(local, cfg.postgresql.superuser, "SELECT pg_is_in_recovery()", timeout=5)
        if rows and rows[0][0] is False:
            return local
    return None


# --------------------------------------------------------------------------------- backup create


@backup_app.command("create")
def backup_create(
    config: ConfigReq,
    repo: RepoOpt = None,
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="auto: a streaming standby, else the primary; primary; standby; "
            "local: the node of -c (no etcd).",
        ),
    ] = "auto",
    label: Annotated[str | None, typer.Option("--label", help="Backup label.")] = None,
    backup_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="full; incremental (PostgreSQL 17+): only what changed since the newest backup "
            "(a full when no backup can be its parent; the reason is shown).",
        ),
    ] = "full",
    wal_timeout: Annotated[
        float,
        typer.Option("--wal-timeout", help="Seconds to wait for the backup's WAL to be archived.", min=1),
    ] = 300.0,
    part_size: Annotated[
        int, typer.Option("--part-size", help="MiB per stored part (compressed).", min=1, max=4096)
    ] = 64,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            help="zstd threads on the server (client: parts compressed at once); parts stored at once.",
            min=1,
        ),
    ] = 2,
    compress_on: Annotated[
        str | None,
        typer.Option(
            "--compress-on",
            help="server: PostgreSQL compresses (15+, fastest); client: this process compresses every part "
            "and writes a file index (restore --jobs unpacks it in parallel, restore --delta needs it). "
            "Default: backup.compress_on (server).",
        ),
    ] = None,
    staging_dir: Annotated[
        Path | None,
        typer.Option(
            "--staging-dir", help="Where pg_basebackup's compressed output passes (default: $TMPDIR)."
        ),
    ] = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Take a base backup, full or incremental, into one repository (default: the first configured).

    The backup is complete only once every WAL segment it needs is in that repository's
    archive; otherwise it is marked failed and its data removed."""
    check_output(output)
    if backup_type not in ("full", "incremental"):
        raise fail(f"--type must be full or incremental, not {backup_type!r}", 2)
    if source not in ("auto", "primary", "standby", "local"):
        raise fail(f"--from must be auto, primary, standby or local, not {source!r}", 2)
    if compress_on is not None and compress_on not in ("server", "client"):
        raise fail(f"--compress-on must be server or client, not {compress_on!r}", 2)
    if staging_dir is not None and not staging_dir.is_dir():
        raise fail(f"--staging-dir {staging_dir} is not a directory", 2)
    cfg = load_or_exit(config)
    quiet_logging()
    rc = _repo_configs(cfg, repo)[0]
    try:
        bin_dir = node_bin_dir(cfg.postgresql)
    except PgError as e:
        raise fail(str(e), 2) from None

    async def go(progress: ProgressFn | None) -> tuple[BackupRecord, str]:
        src, primary, note = await pick_source(cfg, source)
        if output == "table" and not quiet:
            err.print(escape(f"{note} ({src.address}) into repository {rc.name}"))
        r = make_repository(rc)
        try:
            rec = await create_backup(
                r,
                scope=cfg.scope,
                source=src,
                primary=primary,
                superuser=cfg.postgresql.superuser,
                replication=cfg.postgresql.replication,
                bin_dir=bin_dir,
                label=label,
                part_size=part_size << 20,
                parallel=parallel,
                wal_timeout=wal_timeout,
                progress=progress,
                compress_on=compress_on or cfg.backup.compress_on,
                staging_dir=staging_dir,
                row_counts=cfg.backup.row_counts,
                backup_type=backup_type,
            )
        finally:
            await r.close()
        return rec, note

    try:
        labels = {"copy": Label("copy"), "wal": Label("WAL archived", "segments")}
        with progress_display("backup create", labels, output=output, quiet=quiet) as bars:
            rec, _ = asyncio.run(go(bars))
    except (BackupError, RepoError) as e:
        raise fail(str(e)) from None
    if output != "table":
        emit_data(output, rec.model_dump(mode="json"))
        return
    src = rec.source
    ratio = f", {rec.size / rec.stored_size:.1f}x" if rec.stored_size else ""
    kind = rec.kind if rec.parent is None else f"{rec.kind} against {rec.parent} (chain {rec.root})"
    lines = [
        f"backup {rec.id} complete in repository {rec.repository}",
        f"  type     {kind}",
        f"  note     asked for incremental, taken as full: {rec.became_full}" if rec.became_full else "",
        f"  source   {src.member} ({'standby' if src.standby else 'primary'}) {src.host}:{src.port}"
        if src
        else "",
        f"  WAL      {rec.start_lsn} .. {rec.stop_lsn} on timeline {rec.timeline}: "
        f"{rec.wal_start} .. {rec.wal_stop} archived",
        f"  size     {human_bytes(rec.size)} -> {human_bytes(rec.stored_size)} stored{ratio}, "
        f"{len(rec.parts)} parts, {rec.files} files",
        f"  seconds  {rec.seconds_copy} copy{rate(rec.size, rec.seconds_copy)}, "
        f"{rec.seconds_wal_wait} waiting for WAL",
        f"  phases   {phases_text(rec.phases)}" if rec.phases else "",
    ]
    rc_ = rec.row_counts
    if rc_ is not None and rc_.skipped:
        lines.append(f"  counts   skipped: {rc_.skipped}")
    elif rc_ is not None:
        n = sum(len(t) for t in rc_.tables.values())
        lines.append(
            f"  counts   {n} tables in {len(rc_.tables)} databases, restore point {rc_.restore_point} "
            f"at {rc_.restore_point_lsn}, " + ("exact" if rc_.exact else f"not exact ({rc_.inexact_reason})")
        )
    out.print(escape("\n".join(ln for ln in lines if ln)))


# --------------------------------------------------------------------------------- backup list / info


async def _catalogs(cfg: NodeConfig, repos: list[RepositoryConfig], wal: bool) -> list[catalog.Catalog]:
    async def one(rc: RepositoryConfig) -> catalog.Catalog:
        r = make_repository(rc)
        try:
            return await catalog.load_catalog(r, cfg.scope, wal=wal)
        finally:
            await r.close()

    return list(await asyncio.gather(*(one(rc) for rc in repos)))


async def _verified(repos: list[RepositoryConfig], cats: list[catalog.Catalog]) -> dict[tuple[str, str], Any]:
    """(repository, backup id) -> the newest restore drill stored with that backup (a summary)."""
    from hakeeper.backup.verify import last_drills

    out: dict[tuple[str, str], Any] = {}
    for rc, c in zip(repos, cats, strict=True):
        r = make_repository(rc)
        try:
            for bid, d in (await last_drills(r, c)).items():
                out[(rc.name, bid)] = {
                    "id": d.id,
                    "ok": d.ok,
                    "at": timefmt.iso(d.finished_at or d.started_at),
                    "failed_object": d.failed_object,
                    "error": d.error,
                    "rto_seconds": d.rto.total if d.rto else None,
                    "phases": phases_dict(d.phases),
                }
        finally:
            await r.close()
    return out


async def _readable_catalogs(
    cfg: NodeConfig, repos: list[RepositoryConfig]
) -> tuple[list[RepositoryConfig], list[catalog.Catalog], dict[str, str]]:
    """The catalogs of the repositories that could be read, and why each other one could not:
    one repository down does not hide the backups of the others."""

    async def one(rc: RepositoryConfig) -> catalog.Catalog | str:
        r = make_repository(rc)
        try:
            return await catalog.load_catalog(r, cfg.scope, wal=False)
        except (RepoError, OSError) as e:
            return str(e) or type(e).__name__
        finally:
            await r.close()

    got = await asyncio.gather(*(one(rc) for rc in repos))
    ok = [(rc, c) for rc, c in zip(repos, got, strict=True) if isinstance(c, catalog.Catalog)]
    failed = {rc.name: c for rc, c in zip(repos, got, strict=True) if isinstance(c, str)}
    return [rc for rc, _ in ok], [c for _, c in ok], failed


@backup_app.command("list")
def backup_list(config: ConfigReq, repo: RepoOpt = None, output: OutputOpt = "table") -> None:
    """Backups of every repository (or --repo), oldest first.  A repository that cannot be read
    is reported (exit 1) after the backups of the others."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)

    async def load() -> tuple[list[catalog.Catalog], dict[tuple[str, str], Any], dict[str, str]]:
        readable, cats, failed = await _readable_catalogs(cfg, repos)
        try:
            verified = await _verified(readable, cats)
        except RepoError as e:  # the drill records are extra information: the list stands without
            err.print(escape(f"warning: restore drill results not read: {e}"))
            verified = {}
        return cats, verified, failed

    cats, verified, failed = asyncio.run(load())
    for name, why in failed.items():
        err.print(escape(f"error: repository {name} could not be read: {why}"))
    now = catalog.utcnow()
    for c in cats:
        for p in c.problems:
            err.print(escape(f"warning: {p}"))
        if c.lineage_problem is not None:
            err.print(escape(f"warning: {c.lineage_problem} (the cluster column is not known)"))
    rows = [
        {
            **r.summary(now),
            # "current", or "before upgrade to 18": a backup of the cluster a major upgrade replaced
            "cluster": c.cluster_of(r) if c.lineage_problem is None else None,
            "verified": verified.get((c.repository, r.id)),
        }
        for c in cats
        for r in c.records
    ]
    if output != "table":
        emit_data(output, rows)
        if failed:
            raise typer.Exit(1)
        return
    t = Table(title=f"backups of {cfg.scope}")
    for col in (
        "ID",
        "Repo",
        "Status",
        "Type",
        "Parent",
        "Source",
        "PG",
        "Cluster",
        "TL",
        "Start LSN",
        "Stop LSN",
        "Stop (UTC)",
        "Size",
        "Stored",
        "Verified",
    ):
        t.add_column(col, justify="right" if col in ("TL", "Size", "Stored") else "left")
    for row in rows:
        src = row["source"] or ""
        if row["from_standby"]:
            src = f"{src} (standby)"
        stop = row["stop_time"]
        t.add_row(
            str(row["id"]),
            str(row["repository"]),
            str(row["status"]),
            str(row["type"]),
            str(row["parent"] or "-"),
            escape(str(src)),
            "" if row["pg_major"] is None else str(row["pg_major"]),
            escape(str(row["cluster"] or "?")),
            "" if row["timeline"] is None else str(row["timeline"]),
            str(row["start_lsn"] or ""),
            str(row["stop_lsn"] or ""),
            str(stop or "").replace("T", " ").rstrip("Z")[:19],
            human_bytes(int(str(row["size"]))),
            human_bytes(int(str(row["stored_size"]))),
            _verified_cell(row["verified"]),
        )
    for name, why in failed.items():
        t.add_row("-", escape(name), "[bold red]ERROR[/]", "", "", escape(why), *([""] * 9))
    if not rows:
        err.print("no backups")
    out.print(t)
    if failed:
        raise typer.Exit(1)


def _verified_cell(v: Any) -> str:
    """The last restore drill of a backup: ``ok 2026-11-24 13:50`` or ``FAILED ...``."""
    if not v:
        return "-"
    when = str(v["at"]).replace("T", " ")[:16]
    return f"[green]ok[/] {when}" if v["ok"] else f"[bold red]FAILED[/] {when}"


@backup_app.command("info")
def backup_info(
    backup_id: Annotated[str, typer.Argument(help="Backup id (from backup list).")],
    config: ConfigReq,
    repo: RepoOpt = None,
    output: OutputOpt = "table",
) -> None:
    """One backup's record, and whether the WAL it needs is still in the archive."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)
    try:
        cats = asyncio.run(_catalogs(cfg, repos, wal=True))
    except RepoError as e:
        raise fail(str(e)) from None
    found = [(rc, c, c.get(backup_id)) for rc, c in zip(repos, cats, strict=True)]
    found = [f for f in found if f[2] is not None]
    if not found:
        raise fail(f"no backup {backup_id!r} in {', '.join(r.name for r in repos)}")
    rc, c, rec = found[0]
    assert rec is not None
    try:  # the newest restore drill of it, for its restore timings (a failure hides only those)
        drill = asyncio.run(_verified([rc], [c])).get((rc.name, rec.id))
    except (RepoError, OSError):
        drill = None
    missing: list[str] | None = None
    if rec.usable():
        hist = c.history_of(rec.stop_timeline or rec.timeline or 1) or []
        need = catalog.required_segments(rec.start_lsn_int, rec.stop_lsn_int, rec.stop_timeline or 1, hist)
        missing = [s for s in need if s not in c.wal]
    doc: dict[str, Any] = rec.model_dump(mode="json")
    doc["effective_status"] = rec.effective_status(catalog.utcnow())
    doc["wal_missing"] = missing
    doc["cluster"] = c.cluster_of(rec) if c.lineage_problem is None else None
    doc["last_drill"] = drill
    if output != "table":
        emit_data(output, doc)
        return
    src = rec.source
    lines = [
        f"backup     {rec.id} ({rec.kind}), repository {rec.repository}",
        f"status     {doc['effective_status']}" + (f": {rec.error}" if rec.error else ""),
        f"parent     {rec.parent} (chain {rec.root}; restored with every link from {rec.root} on)"
        if rec.parent
        else "",
        f"note       asked for incremental, taken as full: {rec.became_full}" if rec.became_full else "",
        f"label      {rec.label}",
        f"source     {src.member} ({'standby' if src.standby else 'primary'}) {src.host}:{src.port}"
        if src
        else "source     ?",
        f"postgres   {rec.pg_version}, system identifier {rec.system_identifier}"
        + (f" ({doc['cluster']})" if doc["cluster"] else ""),
        f"timeline   {rec.timeline}"
        + (f" -> {rec.stop_timeline}" if rec.stop_timeline != rec.timeline else ""),
        f"LSN        {rec.start_lsn} .. {rec.stop_lsn}",
        f"time       {timefmt.iso(rec.start_time)} .. {timefmt.iso(rec.stop_time) if rec.stop_time else '-'}",
        f"WAL        {rec.wal_start} .. {rec.wal_stop} ({rec.wal_segments} segments): "
        + (
            "unknown"
            if missing is None
            else "all in the archive"
            if not missing
            else f"{len(missing)} MISSING ({missing[0]} ...)"
        ),
        f"size       {human_bytes(rec.size)} in {len(rec.parts)} parts, "
        f"{human_bytes(rec.stored_size)} stored, {rec.files} files",
        f"seconds    {rec.seconds_copy} copy, {rec.seconds_wal_wait} waiting for WAL",
        f"phases     {phases_text(rec.phases)}" if rec.phases else "",
        f"drill      {drill['id']} ({'passed' if drill['ok'] else 'FAILED'} {drill['at']}): restore "
        + phases_text(parse_phases(drill["phases"]))
        if drill and drill.get("phases")
        else "",
    ]
    out.print(escape("\n".join(ln for ln in lines if ln)))


# --------------------------------------------------------------------------------- backup expire


def _wal_ranges(names: list[str]) -> list[str]:
    """Consecutive segments of one timeline as 'first .. last (n files)'; others one by one."""
    out_lines: list[str] = []
    run: list[tuple[int, int, str]] = []

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            out_lines.append(run[0][2])
        else:
            out_lines.append(f"{run[0][2]} .. {run[-1][2]} ({len(run)} files)")
        run.clear()

    for full in names:
        base = full.rpartition("/")[2]
        seg = layout.parse_segment_name(base)
        if seg is None:
            flush()
            out_lines.append(base)
            continue
        if run and (run[-1][0] != seg[0] or run[-1][1] + 1 != seg[1]):
            flush()
        run.append((seg[0], seg[1], base))
    flush()
    return out_lines


@backup_app.command("expire")
def backup_expire(
    config: ConfigReq,
    repo: RepoOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    output: OutputOpt = "table",
) -> None:
    """Remove the backups each repository's retention no longer keeps, failed backups, and the
    WAL no kept backup needs (every repository, or --repo)."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)
    from hakeeper.backup.retention import ExpirePlan, expire

    async def go() -> list[ExpirePlan]:
        plans = []
        for rc in repos:
            r = make_repository(rc)
            try:
                plans.append(await expire(r, cfg.scope, rc.retention, dry_run=dry_run))
            finally:
                await r.close()
        return plans

    try:
        plans = asyncio.run(go())
    except RepoError as e:
        raise fail(str(e)) from None
    if output != "table":
        emit_data(output, [p.to_dict() for p in plans])
        return
    verb = "would remove" if dry_run else "removed"
    for p in plans:
        lines = [f"repository {p.repository}:"]
        for b in p.backups:
            lines.append(
                f"  {verb} backup {b.id} ({b.reason}; {len(b.objects)} objects, {human_bytes(b.stored_size)})"
            )
        if p.wal:
            lines.append(f"  {verb} {len(p.wal)} WAL files:")
            lines.extend(f"    {ln}" for ln in _wal_ranges(p.wal))
        if not p.backups and not p.wal:
            lines.append("  nothing to remove")
        if p.kept:
            lines.append(f"  kept {len(p.kept)} backups: {', '.join(p.kept)}")
        if p.running:
            lines.append(f"  running (kept): {', '.join(p.running)}")
        if p.wal_boundary:
            lines.append("  WAL kept from " + ", ".join(f"{s} (timeline {t})" for t, s in p.wal_boundary))
        lines.extend(f"  note: {n}" for n in p.notes)
        out.print(escape("\n".join(lines)))


# --------------------------------------------------------------------------------- restore


class UsageError(ValueError):
    pass


def parse_target_time(text: str) -> dt.datetime:
    """ISO 8601; ``Z`` or an offset; a time without a zone is local time."""
    try:
        return config_time(text)
    except ValueError as e:
        raise UsageError(f"--target-time: {e}") from None


def build_target(
    time_: str | None,
    lsn: str | None,
    xid: int | None,
    name: str | None,
    latest: bool,
    exclusive: bool,
    timeline: str,
) -> Target:
    given = [
        k
        for k, v in (
            ("--target-time", time_),
            ("--target-lsn", lsn),
            ("--target-xid", xid),
            ("--target-name", name),
            ("--latest", latest or None),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --target-time, --target-lsn, --target-xid, --target-name, --latest"
            + (f" (got {', '.join(given)})" if given else "")
        )
    tl: int | Literal["latest", "current"]
    t = timeline.strip().lower()
    if t == "latest":
        tl = "latest"
    elif t == "current":
        tl = "current"
    else:
        try:
            tl = int(t, 0)
        except ValueError:
            raise UsageError(
                f"--target-timeline must be a number, latest or current, not {timeline!r}"
            ) from None
        if tl < 1:
            raise UsageError("--target-timeline must be at least 1")
    inclusive = not exclusive
    if time_ is not None:
        return Target("time", time=parse_target_time(time_), inclusive=inclusive, timeline=tl)
    if lsn is not None:
        try:
            value = parse_lsn(lsn)
        except ValueError:
            raise UsageError(f"--target-lsn: {lsn!r} is not an LSN (like 0/3000148)") from None
        return Target("lsn", lsn=value, inclusive=inclusive, timeline=tl)
    if xid is not None:
        if xid < 3:
            raise UsageError("--target-xid must be a normal transaction id (3 or more)")
        return Target("xid", xid=xid, inclusive=inclusive, timeline=tl)
    if name is not None:
        if not name or len(name) > 63:
            raise UsageError("--target-name must be 1 to 63 characters")
        return Target("name", name=name, timeline=tl)
    return Target("latest", timeline=tl)


def _bytes_line(res: RestoreResult) -> str:
    """An indexed backup's bytes: what a delta fetched and wrote against the backup's total."""
    if res.bytes_total is None:
        return ""
    how = "delta" if res.delta else f"{res.jobs} jobs"
    return (
        f"  bytes     fetched {human_bytes(res.bytes_fetched or 0)} (stored), wrote "
        f"{human_bytes(res.bytes_written or 0)} of {human_bytes(res.bytes_total)} ({how})"
    )


def _check_restore_flags(
    start: bool,
    port: int | None,
    latest: bool,
    include_current_wal: bool,
    no_switch_wal: bool,
    combine: str,
    delta: bool = False,
    rehash: bool = False,
) -> None:
    if start and port is None:
        raise fail("--start needs --port (the restored server must not take the source's port)", 2)
    if rehash and not delta:
        raise fail("--rehash goes with --delta", 2)
    if include_current_wal and not latest:
        raise fail("--include-current-wal goes with --latest (other targets switch WAL when they need it)", 2)
    if include_current_wal and no_switch_wal:
        raise fail("--include-current-wal and --no-switch-wal contradict each other", 2)
    if combine not in COMBINE_MODES:
        raise fail(f"--combine: {combine!r} is not one of {', '.join(COMBINE_MODES)}", 2)


def restore_point_text(plan: RestorePlan, target: Target) -> str:
    """What ``restore`` says before it copies: the backup, where it ends, and the archived WAL
    recovery replays up to (the point a --latest restore reaches)."""
    b = plan.backup
    end = f"ends at {b.stop_lsn}" + (f", {timefmt.iso(b.stop_time)}" if b.stop_time else "")
    wal = plan.covered_until or "no WAL after the backup"
    when = f", archived {timefmt.iso(plan.covered_until_modified)}" if plan.covered_until_modified else ""
    return (
        f"restoring backup {b.id} ({b.kind}, {end}) to {target.describe()} on timeline {plan.timeline}; "
        f"WAL replayed up to {wal}{when}"
    )


def _restore_lines(res: RestoreResult) -> list[str]:
    """What ``restore`` prints on a terminal."""
    secs = [
        f"plan {res.seconds_plan:.1f}",
        f"fetch+decompress {res.seconds_fetch:.1f}{rate(res.size, res.seconds_fetch)}",
    ]
    if res.seconds_fetch_wait is not None and res.seconds_decompress is not None:
        secs[-1] += (
            f" [waiting for the repository {res.seconds_fetch_wait:.1f}, untar {res.seconds_decompress:.1f}]"
        )
    if res.seconds_combine is not None and res.combine_mode == COMBINE_IN_PLACE:
        secs.append(f"chain applied in place {res.seconds_combine:.1f}")
    elif res.seconds_combine is not None:
        secs.append(f"pg_combinebackup --{res.combine_mode} and pg_verifybackup {res.seconds_combine:.1f}")
    if res.seconds_replay is not None:
        secs.append(f"WAL replay {res.seconds_replay:.1f}")
    if res.seconds_promote is not None:
        secs.append(f"promote {res.seconds_promote:.1f}")
    secs.append(f"total {res.seconds_total:.1f}")
    lines = [
        f"restored backup {res.backup_id} (repository {res.repository}) into {res.data_dir}",
        f"  target    {res.target} on timeline {res.timeline}",
        f"  size      {human_bytes(res.size)} in {res.parts} parts",
        f"  chain     {' -> '.join(res.chain)} (full backup first)" if len(res.chain) > 1 else "",
        _bytes_line(res),
        f"  seconds   {', '.join(secs)}",
        f"  phases    {phases_text(res.phases)}" if res.phases else "",
    ]
    lines.extend(f"  note      {n}" for n in res.notes)
    if res.started:
        lines.append(f"  promoted  new timeline {res.new_timeline}; writable")
        if res.wal_requests:
            lines.append(
                f"  WAL       {res.wal_requests} segments, {res.wal_prefetch_hits} fetched ahead, "
                f"replay waited {res.wal_fetch_wait_s or 0.0:.1f}s for the rest"
            )
        lines.append(f"  connect   {res.dsn}")
    else:
        lines.append(f"  start it  {res.start_command}")
    return lines


@app.command("restore")
def restore_cmd(
    config: ConfigReq,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir", "-D", help="Empty or missing directory to restore into (--delta: an older copy)."
        ),
    ],
    target_time: Annotated[
        str | None, typer.Option("--target-time", help="ISO 8601 time; without a zone: local time.")
    ] = None,
    target_lsn: Annotated[
        str | None, typer.Option("--target-lsn", help="WAL position, e.g. 0/3000148.")
    ] = None,
    target_xid: Annotated[int | None, typer.Option("--target-xid", help="Transaction id.")] = None,
    target_name: Annotated[
        str | None, typer.Option("--target-name", help="Restore point (pg_create_restore_point).")
    ] = None,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest", help="Everything in the archive (what is archived now; see --include-current-wal)."
        ),
    ] = False,
    include_current_wal: Annotated[
        bool,
        typer.Option(
            "--include-current-wal",
            help="With --latest: run pg_switch_wal() on the cluster's primary and wait until that segment "
            "is archived, so that the restore includes the very latest commits (a wait before the copy).",
        ),
    ] = False,
    exclusive: Annotated[
        bool, typer.Option("--exclusive", help="Stop just before the target (time, LSN, xid).")
    ] = False,
    target_timeline: Annotated[
        str, typer.Option("--target-timeline", help="Timeline number, latest or current.")
    ] = "latest",
    backup_id: Annotated[
        str | None, typer.Option("--backup", help="Backup id (default: the newest one before the target).")
    ] = None,
    repo: RepoOpt = None,
    start: Annotated[
        bool, typer.Option("--start", help="Start PostgreSQL and wait until it has left recovery.")
    ] = False,
    port: Annotated[
        int | None, typer.Option("--port", help="Port of the restored server.", min=1, max=65535)
    ] = None,
    no_switch_wal: Annotated[
        bool,
        typer.Option(
            "--no-switch-wal",
            help="Never run pg_switch_wal() on the cluster's primary (a time or LSN target past the "
            "archive is then refused).",
        ),
    ] = False,
    wal_timeout: Annotated[
        float,
        typer.Option("--wal-timeout", help="Seconds to wait for a switched segment to be archived.", min=1),
    ] = 60.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for recovery to end.", min=1)
    ] = 3600.0,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            "--parallel",
            help="Workers fetching, checking, decompressing and writing parts at once "
            "(default: the CPU count; --parallel is the old name).",
            min=1,
            max=256,
        ),
    ] = None,
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="DATA_DIR holds an older copy of the same cluster (stopped): fetch and write only the "
            "blocks that differ, remove what the backup lacks (needs a backup with a file index).",
        ),
    ] = False,
    rehash: Annotated[
        bool,
        typer.Option(
            "--rehash",
            help="With --delta: read and compare every local file, also those unchanged (same inode, "
            "size, mtime and ctime) since the restore that wrote them recorded their content.",
        ),
    ] = False,
    prefetch: Annotated[
        int,
        typer.Option(
            "--prefetch",
            help="WAL segments fetched ahead of recovery (0: none), within --prefetch-max-mb.",
            min=0,
            max=256,
        ),
    ] = DEFAULT_PREFETCH,
    prefetch_max_mb: Annotated[
        int,
        typer.Option(
            "--prefetch-max-mb",
            help="MiB the WAL fetched ahead may hold in pg_wal at once (downloads included); the window "
            "shrinks to what fits (less than a segment: no prefetch).",
            min=0,
            max=1 << 20,
        ),
    ] = DEFAULT_PREFETCH_MAX_BYTES >> 20,
    combine: Annotated[
        str,
        typer.Option(
            "--combine",
            help="How an incremental backup's chain is rebuilt: in-place (the full unpacked into the "
            "directory, the changes of the later backups applied to it); pg_combinebackup "
            "(PostgreSQL's tool, then pg_verifybackup: slower, the result written twice).",
        ),
    ] = COMBINE_IN_PLACE,
    bin_dir_opt: Annotated[
        Path | None,
        typer.Option(
            "--bin-dir",
            help="PostgreSQL binaries to start/combine with (default: postgresql.bin_dir); a backup "
            "taken before a major upgrade needs its own major's.",
        ),
    ] = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Restore a base backup into an empty directory (or, with --delta, over an older copy of the
    same cluster) and recover to a target.

    The newest complete backup before the target is chosen, and the archive is checked to
    reach the target along the target timeline's history before anything is copied.  The
    restored server promotes at the target (recovery_target_action = promote), never
    archives (archive_mode = off) and has the source's replication settings cleared."""
    check_output(output)
    try:
        target = build_target(
            target_time, target_lsn, target_xid, target_name, latest, exclusive, target_timeline
        )
    except UsageError as e:
        raise fail(str(e), 2) from None
    _check_restore_flags(start, port, latest, include_current_wal, no_switch_wal, combine, delta, rehash)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)
    from hakeeper.backup.delta import check_target as check_delta_target
    from hakeeper.backup.restore import RestoreError, RestoreOptions, check_data_dir, restore
    from hakeeper.util.proc import resolve_run_as

    try:
        if bin_dir_opt is not None:
            bin_dir = find_bin_dir(bin_dir_opt.absolute())
        else:
            bin_dir = node_bin_dir(cfg.postgresql)
        run_as = resolve_run_as(data_dir.absolute(), cfg.postgresql.os_user)
    except (PgError, RuntimeError) as e:
        raise fail(str(e), 2) from None
    try:
        if delta:
            check_delta_target(data_dir.absolute())
        else:
            check_data_dir(data_dir.absolute())
    except RestoreRefused as e:
        raise fail(str(e)) from None

    def announce(plan: RestorePlan) -> None:
        if output == "table" and not quiet:
            err.print(escape(restore_point_text(plan, target)))

    async def go(progress: ProgressFn | None) -> RestoreResult:
        # --latest restores what is archived (no primary needed) unless the current WAL is wanted
        switch = not no_switch_wal and (not latest or include_current_wal)
        primary = await find_primary(cfg) if switch else None
        refusals: list[str] = []
        for rc in repos:
            r = make_repository(rc)
            opts = RestoreOptions(
                data_dir=data_dir.absolute(),
                target=target,
                bin_dir=bin_dir,
                run_as=run_as,
                superuser=cfg.postgresql.superuser,
                backup_id=backup_id,
                start=start,
                port=port,
                primary=primary,
                switch_wal=not no_switch_wal,
                include_current_wal=include_current_wal,
                on_planned=announce,
                wal_timeout=wal_timeout,
                start_timeout=timeout,
                parallel=jobs or os.cpu_count() or 2,
                delta=delta,
                rehash=rehash,
                progress=progress,
                combine=combine,
                prefetch=prefetch,
                prefetch_max_bytes=prefetch_max_mb << 20,
            )
            try:
                return await restore(r, rc, cfg.scope, opts)
            except RestoreRefused as e:
                refusals.append(f"{rc.name}: {e}" if len(repos) > 1 else str(e))
            finally:
                await r.close()
        raise RestoreRefused("\n".join(refusals))

    try:
        labels = {
            "fetch": Label("fetch + decompress"),
            "wal_replay": Label("WAL replay"),
            "end_of_recovery": Label("end of recovery", "time"),  # the checkpoint, or the promotion
        }
        with progress_display("restore", labels, output=output, quiet=quiet) as bars:
            res = asyncio.run(go(bars))
    except RestoreRefused as e:
        raise fail(f"restore refused, nothing was copied: {e}") from None
    except (RestoreError, BackupError, RepoError) as e:
        raise fail(f"restore failed: {e}") from None
    if output != "table":
        emit_data(output, res.to_dict())
        return
    lines = _restore_lines(res)
    out.print(escape("\n".join(ln for ln in lines if ln)))
    sys.stdout.flush()


# --------------------------------------------------------------------------------- backup copy / policy


@backup_app.command("copy")
def backup_copy(
    item_id: Annotated[str, typer.Argument(help="Backup id, or dump id (D...), from backup/dump list.")],
    config: ConfigReq,
    to: Annotated[str, typer.Option("--to", help="Repository to copy into.")],
    source: Annotated[
        str | None,
        typer.Option("--from", help="Repository to copy from (default: the first other one holding it)."),
    ] = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Copy a base backup (with the WAL it needs) or a dump to another repository without
    recompressing it (decrypted and sealed again with the target's key where encrypted), and
    verify the copy."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    names = [r.name for r in _repo_configs(cfg, None)]
    for opt, name in (("--to", to), ("--from", source)):
        if name is not None and name not in names:
            raise fail(f"{opt}: unknown repository {name!r} (configured: {', '.join(names)})", 2)
    if source == to:
        raise fail("--from and --to name the same repository", 2)
    from hakeeper.backup.copy import CopyError, CopyResult, copy_to

    async def go(progress: ProgressFn | None) -> CopyResult:
        return await copy_to(cfg.backup, cfg.scope, item_id, to, source=source, progress=progress)

    try:
        labels = {"copy": Label("copy", "objects")}
        with progress_display("backup copy", labels, output=output, quiet=quiet) as bars:
            res = asyncio.run(go(bars))
    except (CopyError, RepoError) as e:
        raise fail(str(e)) from None
    if output != "table":
        emit_data(output, res.to_dict())
        return
    lines = [
        f"{res.kind} {res.item_id}: {res.source} -> {res.target}, "
        + (
            "already there"
            if res.already_there
            else f"{res.objects} objects, {human_bytes(res.stored_bytes)} copied and verified"
        ),
    ]
    if res.kind == "backup":
        lines.append(f"  WAL      {res.wal_copied} files copied, {res.wal_present} already there")
    lines.extend(f"  note     {n}" for n in res.notes)
    out.print(escape("\n".join(lines)))


@backup_app.command("policy")
def backup_policy(
    config: ConfigReq,
    copies: Annotated[int, typer.Option("--copies", help="Copies each backup needs.", min=1)] = 3,
    storage_types: Annotated[
        int, typer.Option("--storage-types", help="Different storage types among them.", min=1)
    ] = 2,
    offsite: Annotated[int, typer.Option("--offsite", help="Off-site copies among them.", min=0)] = 1,
    output: OutputOpt = "table",
) -> None:
    """The 3-2-1 check: does every retained backup and dump have 3 copies, on 2 storage types,
    1 off-site?  Exit 1 when one does not (or a repository cannot be read)."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    _repo_configs(cfg, None)
    from hakeeper.backup.policy import Rule, check_policy

    report = asyncio.run(check_policy(cfg.backup, cfg.scope, Rule(copies, storage_types, offsite)))
    if output != "table":
        emit_data(output, report.to_dict())
    else:
        t = Table(title=f"3-2-1 policy of {cfg.scope}: {report.rule.describe()}")
        for col in ("ID", "Kind", "Time (UTC)", "Copies", "Storage", "Off-site", "OK", "Missing"):
            t.add_column(col)
        for r in report.rows:
            t.add_row(
                r.id,
                r.kind,
                timefmt.iso(r.time).replace("T", " ").rstrip("Z")[:19] if r.time else "",
                escape(", ".join(r.repositories)),
                escape(", ".join(r.storage_types)),
                escape(", ".join(r.offsite)) or "-",
                "[green]yes[/]" if r.ok else "[bold red]NO[/]",
                escape("; ".join(r.missing)),
            )
        out.print(t)
        repos = ", ".join(
            f"{f.name} ({f.storage}{', off-site' if f.offsite else ''})" for f in report.repositories
        )
        err.print(escape(f"repositories: {repos}"))
        for name, e in report.unreadable.items():
            err.print(escape(f"warning: {name} could not be read: {e}"))
        for n in report.notes:
            err.print(escape(f"note: {n}"))
    if not report.ok:
        raise typer.Exit(1)


@backup_app.command("keygen")
def backup_keygen(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the key to this new file (mode 0600) instead of stdout."),
    ] = None,
) -> None:
    """Make a random key for an encrypted repository (32 bytes, printed as base64): for
    `encryption: {key_file: ...}` or an environment variable named by `key_env`.  Keep a copy
    away from the repository: without it no backup in the repository can be read."""
    from hakeeper.util.keyfile import new_key_text

    text = new_key_text() + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    import os

    try:
        # O_EXCL: never replace a key (the backups made with it would become unreadable)
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise fail(f"{output}: {e.strerror or e}", 2) from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    err.print(f"wrote a new key to {output} (mode 0600)", markup=False)
