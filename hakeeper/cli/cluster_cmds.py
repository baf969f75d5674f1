"""Cluster read commands: ``list`` and ``history``.  Reads come straight from etcd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from hakeeper.api.status import member_slots_doc
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.core import timefmt
from hakeeper.core.cluster import ClusterView, Member, MemberRole
from hakeeper.core.config import EtcdConfig, NodeConfig, format_validation_error
from hakeeper.core.keys import Keys
from hakeeper.core.lsn import format_lsn
from hakeeper.dcs.etcd import EtcdClient, EtcdError
from hakeeper.dcs.store import ClusterStore

ConfigOpt = Annotated[Path | None, typer.Option("-c", "--config", help="Node YAML file.")]
EtcdOpt = Annotated[list[str] | None, typer.Option("--etcd", help="etcd URL (repeatable); instead of -c.")]
ScopeOpt = Annotated[str | None, typer.Option("--scope", help="Cluster name; with --etcd.")]
NamespaceOpt = Annotated[str, typer.Option("--namespace", help="Key prefix; with --etcd.")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table, json or yaml.")]
WATCH_DEFAULT_S = "2"
WatchOpt = Annotated[
    str | None,
    typer.Option(
        "-w",
        "--watch",
        metavar="[SECONDS]",
        help=f"Refresh every SECONDS (default {WATCH_DEFAULT_S}) until Ctrl-C.",
    ),
]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def expand_watch_default(args: list[str]) -> list[str]:
    """Let ``list --watch`` take an optional value: a bare ``--watch``/``-w`` (last, or followed
    by another option) gets the default interval.  ``args`` is ``sys.argv[1:]``."""
    if "list" not in args:
        return args
    start = args.index("list")
    out = args[: start + 1]
    rest = args[start + 1 :]
    for i, a in enumerate(rest):
        out.append(a)
        if a in ("-w", "--watch"):
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            if nxt is None or (nxt.startswith("-") and not _is_number(nxt)):
                out.append(WATCH_DEFAULT_S)
    return out


OUTPUTS = ("table", "json", "yaml")


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise fail(f"unknown output format {output!r}; use table, json or yaml", 2)


def emit_data(output: str, data: Any) -> None:
    """Print ``data`` as JSON (indented) or YAML, unwrapped, for scripts."""
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def etcd_client_for(cfg: NodeConfig) -> EtcdClient:
    return EtcdClient.from_config(cfg.etcd, min_timeout=2.0)


ETCD_ENV = "HAKEEPER_ETCD__"  # the same variables a node config's etcd section takes
ETCD_ENV_FIELDS = ("cacert", "cert", "key", "username", "password")


def etcd_config_for_urls(urls: list[str]) -> EtcdConfig:
    """The etcd settings of ``--etcd URL``: the URLs, plus CA, client certificate and key, user
    and password from ``HAKEEPER_ETCD__CACERT``/``CERT``/``KEY``/``USERNAME``/``PASSWORD`` (not
    options: a password on the command line is visible to every local user in ``ps``).
    Exit 2 with the variable and the reason when they do not make a valid etcd section."""
    raw: dict[str, Any] = {"hosts": urls}
    for field in ETCD_ENV_FIELDS:
        value = os.environ.get(ETCD_ENV + field.upper())
        if value:
            raw[field] = value
    if "cacert" not in raw and any(u.startswith("https://") for u in urls):
        err.print(
            f"note: https:// etcd: its CA, a client certificate and user come from {ETCD_ENV}CACERT, "
            f"{ETCD_ENV}CERT, {ETCD_ENV}KEY, {ETCD_ENV}USERNAME, {ETCD_ENV}PASSWORD (or use -c NODE.yml)",
            markup=False,
        )
    try:
        return EtcdConfig.model_validate(raw)
    except ValidationError as e:
        for field, msg in format_validation_error(e):
            where = f"{ETCD_ENV}{field.upper()}" if field in ETCD_ENV_FIELDS else f"--etcd ({field})"
            index = field.removeprefix("hosts.")
            if index.isdigit() and int(index) < len(urls):  # the URL itself, not its list position
                where = f"--etcd {urls[int(index)]}"
            err.print(f"{where}: {msg}", markup=False)
        raise typer.Exit(2) from None


def etcd_client_for_urls(urls: list[str]) -> EtcdClient:
    return EtcdClient.from_config(etcd_config_for_urls(urls), min_timeout=2.0)


def quiet_logging() -> None:
    """Library log lines (e.g. one etcd endpoint of several failing) go to stderr, and only at
    ERROR: stdout carries the command's output (JSON for scripts) and nothing else."""
    from hakeeper.util.log import setup_logging

    setup_logging(fmt="console", level="ERROR")


def _client_and_prefix(
    config: Path | None, etcd: list[str] | None, scope: str | None, namespace: str
) -> tuple[EtcdClient, str]:
    quiet_logging()
    if config is not None:
        cfg = load_or_exit(config)
        # another cluster on the same etcd (`hakeeper list -c node.yml other`): the node file's
        # namespace with the scope asked for
        return etcd_client_for(cfg), cfg.prefix if scope is None else f"{cfg.namespace}/{scope}"
    if not etcd or not scope:
        raise fail("give -c NODE.yml, or both --etcd URL and --scope NAME", 2)
    return etcd_client_for_urls(etcd), "/" + namespace.strip("/") + "/" + scope


async def fetch_view(client: EtcdClient, prefix: str) -> ClusterView:
    """The cluster under ``prefix`` from one read; closes ``client``."""
    try:
        return await ClusterStore(client, Keys(prefix)).read_view()
    finally:
        await client.close()


def _load(config: Path | None, etcd: list[str] | None, scope: str | None, namespace: str) -> ClusterView:
    client, prefix = _client_and_prefix(config, etcd, scope, namespace)
    try:
        return asyncio.run(fetch_view(client, prefix))
    except EtcdError as e:
        raise fail(f"cannot read the cluster from etcd: {e}") from None


_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_bytes(n: int) -> str:
    """``n`` bytes the way PostgreSQL's pg_size_pretty counts (1024-based): ``0 B``, ``16 MB``,
    ``1.2 GB`` -- one decimal below 10 of a unit, none above."""
    value = float(n)
    unit = 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n} B"
    text = f"{value:.1f}" if abs(value) < 9.95 else f"{value:.0f}"
    return f"{text} {_UNITS[unit]}"


def standby_kind(view: ClusterView, m: Member) -> str | None:
    """``sync`` or ``quorum`` for a member the current leader's ``sync`` key lists (it has every
    commit, or is one of the quorum that does), None otherwise."""
    sync = view.sync
    if sync is None or view.leader is None or sync.leader != view.leader.name or m.name == sync.leader:
        return None
    if m.name not in sync.members:
        return None
    return "quorum" if sync.is_quorum else "sync"


def role_label(view: ClusterView, m: Member) -> str:
    """The role as ``list`` shows it: ``sync standby`` / ``quorum standby`` set apart from
    ``replica`` (the published role stays in ``-o json``'s ``role``)."""
    if m.role == MemberRole.REPLICA and (kind := standby_kind(view, m)) is not None:
        return f"{kind} standby"
    return m.role.value


def members_rows(view: ClusterView) -> list[dict[str, Any]]:
    rows = []
    for m in sorted(view.members.values(), key=lambda m: m.name):
        is_leader = view.leader is not None and view.leader.name == m.name
        rows.append(
            {
                "name": m.name,
                "host": m.conn_address,
                "role": m.role.value,
                "display_role": role_label(view, m),
                "standby": standby_kind(view, m),
                "state": m.state.value,
                "timeline": m.timeline,
                "lag": m.lag,  # bytes
                "lag_pretty": None if m.lag is None else human_bytes(m.lag),
                "leader": is_leader,
                "eligible": m.eligible,
                "reason": m.ineligible_reason,
                "wal_lsn": format_lsn(m.wal_lsn) if m.wal_lsn is not None else None,
                "server_version": m.server_version,
                "pending_restart": m.pending_restart,
                "pending_restart_reasons": list(m.pending_restart_reasons),
                "slots": member_slots_doc(m, view),
                "scheduled_restart": timefmt.iso(m.scheduled_restart, timespec="seconds"),
                "api_url": m.api_url,
                "updated_at": timefmt.iso(m.updated_at, timespec="seconds") if m.updated_at else None,
                "tags": {
                    "nofailover": m.nofailover,
                    "failover_priority": m.failover_priority,
                    "noloadbalance": m.noloadbalance,
                    "nosync": m.nosync,
                },
            }
        )
    return rows


def scope_of(prefix: str) -> str:
    """The scope of the key prefix ``/namespace/scope``."""
    return prefix.rstrip("/").rsplit("/", 1)[-1]


def list_document(view: ClusterView, scope: str | None = None) -> dict[str, Any]:
    """What ``list -o json|yaml`` prints."""
    sw = view.switchover
    return {
        "scope": scope,
        "system_identifier": view.initialized,
        "leader": view.leader.name if view.leader else None,
        "term": view.leader.term if view.leader else None,
        "paused": view.paused,
        "upgrade": None
        if view.upgrade is None
        else {
            "id": view.upgrade.id,
            "from_major": view.upgrade.from_major,
            "to_major": view.upgrade.to_major,
            "method": view.upgrade.method,
            "started_at": view.upgrade.started_at,
        },
        "switchover": None
        if sw is None
        else {
            "kind": sw.kind.value,
            "leader": sw.leader,
            "candidate": sw.candidate,
            "scheduled_at": sw.scheduled_at,
            "stage": sw.stage.value,
        },
        "members": members_rows(view),
        "config_error": view.config_error,
        "invalid_records": [{"key": p.key, "revision": p.revision, "reason": p.reason} for p in view.invalid],
    }


def view_warnings(view: ClusterView) -> list[str]:
    """What is wrong with the keys in etcd, one line each (printed to stderr by ``list``)."""
    lines = []
    if view.config_error:
        lines.append(f"warning: {view.config_error}")
    for p in view.invalid:
        if view.config_error and p.key.endswith("/config"):
            continue  # said above
        lines.append(f"warning: {p.key} (revision {p.revision}) is invalid and ignored: {p.reason}")
    return lines


def _ago(epoch: float, now: float) -> str:
    """How long ago ``epoch`` was, short: ``3s``, ``2m``, ``5h``."""
    age = max(0.0, now - epoch)
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.0f}h ago"


def _tags_text(m: Member) -> str:
    tags = []
    if m.nofailover:
        tags.append("nofailover")
    if m.failover_priority != 1:
        tags.append(f"failover_priority={m.failover_priority}")
    if m.noloadbalance:
        tags.append("noloadbalance")
    if m.nosync:
        tags.append("nosync")
    if m.sync_priority != 1:
        tags.append(f"sync_priority={m.sync_priority}")
    return ",".join(tags)


def server_versions(view: ClusterView) -> list[str]:
    """The PostgreSQL releases the running members report, in version order."""
    found = {m.server_version for m in view.members.values() if m.server_version}
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def members_table(
    view: ClusterView, scope: str | None = None, *, extended: bool = False, now: float | None = None
) -> Table:
    """The table of ``list``: like patronictl's, the scope and system identifier in the title,
    lag in human units (raw bytes in ``-o json``), ``*`` for a pending restart; ``extended``
    adds the LSN, tags, API URL, what a restart would apply, a scheduled restart, last seen."""
    # One PostgreSQL release for all (the usual case): in the title; during a rolling minor or
    # a mixed-up major upgrade: a column, so the odd member stands out.
    versions = server_versions(view)
    release = f", PostgreSQL {versions[0]}" if len(versions) == 1 else ""
    title = f"cluster {scope or '?'} (system {view.initialized or 'not initialized'}{release})"
    if view.upgrade is not None:
        up = view.upgrade
        title += f" [major upgrade {up.from_major} -> {up.to_major} in progress ({up.id}): paused]"
    elif view.upgrading:
        title += " [unreadable upgrade key: paused]"
    elif view.paused:
        title += " [maintenance mode: paused]"
    sw = view.switchover
    if sw is not None:
        when = (
            "now"
            if sw.scheduled_at is None
            else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(sw.scheduled_at))
        )
        title += f" [{sw.kind.value} {sw.leader or '-'} -> {sw.candidate or 'best replica'}, {when}]"
    t = Table(title=escape(title))
    cols = ["Member", "Host", "Role", "State", "TL", "Lag", "Pending restart"]
    if len(versions) > 1:
        cols.insert(4, "PostgreSQL")
    if extended:
        cols += ["LSN", "Tags", "API", "Restart for", "Scheduled restart", "Last seen"]
    cols.append("Notes")
    for col in cols:
        t.add_column(col, justify="right" if col in ("TL", "Lag") else "left")
    now = time.time() if now is None else now
    for r in members_rows(view):
        m = view.members[r["name"]]
        notes = []
        if r["leader"]:
            notes.append("leader")
        if r["reason"] and r["role"] != "primary":
            notes.append(r["reason"])
        if r["slots"] and r["slots"]["summary"]:
            notes.append(r["slots"]["summary"])
        row = [
            r["name"],
            r["host"],
            r["display_role"],
            r["state"],
            *([r["server_version"] or ""] if len(versions) > 1 else []),
            "" if r["timeline"] is None else str(r["timeline"]),
            r["lag_pretty"] or "",
            "*" if r["pending_restart"] else "",
        ]
        if extended:
            row += [
                r["wal_lsn"] or "",
                _tags_text(m),
                m.api_url,
                ",".join(r["pending_restart_reasons"]),
                r["scheduled_restart"] or "",
                _ago(m.updated_at, now) if m.updated_at else "",
            ]
        row.append("; ".join(notes))
        t.add_row(*(escape(c) for c in row))
    return t


def _print_list(view: ClusterView, output: str, watching: bool, scope: str, extended: bool) -> None:
    if output == "table":
        if not view.members:
            err.print("no members registered (is the scope right and are the agents running?)")
        out.print(members_table(view, scope, extended=extended))
        for line in view_warnings(view):
            err.print(line, markup=False, highlight=False)
    elif watching and output == "json":
        # One compact document per refresh: easy to consume line by line.
        sys.stdout.write(json.dumps(list_document(view, scope)) + "\n")
        sys.stdout.flush()
    else:
        emit_data(output, list_document(view, scope))


ScopeArg = Annotated[
    str | None,
    typer.Argument(metavar="[SCOPE]", help="Cluster name (like --scope; with -c: another cluster)."),
]
ExtendedOpt = Annotated[
    bool,
    typer.Option(
        "-e",
        "--extended",
        help="Add LSN, tags, API URL, pending-restart parameters, scheduled restart, last seen.",
    ),
]


def scope_argument(scope_arg: str | None, scope: str | None) -> str | None:
    """The scope from ``list SCOPE`` or ``--scope`` (the same one if both are given)."""
    if scope_arg is not None and scope is not None and scope_arg != scope:
        raise fail(f"two scopes given: {scope_arg!r} and --scope {scope!r}", 2)
    return scope_arg if scope_arg is not None else scope


@app.command("list")
def list_members(
    scope_arg: ScopeArg = None,
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
    watch: WatchOpt = None,
    extended: ExtendedOpt = False,
) -> None:
    """One row per member: name, host:port, role (sync/quorum standby set apart), state,
    timeline, lag, '*' when a restart is pending.

    The title names the scope and system identifier.  With --watch [SECONDS] the list refreshes
    until Ctrl-C (exit 0); -o json then prints one compact JSON document per line (lag in bytes)."""
    check_output(output)
    scope = scope_argument(scope_arg, scope)
    if watch is None:
        client, prefix = _client_and_prefix(config, etcd, scope, namespace)
        try:
            view = asyncio.run(fetch_view(client, prefix))
        except EtcdError as e:
            raise fail(f"cannot read the cluster from etcd: {e}") from None
        _print_list(view, output, watching=False, scope=scope_of(prefix), extended=extended)
        return
    try:
        interval = float(watch)
    except ValueError:
        raise fail(f"--watch wants a number of seconds, not {watch!r}", 2) from None
    if not 0.1 <= interval <= 3600:
        raise fail("--watch interval must be between 0.1 and 3600 seconds", 2)
    asyncio.run(_watch(config, etcd, scope, namespace, output, interval, extended))
    raise typer.Exit(0)


async def _watch(
    config: Path | None,
    etcd: list[str] | None,
    scope: str | None,
    namespace: str,
    output: str,
    interval: float,
    extended: bool = False,
) -> None:
    """Refresh until SIGINT (Ctrl-C) or SIGTERM.  The signals only set an event: a signal that
    cancelled an etcd request half-way (asyncio.run's own SIGINT handling) could be swallowed on
    the way out and leave the loop running."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        client, prefix = _client_and_prefix(config, etcd, scope, namespace)
        fetch = asyncio.ensure_future(fetch_view(client, prefix))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await fetch
            break
        try:
            view = fetch.result()
        except EtcdError as e:
            err.print(f"{time.strftime('%H:%M:%S')} cannot read the cluster from etcd: {e}")
        else:
            if output == "table":
                if out.is_terminal:
                    out.clear()
                out.print(time.strftime("%Y-%m-%d %H:%M:%S"), markup=False)
            _print_list(view, output, watching=True, scope=scope_of(prefix), extended=extended)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@app.command("history")
def history(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
) -> None:
    """Every promotion: timeline, LSN, time, reason, old and new leader."""
    check_output(output)
    view = _load(config, etcd, scope, namespace)
    entries = [e.to_dict() for e in view.history]
    if output != "table":
        emit_data(output, entries)
        return
    t = Table(title="history")
    for col in ("TL", "LSN", "Time (UTC)", "Reason", "Old leader", "New leader"):
        t.add_column(col)
    for e in view.history:
        t.add_row(
            str(e.timeline),
            format_lsn(e.lsn) if e.lsn is not None else "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time)),
            e.reason + upgrade_note(e.upgrade),
            e.old_leader or "",
            e.new_leader,
        )
    out.print(t)


def upgrade_note(upgrade: Mapping[str, Any] | None) -> str:
    """What the reason column adds for a major upgrade: its write downtime and phases."""
    if not upgrade:
        return ""
    down = upgrade.get("downtime_s")
    phases = ", ".join(f"{k} {float(v):.1f} s" for k, v in (upgrade.get("phases") or {}).items())
    head = f"; write downtime {float(down):.2f} s" if isinstance(down, int | float) else ""
    return head + (f" ({phases})" if phases else "")
