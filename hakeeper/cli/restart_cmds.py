"""``restart`` (one member, several, a role, those with a pending restart, the whole cluster in a
safe order, or at a set time) and ``flush`` (cancel scheduled restarts or a switchover).

A restart without a member restarts the whole cluster one member at a time: the replicas first
(asynchronous ones, then synchronous/quorum standbys), each back and streaming before the next,
the leader last, in place (it keeps the leader key: no switchover, no failover).  A member that
fails stops the run; the members not reached are named.

A scheduled restart (``--scheduled``) is kept by each member's agent and done at that time,
without ordering between members (each agent restarts when its time comes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer

from hakeeper.cli.app import app, err, fail, out
from hakeeper.cli.cluster_cmds import (
    ConfigOpt,
    EtcdOpt,
    NamespaceOpt,
    OutputOpt,
    ScopeOpt,
    check_output,
    emit_data,
)
from hakeeper.cli.ops_cmds import (
    ApiAnswer,
    ApiUrlOpt,
    Context,
    ForceOpt,
    NotSent,
    PasswordOpt,
    TokenOpt,
    UsageError,
    UserOpt,
    answer_error,
    call_any,
    check_answer,
    confirm,
    make_context,
    member_or_exit,
    parse_when,
    read_view,
    send_api,
)
from hakeeper.core.cluster import ClusterView, Member, MemberRole, MemberState
from hakeeper.core.timefmt import iso

# --------------------------------------------------------------------------------- the plan (pure)


class RoleFilter(StrEnum):
    REPLICA = "replica"
    PRIMARY = "primary"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class RestartPlan:
    """Who is restarted, in order, and who was left out and why."""

    order: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (member, why)
    leader: str | None  # the leader, if it is in ``order`` (always last)


def _is_leader(view: ClusterView, m: Member) -> bool:
    return view.leader is not None and view.leader.name == m.name


def plan_restart(
    view: ClusterView,
    names: list[str] | None = None,
    *,
    role: RoleFilter = RoleFilter.ANY,
    pending: bool = False,
) -> RestartPlan:
    """The members to restart (``names``, or every member) that match ``role`` and, with
    ``pending``, have a restart pending; in a safe order: replicas first -- asynchronous ones
    before synchronous/quorum standbys, so the standbys commits wait on stay up longest --, the
    leader last.  Names that are not members are the caller's to refuse first."""
    chosen = [view.members[n] for n in dict.fromkeys(names)] if names else list(view.members.values())
    keep: list[Member] = []
    skipped: list[tuple[str, str]] = []
    for m in chosen:
        lead = _is_leader(view, m)
        if role == RoleFilter.PRIMARY and not lead:
            skipped.append((m.name, "not the leader (--role primary)"))
        elif role == RoleFilter.REPLICA and (lead or m.role == MemberRole.PRIMARY):
            skipped.append((m.name, "not a replica (--role replica)"))
        elif pending and not m.pending_restart:
            skipped.append((m.name, "no restart pending (--pending)"))
        else:
            keep.append(m)
    sync = view.sync
    in_sync = (
        set(sync.members) if sync is not None and view.leader and sync.leader == view.leader.name else set()
    )

    def rank(m: Member) -> tuple[int, str]:
        if _is_leader(view, m) or m.role == MemberRole.PRIMARY:
            return (2, m.name)
        return (1 if m.name in in_sync else 0, m.name)

    order = tuple(m.name for m in sorted(keep, key=rank))
    leader = view.leader.name if view.leader is not None and view.leader.name in order else None
    return RestartPlan(order, tuple(skipped), leader)


def back_after_restart(view: ClusterView, name: str, since: float, was_leader: bool) -> str | None:
    """None once ``name`` is back after a restart that ended at wall time ``since``: a record
    published after it, streaming (a replica) or running and still leading (the leader).
    Otherwise what it still waits for."""
    m = view.members.get(name)
    if m is None:
        return "no member record"
    if m.updated_at < since:
        return "no record published since the restart"
    if was_leader:
        if not _is_leader(view, m):
            return "not the leader any more"
        return None if m.state == MemberState.RUNNING else f"state {m.state.value}"
    if view.leader is None:
        return "no leader to stream from"
    return None if m.state == MemberState.STREAMING else f"state {m.state.value}"


# --------------------------------------------------------------------------------- requests


class StepFailed(Exception):
    pass


def _request(
    ctx: Context, m: Member, method: str, path: str, body: dict[str, Any], timeout: float
) -> ApiAnswer:
    """One request to ``m``'s API; :class:`StepFailed` with the reason when it cannot be sent."""
    try:
        return send_api(m, method, path, ctx, body=body, timeout=timeout)
    except NotSent as e:
        raise StepFailed(str(e)) from None


def _restart_one(ctx: Context, m: Member, body: dict[str, Any], timeout: float) -> ApiAnswer:
    ans = _request(ctx, m, "POST", "/restart", {**body, "member": m.name}, timeout)
    if not 200 <= ans.status < 300:
        raise StepFailed(f"HTTP {ans.status}: {answer_error(ans)}")
    return ans


def _wait_back(ctx: Context, name: str, since: float, was_leader: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    why: str | None = "not read yet"
    while time.monotonic() < deadline:
        why = back_after_restart(read_view(ctx), name, since, was_leader)
        if why is None:
            return
        time.sleep(1.0)
    raise StepFailed(f"not back within {timeout:g} s ({why})")


# --------------------------------------------------------------------------------- commands

MembersArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[MEMBER]...", help="Members to restart (default: the whole cluster, leader last)."
    ),
]
RoleOpt = Annotated[
    RoleFilter, typer.Option("--role", help="Only members of this role (the leader is the primary).")
]
PendingOpt = Annotated[
    bool, typer.Option("--pending", help="Only members with a pending restart ('*' in `hakeeper list`).")
]
RestartScheduledOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduled",
        help="Have each member's agent restart at this ISO 8601 time (without a zone: local time); "
        "not ordered between members.  `hakeeper flush restart` cancels.",
    ),
]


@app.command("restart")
def restart(
    members: MembersArg = None,
    role: RoleOpt = RoleFilter.ANY,
    pending: PendingOpt = False,
    scheduled: RestartScheduledOpt = None,
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    force: ForceOpt = False,
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", help="Seconds to wait for each member's restart and return.", min=0.5, max=3600
        ),
    ] = 120.0,
) -> None:
    """Restart PostgreSQL on MEMBERs in place (a leader keeps its role); no MEMBER: the whole
    cluster, replicas one at a time (each back and streaming before the next), the leader last.

    Exit 1 when a member fails: the run stops there and the members not restarted are named."""
    check_output(output)
    try:
        when = parse_when(scheduled)
    except UsageError as e:
        raise fail(str(e), 2) from None
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    view = read_view(ctx)
    for n in members or ():
        member_or_exit(view, n)
    plan = plan_restart(view, members, role=role, pending=pending)
    if output == "table":
        for name, why in plan.skipped:
            err.print(f"skipped {name}: {why}", markup=False)
    if not plan.order:
        _print(output, {"restarted": [], "skipped": [n for n, _ in plan.skipped]}, "nothing to restart")
        return
    body: dict[str, Any] = {"pending": True} if pending else {}
    if when is not None:
        _schedule(ctx, view, plan, body, when.timestamp(), force, output, timeout)
        return
    names = [f"{n} (leader, in place)" if n == plan.leader else n for n in plan.order]
    confirm(f"Restart PostgreSQL on {', '.join(names)}, in this order?", force)
    done: list[str] = []
    for i, name in enumerate(plan.order):
        m = read_view(ctx).members.get(name) or view.members[name]
        was_leader = name == plan.leader
        if output == "table":
            out.print(f"restarting {name}{' (leader)' if was_leader else ''} ...", markup=False)
        try:
            _restart_one(ctx, m, body, timeout)
            if len(plan.order) > 1:  # the next one waits until this one is back
                _wait_back(ctx, name, time.time(), was_leader, timeout)
        except StepFailed as e:
            rest = plan.order[i + 1 :]
            msg = f"restart of {name} failed: {e}"
            if rest:
                msg += f"; not restarted: {', '.join(rest)}"
            if done:
                msg += f" (restarted: {', '.join(done)})"
            raise fail(msg) from None
        done.append(name)
    text = f"restarted: {', '.join(done)}"
    _print(output, {"restarted": done, "skipped": [n for n, _ in plan.skipped]}, text)


def _schedule(
    ctx: Context,
    view: ClusterView,
    plan: RestartPlan,
    body: dict[str, Any],
    at: float,
    force: bool,
    output: str,
    timeout: float,
) -> None:
    when = iso(at, timespec="seconds")
    confirm(f"Schedule a restart of {', '.join(plan.order)} at {when}?", force)
    done: list[str] = []
    for i, name in enumerate(plan.order):
        try:
            ans = _restart_one(ctx, view.members[name], {**body, "scheduled_at": when}, timeout)
        except StepFailed as e:
            rest = plan.order[i + 1 :]
            raise fail(
                f"scheduling the restart of {name} failed: {e}"
                + (f"; not scheduled: {', '.join(rest)}" if rest else "")
                + (f" (scheduled: {', '.join(done)})" if done else "")
            ) from None
        if ans.status != 202:  # the time passed meanwhile: the agent restarted at once
            if output == "table":
                out.print(f"{name}: {answer_error(ans) if ans.status >= 300 else ans.data.get('message')}")
        done.append(name)
    _print(
        output, {"scheduled": done, "scheduled_at": when}, f"restart scheduled at {when}: {', '.join(done)}"
    )


def _print(output: str, data: dict[str, Any], text: str) -> None:
    if output == "table":
        out.print(text, markup=False)
    else:
        emit_data(output, data)


FLUSH_TARGETS = ("restart", "switchover")


@app.command("flush")
def flush(
    args: Annotated[
        list[str],
        typer.Argument(metavar="[MEMBER]... restart|switchover", help="What to cancel, after the members."),
    ],
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    output: OutputOpt = "table",
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds per API call.", min=0.5, max=3600)
    ] = 30.0,
) -> None:
    """Cancel scheduled restarts (of MEMBERs, default: every member that has one) or the pending
    switchover/failover (`switchover --cancel`)."""
    check_output(output)
    *names, target = args
    if target not in FLUSH_TARGETS:
        raise fail(f"flush what? the last argument is restart or switchover, not {target!r}", 2)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    view = read_view(ctx)
    if target == "switchover":
        if names:
            raise fail("flush switchover takes no member (a switchover is cluster-wide)", 2)
        if view.switchover is None:
            _print(output, {"cancelled": []}, "no switchover or failover is pending")
            return
        ans = call_any(view, "DELETE", "/switchover", ctx, what="flush switchover", timeout=timeout)
        data = check_answer(ans, "flush switchover", ctx.auth)
        _print(output, data, str(data.get("message") or "cancelled"))
        return
    for n in names:
        member_or_exit(view, n)
    chosen = [view.members[n] for n in dict.fromkeys(names)] or [
        m for m in sorted(view.members.values(), key=lambda m: m.name) if m.scheduled_restart is not None
    ]
    if not chosen:
        _print(output, {"cancelled": []}, "no restart is scheduled")
        return
    cancelled: list[str] = []
    errors: list[str] = []
    for m in chosen:
        try:
            ans = _request(ctx, m, "DELETE", "/restart", {"member": m.name}, timeout)
        except StepFailed as e:
            errors.append(f"{m.name}: {e}")
            continue
        if 200 <= ans.status < 300:
            cancelled.append(m.name)
            if output == "table":
                out.print(f"{m.name}: {ans.data.get('message', 'cancelled')}", markup=False)
        else:
            errors.append(f"{m.name}: {answer_error(ans)}")
    if output != "table":
        emit_data(output, {"cancelled": cancelled, "errors": errors})
    if errors:
        raise fail("not cancelled: " + "; ".join(errors))
