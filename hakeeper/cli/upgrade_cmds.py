"""``hakeeper upgrade --to-version N``: a major-version upgrade of the running cluster.

The command drives the members through their agents (:mod:`hakeeper.ha.upgrade`):

1. **Preflight** (all of it with ``--check``, and first in a real run): the cluster (a running
   leader, every member running and streaming, no switchover pending) and each member
   (``POST /upgrade/check``: the new binaries, disk, on the primary ``pg_upgrade --check``
   against the live server).  Every problem is listed with its fix; nothing is changed.
2. **Pause**: etcd's ``upgrade`` key; every agent acknowledges it (no automatic start, stop or
   failover while it exists).
3. **The primary** (``POST /upgrade/primary``, followed on ``GET /upgrade``): initdb beside the
   old cluster, CHECKPOINT, fast shutdown (writes stop), pg_upgrade, the data directories
   swapped, the new system identifier in etcd, the new primary started (writes resume), a full
   backup into every repository.  As soon as the old primary has stopped, each replica replays
   its last WAL and stops (``POST /upgrade/stop``).  A failure before the new primary starts is
   undone by the agent: the old cluster runs again as before, and the command resumes it.
4. **The replicas** (``POST /upgrade/rejoin``): cloned from the new primary with the new
   binaries, until they stream.
5. **After**: the upgrade in ``history`` (from, to, method, downtime, phases), the ``upgrade``
   key removed (automatic failover resumes), and the report.

Run again with the same ``--to-version`` it continues an upgrade that was interrupted (the
``upgrade`` key says which); ``--cancel`` removes the key of one that will not be continued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
import uuid
from typing import Annotated, Any

import typer
from rich.status import Status
from rich.table import Table
from rich.text import Text

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
    ApiUrlOpt,
    Context,
    ForceOpt,
    NotSent,
    PasswordOpt,
    TokenOpt,
    UserOpt,
    confirm,
    format_bytes,
    make_context,
    member_body,
    read_view,
    send_api,
)
from hakeeper.cli.pause_wait import wait_for_pause_state
from hakeeper.cli.progress import QuietOpt
from hakeeper.core.cluster import ClusterView, HistoryEntry, Member, MemberRole, MemberState, Upgrade
from hakeeper.core.keys import Keys
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.store import ClusterStore

METHODS = ("link", "copy", "clone", "swap")
CHECK_TIMEOUT = 1800.0  # pg_upgrade --check dumps every database's schema
POLL_S = 0.5
PAUSE_TIMEOUT = 60.0
LEADER_RECORD_WAIT = 60.0  # s for the upgraded leader's member record to report the new major
REJOIN_TIMEOUT = 6 * 3600.0
RUNNING = (MemberState.RUNNING, MemberState.STREAMING, MemberState.IN_RECOVERY)


# --------------------------------------------------------------------------------- pure parts


def cluster_problems(view: ClusterView, to_major: int) -> list[dict[str, Any]]:
    """What keeps the cluster as a whole from an upgrade to ``to_major``, from etcd alone."""
    problems: list[dict[str, Any]] = []

    def add(member: str, check: str, text: str, fix: str | None) -> None:
        problems.append({"member": member, "check": check, "text": text, "fix": fix})

    lm = view.leader_member
    if lm is None or lm.state not in RUNNING:
        add("-", "leader", "the cluster has no running leader", "wait for (or fix) the leader first")
    if view.switchover is not None:
        add(
            "-",
            "switchover",
            "a switchover or failover is pending",
            "let it finish, or `hakeeper flush switchover`",
        )
    if view.upgrade is not None and view.upgrade.to_major != to_major:
        add("-", "upgrade", f"an upgrade to {view.upgrade.to_major} is in progress", "finish or --cancel it")
    if view.config.pause:
        add("-", "pause", "the cluster is paused", "`hakeeper resume` first (the upgrade pauses it itself)")
    for m in sorted(view.members.values(), key=lambda m: m.name):
        if lm is not None and m.name == lm.name:
            continue
        if m.state not in RUNNING:
            add(m.name, "running", f"{m.name} is {m.state}", "start it, or remove the member, first")
        elif m.role == MemberRole.REPLICA and m.state != MemberState.STREAMING:
            add(
                m.name,
                "replication",
                f"{m.name} does not stream from the leader",
                "fix its replication first",
            )
    return problems


def member_major(m: Member) -> int | None:
    """The major the member's running server reports (``17.10`` -> 17)."""
    if not m.server_version:
        return None
    try:
        return int(m.server_version.split(".")[0])
    except ValueError:
        return None


def report_rows(job: dict[str, Any], replicas: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The report: write downtime, each phase, data size, method."""
    rows = [
        ("upgrade", f"PostgreSQL {job.get('from_major')} -> {job.get('to_major')} ({job.get('method')})"),
        ("write downtime", _secs(job.get("downtime_s"))),
    ]
    for name, s in (job.get("phases") or {}).items():
        label = "replicas: clone to streaming" if name == "replicas" else f"primary: {name}"
        rows.append((label, _secs(s)))
    for name, r in sorted(replicas.items()):
        rows.append((f"replica {name}", r.get("summary", "-")))
    size = job.get("data_bytes")
    rows.append(("data size", format_bytes(int(size)) if isinstance(size, int) else "-"))
    backup = job.get("backup") or {}
    rows.append(("backup after", _backup_summary(backup)))
    return rows


def _secs(v: Any) -> str:
    return f"{float(v):.2f} s" if isinstance(v, int | float) else "-"


def _backup_summary(backup: dict[str, Any]) -> str:
    if "skipped" in backup:
        return str(backup["skipped"])
    if "error" in backup:
        return f"failed: {backup['error']}"
    parts = []
    for repo, r in (backup.get("repositories") or {}).items():
        parts.append(f"{repo}: {r.get('backup') or 'failed: ' + str(r.get('error'))}")
    source = f" (from {backup['source']})" if backup.get("source") else ""
    return "; ".join(parts) + source if parts else "-"


# --------------------------------------------------------------------------------- etcd


def _store(ctx: Context) -> tuple[ClusterStore, Any]:
    client = ctx.client()
    return ClusterStore(client, Keys(ctx.prefix)), client


def _etcd(ctx: Context, fn: Any) -> Any:
    async def go() -> Any:
        store, client = _store(ctx)
        try:
            return await fn(store)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except EtcdError as e:
        raise fail(f"upgrade: etcd: {e}") from None


# --------------------------------------------------------------------------------- API


def _post(ctx: Context, m: Member, path: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, Any]:
    try:
        ans = send_api(m, "POST", path, ctx, body=member_body(m.name, **body), timeout=timeout)
    except NotSent as e:
        return 0, {"error": str(e)}
    return ans.status, ans.data


def _get(ctx: Context, m: Member, path: str) -> tuple[int, Any]:
    try:
        ans = send_api(m, "GET", path, ctx, timeout=10.0)
    except NotSent as e:
        return 0, {"error": str(e)}
    return ans.status, ans.data


def _error(status: int, data: Any) -> str:
    if status == 0:
        return str(data.get("error"))
    if isinstance(data, dict):
        return f"HTTP {status}: {data.get('error') or data.get('message') or data}"
    return f"HTTP {status}"


def check_members(ctx: Context, view: ClusterView, to_major: int, method: str) -> list[dict[str, Any]]:
    """Every member's own problems (``POST /upgrade/check``, in parallel)."""
    members = sorted(view.members.values(), key=lambda m: m.name)

    def one(m: Member) -> list[dict[str, Any]]:
        status, data = _post(
            ctx, m, "/upgrade/check", {"to_version": to_major, "method": method}, CHECK_TIMEOUT
        )
        if status != 200 or not isinstance(data, dict):
            return [{"member": m.name, "check": "agent", "text": _error(status, data), "fix": None}]
        return [{"member": m.name, **p} for p in data.get("problems", [])]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        return [p for ps in pool.map(one, members) for p in ps]


# --------------------------------------------------------------------------------- the command


@app.command("upgrade")
def upgrade(
    to_version: Annotated[int, typer.Option("--to-version", help="The PostgreSQL major to upgrade to.")],
    config: ConfigOpt = None,
    etcd: EtcdOpt = None,
    scope: ScopeOpt = None,
    namespace: NamespaceOpt = "/hakeeper",
    check: Annotated[
        bool, typer.Option("--check", help="Only the preflight: list every problem, change nothing.")
    ] = False,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="pg_upgrade's: link (hard links: seconds, the old cluster is unusable once the new one "
            "ran), copy (slow, the old cluster stays), clone (reflinks), swap (18+).",
        ),
    ] = "link",
    cancel: Annotated[
        bool,
        typer.Option(
            "--cancel", help="Remove the upgrade key of an interrupted upgrade (resumes the cluster)."
        ),
    ] = False,
    force: ForceOpt = False,
    output: OutputOpt = "table",
    quiet: QuietOpt = False,
    token: TokenOpt = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    api_url: ApiUrlOpt = None,
) -> None:
    """Upgrade the cluster to PostgreSQL major --to-version, member by member (see docs/upgrade.md)."""
    check_output(output)
    if method not in METHODS:
        raise fail(f"--method must be one of {', '.join(METHODS)}, not {method!r}", 2)
    ctx = make_context(config, etcd, scope, namespace, token, user, password, api_url)
    view = read_view(ctx)
    if cancel:
        _cancel(ctx, view)
        return
    resuming = view.upgrade is not None and view.upgrade.to_major == to_version
    if not resuming:
        problems = cluster_problems(view, to_version)
        problems += check_members(ctx, view, to_version, method)
        _print_problems(problems, output, check)
        if check:
            raise typer.Exit(1 if problems else 0)
        if problems:
            raise fail(f"upgrade: {len(problems)} problem(s) found; nothing was changed")
        lm = view.leader_member
        assert lm is not None  # cluster_problems requires a running leader
        confirm(
            f"Upgrade cluster {ctx.prefix} from PostgreSQL {member_major(lm)} to {to_version} "
            f"(--{method}; writes stop for the upgrade of {lm.name})?",
            force,
        )
    elif check:
        raise fail(f"upgrade: an upgrade to {to_version} is in progress; run without --check to continue it")
    runner = Runner(ctx, to_version, method, output, quiet=quiet)
    # On a terminal, the phase under way and the time so far stay in view on stderr (the agents
    # report phases, not bytes: pg_upgrade --link is seconds, a clone is its own job)
    live = err.status("upgrade: starting") if err.is_terminal and not quiet else contextlib.nullcontext()
    with live as status:
        runner.status = status
        runner.run(view)


def _print_problems(problems: list[dict[str, Any]], output: str, check_only: bool) -> None:
    if output != "table":
        if check_only or problems:  # a run that goes on prints one document: its report
            emit_data(output, {"ok": not problems, "problems": problems})
        return
    if not problems:
        out.print("preflight: no problem found" + ("" if not check_only else "; nothing was changed"))
        return
    t = Table(title="upgrade preflight: problems (nothing was changed)")
    for col in ("member", "check", "problem", "fix"):
        t.add_column(col, overflow="fold")
    for p in problems:
        # Text, not markup: pg_upgrade's texts hold brackets ("[could not load library ...]")
        cells = (p.get("member"), p.get("check"), p.get("text"), p.get("fix") or "-")
        t.add_row(*(Text(str(x)) for x in cells))
    out.print(t)


def _cancel(ctx: Context, view: ClusterView) -> None:
    up = view.upgrade
    if up is None and not view.upgrade_invalid:
        out.print("no upgrade is in progress")
        return
    lm = view.leader_member
    if lm is not None and up is not None:
        status, data = _get(ctx, lm, "/upgrade")
        if (
            status == 200
            and isinstance(data, dict)
            and data.get("state") == "running"
            and data.get("id") == up.id
        ):
            raise fail(f"upgrade {up.id} is running on {lm.name} (phase {data.get('phase')}): not cancelled")
    if not _etcd(ctx, lambda s: s.upgrades.delete(up.id if up else "")):
        raise fail("upgrade: the upgrade key changed meanwhile; look again")
    out.print("upgrade key removed: automatic failover resumes" + (f" (was {up.id})" if up else ""))


class Runner:
    """One run of the upgrade (or its continuation), with the progress on the terminal."""

    def __init__(self, ctx: Context, to_major: int, method: str, output: str, *, quiet: bool = False) -> None:
        self.ctx = ctx
        self.to_major = to_major
        self.method = method
        self.output = output
        self.quiet = quiet
        self.status: Status | None = None  # the live line on a terminal
        self.t0 = time.monotonic()
        self.replicas: dict[str, dict[str, Any]] = {}

    def say(self, text: str) -> None:
        """A line per phase (``--quiet``: none; ``-o json``: none, stdout is the JSON)."""
        if self.status is not None:
            self.status.update(f"upgrade: {text}")
        if self.output == "table" and not self.quiet:
            out.print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", markup=False)

    def run(self, view: ClusterView) -> None:
        up = self._pause(view)
        view = read_view(self.ctx)
        lm = view.leader_member
        if lm is None:
            raise fail("upgrade: the cluster has no leader; the upgrade key stays (run again to continue)")
        job: dict[str, Any]
        if member_major(lm) == self.to_major:
            status, data = _get(self.ctx, lm, "/upgrade")
            job = data if status == 200 and isinstance(data, dict) and data.get("id") == up.id else {}
            self.say(f"{lm.name} already runs PostgreSQL {self.to_major}: continuing with the replicas")
        else:
            job = self._primary(lm, view, up)
        self._rejoin(self._leader_on_new_major(lm.name), lm.name, up)
        if job.get("state") == "running":
            job = self._await_backup(lm, up, job)
        self._finish(up, lm.name, job)

    def _await_backup(self, lm: Member, up: Upgrade, job: dict[str, Any]) -> dict[str, Any]:
        """The primary's job goes on with the backup of the new cluster: wait for its end."""
        self.say(f"{lm.name}: waiting for the full backup of the new cluster")
        while True:
            st, doc = _get(self.ctx, lm, "/upgrade")
            if st == 200 and isinstance(doc, dict) and doc.get("id") == up.id:
                job = doc
                if job.get("state") != "running":
                    return job
            elif st == 404:  # the agent restarted: its job is gone
                return job
            time.sleep(POLL_S)

    # -- 2. pause ---------------------------------------------------------------------------

    def _pause(self, view: ClusterView) -> Upgrade:
        up = view.upgrade
        if up is None:
            lm = view.leader_member
            rec = Upgrade(
                id=uuid.uuid4().hex[:12],
                from_major=member_major(lm) or 0 if lm else 0,
                to_major=self.to_major,
                method=self.method,
                started_at=time.time(),
                by="hakeeper upgrade",
                phase="pausing",
            )
            stored = _etcd(self.ctx, lambda s: s.upgrades.write(None, rec))
            if stored is None:
                raise fail("upgrade: another upgrade was started meanwhile; nothing was changed")
            up = stored
            self.say(f"upgrade {up.id}: the cluster is paused for it (etcd key {self.ctx.prefix}/upgrade)")
        else:
            self.say(f"continuing upgrade {up.id} to PostgreSQL {up.to_major}")
        _, laggards = asyncio.run(wait_for_pause_state(self.ctx.client, self.ctx.prefix, True, PAUSE_TIMEOUT))
        if laggards:
            who = "; ".join(f"{k}: {v}" for k, v in laggards.items())
            self._abandon(up, f"not every agent acknowledged the pause within {PAUSE_TIMEOUT:.0f} s ({who})")
        return up

    def _abandon(self, up: Upgrade, why: str) -> None:
        """Give up before anything changed: remove the key (the cluster resumes), exit 1."""
        _etcd(self.ctx, lambda s: s.upgrades.delete(up.id))
        raise fail(f"upgrade: {why}; the upgrade key was removed, nothing was changed")

    # -- 3. the primary ------------------------------------------------------------------------

    def _primary(self, lm: Member, view: ClusterView, up: Upgrade) -> dict[str, Any]:
        status, data = _post(
            self.ctx,
            lm,
            "/upgrade/primary",
            {"id": up.id, "to_version": self.to_major, "method": up.method},
            120,
        )
        if status != 202 or not isinstance(data, dict):
            self._abandon(up, f"{lm.name} refused to start: {_error(status, data)}")
        self.say(f"{lm.name}: upgrade of the primary started")
        replicas = [m for m in view.members.values() if m.name != lm.name]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(replicas)))
        stops: dict[str, concurrent.futures.Future[tuple[int, Any]]] = {}
        phase = ""
        job: dict[str, Any] = data
        try:
            while True:
                st, doc = _get(self.ctx, lm, "/upgrade")
                if st == 200 and isinstance(doc, dict) and doc.get("id") == up.id:
                    job = doc
                    if job.get("phase") != phase:
                        phase = str(job.get("phase"))
                        self.say(f"{lm.name}: {phase}")
                    if job.get("stop_lsn") and not stops:
                        body = {"id": up.id, "lsn": job["stop_lsn"], "timeout": 120.0}
                        for m in replicas:
                            stops[m.name] = pool.submit(_post, self.ctx, m, "/upgrade/stop", body, 180.0)
                        self.say(f"writes stopped at {job['stop_lsn']}: the replicas replay it and stop")
                    if job.get("state") != "running" or job.get("downtime_s") is not None:
                        break  # ended, or the new primary takes writes (its backup goes on)
                time.sleep(POLL_S)
            for name, fut in stops.items():
                st, doc = fut.result()
                ok = st == 200 and isinstance(doc, dict)
                self.replicas[name] = {"stop": doc.get("message") if ok else _error(st, doc)}
        finally:
            pool.shutdown(wait=True)
        if job.get("state") == "failed":
            self._primary_failed(up, lm, job)
        self.say(f"{lm.name} runs PostgreSQL {self.to_major}: write downtime {_secs(job.get('downtime_s'))}")
        return job

    def _primary_failed(self, up: Upgrade, lm: Member, job: dict[str, Any]) -> None:
        if job.get("rolled_back"):
            _etcd(self.ctx, lambda s: s.upgrades.delete(up.id))
            raise fail(
                f"upgrade failed on {lm.name} during {job.get('phase')}: {job.get('error')}\n"
                f"rolled back: the old PostgreSQL {job.get('from_major')} cluster runs as before and takes "
                "writes; the replicas follow it again (the upgrade key was removed)"
            )
        raise fail(
            f"upgrade failed on {lm.name}: {job.get('error')}\n{job.get('state_after') or ''}\n"
            f"the cluster stays paused for upgrade {up.id}; after fixing the cause run "
            f"`hakeeper upgrade --to-version {self.to_major}` again (or --cancel)"
        )

    # -- 4. the replicas -----------------------------------------------------------------------

    def _leader_on_new_major(self, leader: str) -> ClusterView:
        """The view once the leader's member record reports the new major (its agent publishes
        it on its next cycle after the start; a replica refuses to clone before)."""
        deadline = time.monotonic() + LEADER_RECORD_WAIT
        while True:
            view = read_view(self.ctx)
            lm = view.members.get(leader)
            if (lm is not None and member_major(lm) == self.to_major) or time.monotonic() >= deadline:
                return view
            time.sleep(POLL_S)

    def _rejoin(self, view: ClusterView, leader: str, up: Upgrade) -> None:
        todo = [m for m in view.members.values() if m.name != leader and member_major(m) != self.to_major]
        if not todo:
            return
        self.say(
            f"cloning {', '.join(sorted(m.name for m in todo))} from {leader} with PostgreSQL {self.to_major}"
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(todo)) as pool:
            results = dict(
                zip([m.name for m in todo], pool.map(lambda m: self._rejoin_one(m, up), todo), strict=True)
            )
        failed = {k: v for k, v in results.items() if not v.get("ok")}
        for name, r in results.items():
            self.replicas.setdefault(name, {}).update(r)
        if failed:
            who = "; ".join(f"{k}: {v.get('summary')}" for k, v in failed.items())
            raise fail(
                f"upgrade: the primary runs PostgreSQL {self.to_major} but replicas did not rejoin ({who}); "
                "the cluster stays paused: fix them and run "
                f"`hakeeper upgrade --to-version {self.to_major}` again"
            )

    def _rejoin_one(self, m: Member, up: Upgrade) -> dict[str, Any]:
        t = time.monotonic()
        status, data = _post(self.ctx, m, "/upgrade/rejoin", {"id": up.id, "to_version": self.to_major}, 120)
        if status != 202 or not isinstance(data, dict):
            return {"ok": False, "summary": f"refused: {_error(status, data)}"}
        job_id = data.get("id")
        deadline = time.monotonic() + REJOIN_TIMEOUT
        while time.monotonic() < deadline:
            st, doc = _get(self.ctx, m, f"/reinitialize/{job_id}")
            if st == 200 and isinstance(doc, dict) and doc.get("state") != "running":
                secs = time.monotonic() - t
                if doc.get("state") == "succeeded":
                    self.say(f"{m.name}: streaming from the new primary ({secs:.1f} s)")
                    return {"ok": True, "summary": f"cloned and streaming in {secs:.1f} s", "seconds": secs}
                return {"ok": False, "summary": f"failed during {doc.get('phase')}: {doc.get('error')}"}
            time.sleep(1.0)
        return {"ok": False, "summary": "did not finish in time"}

    # -- 5. after ------------------------------------------------------------------------------

    def _finish(self, up: Upgrade, leader: str, job: dict[str, Any]) -> None:
        phases = dict(job.get("phases") or {})
        rejoin = [r["seconds"] for r in self.replicas.values() if isinstance(r.get("seconds"), float)]
        if rejoin and "replicas" not in phases:  # the agent's own measure, else the clones'
            phases["replicas"] = max(rejoin)
        rounded = {k: round(float(v), 3) for k, v in phases.items()}
        summary: dict[str, Any] = {
            "from_major": job.get("from_major") or up.from_major,
            "to_major": self.to_major,
            "method": up.method,
            "downtime_s": job.get("downtime_s"),
            "phases": rounded,
            "old_system_identifier": job.get("old_system_identifier"),
            "system_identifier": job.get("system_identifier"),
        }

        async def record(store: ClusterStore) -> bool:
            view = await store.read_view()
            lm = view.leader_member
            if view.leader is None or lm is None:
                return False
            entry = HistoryEntry(
                timeline=lm.timeline or 1,
                lsn=parse_lsn(str(job.get("stop_lsn"))) if job.get("stop_lsn") else None,
                time=time.time(),
                reason=f"major upgrade {summary['from_major']} -> {self.to_major} ({up.method})",
                old_leader=leader,
                new_leader=view.leader.name,
                upgrade=summary,
            )
            return await store.append_history(view.leader.term, entry)

        recorded = not job or _etcd(self.ctx, record)
        _etcd(self.ctx, lambda s: s.upgrades.delete(up.id))
        self.say("upgrade key removed: automatic failover resumes")
        if self.output != "table":
            emit_data(
                self.output,
                {"upgrade": up.id, **summary, "replicas": self.replicas, "backup": job.get("backup")},
            )
            return
        t = Table(title=f"upgrade {up.id}: done in {time.monotonic() - self.t0:.1f} s")
        t.add_column("")
        t.add_column("", overflow="fold")
        for k, v in report_rows({**job, "phases": rounded}, self.replicas):
            t.add_row(Text(k), Text(v))
        out.print(t)
        if not recorded:
            out.print("note: the history entry could not be written (the leader changed meanwhile)")


__all__ = ["cluster_problems", "member_major", "report_rows", "upgrade"]
