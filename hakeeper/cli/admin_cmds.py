"""Administration verbs a Patroni user reaches for: ``remove`` (wipe a cluster's keys in etcd),
``query`` (run SQL on a member or role) and ``version``.

``remove`` talks to etcd only (with the node file's etcd TLS and credentials, or ``--etcd`` and
``HAKEEPER_ETCD__*`` like ``list``); ``query`` and ``version`` connect to PostgreSQL with libpq
at the address a member publishes, as the node file's superuser (or ``--username``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import math
import platform
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.markup import escape
from rich.table import Table

from hakeeper import __version__
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.cluster_cmds import (
    ConfigOpt,
    EtcdOpt,
    NamespaceOpt,
    OutputOpt,
    check_output,
    emit_data,
    etcd_client_for,
    etcd_client_for_urls,
    etcd_config_for_urls,
    quiet_logging,
)
from hakeeper.core.cluster import ClusterView, Member, MemberRole
from hakeeper.core.config import NodeConfig, secret_value
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV, EtcdClient, EtcdError
from hakeeper.dcs.store import ClusterStore
from hakeeper.pg.bins import node_bin_dir
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.session import client_auth_options, conn_kwargs

CONNECT_TIMEOUT_S = 5

# ============================================================================== remove


def confirmation_problem(scope: str, typed: str | None) -> str | None:
    """Why ``typed`` does not confirm removing ``scope`` (None: it does).  The scope must be
    typed exactly: no case folding, no trimming beyond the line end, no prefix of it.  Pure."""
    if typed is None or not typed.strip():
        return "nothing was typed"
    if typed != scope:
        return f"{typed!r} is not the scope {scope!r}"
    return None


@dataclass(frozen=True, slots=True)
class RemovalPlan:
    """What ``remove`` found under the cluster's prefix, read at ``revision``."""

    prefix: str
    keys: tuple[str, ...]
    revision: int
    system_identifier: str | None
    leader: str | None
    live_members: tuple[str, ...]

    @property
    def running(self) -> bool:
        return self.leader is not None or bool(self.live_members)


def removal_plan(keys: Keys, kvs: dict[str, KV], revision: int) -> RemovalPlan:
    """The :class:`RemovalPlan` of the keys ``kvs`` read at ``revision``.  Pure."""
    init = kvs.get(keys.initialize)
    leader = kvs.get(keys.leader)
    members = tuple(sorted(k[len(keys.members) :] for k in kvs if k.startswith(keys.members)))
    return RemovalPlan(
        prefix=keys.all,
        keys=tuple(sorted(kvs)),
        revision=revision,
        system_identifier=init.value.decode(errors="replace") if init is not None else None,
        leader=leader.value.decode(errors="replace") if leader is not None else None,
        live_members=members,
    )


def running_refusal(plan: RemovalPlan, ttl_hint: str) -> str:
    """The one-line reason ``remove`` refuses a cluster whose agents hold keys."""
    held = []
    if plan.leader is not None:
        held.append(f"the leader key ({plan.leader})")
    if plan.live_members:
        held.append("member keys of " + ", ".join(plan.live_members))
    return (
        "refused: the cluster is running: "
        + " and ".join(held)
        + f" are held by live agents. Stop every agent first (their keys go with them, {ttl_hint}), "
        "or add --while-running to remove the keys under running agents (the primary loses its "
        "leader key and a new election follows; history and the dynamic configuration are lost)"
    )


def _remove_etcd(
    config: Path | None, etcd: list[str] | None, namespace: str | None
) -> tuple[Callable[[], EtcdClient], str]:
    """A maker of etcd clients (one per event loop: a client is bound to the loop it ran on)
    and the namespace: the node file's, or ``--etcd`` + ``--namespace``."""
    quiet_logging()
    if config is not None:
        cfg = load_or_exit(config)
        return (lambda: etcd_client_for(cfg)), namespace or cfg.namespace
    if not etcd:
        raise fail("give -c NODE.yml, or --etcd URL (with --namespace if not /hakeeper)", 2)
    urls = list(etcd)
    settings = etcd_config_for_urls(urls)  # checked (exit 2) before anything is read
    return (lambda: EtcdClient.from_config(settings, min_timeout=2.0)), namespace or "/hakeeper"


async def _read(client: EtcdClient, keys: Keys) -> tuple[dict[str, KV], int]:
    try:
        return await ClusterStore(client, keys).read_keys()
    finally:
        await client.close()


def _ask_scope(scope: str) -> str | None:
    if not sys.stdin.isatty():
        raise fail(
            "not confirmed: standard input is not a terminal; add --confirm SCOPE (the scope name "
            "again) to remove without asking"
        )
    try:
        typed: str = typer.prompt(f"Type the scope name ({scope}) to remove its keys", default="")
    except (typer.Abort, EOFError):
        return None
    return typed


@app.command("remove")
def remove(
    scope: Annotated[str, typer.Argument(help="The cluster (scope) whose keys to remove.")],
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="Key prefix (default: the node file's, or /hakeeper).")
    ] = None,
    confirm_scope: Annotated[
        str | None,
        typer.Option(
            "--confirm",
            metavar="SCOPE",
            help="Confirm without asking: the scope name again, exactly (for scripts).",
        ),
    ] = None,
    while_running: Annotated[
        bool,
        typer.Option(
            "--while-running",
            help="Remove the keys although agents hold leader or member keys (they keep running).",
        ),
    ] = False,
    output: OutputOpt = "table",
) -> None:
    """Remove every key of cluster SCOPE from etcd (`<namespace>/<scope>/...`).

    After `remove`, agents started on empty data directories bootstrap a new cluster under the
    scope.  Refused while agents run (leader or member keys held) unless --while-running.  Asks
    to type the scope name; --confirm SCOPE does that for scripts.  Exit 1: refused or aborted,
    nothing removed."""
    check_output(output)
    make_client, ns = _remove_etcd(config, etcd, namespace)
    keys = Keys.of(ns.rstrip("/"), scope)
    try:
        kvs, revision = asyncio.run(_read(make_client(), keys))
    except EtcdError as e:
        raise fail(f"cannot read the cluster from etcd: {e}") from None
    plan = removal_plan(keys, kvs, revision)
    if not plan.keys:
        raise fail(f"no key under {plan.prefix}: no cluster {scope!r} in namespace {ns} (nothing removed)")
    if plan.running and not while_running:
        raise fail(running_refusal(plan, "at once on a clean stop, within the ttl after a crash"))
    sysid = plan.system_identifier or "none"
    err.print(
        f"cluster {scope!r}: {len(plan.keys)} keys under {plan.prefix} (system identifier {sysid}"
        + (f", leader {plan.leader}" if plan.leader else "")
        + (f", live members {', '.join(plan.live_members)}" if plan.live_members else "")
        + ")",
        markup=False,
    )
    typed = confirm_scope if confirm_scope is not None else _ask_scope(scope)
    problem = confirmation_problem(scope, typed)
    if problem is not None:
        code = 2 if confirm_scope is not None else 1
        raise fail(f"not confirmed ({problem}); nothing was removed", code)
    try:
        done = asyncio.run(_remove(make_client(), keys, plan.revision, while_running))
    except EtcdError as e:
        raise fail(f"cannot remove the keys (nothing or all of them removed: one transaction): {e}") from None
    if not done:
        raise fail(
            f"refused by etcd: a key under {plan.prefix} changed after it was read (an agent is running "
            "or starting); nothing was removed"
        )
    doc = {
        "scope": scope,
        "prefix": plan.prefix,
        "removed": len(plan.keys),
        "system_identifier": plan.system_identifier,
    }
    text = f"removed {len(plan.keys)} keys of cluster {scope!r} ({plan.prefix})"
    if output == "table":
        out.print(text, markup=False)
    else:
        emit_data(output, doc)


async def _remove(client: EtcdClient, keys: Keys, revision: int, while_running: bool) -> bool:
    try:
        return await ClusterStore(client, keys).remove_cluster(revision, while_running=while_running)
    finally:
        await client.close()


# ============================================================================== query


class UsageProblem(ValueError):
    """A malformed command line (exit 2)."""


def split_query_args(args: list[str], from_file: bool) -> tuple[str | None, str | None]:
    """``query``'s positional arguments -> (member, SQL): ``[MEMBER] SQL``, or ``[MEMBER]`` with
    ``--file``.  Pure; :class:`UsageProblem` for a wrong count."""
    if from_file:
        if len(args) > 1:
            raise UsageProblem("with --file, give at most a MEMBER (the SQL comes from the file)")
        return (args[0] if args else None), None
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise UsageProblem('give the SQL to run: hakeeper query [MEMBER] "SQL" (or --file FILE)')


ROLES = ("primary", "replica", "any")


def choose_member(view: ClusterView, member: str | None, role: str | None) -> Member:
    """The member to run a query on: ``member`` (which must then have ``role``, if given), else
    the leader (``primary``), the least lagging replica (``replica``; load-balanced ones first)
    or the leader, else the least lagging replica (``any``, the default without a member).
    Pure; :class:`LookupError` with the reason when there is none."""
    leader = view.members.get(view.leader.name) if view.leader is not None else None
    replicas = sorted(
        (m for m in view.members.values() if m.role == MemberRole.REPLICA and m.host),
        key=lambda m: (m.noloadbalance, m.lag is None, m.lag or 0, m.name),
    )
    if member is not None:
        m = view.members.get(member)
        if m is None:
            known = ", ".join(sorted(view.members)) or "none registered"
            raise LookupError(f"{member!r} is not a member of the cluster (members: {known})")
        if role == "primary" and m is not leader:
            raise LookupError(f"{member} is not the primary (it is {m.role.value})")
        if role == "replica" and m.role != MemberRole.REPLICA:
            raise LookupError(f"{member} is not a replica (it is {m.role.value})")
        return m
    if role in ("primary", "any", None) and leader is not None:
        return leader
    if role == "primary":
        raise LookupError("the cluster has no primary (no leader with a member record)")
    if not replicas:
        raise LookupError("no replica is registered" if role == "replica" else "no member to query")
    return replicas[0]


def cell(value: Any) -> Any:
    """A result value as JSON can carry it: numbers, text, booleans, null and lists/objects of
    them as they are; NaN/infinity, decimals, times, UUIDs, bytes, ... as their text.  Pure."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal | dt.date | dt.time | dt.timedelta | uuid.UUID):
        return value.isoformat() if isinstance(value, dt.date | dt.time) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [cell(v) for v in value]
    if isinstance(value, dict):
        return {str(k): cell(v) for k, v in value.items()}
    return str(value)


def cell_text(value: Any) -> str:
    """A result value in a table cell (NULL shown as such, not as an empty string)."""
    v = cell(value)
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


@dataclass(frozen=True, slots=True)
class ResultSet:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    status: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": list(self.columns),
            "rows": [[cell(v) for v in r] for r in self.rows],
            "status": self.status,
        }


def result_table(rs: ResultSet, title: str | None = None) -> Table:
    t = Table(title=escape(title) if title else None)
    for c in rs.columns:
        t.add_column(escape(c))
    for r in rs.rows:
        t.add_row(*(escape(cell_text(v)) for v in r))
    return t


def pg_error_line(e: psycopg.Error, password: str | None) -> str:
    """A PostgreSQL or connection error as one line (SQLSTATE and primary message), with the
    password blotted out should the server or libpq ever echo it."""
    diag = e.diag
    if diag.message_primary:
        line = f"{diag.severity or 'ERROR'} {diag.sqlstate or ''}: {diag.message_primary}".replace(" :", ":")
    else:
        text = str(e).strip()
        line = " ".join(text.split()) if text else type(e).__name__
    if password:
        line = line.replace(password, "********")
    return line


@dataclass(frozen=True, slots=True)
class QueryTarget:
    """Where and as whom ``query`` connects (the password is kept out of the conninfo)."""

    conninfo: str
    password: str | None


def query_target(cfg: NodeConfig | None, m: Member, dbname: str, username: str | None) -> QueryTarget:
    """libpq settings for ``m``: its published host and port, the node file's superuser (its
    password only for that user; another user's comes from libpq: PGPASSWORD, ~/.pgpass) and,
    when the node file sends a password, the same server checks as the agents' own connections
    to other members (SCRAM required; verify-full against postgresql.tls.cafile with TLS)."""
    superuser = cfg.postgresql.superuser.username if cfg is not None else None
    user = username or superuser or "postgres"
    password = None
    checks: dict[str, str] = {}
    if cfg is not None and user == superuser:
        password = secret_value(cfg.postgresql.superuser.password)
        checks = client_auth_options(cfg.postgresql.tls)
    conninfo = build_conninfo(
        host=m.host,
        port=m.port,
        user=user,
        dbname=dbname,
        application_name="hakeeper-query",
        connect_timeout=CONNECT_TIMEOUT_S,
        client_encoding="UTF8",
        **checks,
    )
    return QueryTarget(conninfo, password)


def run_sql(target: QueryTarget, sql: str) -> list[ResultSet]:
    """Run ``sql`` (one or more statements, autocommit) and return every result."""
    kw: dict[str, Any] = {"autocommit": True}
    if target.password is not None:
        kw["password"] = target.password
    results = []
    # A ClientCursor sends the text as one simple query: several statements are allowed, as psql
    # allows them, and each one's result comes back.
    with psycopg.connect(target.conninfo, cursor_factory=psycopg.ClientCursor, **kw) as conn:
        cur = conn.cursor()
        cur.execute(sql)
        while True:
            cols = tuple(d.name for d in cur.description) if cur.description else ()
            rows = tuple(tuple(r) for r in cur.fetchall()) if cur.description else ()
            results.append(ResultSet(cols, rows, cur.statusmessage or ""))
            if not cur.nextset():
                break
    return results


def _read_sql_file(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(f"--file {path}: cannot read it: {e}", 2) from None


def _view_for(
    cfg: NodeConfig | None, etcd: list[str] | None, scope: str | None, namespace: str
) -> ClusterView:
    quiet_logging()
    if cfg is not None:
        client, prefix = etcd_client_for(cfg), cfg.prefix
    elif etcd and scope:
        client, prefix = etcd_client_for_urls(etcd), "/" + namespace.strip("/") + "/" + scope
    else:
        raise fail("give -c NODE.yml, or both --etcd URL and --scope NAME", 2)
    try:
        return asyncio.run(_fetch(client, prefix))
    except EtcdError as e:
        raise fail(f"cannot read the cluster from etcd: {e}") from None


async def _fetch(client: EtcdClient, prefix: str) -> ClusterView:
    try:
        return await ClusterStore(client, Keys(prefix)).read_view()
    finally:
        await client.close()


@app.command("query")
def query(
    args: Annotated[list[str] | None, typer.Argument(metavar="[MEMBER] SQL", show_default=False)] = None,
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: Annotated[str | None, typer.Option("--scope", help="Cluster name; with --etcd.")] = None,
    namespace: NamespaceOpt = "/hakeeper",
    role: Annotated[
        str | None,
        typer.Option("-r", "--role", help="primary, replica or any (default: primary if there is one)."),
    ] = None,
    file: Annotated[
        str | None, typer.Option("-f", "--file", help="Read the SQL from FILE ('-': standard input).")
    ] = None,
    dbname: Annotated[str, typer.Option("-d", "--dbname", help="Database.")] = "postgres",
    username: Annotated[
        str | None,
        typer.Option(
            "-U",
            "--username",
            help="Database user (default: the superuser of -c; another user's password comes from "
            "PGPASSWORD or ~/.pgpass).",
        ),
    ] = None,
    output: OutputOpt = "table",
) -> None:
    """Run SQL on a member, or on the primary or a replica, and print the rows.

    Autocommit, nothing restricted (as psql).  A PostgreSQL error is printed as one line,
    exit 1."""
    check_output(output)
    if role is not None and role not in ROLES:
        raise fail(f"--role must be primary, replica or any, not {role!r}", 2)
    try:
        member_name, sql = split_query_args(list(args or []), file is not None)
    except UsageProblem as e:
        raise fail(str(e), 2) from None
    if file is not None:
        sql = _read_sql_file(file)
    if sql is None or not sql.strip():
        raise fail("no SQL to run", 2)
    cfg = load_or_exit(config) if config is not None else None
    view = _view_for(cfg, etcd, scope, namespace)
    try:
        m = choose_member(view, member_name, role)
    except LookupError as e:
        raise fail(str(e)) from None
    if not m.host or not m.port:
        raise fail(f"{m.name} has not published a PostgreSQL address (is its agent running?)")
    target = query_target(cfg, m, dbname, username)
    try:
        results = run_sql(target, sql)
    except psycopg.Error as e:
        why = pg_error_line(e, target.password)
        raise fail(f"query on {m.name} ({m.conn_address}) failed: {why}") from None
    if output != "table":
        emit_data(output, {"member": m.name, "role": m.role.value, "results": [r.to_dict() for r in results]})
        return
    for rs in results:
        if rs.columns:
            out.print(result_table(rs))
        else:
            out.print(rs.status, markup=False)
    err.print(f"({m.name}, {m.role.value}, {m.conn_address})", markup=False)


# ============================================================================== version


def local_server_version(cfg: NodeConfig) -> tuple[str | None, str]:
    """This node's PostgreSQL version: from the running server (``server_version``) when it
    answers, else from its binaries (``postgres --version``); and where it came from."""
    host, port = cfg.postgresql.connect_host_port
    kw = conn_kwargs(cfg.postgresql, host, port, statement_timeout_ms=5000, connect_timeout=CONNECT_TIMEOUT_S)
    password = kw.get("password")
    try:
        with psycopg.connect(**kw) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        if row is not None:
            return str(row[0]), f"running server at {host}:{port}"
    except psycopg.Error as e:
        why = pg_error_line(e, password if isinstance(password, str) else None)
    else:
        why = "no answer"
    try:
        postgres = node_bin_dir(cfg.postgresql) / "postgres"
        res = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return None, f"server not reachable ({why}); binaries not found: {e}"
    if res.returncode != 0:
        return None, f"server not reachable ({why}); {postgres} --version failed"
    return res.stdout.strip().rsplit(" ", 1)[-1], f"binaries ({postgres}); server not reachable: {why}"


def versions_document(cfg: NodeConfig | None, view: ClusterView | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "hakeeper": __version__,
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
    }
    if cfg is not None:
        version, source = local_server_version(cfg)
        doc["postgresql"] = {"member": cfg.name, "version": version, "source": source}
    if view is not None:
        members = sorted(view.members.values(), key=lambda m: m.name)
        doc["agents"] = {m.name: m.version or None for m in members}
    return doc


def libpq_text(v: int) -> str:
    return f"{v // 10000}.{v % 10000}" if v else "unknown"


@app.command("version")
def version(config: ConfigOpt = None, output: OutputOpt = "table") -> None:
    """The versions of hakeeper and Python; with -c also this node's PostgreSQL server and the
    agents of the cluster's members (as they publish it in etcd)."""
    check_output(output)
    cfg = load_or_exit(config) if config is not None else None
    view: ClusterView | None = None
    etcd_error = None
    if cfg is not None:
        quiet_logging()
        try:
            view = asyncio.run(_fetch(etcd_client_for(cfg), cfg.prefix))
        except EtcdError as e:
            etcd_error = str(e)
    doc = versions_document(cfg, view)
    if etcd_error is not None:
        doc["agents_error"] = f"cannot read the cluster from etcd: {etcd_error}"
    if output != "table":
        emit_data(output, doc)
        return
    lines = [
        f"hakeeper {doc['hakeeper']}",
        f"Python {doc['python']}, psycopg {doc['psycopg']}, libpq {libpq_text(doc['libpq'])}",
    ]
    if "postgresql" in doc:
        pg = doc["postgresql"]
        lines.append(f"PostgreSQL {pg['version'] or 'unknown'} ({pg['member']}: {pg['source']})")
    for name, v in doc.get("agents", {}).items():
        lines.append(f"agent {name}: hakeeper {v or 'unknown (not published)'}")
    if etcd_error is not None:
        lines.append(doc["agents_error"])
    out.print("\n".join(lines), markup=False)
