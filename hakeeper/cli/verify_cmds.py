"""``hakeeper verify`` (restore drills) and ``hakeeper report`` (this cluster's RPO/RTO table).

docs/verify.md.  Exit codes: 0 the drill passed, 1 it failed (or could not run), 2 usage.
``report``: 1 when neither etcd nor any repository could be read.  The checksum scan that
pgBackRest calls verify is ``hakeeper repo verify`` (:mod:`hakeeper.cli.repo_cmds`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.markup import escape

from hakeeper.backup.basebackup import BackupError
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.backup_cmds import (
    ConfigReq,
    RepoOpt,
    UsageError,
    find_primary,
    parse_target_time,
)
from hakeeper.cli.cluster_cmds import OutputOpt, check_output, emit_data, etcd_client_for, quiet_logging
from hakeeper.cli.progress import Label, QuietOpt, human_bytes, phases_text, progress_display


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


@app.command("verify")
def verify_cmd(
    config: ConfigReq,
    backup_id: Annotated[
        str | None, typer.Option("--backup", help="Backup id (default: the newest).")
    ] = None,
    latest: Annotated[
        bool, typer.Option("--latest", help="The newest complete backup (the default).")
    ] = False,
    target_time: Annotated[
        str | None,
        typer.Option(
            "--target-time",
            help="Recover to this time (ISO 8601; without a zone: local time) instead of the "
            "restore point recorded with the backup's row counts.",
        ),
    ] = None,
    repo: RepoOpt = None,
    no_switch_wal: Annotated[
        bool, typer.Option("--no-switch-wal", help="Never run pg_switch_wal() on the cluster's primary.")
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", help="Restore workers, as for restore (default: the CPU count).", min=1),
    ] = None,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
) -> None:
    """Restore drill: restore a backup into a scratch directory on a free port, check it
    (pg_verifybackup, row counts, pg_amcheck --heapallindexed, a logical dump restored), measure
    the RTO by phase, clean up, and record the result with the backup and in etcd.  (The
    checksum scan of every object, pgBackRest's verify, is `hakeeper repo verify`.)

    Exit 0 when the drill passed, 1 when it failed."""
    check_output(output)
    if backup_id is not None and latest:
        raise fail("give --backup ID or --latest, not both", 2)
    try:
        when = parse_target_time(target_time) if target_time is not None else None
    except UsageError as e:
        raise fail(str(e), 2) from None
    cfg = load_or_exit(config)
    quiet_logging()
    if not cfg.backup.repositories:
        raise fail("no backup repositories configured (backup.repositories in the node YAML)", 2)
    if repo is not None and repo not in {r.name for r in cfg.backup.repositories}:
        raise fail(f"unknown repository {repo!r}", 2)
    from hakeeper.backup.verify import DrillError, DrillResult, run_drill

    def step(msg: str) -> None:
        if output == "table" and not quiet:
            err.print(escape(f"verify: {msg}"))

    async def go(progress: Any) -> DrillResult:
        primary = None if no_switch_wal else await find_primary(cfg)
        client = etcd_client_for(cfg)
        try:
            return await run_drill(
                cfg,
                backup_id=backup_id,
                target_time=when,
                repository=repo,
                primary=primary,
                etcd=client,
                progress=progress,
                step=step,
                jobs=jobs,
            )
        finally:
            await client.close()

    try:
        labels = {
            "fetch": Label("fetch + decompress"),
            "wal_replay": Label("WAL replay"),
            "end_of_recovery": Label("end of recovery", "time"),  # the checkpoint, or the promotion
        }
        with progress_display("verify", labels, output=output, quiet=quiet) as bars:
            res = asyncio.run(go(bars))
    except (DrillError, BackupError) as e:
        raise fail(str(e)) from None
    if output != "table":
        emit_data(output, res.model_dump(mode="json"))
    else:
        _print_drill(res)
    if not res.ok:
        raise typer.Exit(1)


def _print_drill(res: Any) -> None:
    verdict = "[green]PASSED[/]" if res.ok else "[bold red]FAILED[/]"
    out.print(
        f"drill {res.id}: {verdict} backup {escape(str(res.backup_id))} "
        f"(repository {escape(str(res.repository))}) in {res.seconds:.1f} s"
    )
    lines: list[str] = []
    if res.error:
        lines.append(f"  error     {res.error}")
    if res.failed_object:
        lines.append(f"  object    {res.failed_object}")
    lines.append(f"  target    {res.target}")
    for name, c in res.checks.items():
        state = "ok" if c.ok else "skipped" if c.ok is None else "FAILED"
        lines.append(f"  {name:<16} {state}: {c.detail}" + (f" ({c.seconds:.1f} s)" if c.seconds else ""))
    if res.rto is not None:
        r = res.rto
        size = res.restore.get("size") if res.restore else None
        lines.append(
            f"  RTO       {r.total:.1f} s: plan {r.plan:.1f}, fetch {r.fetch:.1f}, "
            f"decompress {r.decompress:.1f}, WAL replay {_fmt_s(r.wal_replay)}, promote {_fmt_s(r.promote)}"
            + (f" ({human_bytes(size)})" if size else "")
        )
    if res.phases:
        lines.append(f"  phases    {phases_text(res.phases)}")
    lines.extend(f"  note      {n}" for n in res.notes)
    lines.extend(f"  stored    {s}" for s in res.stored)
    out.print(escape("\n".join(lines)))


@app.command("report")
def report_cmd(config: ConfigReq, output: OutputOpt = "table") -> None:
    """This cluster's RPO/RTO table: daily dump, WAL archive + PITR, synchronous replication and
    failover, with the values measured here (restore drills, the archive's lag now, the agents'
    failover timings) and where each comes from; "not measured yet" where there is no data.
    Exit 1 when neither etcd nor any repository could be read (the table is then all unknown)."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    from hakeeper.backup.report import Inputs, build_rows, gather

    # No credentials: the report only GETs /metrics and /status, which need none, from API
    # addresses the members publish in etcd -- where anyone who can write etcd could point
    # them to collect a token (issue 12, finding 3).
    headers: dict[str, str] = {}

    async def go() -> Inputs:
        client = etcd_client_for(cfg)
        try:
            return await gather(cfg, client, headers)
        finally:
            await client.close()

    inp = asyncio.run(go())
    rows = build_rows(inp)
    if output != "table":
        emit_data(
            output,
            {
                "cluster": cfg.scope,
                "generated_at": inp.now.isoformat().replace("+00:00", "Z"),
                "rows": [r.to_dict() for r in rows],
                "notes": inp.notes,
            },
        )
        _exit_if_blind(inp)
        return
    from rich.table import Table

    t = Table(title=f"RPO / RTO of {cfg.scope}, measured (as of {inp.now:%Y-%m-%d %H:%M:%S} UTC)")
    for col in ("Scenario", "RPO measured", "RTO measured", "Source of the numbers"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(escape(r.scenario), escape(r.rpo), escape(r.rto), escape(r.source))
    out.print(t)
    for n in inp.notes:
        err.print(escape(f"note: {n}"))
    _exit_if_blind(inp)


def _exit_if_blind(inp: Any) -> None:
    if inp.read_nothing:
        err.print("error: neither etcd nor any backup repository could be read; nothing above is measured")
        raise typer.Exit(1)
