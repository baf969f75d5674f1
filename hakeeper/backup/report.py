"""This cluster's RPO/RTO table (``hakeeper report``, issue 6 item 5b; docs/verify.md).

One row per way of losing and getting back data -- a daily dump, WAL archiving + PITR,
synchronous replication, failover -- with the numbers **measured on this cluster** and where each
comes from.  Nothing is estimated: a number that was never measured is reported as such.

:func:`gather` reads the inputs (etcd, the agents' ``/status`` and ``/metrics``, the
repositories); :func:`build_rows` is pure and turns them into the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hakeeper.backup import catalog, layout
from hakeeper.backup.errors import RepoError
from hakeeper.backup.phases import describe, parse_phases
from hakeeper.backup.repos import make_repository
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.core.config import NodeConfig
    from hakeeper.dcs.store import EtcdLike

log = get_logger(__name__)

NOT_MEASURED = "not measured yet"
PROMOTION_METRIC = "hakeeper_promotion_phase_seconds"
RTO_PHASES = ("detect", "elect", "promote")  # leader lost -> new primary writable


@dataclass
class Row:
    scenario: str
    rpo_seconds: float | None
    rpo: str  # the number as shown, or why there is none
    rto_seconds: float | None
    rto: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "rpo_seconds": None if self.rpo_seconds is None else round(self.rpo_seconds, 3),
            "rpo": self.rpo,
            "rto_seconds": None if self.rto_seconds is None else round(self.rto_seconds, 3),
            "rto": self.rto,
            "source": self.source,
        }


@dataclass
class Inputs:
    """What the report is made of; every field may be missing (None / empty)."""

    now: dt.datetime
    replication_mode: str | None = None  # dynamic config in etcd
    sync_members: list[str] = field(default_factory=list)  # the sync key's members now
    sync_quorum: int | None = None
    replica_lags: dict[str, int] = field(default_factory=dict)  # eligible replicas: bytes behind
    history: list[dict[str, Any]] = field(default_factory=list)  # etcd history entries
    archive_rpo: dict[str, float | None] | None = None  # repository -> seconds (leader's /status)
    archive_source: str | None = None
    newest_wal_age: dict[str, float] = field(default_factory=dict)  # repository listing fallback
    newest_dump: dict[str, Any] | None = None  # id, repository, stop_time
    last_drill: dict[str, Any] | None = None  # etcd verify/last (a DrillResult summary)
    last_success: dict[str, Any] | None = None  # etcd verify/last_success
    # (kind, phase) -> durations of promotions, from every agent's /metrics (sum, count)
    promotions: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    etcd_read: bool = False  # the cluster's keys were read
    repositories_read: int = 0  # repositories that answered

    @property
    def read_nothing(self) -> bool:
        """Neither etcd nor any repository could be read: the report is all "unknown"."""
        return not self.etcd_read and self.repositories_read == 0


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def parse_promotion_metrics(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """``hakeeper_promotion_phase_seconds`` sums and counts by (kind, phase) from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], list[float]] = {}
    with contextlib.suppress(ValueError):
        for fam in text_string_to_metric_families(text):
            if fam.name != PROMOTION_METRIC:
                continue
            for s in fam.samples:
                kind, phase = s.labels.get("kind", ""), s.labels.get("phase", "")
                slot = out.setdefault((kind, phase), [0.0, 0.0])
                if s.name.endswith("_sum"):
                    slot[0] += s.value
                elif s.name.endswith("_count"):
                    slot[1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items() if v[1] > 0}


def merge_promotions(
    pages: Sequence[Mapping[tuple[str, str], tuple[float, float]]],
) -> dict[tuple[str, str], tuple[float, float]]:
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for page in pages:
        for k, (s, c) in page.items():
            s0, c0 = out.get(k, (0.0, 0.0))
            out[k] = (s0 + s, c0 + c)
    return out


def _failover_rto(inp: Inputs) -> tuple[float | None, str, str]:
    """Mean time from a lost leader to a writable new primary, by the agents' phase metrics."""
    phases = {p: inp.promotions.get(("failover", p)) for p in RTO_PHASES}
    failovers = [e for e in inp.history if "failover" in str(e.get("reason", "")).lower()]
    hist = f"; {len(failovers)} failovers in the history" if inp.history else ""
    if phases["promote"] is None or phases["elect"] is None:
        return (
            None,
            NOT_MEASURED,
            "no failover measured by the running agents (hakeeper_promotion_phase_seconds)" + hist,
        )
    total = 0.0
    parts = []
    n = 0
    for p in RTO_PHASES:
        v = phases[p]
        if v is None:
            continue
        mean = v[0] / v[1]
        total += mean
        n = max(n, int(v[1]))
        parts.append(f"{p} {mean:.1f}")
    return (
        total,
        human_seconds(total),
        f"mean of {n} failovers measured by the agents since they started ({', '.join(parts)} s)" + hist,
    )


def build_rows(inp: Inputs) -> list[Row]:
    rows: list[Row] = []
    drill, ok_drill = inp.last_drill, inp.last_success

    # --- daily dump: what is lost is everything since the newest dump; getting it back is a
    # pg_restore (measured by the last drill's dump check)
    d = inp.newest_dump
    if d is not None and d.get("stop_time") is not None:
        age = (inp.now - d["stop_time"]).total_seconds()
        rpo_s: float | None = max(0.0, age)
        rpo = f"{human_seconds(max(0.0, age))} (age of dump {d['id']})"
    else:
        rpo_s, rpo = None, "no complete dump"
    dump_check = (ok_drill or {}).get("dump") if ok_drill else None
    if dump_check and dump_check.get("seconds") is not None:
        rto_s: float | None = float(dump_check["seconds"])
        rto = f"{human_seconds(float(dump_check['seconds']))} (dump {dump_check.get('dump_id')})"
        src = f"RPO: newest complete dump in {d['repository']}; " if d else "RPO: -; "
        src += f"RTO: fetch + pg_restore in drill {ok_drill.get('id')}" if ok_drill else ""
    else:
        rto_s, rto = None, NOT_MEASURED
        src = (
            f"RPO: newest complete dump in {d['repository']}; " if d else ""
        ) + "RTO: no drill restored a dump"
    rows.append(Row("daily dump", rpo_s, rpo, rto_s, rto, src))

    # --- WAL archiving + PITR: the archive's RPO now; RTO of the last passed drill
    if inp.archive_rpo:
        known = {k: v for k, v in inp.archive_rpo.items() if v is not None}
        if known:
            best = min(known.values())
            rpo_s = best
            rpo = f"{human_seconds(best)}" + (
                f" (worst repository {human_seconds(max(known.values()))})" if len(known) > 1 else ""
            )
        else:
            rpo_s, rpo = None, "unknown (no WAL archived since the agent started)"
        rpo_src = f"RPO: archive lag now ({inp.archive_source})"
    elif inp.newest_wal_age:
        best = min(inp.newest_wal_age.values())
        rpo_s, rpo = best, f"<= {human_seconds(best)}"
        rpo_src = "RPO: age of the newest archived WAL in the repository listing (no agent answered)"
    else:
        rpo_s, rpo, rpo_src = None, NOT_MEASURED, "RPO: no agent answered and no WAL archived"
    if ok_drill and isinstance(ok_drill.get("rto"), dict) and ok_drill["rto"].get("total") is not None:
        r = ok_drill["rto"]
        rto_s = float(r["total"])
        rto = human_seconds(rto_s)
        rto_src = (
            f"RTO: drill {ok_drill.get('id')} of backup {ok_drill.get('backup_id')} "
            f"(fetch {r.get('fetch')}, decompress {r.get('decompress')}, WAL replay {r.get('wal_replay')}, "
            f"promote {r.get('promote')} s)"
        )
        phases = parse_phases(ok_drill.get("phases"))
        if phases:  # throughput by phase (issue 16): where the restore time goes
            rto_src += f"; restore phases: {describe(phases)}"
    else:
        rto_s, rto, rto_src = None, NOT_MEASURED, "RTO: no restore drill has passed (hakeeper verify)"
    if drill and not drill.get("ok"):
        rto_src += f"; the LAST DRILL FAILED ({drill.get('id')}: {drill.get('error')})"
    rows.append(Row("WAL archive + PITR", rpo_s, rpo, rto_s, rto, f"{rpo_src}; {rto_src}"))

    # --- synchronous replication and failover share the failover RTO
    f_rto_s, f_rto, f_src = _failover_rto(inp)
    mode = inp.replication_mode
    if mode in ("synchronous", "quorum") and inp.sync_members:
        rows.append(
            Row(
                "synchronous replication",
                0.0,
                "0",
                f_rto_s,
                f_rto,
                f"RPO: replication_mode {mode}, acknowledged commits are on {inp.sync_quorum} of "
                f"{', '.join(inp.sync_members)} (sync key now); RTO: {f_src}",
            )
        )
    elif mode in ("synchronous", "quorum"):
        rows.append(
            Row(
                "synchronous replication",
                None,
                "no guarantee now (no synchronous standby listed)",
                f_rto_s,
                f_rto,
                f"RPO: replication_mode {mode} but the sync key lists no member; RTO: {f_src}",
            )
        )
    elif mode is None:
        rows.append(Row("synchronous replication", None, "unknown", f_rto_s, f_rto, "etcd could not be read"))
    else:
        rows.append(
            Row(
                "synchronous replication",
                None,
                f"not configured (replication_mode {mode})",
                None,
                "-",
                "dynamic config in etcd",
            )
        )
    if mode is None:
        rows.append(Row("failover", None, "unknown", f_rto_s, f_rto, f"etcd could not be read; RTO: {f_src}"))
        return rows
    if inp.replica_lags:
        lag = min(inp.replica_lags.values())
        closest = min(inp.replica_lags, key=lambda k: inp.replica_lags[k])
        if mode in ("synchronous", "quorum") and inp.sync_members:
            frpo_s: float | None = 0.0
            frpo = "0 (a synchronous standby is promoted)"
        else:
            frpo_s, frpo = None, f"{lag} bytes of WAL (lag of {closest} now)"
        fsrc = "RPO: replicas' lag now (member keys)"
    else:
        frpo_s, frpo, fsrc = None, "no replica to fail over to", "RPO: member keys"
    rows.append(Row("failover", frpo_s, frpo, f_rto_s, f_rto, f"{fsrc}; RTO: {f_src}"))
    return rows


# ============================================================================ gathering


async def _http_get(url: str, headers: Mapping[str, str], timeout: float = 5.0) -> tuple[int, str]:
    import aiohttp

    to = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=to) as s, s.get(url, headers=dict(headers)) as r:
        return r.status, await r.text(errors="replace")


def _note_pg_wal_cap(inp: Inputs, leader: str, cap: Mapping[str, Any]) -> None:
    """A note once the WAL waiting for archiving on the leader reaches half the pg_wal cap."""
    if (cap.get("percent") or 0) >= 50:
        inp.notes.append(
            f"pg_wal on the leader {leader}: {cap['percent']}% of max_pg_wal_bytes "
            f"({cap.get('pending_bytes')} of {cap.get('max_bytes')} bytes) waits for archiving; "
            "at 100% the oldest is given up (a gap in the archive)"
        )


async def gather(cfg: NodeConfig, client: EtcdLike, headers: Mapping[str, str]) -> Inputs:
    """Read everything the report needs; what cannot be read becomes a note."""
    from hakeeper.backup.dump import load_dumps
    from hakeeper.backup.verify import parse_summary
    from hakeeper.core.cluster import MemberRole
    from hakeeper.core.config import DynamicConfig
    from hakeeper.core.keys import Keys
    from hakeeper.dcs.store import ClusterStore

    inp = Inputs(now=catalog.utcnow())
    view = None
    try:
        store = ClusterStore(client, Keys(cfg.prefix))
        async with asyncio.timeout(10):
            kvs, rev = await store.read_keys()
        view = store.view_of(kvs, rev, DynamicConfig())
        inp.etcd_read = True
        drill, success = kvs.get(store.keys.verify_last), kvs.get(store.keys.verify_last_success)
        inp.last_drill = parse_summary(drill.value if drill is not None else None)
        inp.last_success = parse_summary(success.value if success is not None else None)
    except Exception as e:  # etcd down: the repositories still tell something
        inp.notes.append(f"etcd could not be read: {e or type(e).__name__}")
    if view is not None:
        inp.replication_mode = view.config.replication_mode
        if view.sync is not None:
            inp.sync_members = list(view.sync.members)
            inp.sync_quorum = view.sync.quorum
        inp.history = [e.to_dict() for e in view.history]
        for m in view.members.values():
            if m.role == MemberRole.REPLICA and m.lag is not None and not m.nofailover:
                inp.replica_lags[m.name] = m.lag
        pages = await asyncio.gather(
            *(_metrics_of(m.api_url, headers) for m in view.members.values() if m.api_url)
        )
        inp.promotions = merge_promotions([p for p in pages if p])
        leader = view.leader_member
        if leader is not None and leader.api_url:
            try:
                status, text = await _http_get(leader.api_url.rstrip("/") + "/status", headers)
                doc = json.loads(text) if status == 200 else {}
                arch = doc.get("archive") or {}
                repos = arch.get("repositories") or []
                _note_pg_wal_cap(inp, leader.name, arch.get("pg_wal_cap") or {})
                if repos and any("rpo_seconds" in r for r in repos):
                    inp.archive_rpo = {str(r.get("name")): r.get("rpo_seconds") for r in repos}
                    inp.archive_source = f"hakeeper_archive_rpo_seconds of the leader {leader.name}"
            except Exception as e:
                inp.notes.append(
                    f"the leader's API ({leader.api_url}) did not answer: {e or type(e).__name__}"
                )
    # the repositories: newest dump, newest WAL (fallback for the archive RPO), drills there
    newest_dump: dict[str, Any] | None = None
    for rc in cfg.backup.repositories:
        r = make_repository(rc)
        try:
            dumps = (await load_dumps(r, cfg.scope)).complete()
            if dumps and (newest_dump is None or (dumps[0].stop_time or inp.now) > newest_dump["stop_time"]):
                newest_dump = {"id": dumps[0].id, "repository": rc.name, "stop_time": dumps[0].stop_time}
            if inp.archive_rpo is None:
                wal = await r.list_objects(layout.wal_prefix(cfg.scope))
                times = [e.modified for e in wal if not e.name.endswith(".history") and e.modified]
                if times:
                    inp.newest_wal_age[rc.name] = max(0.0, (inp.now - max(times)).total_seconds())
            if inp.last_success is None or inp.last_drill is None:
                await _drills_from_repo(r, cfg.scope, inp)
            inp.repositories_read += 1
        except RepoError as e:
            inp.notes.append(f"repository {rc.name} could not be read: {e}")
        finally:
            await r.close()
    inp.newest_dump = newest_dump
    return inp


async def _metrics_of(api_url: str, headers: Mapping[str, str]) -> dict[tuple[str, str], tuple[float, float]]:
    try:
        status, text = await _http_get(api_url.rstrip("/") + "/metrics", headers)
    except Exception:
        return {}
    return parse_promotion_metrics(text) if status == 200 else {}


async def _drills_from_repo(repo: Any, scope: str, inp: Inputs) -> None:
    """Without etcd: the newest drill results stored with the backups."""
    from hakeeper.backup.verify import last_drills

    cat = await catalog.load_catalog(repo, scope, wal=False)
    results = sorted((await last_drills(repo, cat)).values(), key=lambda d: d.id)
    if inp.last_drill is None and results:
        inp.last_drill = results[-1].summary()
    passed = [d for d in results if d.ok]
    if inp.last_success is None and passed:
        inp.last_success = passed[-1].summary()
