"""``hakeeper schedule list``: the backup schedules of a node's config with their etcd records."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hakeeper.backup.schedule import describe, records_from
from hakeeper.cli.app import app, fail, load_or_exit, out
from hakeeper.cli.cluster_cmds import OutputOpt, check_output, emit_data, etcd_client_for, quiet_logging
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.store import ClusterStore

schedule_app = typer.Typer(
    help="Backup schedules run by the leader (backup.schedules).", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")

ConfigReq = Annotated[Path, typer.Option("-c", "--config", help="Node YAML file (schedules, etcd, scope).")]


def _row(d: dict[str, Any]) -> list[str]:
    result = d["last_result"] or "-"
    if not d["available"]:
        result = f"unavailable: {d['unavailable_reason']}"
    elif d["last_error"]:
        result += f": {d['last_error']}"
    dur = d["last_duration"]
    return [
        d["name"],
        d["kind"],
        d["cron"] + ("" if d["timezone"] == "UTC" else f" ({d['timezone']})"),
        d["last_slot"] or "-",
        result,
        "-" if dur is None else f"{dur:g} s",
        d["next_run"] or "-",
    ]


@schedule_app.command("list")
def schedule_list(config: ConfigReq, output: OutputOpt = "table") -> None:
    """Each schedule: kind, cron, last slot and its result (ok, failed, interrupted, running),
    duration and next run (from the records the leader keeps in etcd)."""
    check_output(output)
    cfg = load_or_exit(config)
    quiet_logging()
    schedules = cfg.backup.effective_schedules()

    async def fetch() -> dict[str, bytes]:
        client = etcd_client_for(cfg)
        try:
            async with asyncio.timeout(10):
                kvs = await ClusterStore(client, Keys(cfg.prefix)).read_schedules()
        finally:
            await client.close()
        return {kv.key: kv.value for kv in kvs}

    try:
        records = records_from(asyncio.run(fetch()), cfg.prefix)
    except (EtcdError, TimeoutError) as e:
        raise fail(f"cannot read the schedules from etcd: {e or 'timed out'}") from None
    now = time.time()
    docs = [describe(s, records.get(s.name), now) for s in schedules]
    if output != "table":
        emit_data(output, docs)
        return
    if not docs:
        out.print("no schedules (backup.schedules is empty, or there is no repository)")
        return
    table = Table(box=None, header_style="bold")
    for col in ("name", "kind", "cron", "last slot", "last result", "duration", "next run"):
        table.add_column(col)
    for d in docs:
        table.add_row(*(escape(c) for c in _row(d)))
    out.print(table)
