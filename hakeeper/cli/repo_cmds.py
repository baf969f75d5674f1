"""The verbs a pgBackRest user reaches for first (docs/backup.md, "pgBackRest names"):

* ``hakeeper repo create`` (``stanza-create``): create every configured repository and bind
  its ``<scope>/`` to the cluster's system identifier;
* ``hakeeper check`` (``check``): switch a WAL segment on the primary and wait until every
  repository holds it;
* ``hakeeper info`` (``info``): per repository, the archive's WAL range, the last archived
  segment, the backups and the size;
* ``hakeeper repo verify`` (``verify``): the checksum scan of every object.  hakeeper's own
  ``hakeeper verify`` is a restore drill (docs/verify.md).

Exit codes: 0 ok, 1 the operation failed (named per repository), 2 usage or configuration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hakeeper.backup.basebackup import BackupError, query, switch_wal
from hakeeper.backup.binding import BindingMismatch, create_repository
from hakeeper.backup.errors import RepoError
from hakeeper.backup.info import RepoInfo, repository_info, wait_for_wal
from hakeeper.backup.repos import make_repository
from hakeeper.backup.scan import ScanReport, scan_repository
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.backup_cmds import (
    ConfigReq,
    RepoOpt,
    _local,
    _repo_configs,
    _view,
    find_primary,
    human_bytes,
)
from hakeeper.cli.cluster_cmds import OutputOpt, check_output, emit_data, quiet_logging
from hakeeper.core.config import NodeConfig
from hakeeper.util.proc import resolve_run_as

repo_app = typer.Typer(
    help="Backup repositories: create (set up and bind to this cluster), verify (checksum scan).",
    no_args_is_help=True,
)
app.add_typer(repo_app, name="repo")


# --------------------------------------------------------------------------------- repo create


async def cluster_system_identifier(cfg: NodeConfig) -> tuple[str | None, str]:
    """The cluster's system identifier and where it was read: etcd's initialize key (what every
    member checks its data directory against), else this node's PostgreSQL (pg_control)."""
    notes = []
    try:
        view = await _view(cfg)
        if view.initialized:
            return view.initialized, "etcd (initialize key)"
        notes.append("etcd has no initialize key (cluster not bootstrapped)")
    except BackupError as e:
        notes.append(str(e))
    try:
        rows = await query(
            _local(cfg),
            cfg.postgresql.superuser,
            "SELECT system_identifier::text FROM pg_control_system()",
            5,
        )
        return str(rows[0][0]), f"this node's PostgreSQL ({cfg.name})"
    except BackupError as e:
        notes.append(f"local PostgreSQL: {e}")
    return None, "; ".join(notes)


@repo_app.command("create")
def repo_create(
    config: ConfigReq,
    repo: RepoOpt = None,
    system_identifier: Annotated[
        str | None,
        typer.Option(
            "--system-identifier",
            help="Bind to this system identifier when neither etcd nor the local PostgreSQL can "
            "tell it (refused if they tell another).",
        ),
    ] = None,
    output: OutputOpt = "table",
) -> None:
    """Create the repositories (default: all) and bind them to this cluster (pgBackRest's
    stanza-create).  A directory is created 0700 and, when run as root, given to PostgreSQL's OS
    user (the owner of data_dir); an S3 bucket is created if missing.  Idempotent; refused (exit
    1) for a repository whose <scope>/ belongs to another system identifier."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)
    sysid, source = asyncio.run(cluster_system_identifier(cfg))
    if sysid is not None and system_identifier is not None and sysid != system_identifier:
        raise fail(f"--system-identifier {system_identifier} but {source} says {sysid}", 2)
    if sysid is None:
        if system_identifier is None:
            raise fail(
                f"cannot tell the cluster's system identifier ({source}); start the cluster first or "
                "give --system-identifier"
            )
        sysid, source = system_identifier, "--system-identifier"
    run_as = resolve_run_as(cfg.postgresql.data_dir, cfg.postgresql.os_user)
    owner = (run_as.uid, run_as.gid) if run_as.uid is not None and run_as.gid is not None else None

    async def one(rc: Any) -> dict[str, Any]:
        r = make_repository(rc)
        try:
            return {
                "ok": True,
                **(await create_repository(r, cfg.scope, sysid, owner=owner, now=time.time())).to_dict(),
            }
        except BindingMismatch as e:
            return {"ok": False, "repository": rc.name, "error": str(e)}
        except (RepoError, OSError) as e:
            return {"ok": False, "repository": rc.name, "error": f"{type(e).__name__}: {e}"}
        finally:
            await r.close()

    async def all_() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(rc) for rc in repos)))

    rows = asyncio.run(all_())
    if output != "table":
        emit_data(
            output, {"scope": cfg.scope, "system_identifier": sysid, "source": source, "repositories": rows}
        )
    else:
        out.print(escape(f"cluster {cfg.scope}, system identifier {sysid} (from {source})"))
        for row in rows:
            if not row["ok"]:
                err.print(escape(f"{row['repository']}: REFUSED: {row['error']}"))
                continue
            what = (
                "bound now" if row["bound_now"] else f"already bound ({row['bound_at']}, {row['bound_by']})"
            )
            extra = " created" if row["root_created"] else ""
            if row["owner"]:
                extra += f", owner {row['owner']}"
            out.print(escape(f"{row['repository']}: ok, {what}{extra}"))
    if not all(r["ok"] for r in rows):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------- check


@app.command("check")
def check_cmd(
    config: ConfigReq,
    repo: RepoOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the segment in every repository.")
    ] = 60.0,
    output: OutputOpt = "table",
) -> None:
    """End-to-end archive check (pgBackRest's check): on the primary, write a WAL record and
    pg_switch_wal(), then wait until every configured repository holds that segment.  Exit 1
    naming each repository that did not get it within --timeout.  --repo: wait for that one
    only (default: every configured repository)."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)

    async def go() -> tuple[str, str, dict[str, str | None]]:
        primary = await find_primary(cfg)
        if primary is None:
            raise BackupError("no primary found (neither the leader in etcd nor this node)")
        # a WAL record first: pg_switch_wal() after no write since the last switch switches nothing
        await query(
            primary, cfg.postgresql.superuser, "SELECT pg_logical_emit_message(false, 'hakeeper', 'check')"
        )
        seg = await switch_wal(primary, cfg.postgresql.superuser)
        if seg is None:
            raise BackupError(f"{primary.name} is in recovery (not a primary)")
        made = [make_repository(rc) for rc in repos]
        try:
            state = await wait_for_wal(made, cfg.scope, seg, timeout)
        finally:
            for r in made:
                await r.close()
        return primary.name, seg, state

    t0 = time.monotonic()
    try:
        primary, seg, state = asyncio.run(go())
    except BackupError as e:
        raise fail(str(e)) from None
    seconds = round(time.monotonic() - t0, 2)
    failed = {r: why for r, why in state.items() if why is not None}
    if output != "table":
        emit_data(
            output,
            {
                "primary": primary,
                "segment": seg,
                "seconds": seconds,
                "ok": not failed,
                "repositories": [
                    {"repository": r, "ok": why is None, "error": why} for r, why in state.items()
                ],
            },
        )
    else:
        out.print(escape(f"switched WAL on {primary}: segment {seg}"))
        for r, why in state.items():
            if why is None:
                out.print(escape(f"{r}: ok, {seg} archived"))
            else:
                err.print(escape(f"{r}: FAILED: {why}"))
        if not failed:
            out.print(f"archive check passed in {seconds:g} s")
    if failed:
        err.print(escape(f"error: not archived in {', '.join(failed)}"))
        raise typer.Exit(1)


# --------------------------------------------------------------------------------- info


def _info_rows(cfg: NodeConfig, repo: str | None) -> list[RepoInfo]:
    repos = _repo_configs(cfg, repo)

    async def one(rc: Any) -> RepoInfo:
        r = make_repository(rc)
        try:
            return await repository_info(r, cfg.scope)
        finally:
            await r.close()

    async def all_() -> list[RepoInfo]:
        return list(await asyncio.gather(*(one(rc) for rc in repos)))

    return asyncio.run(all_())


@app.command("info")
def info_cmd(config: ConfigReq, repo: RepoOpt = None, output: OutputOpt = "table") -> None:
    """Per repository (pgBackRest's info): status, the archive's WAL range per timeline, the
    last archived segment and when, backups and the newest complete one, stored size.  A
    repository that cannot be read shows why; exit 1 only if none could be read."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    rows = _info_rows(cfg, repo)
    if output != "table":
        emit_data(output, {"scope": cfg.scope, "repositories": [r.to_dict() for r in rows]})
    else:
        t = Table(title=f"repositories of {cfg.scope}")
        for col in (
            "Repo",
            "Status",
            "System id",
            "WAL (per timeline)",
            "Last archived",
            "Backups",
            "Newest backup",
            "Stored",
        ):
            t.add_column(col, overflow="fold")
        for r in rows:
            d = r.to_dict()
            if not r.ok:
                t.add_row(
                    escape(r.repository), "[bold red]error[/]", "", escape(str(r.error)), "", "", "", ""
                )
                continue
            wal = "\n".join(
                f"{w.first} .. {w.last} ({w.segments}" + (f", {w.missing} missing)" if w.missing else ")")
                for w in r.wal
            )
            newest = r.newest_backup
            t.add_row(
                escape(r.repository),
                "[green]ok[/]" + (f" ({len(r.problems)} problems)" if r.problems else ""),
                r.system_identifier or "(unbound)",
                wal or "-",
                f"{r.last_archived}\n{d['last_archived_at']}" if r.last_archived else "-",
                f"{r.complete_backups} of {r.backups}" + (f"\n{r.chains} chains" if r.chains else ""),
                f"{newest['id']} ({newest['type']})\n{newest['stop_time']}" if newest else "-",
                human_bytes(r.stored_bytes),
            )
        out.print(t)
        for r in rows:
            for p in r.problems:
                err.print(escape(f"warning: {r.repository}: {p}"))
    if rows and not any(r.ok for r in rows):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------- repo verify


@repo_app.command("verify")
def repo_verify(
    config: ConfigReq,
    repo: RepoOpt = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=32, help="Objects read at once.")] = 4,
    output: OutputOpt = "table",
) -> None:
    """Checksum scan (pgBackRest's verify): read every object of this cluster in the
    repositories (default: all), check it against its checksum and what the backup records
    say, and report missing and corrupt objects.  Exit 1 if any.  (The restore drill is
    `hakeeper verify`.)"""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    repos = _repo_configs(cfg, repo)

    async def one(rc: Any) -> ScanReport:
        r = make_repository(rc)
        try:
            return await scan_repository(r, cfg.scope, parallel)
        finally:
            await r.close()

    async def all_() -> list[ScanReport]:
        return list(await asyncio.gather(*(one(rc) for rc in repos)))

    reports = asyncio.run(all_())
    if output != "table":
        emit_data(output, {"scope": cfg.scope, "repositories": [r.to_dict() for r in reports]})
    else:
        for rep in reports:
            if rep.error is not None:
                err.print(escape(f"{rep.repository}: ERROR: could not scan: {rep.error}"))
                continue
            head = (
                f"{rep.repository}: {rep.objects} objects ({human_bytes(rep.bytes)}), "
                f"{rep.backups} backups, {rep.wal_files} WAL files: "
            )
            if rep.ok:
                out.print(escape(head + "ok"))
                continue
            err.print(escape(head + f"{len(rep.problems)} PROBLEMS"))
            for p in rep.problems:
                err.print(escape(f"  {p.kind:<10} {p.object}: {p.detail}"))
    if not all(r.ok for r in reports):
        raise typer.Exit(1)
