"""Cluster operations from the command line.

Reads (who leads, which members exist, the current configuration) come straight from etcd;
every change goes through a member's HTTP API (the leader's ``api_url`` from its member key; for
a failover without a leader, the candidate's), authenticated with the ``api:`` credentials of the
node YAML, ``--token``/``--user``/``--password`` or ``HAKEEPER_API_TOKEN``.  An ``api_url`` from
etcd is used only when it matches what the node file (or ``--api-url``) says, or is https://
verified against the pinned CA (:mod:`hakeeper.cli.api_trust`).

Exit codes: 0 done, 1 the operation failed or was refused (the API's ``error`` is printed),
2 usage or configuration error.  User errors never print a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import difflib
import json
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from hakeeper.cli.api_trust import ApiTrust
from hakeeper.cli.app import app, err, fail, load_or_exit, out
from hakeeper.cli.cluster_cmds import (
    ConfigOpt,
    EtcdOpt,
    NamespaceOpt,
    OutputOpt,
    ScopeOpt,
    check_output,
    emit_data,
    etcd_client_for,
    etcd_client_for_urls,
    fetch_view,
    quiet_logging,
)
from hakeeper.cli.pause_wait import wait_for_pause_state
from hakeeper.core.cluster import ClusterView, Member, MemberRole, MemberState
from hakeeper.core.config import (
    ApiClientConfig,
    ConfigError,
    NodeConfig,
    format_validation_error,
    parse_dynamic_config,
    parse_user_time,
)
from hakeeper.dcs.etcd import EtcdClient, EtcdError
from hakeeper.ha.policy.switchover import switchover_live

TOKEN_ENV = "HAKEEPER_API_TOKEN"

TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help=f"API bearer token (default: ${TOKEN_ENV}, then api.token of -c)."),
]
UserOpt = Annotated[str | None, typer.Option("--user", help="API basic-auth user (default: api.username).")]
PasswordOpt = Annotated[
    str | None, typer.Option("--password", help="API basic-auth password (default: api.password).")
]
ApiUrlOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--api-url",
        help="A member API URL to trust besides those of the node file (repeatable); the CLI sends "
        "requests and credentials only to trusted URLs.",
    ),
]
API_CLIENT_ENV = "HAKEEPER_API__CLIENT__"  # with --etcd: CAFILE, CERTFILE, KEYFILE
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Do not ask for confirmation.")]
# Not --force, which only skips the prompt (and scripts pass it routinely): losing a logical
# consumer's position takes its own flag (docs/slots.md).
UnsyncedSlotsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unsynced-slots",
        help="Hand over even to a candidate without a synced copy of every failover slot: the "
        "logical consumers of the slots it lacks lose their position.",
    ),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the API's answer.", min=0.5, max=3600)
]
ScheduledOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduled",
        help="When: ISO 8601 time (without a zone: local time) or 'now' (default).",
    ),
]

CONNECT_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------- pure helpers


class UsageError(ValueError):
    """A malformed argument (exit 2)."""


def parse_set(arg: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> (``['a','b','c']``, value parsed as a YAML scalar).

    ``null`` (or ``~``) deletes the key, an empty value is the empty string."""
    key, sep, raw = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set wants key.path=value, not {arg!r}")
    path = key.split(".")
    if any(not p for p in path):
        raise UsageError(f"--set: empty segment in key path {key!r}")
    if raw == "":
        return path, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict | list) and not raw.lstrip().startswith(("{", "[")):
        value = raw  # 'a: b' is text, not a mapping
    return path, value


def parse_pg(arg: str) -> tuple[list[str], Any]:
    """``'work_mem=8MB'`` -> (``['postgresql','parameters','work_mem']``, ``'8MB'``).

    Integers and decimals become numbers, ``null`` deletes the parameter, anything else stays
    text (so ``on``/``off`` reach PostgreSQL as written)."""
    name, sep, raw = arg.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--pg wants name=value, not {arg!r}")
    if "." in name and not name.count(".") == 1:
        raise UsageError(f"--pg: invalid parameter name {name!r}")
    value: Any = raw
    stripped = raw.strip()
    if stripped in ("null", "~"):
        value = None
    else:
        for conv in (int, float):
            try:
                value = conv(stripped)
                break
            except ValueError:
                continue
    return ["postgresql", "parameters", name], value


def set_path(doc: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``doc[p0][p1]...= value`` creating mappings on the way; ``None`` deletes the key."""
    node = doc
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if value is None:
                return
            if child is not None:
                raise UsageError(f"{'.'.join(path[: i + 1])} is not a mapping")
            child = {}
            node[part] = child
        node = child
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def make_merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (``null`` for removed keys)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {}
    for k in old:
        if k not in new:
            patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = copy.deepcopy(v)
        elif old[k] != v:
            if isinstance(old[k], dict) and isinstance(v, dict):
                patch[k] = make_merge_patch(old[k], v)
            else:
                patch[k] = copy.deepcopy(v)
    return patch


def dump_yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Unified diff of two configs rendered as YAML with sorted keys ("" when equal)."""
    a = dump_yaml(old).splitlines(keepends=True)
    b = dump_yaml(new).splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, fromfile="current", tofile="new"))


def parse_when(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``--scheduled`` -> an aware datetime, or None for now.  A time without a zone is local."""
    if text is None or text.strip().lower() in ("", "now"):
        return None
    try:
        when = parse_user_time(text, example="2030-01-31T14:00+01:00")
    except ValueError as e:
        raise UsageError(f"--scheduled: {e}") from None
    now = now or dt.datetime.now(dt.UTC)
    if when < now - dt.timedelta(seconds=1):
        raise UsageError(f"--scheduled: {when.isoformat()} is in the past")
    return when


def _quote_conninfo(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(params: dict[str, str]) -> str:
    """A libpq key/value connection string."""
    return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in params.items())


# --------------------------------------------------------------------------------- context


@dataclass(frozen=True, slots=True)
class ApiAuth:
    token: str | None = None
    username: str | None = None
    password: str | None = None

    def headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
        return {}

    @property
    def given(self) -> bool:
        return bool(self.headers())


@dataclass(frozen=True, slots=True)
class Context:
    cfg: NodeConfig | None
    etcd_hosts: tuple[str, ...]
    prefix: str
    auth: ApiAuth
    trust: ApiTrust = field(default_factory=ApiTrust)
    tls: ssl.SSLContext | None = None  # None: the system's CAs, no client certificate

    def client(self) -> EtcdClient:
        if self.cfg is not None:
            return etcd_client_for(self.cfg)
        return etcd_client_for_urls(list(self.etcd_hosts))


def resolve_auth(
    cfg: NodeConfig | None, token: str | None, user: str | None, password: str | None
) -> ApiAuth:
    """Command-line options first, then $HAKEEPER_API_TOKEN, then the node YAML's ``api:``."""
    if token:
        return ApiAuth(token=token)
    if user is not None or password is not None:
        if user is None or password is None:
            raise fail("give --user and --password together", 2)
        return ApiAuth(username=user, password=password)
    env = os.environ.get(TOKEN_ENV)
    if env:
        return ApiAuth(token=env)
    if cfg is not None:
        a = cfg.api
        if a.token is not None:
            return ApiAuth(token=a.token.get_secret_value())
        if a.username is not None and a.password is not None:
            return ApiAuth(username=a.username, password=a.password.get_secret_value())
    return ApiAuth()


def api_client_settings(cfg: NodeConfig | None) -> ApiClientConfig:
    """``api.client`` of the node file; with ``--etcd``, the same from ``HAKEEPER_API__CLIENT__*``."""
    if cfg is not None:
        return cfg.api.client
    raw = {
        k: os.environ[API_CLIENT_ENV + k.upper()]
        for k in ("cafile", "certfile", "keyfile")
        if os.environ.get(API_CLIENT_ENV + k.upper())
    }
    try:
        return ApiClientConfig.model_validate(raw)
    except ValidationError as e:
        for field, msg in format_validation_error(e):
            err.print(f"{API_CLIENT_ENV}{field.upper()}: {msg}", markup=False)
        raise typer.Exit(2) from None


def api_tls_context(client: ApiClientConfig) -> ssl.SSLContext | None:
    """The TLS context for members' APIs: the pinned CA and the client certificate, if any."""
    if client.cafile is None and client.certfile is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(client.cafile) if client.cafile else None)
        if client.certfile is not None:
            ctx.load_cert_chain(str(client.certfile), str(client.keyfile) if client.keyfile else None)
    except (OSError, ssl.SSLError) as e:
        raise fail(f"api.client: cannot load the CA or client certificate: {e}", 2) from None
    return ctx


def api_trust(cfg: NodeConfig | None, config: Path | None, api_urls: list[str] | None) -> ApiTrust:
    client = api_client_settings(cfg)
    return ApiTrust.make(
        own_name=cfg.name if cfg else None,
        own_url=cfg.api.url if cfg else None,
        urls=[*client.urls, *(api_urls or [])],
        ca_pinned=client.cafile is not None,
        source=str(config) if config is not None else None,
    )


def make_context(
    config: Path | None,
    etcd: list[str] | None,
    scope: str | None,
    namespace: str,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    api_urls: list[str] | None = None,
) -> Context:
    quiet_logging()
    cfg = None
    if config is not None:
        cfg = load_or_exit(config)
        prefix = cfg.prefix
        hosts: tuple[str, ...] = tuple(cfg.etcd.hosts)
    else:
        if not etcd or not scope:
            raise fail("give -c NODE.yml, or both --etcd URL and --scope NAME", 2)
        hosts = tuple(h if "://" in h else "http://" + h for h in etcd)
        prefix = "/" + namespace.strip("/") + "/" + scope
    auth = resolve_auth(cfg, token, user, password)
    trust = api_trust(cfg, config, api_urls)
    return Context(cfg, hosts, prefix, auth, trust, api_tls_context(api_client_settings(cfg)))


def read_view(ctx: Context) -> ClusterView:
    try:
        return asyncio.run(fetch_view(ctx.client(), ctx.prefix))
    except EtcdError as e:
        raise fail(f"cannot read the cluster from etcd: {e}") from None


def member_or_exit(view: ClusterView, name: str, what: str = "member") -> Member:
    m = view.members.get(name)
    if m is None:
        known = ", ".join(sorted(view.members)) or "none registered"
        raise fail(f"{what} {name!r} is not a member of the cluster (members: {known})")
    return m


def confirm(question: str, force: bool) -> None:
    """Ask ``question`` [y/N] unless ``force``; refuse without a terminal to ask on."""
    if force:
        return
    if not sys.stdin.isatty():
        raise fail("not confirmed: standard input is not a terminal; add --force to proceed without asking")
    try:
        ok = typer.confirm(question, default=False)
    except (typer.Abort, EOFError):
        ok = False
    if not ok:
        raise fail("aborted; nothing was changed")


# --------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    status: int
    data: Any
    url: str


class Unreachable(Exception):
    pass


async def _http(
    method: str,
    url: str,
    auth: ApiAuth,
    body: Any,
    extra_headers: dict[str, str] | None,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> ApiAnswer:
    headers = {**auth.headers(), **(extra_headers or {})}
    if method not in ("GET", "HEAD"):
        # The agents take mutating requests only as JSON, even without a body (no CSRF).
        headers.setdefault("Content-Type", "application/json")
    to = aiohttp.ClientTimeout(total=timeout, sock_connect=min(CONNECT_TIMEOUT_S, timeout))
    try:
        async with (
            aiohttp.ClientSession(timeout=to) as session,
            session.request(method, url, json=body, headers=headers, ssl=tls or True) as resp,
        ):
            text = await resp.text(errors="replace")
            status = resp.status
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g} s") from None
    except aiohttp.ClientError as e:
        raise Unreachable(str(e) or type(e).__name__) from None
    try:
        data: Any = json.loads(text) if text.strip() else {}
    except ValueError:
        data = {"error": text.strip()[:300]}
    return ApiAnswer(status, data, url)


def call_api(
    member: Member,
    method: str,
    path: str,
    ctx: Context,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> ApiAnswer:
    """One request to ``member``'s API; exit 1 with a one-line message when it cannot be reached
    or its address is not trusted."""
    try:
        return send_api(member, method, path, ctx, body=body, headers=headers, timeout=timeout)
    except NotSent as e:
        raise fail(str(e)) from None


class NotSent(Exception):
    """A request that could not be sent or answered: the reason, one line."""


def send_api(
    member: Member,
    method: str,
    path: str,
    ctx: Context,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> ApiAnswer:
    """One request to ``member``'s API (:class:`NotSent` when it has no address, its address is
    not trusted, or it cannot be reached)."""
    if not member.api_url:
        raise NotSent(f"{member.name} has not published an API address (is its agent running?)")
    refused = ctx.trust.refusal(member.name, member.api_url)
    if refused is not None:
        raise NotSent(refused)
    url = member.api_url.rstrip("/") + path
    try:
        return asyncio.run(_http(method, url, ctx.auth, body, headers, timeout, ctx.tls))
    except Unreachable as e:
        raise NotSent(f"cannot reach the API of {member.name} at {member.api_url}: {e}") from None


def answer_error(ans: ApiAnswer) -> str:
    d = ans.data
    if isinstance(d, dict):
        for key in ("error", "message"):
            if isinstance(d.get(key), str) and d[key]:
                return str(d[key])
    return f"HTTP {ans.status}"


def check_answer(ans: ApiAnswer, what: str, auth: ApiAuth) -> dict[str, Any]:
    """The answer's JSON object on 2xx; otherwise exit 1 with the API's reason."""
    if 200 <= ans.status < 300:
        return ans.data if isinstance(ans.data, dict) else {"result": ans.data}
    reason = answer_error(ans)
    if ans.status == 401:
        hint = (
            "the credentials were rejected"
            if auth.given
            else f"no credentials given: use -c NODE.yml with api.token, --token, ${TOKEN_ENV} "
            "or --user/--password"
        )
        raise fail(f"{what}: not authenticated ({hint}): {reason}")
    if ans.status == 403:
        raise fail(f"{what}: not allowed: {reason}")
    if ans.status in (404, 405) and (
        "Not Found" in reason or "Not Allowed" in reason or reason.startswith("HTTP")
    ):
        raise fail(f"{what}: {ans.url} does not offer this operation (HTTP {ans.status}; agent too old?)")
    raise fail(f"{what} failed (HTTP {ans.status}): {reason}")


def leader_or_exit(view: ClusterView, what: str) -> Member:
    if view.leader is None:
        raise fail(f"{what}: the cluster has no leader")
    m = view.members.get(view.leader.name)
    if m is None:
        raise fail(f"{what}: the leader {view.leader.name} has no member key (its agent is not reporting)")
    return m


def api_targets(view: ClusterView) -> list[Member]:
    """Members to send a cluster-wide request to: the leader first, then the others."""
    lead = view.leader.name if view.leader else None
    ms = [m for m in view.members.values() if m.api_url]
    return sorted(ms, key=lambda m: (m.name != lead, m.name))


def call_any(view: ClusterView, method: str, path: str, ctx: Context, *, what: str, **kw: Any) -> ApiAnswer:
    """Send a cluster-wide request to the leader's API, else to the first trusted member that
    answers.  Members whose address is not trusted are skipped (and named if none answers)."""
    targets = api_targets(view)
    if not targets:
        raise fail(f"{what}: no member has published an API address (are the agents running?)")
    errors = []
    for m in targets:
        refused = ctx.trust.refusal(m.name, m.api_url)
        if refused is not None:
            errors.append(refused)
            continue
        url = m.api_url.rstrip("/") + path
        try:
            return asyncio.run(
                _http(
                    method, url, ctx.auth, kw.get("body"), kw.get("headers"), kw.get("timeout", 30), ctx.tls
                )
            )
        except Unreachable as e:
            errors.append(f"{m.name} ({m.api_url}): {e}")
    raise fail(f"{what}: no member's API could be used: " + "; ".join(errors))


def _print_result(output: str, data: dict[str, Any], text: str) -> None:
    if output == "table":
        out.print(text, markup=False)
    else:
        emit_data(output, data)


def _describe(m: Member) -> str:
    bits = [m.role.value, m.state.value]
    if m.lag is not None and m.role == MemberRole.REPLICA:
        bits.append(f"lag {m.lag} bytes")
    if not m.eligible and m.ineligible_reason and m.role != MemberRole.PRIMARY:
        bits.append(f"not eligible: {m.ineligible_reason}")
    return f"{m.name} ({', '.join(bits)})"


# --------------------------------------------------------------------------------- commands


@app.command("switchover")
def switchover(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    leader: Annotated[
        str | None, typer.Option("--leader", help="The current leader (checked; default: whoever it is).")
    ] = None,
    candidate: Annotated[
        str | None, typer.Option("--candidate", help="Who takes over (default: the best eligible replica).")
    ] = None,
    scheduled: ScheduledOpt = None,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="Cancel a pending (e.g. scheduled) switchover or failover.")
    ] = False,
    force: ForceOpt = False,
    allow_unsynced_slots: UnsyncedSlotsOpt = False,
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Planned handover: the healthy leader stops writes and hands over to a caught-up replica."""
    check_output(output)
    if cancel:
        if leader or candidate or scheduled:
            raise fail("--cancel takes no --leader, --candidate or --scheduled", 2)
        ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
        view = read_view(ctx)
        if view.switchover is None:
            raise fail("no switchover or failover is pending")
        ans = call_any(view, "DELETE", "/switchover", ctx, what="cancel", timeout=timeout)
        data = check_answer(ans, "cancel", ctx.auth)
        _print_result(output, data, str(data.get("message") or "cancelled"))
        return
    try:
        when = parse_when(scheduled)
    except UsageError as e:
        raise fail(str(e), 2) from None
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    view = read_view(ctx)
    cur = leader_or_exit(view, "switchover is not possible")
    if leader is not None and leader != cur.name:
        raise fail(f"switchover is not possible: the leader is {cur.name}, not {leader}")
    cand = None
    if candidate is not None:
        if candidate == cur.name:
            raise fail(f"candidate {candidate} is already the leader")
        cand = member_or_exit(view, candidate, "candidate")
    sw = view.switchover
    if sw is not None and switchover_live(sw, view, time.time()):
        raise fail(
            f"a {sw.kind.value} to {sw.candidate or 'the best replica'} is already pending "
            "(cancel it with `hakeeper switchover --cancel`, or wait)"
        )
    target = _describe(cand) if cand else "the best eligible replica"
    at = "now" if when is None else f"at {when.isoformat()}"
    if output == "table":
        out.print(f"switchover: leader {cur.name} -> {target}, {at}", markup=False)
    confirm(f"Switch over from {cur.name} to {candidate or 'the best replica'} {at}?", force)
    body: dict[str, Any] = {"leader": cur.name}
    if candidate is not None:
        body["candidate"] = candidate
    if when is not None:
        body["scheduled_at"] = when.isoformat()
    if allow_unsynced_slots:
        body["allow_unsynced_slots"] = True
    ans = call_api(cur, "POST", "/switchover", ctx, body=body, timeout=timeout)
    data = check_answer(ans, "switchover", ctx.auth)
    msg = data.get("message") or (
        f"switchover scheduled for {when.isoformat()}" if ans.status == 202 and when else "switchover done"
    )
    _print_result(output, {"status": ans.status, **data}, str(msg))


@app.command("failover")
def failover(
    candidate: Annotated[str, typer.Option("--candidate", help="The member to promote (required).")],
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    force: ForceOpt = False,
    allow_data_loss: Annotated[
        bool,
        typer.Option(
            "--allow-data-loss",
            help="Promote even a candidate that is not eligible (lagging, wrong timeline, "
            "nofailover): acknowledged writes it has not received are LOST.  Recorded in history.",
        ),
    ] = False,
    allow_unsynced_slots: UnsyncedSlotsOpt = False,
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Promote CANDIDATE, also when the cluster has no (healthy) leader.

    An ineligible candidate is refused by the agents unless --allow-data-loss, which accepts the
    loss of writes the candidate has not received (recorded in history).  --force only skips the
    confirmation."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    view = read_view(ctx)
    cand = member_or_exit(view, candidate, "candidate")
    if view.leader is not None and view.leader.name == candidate:
        raise fail(f"candidate {candidate} is already the leader")
    lead = view.leader.name if view.leader else None
    if output == "table":
        out.print(f"failover: promote {_describe(cand)}; current leader: {lead or 'none'}", markup=False)
        if not cand.eligible and cand.ineligible_reason:
            err.print(
                f"warning: {candidate} is not eligible ({cand.ineligible_reason})"
                + (
                    "; --allow-data-loss: writes it has not received will be lost"
                    if allow_data_loss
                    else "; the agents will refuse without --allow-data-loss"
                ),
                markup=False,
            )
    loss = " and accept the loss of writes it has not received" if allow_data_loss else ""
    confirm(
        f"Promote {candidate}{loss}{' (the current leader ' + lead + ' is demoted)' if lead else ''}?", force
    )
    body = failover_body(candidate, allow_data_loss)
    if allow_unsynced_slots:
        body["allow_unsynced_slots"] = True
    targets: list[Member] = []
    lead_m = view.leader_member
    if lead_m is not None and lead_m.api_url:
        targets.append(lead_m)
    targets.append(cand)
    ans: ApiAnswer | None = None
    errors = []
    for m in targets:
        url = m.api_url.rstrip("/") + "/failover"
        if not m.api_url:
            errors.append(f"{m.name}: no API address")
            continue
        refused = ctx.trust.refusal(m.name, m.api_url)
        if refused is not None:
            errors.append(refused)
            continue
        try:
            ans = asyncio.run(_http("POST", url, ctx.auth, body, None, timeout, ctx.tls))
            break
        except Unreachable as e:
            errors.append(f"{m.name} ({m.api_url}): {e}")
    if ans is None:
        raise fail("failover: cannot use the API of " + "; ".join(errors))
    if ans.status == 412 and not allow_data_loss and isinstance(ans.data, dict) and ans.data.get("reason"):
        raise fail(f"failover failed (HTTP 412): {answer_error(ans)}; add --allow-data-loss to accept that")
    data = check_answer(ans, "failover", ctx.auth)
    _print_result(output, {"status": ans.status, **data}, str(data.get("message") or "failover done"))


def _set_pause(ctx: Context, paused: bool, output: str, wait: float | None = None) -> None:
    view = read_view(ctx)
    if view.config_revision == 0:
        raise fail("the cluster has no dynamic configuration in etcd yet (not initialized)")
    if view.paused == paused:
        text, changed = f"the cluster is already {'paused' if paused else 'not paused'}", False
    else:
        ans = call_any(
            view, "PATCH", "/config", ctx, body={"pause": paused}, what="pause" if paused else "resume"
        )
        check_answer(ans, "pause" if paused else "resume", ctx.auth)
        changed = True
        text = (
            "cluster paused: maintenance mode, no automatic failover"
            if paused
            else "cluster resumed: automatic failover is on again"
        )
    doc: dict[str, Any] = {"paused": paused, "changed": changed}
    if wait is not None:
        doc["acknowledged_by"] = _wait_for_members(ctx, paused, wait, text)
        text += "; every member follows: " + ", ".join(doc["acknowledged_by"])
    _print_result(output, doc, text)


def _wait_for_members(ctx: Context, paused: bool, timeout: float, done: str) -> list[str]:
    """``--wait``: the members once all report ``paused``; exit 1 naming those that do not."""
    try:
        view, laggards = asyncio.run(wait_for_pause_state(ctx.client, ctx.prefix, paused, timeout))
    except EtcdError as e:
        raise fail(f"{done}, but the members could not be read from etcd: {e}") from None
    if not view.members:
        raise fail(f"{done}, but no member is registered to follow it (are the agents running?)")
    if laggards:
        raise fail(
            f"{done}, but not every member follows after {timeout:g} s: "
            + "; ".join(f"{name}: {why}" for name, why in laggards.items())
        )
    return sorted(view.members)


WaitPauseOpt = Annotated[
    bool, typer.Option("--wait", help="Wait until every member reports the new state (exit 1 if not).")
]
WaitTimeoutOpt = Annotated[
    float, typer.Option("--wait-timeout", help="Seconds --wait waits at most.", min=1, max=3600)
]


@app.command("pause")
def pause(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    wait: WaitPauseOpt = False,
    wait_timeout: WaitTimeoutOpt = 60.0,
) -> None:
    """Maintenance mode: no automatic failover or restarts until `resume`."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    _set_pause(ctx, True, output, wait_timeout if wait else None)


@app.command("resume")
def resume(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    wait: WaitPauseOpt = False,
    wait_timeout: WaitTimeoutOpt = 60.0,
) -> None:
    """Leave maintenance mode."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    _set_pause(ctx, False, output, wait_timeout if wait else None)


def member_body(member: str, **fields: Any) -> dict[str, Any]:
    """The body of every per-member request (restart, reinitialize, reload): it names the member
    meant, and the agent refuses (421) a request that reached another one."""
    return {"member": member, **fields}


def failover_body(candidate: str, allow_data_loss: bool) -> dict[str, Any]:
    """POST /failover: ``allow_data_loss`` only when asked (the agents then accept an ineligible
    candidate); skipping the prompt (--force) is the CLI's business and is never sent."""
    return {"candidate": candidate, "allow_data_loss": allow_data_loss}


def _member_action(
    ctx: Context,
    member: str,
    path: str,
    what: str,
    question: str | None,
    force: bool,
    output: str,
    timeout: float,
    **fields: Any,
) -> dict[str, Any]:
    view = read_view(ctx)
    m = member_or_exit(view, member)
    if question is not None:
        if output == "table":
            out.print(f"{what}: {_describe(m)}", markup=False)
        confirm(question.format(name=m.name), force)
    ans = call_api(m, "POST", path, ctx, body=member_body(m.name, **fields), timeout=timeout)
    data = check_answer(ans, what, ctx.auth)
    _print_result(
        output, {"member": m.name, "status": ans.status, **data}, str(data.get("message") or f"{what}: done")
    )
    return data


MemberArg = Annotated[str, typer.Argument(help="Member name (see `hakeeper list`).")]


@app.command("reinit")
def reinit(
    member: MemberArg,
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    force: ForceOpt = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Show its progress until the replica streams again (exit 0) or it fails."
        ),
    ] = False,
    status: Annotated[
        bool,
        typer.Option(
            "--status", help="Start nothing: show the running or last reinit (with --wait: follow it)."
        ),
    ] = False,
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="Keep the old copy: fetch and write only the blocks that differ from the newest backup "
            "(one with a file index), replay the archive, stream. Without a usable backup: a clone.",
        ),
    ] = False,
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Rebuild replica MEMBER from scratch: its data directory is removed and cloned again
    (--delta: brought to the newest backup block by block instead).

    The agent runs it in the background: the command returns once it has started (--wait
    follows it to the end; --status shows how it goes)."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    if status:
        m = member_or_exit(read_view(ctx), member)
        job = _reinit_get(ctx, m, "", timeout)
        if not wait or job.get("state") != "running":
            _print_result(output, job, reinit_line(job))
            raise typer.Exit(0 if job.get("state") != "failed" else 1)
    else:
        job = _member_action(
            ctx,
            member,
            "/reinitialize",
            "reinit",
            "Bring the data directory of {name} to the newest backup (only the blocks that differ)?"
            if delta
            else "Remove the data directory of {name} and clone it again from the leader?",
            force,
            output,
            timeout,
            **({"delta": True} if delta else {}),
        )
        if not wait:
            if output == "table":
                out.print(
                    f"it runs in the background on {member}; follow it with: hakeeper reinit {member} "
                    "--status --wait (or GET /reinitialize)",
                    markup=False,
                )
            return
        m = member_or_exit(read_view(ctx), member)
    _follow_reinit(ctx, m, str(job.get("id") or ""), output, timeout)


REINIT_POLL_S = 1.0
REINIT_QUIET_S = 15.0  # print a line at least this often while nothing changes
REINIT_UNREACHABLE_S = 60.0  # give up following after the agent did not answer this long


def reinit_line(job: dict[str, Any]) -> str:
    """One line about a reinitialize, from its API document."""
    state = job.get("state")
    copied = job.get("bytes_copied")
    size = f", {format_bytes(int(copied))} copied" if isinstance(copied, int) and copied else ""
    head = f"reinit {job.get('id')} of {job.get('member')}"
    how = f" ({job.get('method')})" if job.get("delta") and job.get("method") else ""
    if state == "running":
        return f"{head} from {job.get('source')}{how}: {job.get('phase')}{size}"
    if state == "succeeded":
        return f"{head}: succeeded{how}, streaming from {job.get('source')}{size}"
    return f"{head}: failed during {job.get('phase')}: {job.get('error')}"


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _reinit_get(ctx: Context, m: Member, job_id: str, timeout: float) -> dict[str, Any]:
    path = "/reinitialize" + (f"/{job_id}" if job_id else "")
    ans = call_api(m, "GET", path, ctx, timeout=timeout)
    if ans.status == 404:
        raise fail(f"reinit: {answer_error(ans)}")
    return check_answer(ans, "reinit", ctx.auth)


def _follow_reinit(ctx: Context, m: Member, job_id: str, output: str, timeout: float) -> None:
    """Poll the job until it ends: exit 0 when it succeeded, 1 when it failed.  Ctrl-C stops
    watching, not the job."""
    refused = ctx.trust.refusal(m.name, m.api_url)
    if refused is not None:
        raise fail(refused)
    url = m.api_url.rstrip("/") + "/reinitialize" + (f"/{job_id}" if job_id else "")
    last_line, last_print, unreachable_since = "", 0.0, None
    try:
        while True:
            try:
                ans = asyncio.run(_http("GET", url, ctx.auth, None, None, min(timeout, 10.0), ctx.tls))
            except Unreachable as e:
                # the agent restarting or busy: keep asking for a while before giving up
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > REINIT_UNREACHABLE_S:
                    raise fail(
                        f"reinit: {m.name}'s API did not answer for {REINIT_UNREACHABLE_S:.0f} s: {e}"
                    ) from None
                time.sleep(REINIT_POLL_S)
                continue
            unreachable_since = None
            if ans.status == 404:
                raise fail(
                    f"reinit: {answer_error(ans)} (the agent restarted? see `hakeeper list` and its log)"
                )
            job = check_answer(ans, "reinit", ctx.auth)
            line = reinit_line(job)
            now = time.monotonic()
            if output == "table" and (line != last_line or now - last_print >= REINIT_QUIET_S):
                out.print(line, markup=False)
                last_line, last_print = line, now
            if job.get("state") != "running":
                if output != "table":
                    emit_data(output, job)
                raise typer.Exit(0 if job.get("state") == "succeeded" else 1)
            time.sleep(REINIT_POLL_S)
    except KeyboardInterrupt:
        err.print(
            f"stopped watching; the reinit goes on on {m.name} (hakeeper reinit {m.name} --status)",
            markup=False,
        )
        raise typer.Exit(130) from None


@app.command("reload")
def reload(
    member: MemberArg,
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Make MEMBER's agent re-read its YAML and reload PostgreSQL's configuration."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    _member_action(ctx, member, "/reload", "reload", None, True, output, timeout)


def _current_config(view: ClusterView) -> dict[str, Any]:
    if view.config_revision == 0:
        raise fail("the cluster has no dynamic configuration in etcd yet (not initialized)")
    if view.config_error:
        raise fail(view.config_error)
    return view.config.model_dump(mode="json")


@app.command("show-config")
def show_config(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: Annotated[
        str, typer.Option("-o", "--output", help="yaml (default), json, or table (one row per key).")
    ] = "yaml",
) -> None:
    """Print the cluster-wide (dynamic) configuration stored in etcd."""
    check_output(output)
    view = read_view(make_context(config, etcd, scope, namespace))
    current = _current_config(view)
    if output == "json":
        emit_data("json", {"config": current, "revision": view.config_revision})
    elif output == "table":
        t = Table(title=f"dynamic configuration (etcd revision {view.config_revision})")
        t.add_column("Key")
        t.add_column("Value")
        for key, value in _flatten(current):
            t.add_row(escape(key), escape(value))
        out.print(t)
    else:
        sys.stdout.write(dump_yaml(current))


def _flatten(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) for every leaf, sorted: ``postgresql.parameters.work_mem``; lists and
    empty maps as JSON, so the table says exactly what the YAML says."""
    rows: list[tuple[str, str]] = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)))
    return rows


def _edit_in_editor(current: dict[str, Any]) -> dict[str, Any]:
    if not sys.stdin.isatty() and "EDITOR" not in os.environ:
        raise fail("no --set/--pg/--apply given and no terminal for an editor", 2)
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, name = tempfile.mkstemp(prefix="hakeeper-config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# Edit the cluster configuration; save and quit to apply (a diff is shown first).\n")
            f.write(dump_yaml(current))
        try:
            rc = subprocess.call([*shlex.split(editor), name])
        except OSError as e:
            raise fail(f"cannot run the editor {editor!r}: {e}", 2) from None
        if rc != 0:
            raise fail(f"the editor {editor!r} exited with code {rc}; nothing was changed")
        text = Path(name).read_text()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise fail(f"the edited file is not valid YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise fail("the edited configuration must be a mapping")
    return doc


@app.command("edit-config")
def edit_config(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="key.path=value (YAML scalar; null deletes). Repeatable."),
    ] = None,
    pg: Annotated[
        list[str] | None,
        typer.Option("--pg", "-p", help="PostgreSQL parameter name=value (null deletes). Repeatable."),
    ] = None,
    apply: Annotated[
        str | None, typer.Option("--apply", help="YAML merge patch from FILE, or - for stdin.")
    ] = None,
    force: ForceOpt = False,
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
) -> None:
    """Change the cluster-wide configuration: show a diff, confirm, write with compare-and-swap.

    With none of --set/--pg/--apply, $EDITOR opens the configuration as YAML."""
    check_output(output)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    edits: list[tuple[list[str], Any]] = []
    try:
        edits += [parse_set(s) for s in set_ or []]
        edits += [parse_pg(p) for p in pg or []]
    except UsageError as e:
        raise fail(str(e), 2) from None
    patch_doc = _read_patch_file(apply) if apply is not None else None
    view = read_view(ctx)
    if view.config_error and view.config_revision and (edits or patch_doc):
        _repair_config(ctx, view, edits, patch_doc, force, output)
        return
    current = _current_config(view)
    revision = view.config_revision
    if not edits and apply is None:
        new = _edit_in_editor(current)
    else:
        from hakeeper.ha.requests import merge_patch

        new = copy.deepcopy(current)
        if patch_doc:
            new = merge_patch(new, patch_doc)
        try:
            for path, value in edits:
                set_path(new, path, value)
        except UsageError as e:
            raise fail(str(e), 2) from None
    try:
        validated = parse_dynamic_config(new, source="new configuration").model_dump(mode="json")
    except ConfigError as e:
        for field, msg in e.errors:
            err.print(f"new configuration: {field}: {msg}", markup=False)
        raise fail("the new configuration is invalid; nothing was changed") from None
    diff = config_diff(current, validated)
    if not diff:
        _print_result(output, {"changed": False, "revision": revision}, "no changes")
        return
    if output == "table":
        out.print(diff.rstrip("\n"), markup=False, highlight=False)
    confirm("Apply these changes?", force)
    patch = make_merge_patch(current, new)
    ans = call_any(
        view,
        "PATCH",
        "/config",
        ctx,
        body=patch,
        headers={"If-Match": str(revision)},
        what="edit-config",
    )
    if ans.status == 409:
        raise fail(
            f"the configuration was changed by someone else since revision {revision}; nothing was "
            f"written, run the command again ({answer_error(ans)})"
        )
    data = check_answer(ans, "edit-config", ctx.auth)
    new_rev = data.get("revision")
    _print_result(
        output,
        {"changed": True, "revision": new_rev, "patch": patch, "diff": diff},
        f"configuration updated (revision {new_rev})" if new_rev else "configuration updated",
    )


def _read_patch_file(apply: str) -> Any:
    """The YAML merge patch in ``apply`` (``-``: stdin); exit 2 when it cannot be one."""
    try:
        text = sys.stdin.read() if apply == "-" else Path(apply).read_text()
    except OSError as e:
        raise fail(f"cannot read {apply}: {e.strerror or e}", 2) from None
    try:
        patch_doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise fail(f"{apply}: not valid YAML: {str(e).splitlines()[0]}", 2) from None
    if patch_doc is not None and not isinstance(patch_doc, dict):
        raise fail(f"{apply}: the patch must be a YAML mapping", 2)
    return patch_doc


def _repair_config(
    ctx: Context,
    view: ClusterView,
    edits: list[tuple[list[str], Any]],
    patch_doc: Any,
    force: bool,
    output: str,
) -> None:
    """The stored config is invalid (someone wrote etcd directly): send just the edits; the agent
    applies them to the last valid config it runs on, comparing against the invalid record's
    revision, and refuses if it has none (docs/api.md, PATCH /config)."""
    patch: dict[str, Any] = dict(patch_doc or {})
    for path, value in edits:
        node = patch
        for part in path[:-1]:
            child = node.get(part)
            node = node.setdefault(part, {}) if not isinstance(child, dict) else child
        node[path[-1]] = value  # None stays: null deletes in a merge patch
    err.print(f"warning: {view.config_error}", markup=False)
    err.print("the change applies to the last valid configuration the agents run on", markup=False)
    confirm("Apply these changes?", force)
    ans = call_any(
        view,
        "PATCH",
        "/config",
        ctx,
        body=patch,
        headers={"If-Match": str(view.config_revision)},
        what="edit-config",
    )
    data = check_answer(ans, "edit-config", ctx.auth)
    new_rev = data.get("revision")
    _print_result(
        output,
        {"changed": True, "revision": new_rev, "patch": patch, "repaired": True},
        f"configuration repaired (revision {new_rev})",
    )


@app.command("dsn")
def dsn(
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    role: Annotated[str, typer.Option("--role", "-r", help="primary or replica.")] = "primary",
    member: Annotated[
        str | None, typer.Option("--member", "-m", help="This member instead of a role.")
    ] = None,
    multi_host: Annotated[
        bool,
        typer.Option(
            "--multi-host",
            help="List every member; libpq picks by role (target_session_attrs read-write / standby).",
        ),
    ] = False,
    dbname: Annotated[str, typer.Option("--dbname", "-d", help="Database name.")] = "postgres",
    db_user: Annotated[
        str | None, typer.Option("--db-user", "-U", help="Database user (default: the superuser of -c).")
    ] = None,
    output: OutputOpt = "table",
) -> None:
    """Print a libpq connection string for the primary, a replica or one member."""
    check_output(output)
    if role not in ("primary", "replica"):
        raise fail(f"--role must be primary or replica, not {role!r}", 2)
    ctx = make_context(config, etcd, scope, namespace)
    view = read_view(ctx)
    user = db_user or (ctx.cfg.postgresql.superuser.username if ctx.cfg else "postgres")
    params: dict[str, str]
    chosen: list[Member]
    if member is not None:
        chosen = [member_or_exit(view, member)]
    elif multi_host:
        chosen = sorted((m for m in view.members.values() if m.host), key=lambda m: m.name)
        if not chosen:
            raise fail("no members registered")
    elif role == "primary":
        chosen = [leader_or_exit(view, "no primary")]
    else:
        replicas = [
            m
            for m in view.members.values()
            if m.role == MemberRole.REPLICA and m.state == MemberState.STREAMING and not m.noloadbalance
        ]
        if not replicas:
            raise fail("no streaming replica")
        replicas.sort(key=lambda m: (m.lag is None, m.lag or 0, m.name))
        chosen = [replicas[0]]
    params = {
        "host": ",".join(m.host for m in chosen),
        "port": ",".join(str(m.port) for m in chosen),
        "dbname": dbname,
        "user": user,
    }
    if multi_host and member is None:
        params["target_session_attrs"] = "read-write" if role == "primary" else "standby"
    text = conninfo(params)
    if output == "table":
        sys.stdout.write(text + "\n")
    else:
        emit_data(output, {"dsn": text, "members": [m.name for m in chosen]})
