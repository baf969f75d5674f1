"""Logical dump commands: ``hakeeper dump create|list|info|restore|expire`` (pg_dump,
pg_dumpall --globals-only and pg_restore; :mod:`hakeeper.backup.dump`).

Like the backup commands they read the repositories, the scope and the superuser credentials
from a node's YAML (``-c``).  ``dump create`` dumps the cluster's primary (found in etcd) unless
told otherwise; ``dump restore`` restores into the primary too, or into ``--dsn``.
Exit codes: 0 done, 1 the operation failed or was refused, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hakeeper.backup import catalog
from hakeeper.backup.basebackup import BackupError, Endpoint
from hakeeper.backup.catalog import SourceInfo
from hakeeper.backup.dump import (
    FORMATS,
    DumpError,
    DumpExpirePlan,
    DumpRecord,
    DumpRequest,
    DumpRestoreResult,
    RestoreRequest,
    create_dump,
    expire_dumps,
    load_dumps,
    node_conninfo,
    node_dump_request,
    restore_dump,
)
from hakeeper.backup.errors import RepoError
from hakeeper.backup.repos import make_repository
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.backup_cmds import (
    ConfigReq,
    RepoOpt,
    _repo_configs,
    find_primary,
    pick_source,
)
from hakeeper.cli.cluster_cmds import OutputOpt, check_output, emit_data, quiet_logging
from hakeeper.cli.progress import Label, ProgressFn, QuietOpt, human_bytes, phases_text, progress_display
from hakeeper.core import timefmt
from hakeeper.core.config import NodeConfig, secret_value
from hakeeper.pg.bins import node_bin_dir
from hakeeper.pg.errors import PgError

dump_app = typer.Typer(
    help="Logical dumps (pg_dump) in the configured repositories: create, list, info, restore, expire.",
    no_args_is_help=True,
)
app.add_typer(dump_app, name="dump")

DsnOpt = Annotated[
    str | None,
    typer.Option("--dsn", help="libpq connection string or URI of the server (instead of asking etcd)."),
]
TmpOpt = Annotated[
    Path | None,
    typer.Option("--tmp-dir", help="Local scratch directory (needs room for one database's dump)."),
]


def _conninfo(cfg: NodeConfig, ep: Endpoint) -> str:
    return node_conninfo(cfg, ep)


def _dsn_source(dsn: str) -> SourceInfo:
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(dsn)
    return SourceInfo(
        member="dsn", host=str(d.get("host") or "local"), port=int(str(d.get("port") or 5432)), standby=False
    )


def _bin_dir(cfg: NodeConfig) -> Path:
    try:
        return node_bin_dir(cfg.postgresql)
    except PgError as e:
        raise fail(str(e), 2) from None


def _check_dsn(dsn: str | None) -> None:
    if dsn is None:
        return
    from hakeeper.backup.dump import check_conninfo

    try:
        check_conninfo(dsn)
    except DumpError as e:
        raise fail(f"--dsn: {e}", 2) from None


# --------------------------------------------------------------------------------- dump create


@dump_app.command("create")
def dump_create(
    config: ConfigReq,
    db: Annotated[list[str] | None, typer.Option("--db", help="Database to dump (repeatable).")] = None,
    all_dbs: Annotated[bool, typer.Option("--all", help="Every database that accepts connections.")] = False,
    fmt: Annotated[
        str,
        typer.Option("--format", "-F", help="custom (default), directory (parallel with --jobs) or plain."),
    ] = "custom",
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Parallel pg_dump workers (directory format).", min=1, max=64)
    ] = 1,
    table: Annotated[
        list[str] | None, typer.Option("--table", "-t", help="Only this table (pattern; repeatable).")
    ] = None,
    schema_only: Annotated[bool, typer.Option("--schema-only", help="Definitions, no rows.")] = False,
    data_only: Annotated[bool, typer.Option("--data-only", help="Rows, no definitions.")] = False,
    no_globals: Annotated[
        bool, typer.Option("--no-globals", help="Skip pg_dumpall --globals-only (roles, tablespaces).")
    ] = False,
    repo: RepoOpt = None,
    source: Annotated[
        str,
        typer.Option(
            "--from", help="primary (default), standby, auto (a standby, else the primary), local (no etcd)."
        ),
    ] = "primary",
    dsn: DsnOpt = None,
    tmp_dir: TmpOpt = None,
    label: Annotated[str | None, typer.Option("--label", help="Free text kept with the dump.")] = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Dump one or more databases (and the globals) into one repository (default: the first)."""
    check_output(output)
    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}", 2)
    if source not in ("auto", "primary", "standby", "local"):
        raise fail(f"--from must be primary, standby, auto or local, not {source!r}", 2)
    if bool(db) == all_dbs:
        raise fail("give --db NAME (repeatable) or --all", 2)
    if schema_only and data_only:
        raise fail("--schema-only and --data-only exclude each other", 2)
    if jobs > 1 and fmt != "directory":
        raise fail("--jobs needs --format directory (pg_dump dumps in parallel only in that format)", 2)
    _check_dsn(dsn)
    cfg = load_or_exit(config)
    quiet_logging()
    rc = _repo_configs(cfg, repo)[0]
    bin_dir = _bin_dir(cfg)

    async def go(progress: ProgressFn | None) -> DumpRecord:
        what: dict[str, Any] = {
            "databases": tuple(db or ()),
            "all_databases": all_dbs,
            "dump_format": fmt,
            "jobs": jobs,
            "tables": tuple(table or ()),
            "schema_only": schema_only,
            "data_only": data_only,
            "globals": not no_globals,
            "tmp_dir": tmp_dir,
            "label": label,
        }
        if dsn is not None:
            req = DumpRequest(
                conninfo=dsn,
                password=secret_value(cfg.postgresql.superuser.password),
                bin_dir=bin_dir,
                source=_dsn_source(dsn),
                **what,
            )
        else:
            ep, _, note = await pick_source(cfg, source)
            req = node_dump_request(cfg, ep, bin_dir, **what)
            if output == "table" and not quiet:
                err.print(escape(f"{note.replace('backing up', 'dumping')} ({ep.address}) into {rc.name}"))
        async with make_repository(rc) as r:
            return await create_dump(r, cfg.scope, req, progress)

    try:
        with progress_display("dump create", {}, output=output, quiet=quiet) as bars:
            rec = asyncio.run(go(bars))
    except (DumpError, BackupError, RepoError) as e:
        raise fail(str(e)) from None
    if output != "table":
        emit_data(output, rec.model_dump(mode="json"))
        return
    lines = [f"dump {rec.id} complete in repository {rec.repository} ({rec.dump_format} format)"]
    for d in rec.databases:
        toc = f", {d.toc_entries} TOC entries checked" if d.toc_entries is not None else ""
        lines.append(
            f"  {d.name}: {human_bytes(d.size)} -> {human_bytes(d.stored_size)} stored, "
            f"{len(d.objects)} objects{toc}"
        )
    if rec.globals_object is not None:
        lines.append(f"  globals (roles, tablespaces): {human_bytes(rec.globals_object.size)}")
    if rec.phases:
        lines.append(f"  phases: {phases_text(rec.phases)}")
    out.print(escape("\n".join(lines)))


# --------------------------------------------------------------------------------- dump list / info


async def _load_all(cfg: NodeConfig, repo: str | None) -> list[tuple[str, list[DumpRecord], list[str]]]:
    async def one(rc_name: str) -> tuple[str, list[DumpRecord], list[str]]:
        rc = next(r for r in cfg.backup.repositories if r.name == rc_name)
        async with make_repository(rc) as r:
            cat = await load_dumps(r, cfg.scope)
        return rc.name, cat.records, cat.problems

    return list(await asyncio.gather(*(one(rc.name) for rc in _repo_configs(cfg, repo))))


def _records(cfg: NodeConfig, repo: str | None) -> list[DumpRecord]:
    """Every dump record of the repositories (or --repo); unreadable records as warnings."""
    try:
        found = asyncio.run(_load_all(cfg, repo))
    except RepoError as e:
        raise fail(str(e)) from None
    for _, _, problems in found:
        for p in problems:
            err.print(escape(f"warning: {p}"))
    return [r for _, recs, _ in found for r in recs]


@dump_app.command("list")
def dump_list(config: ConfigReq, repo: RepoOpt = None, output: OutputOpt = "table") -> None:
    """Dumps of every repository (or --repo), oldest first."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    now = catalog.utcnow()
    rows = [r.summary(now) for r in _records(cfg, repo)]
    if output != "table":
        emit_data(output, rows)
        return
    t = Table(title=f"dumps of {cfg.scope}")
    for col in (
        "ID",
        "Repo",
        "Status",
        "Format",
        "Databases",
        "Options",
        "Schedule",
        "Stop (UTC)",
        "Size",
        "Stored",
    ):
        t.add_column(col, justify="right" if col in ("Size", "Stored") else "left")
    for row in rows:
        opts = [
            o
            for o, on in (
                ("schema-only", row["schema_only"]),
                ("data-only", row["data_only"]),
                ("globals", row["globals"]),
                ("tables: " + ",".join(row["tables"]), row["tables"]),  # type: ignore[arg-type]
            )
            if on
        ]
        dbs = "all: " if row["all"] else ""
        t.add_row(
            str(row["id"]),
            str(row["repository"]),
            str(row["status"]),
            str(row["format"]),
            escape(dbs + ", ".join(row["databases"])),  # type: ignore[arg-type]
            escape(", ".join(opts)),
            escape(str(row["schedule"] or "-")),
            str(row["stop_time"] or "").replace("T", " ").rstrip("Z")[:19],
            human_bytes(int(str(row["size"]))),
            human_bytes(int(str(row["stored_size"]))),
        )
    if not rows:
        err.print("no dumps")
    out.print(t)


@dump_app.command("info")
def dump_info(
    dump_id: Annotated[str, typer.Argument(help="Dump id (from dump list).")],
    config: ConfigReq,
    repo: RepoOpt = None,
    output: OutputOpt = "table",
) -> None:
    """One dump's record."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    recs = [r for r in _records(cfg, repo) if r.id == dump_id]
    if not recs:
        raise fail(f"no dump {dump_id!r}")
    rec = recs[0]
    doc = rec.model_dump(mode="json")
    doc["effective_status"] = rec.effective_status(catalog.utcnow())
    doc["copies"] = [r.repository for r in recs if r.usable()]
    if output != "table":
        emit_data(output, doc)
        return
    lines = [
        f"dump       {rec.id} ({rec.dump_format} format), repository {rec.repository}",
        f"status     {doc['effective_status']}" + (f": {rec.error}" if rec.error else ""),
        f"source     {rec.source.member} {rec.source.host}:{rec.source.port}"
        + (" (standby)" if rec.source.standby else "")
        if rec.source
        else "source     ?",
        f"postgres   {rec.pg_version}; {rec.pg_dump_version}",
        f"time       {timefmt.iso(rec.start_time)} .. {timefmt.iso(rec.stop_time) if rec.stop_time else '-'}",
        f"globals    {'yes' if rec.globals_object else 'no'}",
        f"taken by   {'schedule ' + rec.schedule if rec.schedule else 'hand'}"
        + (f"; label {rec.label}" if rec.label else ""),
        f"copies     {', '.join(doc['copies']) or 'none complete'}",
    ]
    for d in rec.databases:
        lines.append(
            f"database   {d.name}: {human_bytes(d.size)}, {len(d.objects)} objects, "
            f"{d.toc_entries if d.toc_entries is not None else '-'} TOC entries"
        )
    out.print(escape("\n".join(lines)))


# --------------------------------------------------------------------------------- dump restore


@dump_app.command("restore")
def dump_restore(
    dump_id: Annotated[str, typer.Argument(help="Dump id (from dump list).")],
    config: ConfigReq,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn",
            help="Restore into this database (connection string or URI); with --create-db: the server.",
        ),
    ] = None,
    create_db: Annotated[
        str | None,
        typer.Option("--create-db", help="Create this (new) database and restore into it."),
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Which database of the dump (when it holds several).")
    ] = None,
    table: Annotated[
        list[str] | None,
        typer.Option(
            "--table",
            "-t",
            help="Only this table and its rows (repeatable); NOT its indexes, constraints or "
            "triggers unless --with-related.",
        ),
    ] = None,
    with_related: Annotated[
        bool,
        typer.Option(
            "--with-related",
            help="With --table: also the table's indexes, constraints, triggers, defaults and sequences.",
        ),
    ] = False,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Parallel pg_restore workers.", min=1, max=64)
    ] = 1,
    globals_: Annotated[
        bool,
        typer.Option("--globals", help="First apply the dump's roles and tablespaces (pg_dumpall -g)."),
    ] = False,
    no_owner: Annotated[
        bool, typer.Option("--no-owner", help="Do not set object owners (pg_restore --no-owner).")
    ] = False,
    repo: RepoOpt = None,
    tmp_dir: TmpOpt = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Restore one database of a dump with pg_restore (psql for a plain dump).

    Without --dsn the target server is the cluster's primary (from etcd, else this node)."""
    check_output(output)
    if dsn is None and create_db is None:
        raise fail("give --dsn (an existing database) or --create-db NAME (a new one)", 2)
    if with_related and not table:
        raise fail("--with-related needs --table", 2)
    if create_db is not None and not create_db.strip():
        raise fail("--create-db needs a database name", 2)
    _check_dsn(dsn)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)
    bin_dir = _bin_dir(cfg)

    async def go(progress: ProgressFn | None) -> DumpRestoreResult:
        target = dsn
        if target is None:
            primary = await find_primary(cfg)
            if primary is None:
                raise DumpError("no primary found (etcd, or this node) to restore into; give --dsn")
            target = _conninfo(cfg, primary)
        req = RestoreRequest(
            conninfo=target,
            password=secret_value(cfg.postgresql.superuser.password),
            bin_dir=bin_dir,
            database=db,
            create_db=create_db,
            tables=tuple(table or ()),
            with_related=with_related,
            jobs=jobs,
            globals=globals_,
            no_owner=no_owner,
            tmp_dir=tmp_dir,
        )
        misses: list[str] = []
        for rc in repos:
            async with make_repository(rc) as r:
                cat = await load_dumps(r, cfg.scope)
                rec = cat.get(dump_id)
                if rec is None or (not rec.usable() and len(repos) > 1):
                    misses.append(rc.name)
                    continue
                return await restore_dump(r, cfg.scope, dump_id, req, progress)
        raise DumpError(f"no complete dump {dump_id!r} in {', '.join(misses)}")

    try:
        labels = {"fetch": Label("fetch"), "restore": Label("pg_restore")}
        with progress_display("dump restore", labels, output=output, quiet=quiet) as bars:
            res = asyncio.run(go(bars))
    except (DumpError, BackupError, RepoError) as e:
        raise fail(f"dump restore failed: {e}") from None
    if output != "table":
        emit_data(output, res.to_dict())
        return
    what = f"tables {', '.join(res.tables)} of " if res.tables else ""
    lines = [
        f"restored {what}{res.database} from dump {res.dump_id} (repository {res.repository}) "
        f"into {res.target}" + (" (created)" if res.created else ""),
        f"  {res.entries if res.entries is not None else 'the whole'} "
        f"{'TOC entries' if res.entries is not None else 'plain script'}, {res.seconds:.1f} s",
        f"  phases: {phases_text(res.phases)}" if res.phases else "",
    ]
    lines = [ln for ln in lines if ln]
    lines.extend(f"  note: {n}" for n in res.notes)
    out.print(escape("\n".join(lines)))


# --------------------------------------------------------------------------------- dump expire


@dump_app.command("expire")
def dump_expire(
    config: ConfigReq,
    keep: Annotated[
        int | None, typer.Option("--keep", help="Keep the newest N complete dumps of each kind.", min=1)
    ] = None,
    keep_days: Annotated[
        float | None, typer.Option("--keep-days", help="Keep complete dumps younger than D days.", min=0.001)
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule", help="Only the dumps this backup schedule took (as the schedule's retention does)."
        ),
    ] = None,
    repo: RepoOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    output: OutputOpt = "table",
) -> None:
    """Remove failed dumps and the complete ones --keep / --keep-days no longer keep (per set of
    databases dumped and per schedule; never the newest of a set, never a running one).  Without
    --schedule every dump counts, those of schedules too."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)

    async def go() -> list[DumpExpirePlan]:
        plans = []
        for rc in repos:
            async with make_repository(rc) as r:
                plans.append(await expire_dumps(r, cfg.scope, keep, keep_days, dry_run, schedule=schedule))
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
        lines.extend(
            f"  {verb} dump {d.id} ({d.reason}; {len(d.objects)} objects, {human_bytes(d.stored_size)})"
            for d in p.dumps
        )
        if not p.dumps:
            lines.append("  nothing to remove")
        if p.kept:
            lines.append(f"  kept {len(p.kept)} dumps: {', '.join(p.kept)}")
        if p.running:
            lines.append(f"  running (kept): {', '.join(p.running)}")
        lines.extend(f"  note: {n}" for n in p.notes)
        out.print(escape("\n".join(lines)))
