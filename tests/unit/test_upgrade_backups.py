"""Issue 15, backup side: the repositories across a major-version upgrade.  pg_upgrade makes a
new cluster (new system identifier); the binding moves to it with the old one in its history,
the old cluster's backups stay listed and restorable up to its end, PITR across the upgrade is
refused, automatic choices (restore, drills) pick the new cluster's backups, retention treats
both clusters' backups alike."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import hakeeper.backup.binding as binding_module
import hakeeper.cli.backup_cmds  # noqa: F401  (registers the commands on app)
from hakeeper.backup import catalog, layout
from hakeeper.backup.binding import (
    Binding,
    BindingMismatch,
    bind,
    binding_key,
    read_binding,
    rebind_after_upgrade,
    rebind_all,
)
from hakeeper.backup.catalog import Catalog, RestoreRefused, Target, load_catalog, plan_restore
from hakeeper.backup.errors import CorruptObject
from hakeeper.backup.lineage import ClusterEra, Lineage
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.retention import plan_expire
from hakeeper.backup.verify import _pick_backup
from hakeeper.cli.app import app
from hakeeper.core.backup_config import RetentionConfig
from hakeeper.core.cluster import Succession
from hakeeper.core.lsn import format_lsn
from hakeeper.core.timefmt import iso
from tests.support.sim import capture_events
from tests.unit.test_backup_catalog import SEG, T0, rec, seg, wal
from tests.unit.test_repo_verbs import SCOPE, _backup, _node

OLD, NEW = "7001", "7002"
UPGRADED = T0 + dt.timedelta(hours=2)
END_LSN = 8 * SEG + 0x28  # the old cluster's final checkpoint, in segment 8 of timeline 1


def rebind_kwargs(**over: Any) -> dict[str, Any]:
    """``succession`` and ``by`` for the rebind functions; ``over`` changes the succession."""
    s = Succession(OLD, NEW, 17, 18, UPGRADED.timestamp(), END_LSN)
    return {"succession": replace(s, **over), "by": "upgrade n1"}


# ============================================================================ the binding


async def test_rebind_moves_the_binding_keeps_history_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = FilesystemRepository(tmp_path, name="r")
    await repo.ensure_marker()
    await bind(repo, "sc", OLD, "repo create", 0.0)
    await repo.put_unique(f"sc/wal/{seg(1, 3)}", b"old wal")  # the archive says: timeline 1
    logs = capture_events(monkeypatch, binding_module)
    b = await rebind_after_upgrade(repo, "sc", **rebind_kwargs())
    assert b.system_identifier == NEW and b.created_by == "upgrade n1"
    (era,) = b.history
    assert (era.system_identifier, era.pg_major, era.upgraded_to_major) == (OLD, 17, 18)
    assert era.until == UPGRADED and era.until_lsn == END_LSN and era.until_timeline == 1
    assert [e["event"] for e in logs].count("repository_rebound") == 1
    doc = json.loads(await repo.get(binding_key("sc")))
    assert doc["format"] == 1 and doc["system_identifier"] == NEW
    assert doc["history"] == [
        {
            "system_identifier": OLD,
            "pg_major": 17,
            "until": iso(UPGRADED),
            "until_lsn": format_lsn(END_LSN),
            "upgraded_to_major": 18,
            "until_timeline": 1,
        }
    ]
    # again (a retried upgrade step): nothing written, the same binding
    again = await rebind_after_upgrade(repo, "sc", **rebind_kwargs(upgraded_at=UPGRADED.timestamp() + 60))
    assert again == b and [e["event"] for e in logs].count("repository_rebound") == 1
    # the new cluster's archiver binds without change; the old one is refused, saying why
    assert (await bind(repo, "sc", NEW, "archiver n2", 5.0)) == (b, False)
    with pytest.raises(BindingMismatch, match="was upgraded to PostgreSQL 18"):
        await bind(repo, "sc", OLD, "archiver n1", 6.0)


async def test_rebind_binds_an_unbound_repository_and_refuses_a_foreign_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = FilesystemRepository(tmp_path / "fresh", name="fresh")
    await fresh.initialize()
    b = await rebind_after_upgrade(fresh, "sc", **rebind_kwargs(old_timeline=4))
    assert b.system_identifier == NEW and b.history[0].until_timeline == 4
    assert await read_binding(fresh, "sc") == b

    foreign = FilesystemRepository(tmp_path / "foreign", name="foreign")
    await foreign.initialize()
    await bind(foreign, "sc", "6999", "repo create", 0.0)
    logs = capture_events(monkeypatch, binding_module)
    with pytest.raises(BindingMismatch, match="6999"):
        await rebind_after_upgrade(foreign, "sc", **rebind_kwargs())
    refused = [e for e in logs if e["event"] == "repository_rebind_refused"]
    assert refused and "neither" in str(refused[0]["reason"])
    assert (await read_binding(foreign, "sc")).system_identifier == "6999"  # type: ignore[union-attr]


async def test_rebind_all_reports_per_repository_and_goes_on(tmp_path: Path) -> None:
    a = FilesystemRepository(tmp_path / "a", name="a")
    f = FilesystemRepository(tmp_path / "f", name="f")
    for r in (a, f):
        await r.initialize()
    await bind(a, "sc", OLD, "repo create", 0.0)
    await bind(f, "sc", "6999", "repo create", 0.0)
    gone = FilesystemRepository(tmp_path / "missing", name="gone")  # never initialized: no root
    out = await rebind_all([f, gone, a], "sc", **rebind_kwargs())
    assert [o.repository for o in out] == ["f", "gone", "a"]
    assert [o.ok for o in out] == [False, False, True]
    assert "6999" in str(out[0].error) and out[1].error
    assert out[2].binding is not None and out[2].binding.system_identifier == NEW
    assert out[2].to_dict()["history"][0]["system_identifier"] == OLD


async def test_a_binding_of_the_first_format_is_read(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path, name="r")
    old_doc = {
        "format": 1,
        "scope": "sc",
        "system_identifier": OLD,
        "created_at": "2026-01-01T00:00:00Z",
        "created_by": "repo create",
    }
    await repo.put(binding_key("sc"), json.dumps(old_doc).encode())
    b = await read_binding(repo, "sc")
    assert b == Binding("sc", OLD, "2026-01-01T00:00:00Z", "repo create")
    assert b.history == () and "history" not in json.loads(b.to_json())
    assert (await load_catalog(repo, "sc")).lineage == Lineage(OLD, ())


@pytest.mark.parametrize(
    ("history", "complaint"),
    [
        ("nope", "history is not a list"),
        ([{"system_identifier": "x1"}], "entry 0: system_identifier 'x1'"),
        ([{"system_identifier": OLD, "until": "yesterday"}], "entry 0: until 'yesterday'"),
        ([{"system_identifier": OLD, "until": "2026-01-01T00:00:00"}], "with a zone"),
        (
            [{"system_identifier": OLD, "until": "2026-01-01T00:00:00Z", "until_lsn": "zz"}],
            "until_lsn 'zz' is not an LSN",
        ),
        (
            [{"system_identifier": OLD, "until": "2026-01-01T00:00:00Z", "pg_major": True}],
            "pg_major True",
        ),
        (
            [
                {
                    "system_identifier": OLD,
                    "until": "2026-01-01T00:00:00Z",
                    "pg_major": 18,
                    "upgraded_to_major": 17,
                }
            ],
            "not newer",
        ),
        ([{"system_identifier": NEW, "until": "2026-01-01T00:00:00Z"}], "cannot precede itself"),
        ([{"system_identifier": OLD, "until": "2026-01-01T00:00:00Z"}] * 2, "appears twice"),
        ([7], "entry 0 is not an object"),
    ],
)
async def test_garbage_history_is_refused_with_the_field(
    tmp_path: Path, history: object, complaint: str
) -> None:
    repo = FilesystemRepository(tmp_path, name="r")
    doc = {"format": 1, "scope": "sc", "system_identifier": NEW, "history": history}
    await repo.put(binding_key("sc"), json.dumps(doc).encode())
    with pytest.raises(CorruptObject) as ei:
        await read_binding(repo, "sc")
    assert complaint in str(ei.value) and "unreadable binding" in str(ei.value)
    cat = await load_catalog(repo, "sc")  # the catalog stays readable, the clusters unknown
    assert cat.lineage == Lineage() and cat.lineage_problem is not None and complaint in cat.lineage_problem


# ============================================================================ planning


def upgraded(*, history_file: bool = False, until_timeline: int | None = 1) -> Catalog:
    """Old cluster 7001 (PostgreSQL 17) on timeline 1: backups O1 (segment 2) and O2 (5), WAL
    2..8, upgraded at T0+2h (final checkpoint in segment 8).  New cluster 7002 (18) starts on
    timeline 2 at segment 9: backup N1 (segment 10) ended at T0+3h, WAL 9..12."""
    cat = Catalog("r")
    cat.records = [
        rec("O1", 1, 2 * SEG + 0x28, 2 * SEG + 0x100, T0, system_identifier=OLD, pg_version=170004),
        rec(
            "O2",
            1,
            5 * SEG + 0x28,
            5 * SEG + 0x100,
            T0 + dt.timedelta(minutes=30),
            system_identifier=OLD,
            pg_version=170004,
        ),
        rec(
            "N1",
            2,
            10 * SEG + 0x28,
            10 * SEG + 0x100,
            T0 + dt.timedelta(hours=3),
            system_identifier=NEW,
            pg_version=180001,
        ),
    ]
    wal(cat, [seg(1, i) for i in range(2, 9)], T0 + dt.timedelta(hours=1))
    wal(cat, [seg(2, i) for i in range(9, 13)], T0 + dt.timedelta(hours=4))
    if history_file:
        wal(cat, ["00000002.history"])
        cat.histories = {2: [layout.HistoryEntry(1, 9 * SEG, "upgraded")]}
    cat.lineage = Lineage(NEW, (ClusterEra(OLD, 17, UPGRADED, END_LSN, 18, until_timeline),))
    return cat


@pytest.mark.parametrize(("history_file", "until_timeline"), [(False, 1), (True, 1), (True, None)])
def test_latest_picks_the_new_clusters_backup_and_an_old_one_only_when_named(
    history_file: bool, until_timeline: int | None
) -> None:
    cat = upgraded(history_file=history_file, until_timeline=until_timeline)
    p = plan_restore(cat, Target("latest"))
    assert p.backup.id == "N1" and p.timeline == 2 and p.era is None
    # named: restored along the old cluster's timeline to its end, never into the new WAL
    p = plan_restore(cat, Target("latest"), backup_id="O2")
    assert p.timeline == 1 and p.era is not None and p.proven
    assert p.segments[-1] == seg(1, 8)
    assert any("PostgreSQL 17's binaries" in n and format_lsn(END_LSN) in n for n in p.notes)


def test_no_backup_of_the_new_cluster_yet_nothing_old_is_chosen_silently() -> None:
    cat = upgraded()
    cat.records = [r for r in cat.records if r.id != "N1"]
    with pytest.raises(RestoreRefused) as ei:
        plan_restore(cat, Target("latest"))
    assert "name it with --backup" in str(ei.value) and "upgraded to PostgreSQL 18" in str(ei.value)


def test_pitr_across_the_upgrade_is_refused_with_the_reason() -> None:
    cat = upgraded()
    after = UPGRADED + dt.timedelta(minutes=30)  # after the upgrade, before N1 ended
    with pytest.raises(RestoreRefused) as ei:
        plan_restore(cat, Target("time", time=after), backup_id="O2")
    msg = str(ei.value)
    assert "upgraded to PostgreSQL 18 at 2026" in msg and "across a major-version upgrade" in msg
    assert f"newest point of the old cluster that can be reached is its end, {iso(UPGRADED)}" in msg
    assert format_lsn(END_LSN) in msg and "backup of the new cluster instead" in msg
    with pytest.raises(RestoreRefused, match="across a major-version upgrade"):
        plan_restore(cat, Target("time", time=after))  # automatic: nothing fits, the reason is there
    with pytest.raises(RestoreRefused, match=f"target LSN {format_lsn(9 * SEG)} is after the upgrade"):
        plan_restore(cat, Target("lsn", lsn=9 * SEG), backup_id="O2")
    # the old cluster's own history stays restorable
    p = plan_restore(cat, Target("lsn", lsn=7 * SEG))
    assert p.backup.id == "O2" and p.timeline == 1 and p.proven
    p = plan_restore(cat, Target("time", time=UPGRADED - dt.timedelta(minutes=10)))
    assert p.backup.id == "O2" and p.timeline == 1 and p.proven  # its WAL is all there: nothing to wait for
    # after N1 ended: N1
    p = plan_restore(cat, Target("time", time=T0 + dt.timedelta(hours=3, minutes=30)))
    assert p.backup.id == "N1"


def test_an_explicit_new_timeline_is_refused_for_an_old_backup() -> None:
    cat = upgraded(history_file=True)
    with pytest.raises(RestoreRefused, match="timeline 2 is the new cluster's"):
        plan_restore(cat, Target("latest", timeline=2), backup_id="O1")


def test_drills_pick_the_new_clusters_backup() -> None:
    cat = upgraded()
    assert _pick_backup(cat, None, None).id == "N1"  # type: ignore[union-attr]
    assert _pick_backup(cat, None, T0 + dt.timedelta(hours=1)) is None  # only old ones end before
    assert _pick_backup(cat, "O1", None).id == "O1"  # type: ignore[union-attr]


def test_retention_counts_both_clusters_and_keeps_the_old_wal_its_backups_need() -> None:
    now = T0 + dt.timedelta(hours=5)
    cat = upgraded()
    plan = plan_expire(cat, "s", RetentionConfig(full_count=3), now)
    assert plan.backups == [] and set(plan.kept) == {"N1", "O2", "O1"}
    assert not [w for w in plan.wal if "00000001" in w.rpartition("/")[2][:8] and int(w[-8:], 16) >= 2]
    plan = plan_expire(cat, "s", RetentionConfig(full_count=2), now)
    assert [b.id for b in plan.backups] == ["O1"] and "number 3" in plan.backups[0].reason
    expired = {w.rpartition("/")[2] for w in plan.wal}
    assert expired == {seg(1, 2), seg(1, 3), seg(1, 4)}  # O2's WAL (5..8) and all of timeline 2 stay
    assert not plan.notes


# ============================================================================ backup list


def test_backup_list_shows_major_and_cluster(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "good", name="good")

    async def setup() -> None:
        await repo.initialize()
        await repo.ensure_marker()
        old = await _backup(repo)  # B1, system identifier 7001
        old.pg_version = 170004
        await repo.put(catalog.record_key(SCOPE, "B1"), old.to_json())
        await bind(repo, SCOPE, OLD, "repo create", 0.0)
        await rebind_after_upgrade(repo, SCOPE, **rebind_kwargs())
        new = old.model_copy(update={"id": "B2", "system_identifier": NEW, "pg_version": 180001})
        await repo.put(catalog.record_key(SCOPE, "B2"), new.to_json())

    asyncio.run(setup())
    conf = _node(tmp_path, {"good": repo.root})
    res = CliRunner().invoke(app, ["backup", "list", "-c", str(conf), "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert (rows["B1"]["pg_major"], rows["B1"]["cluster"]) == (17, "before upgrade to 18")
    assert (rows["B2"]["pg_major"], rows["B2"]["cluster"]) == (18, "current")
    assert rows["B1"]["pg_version"] == 170004 and rows["B1"]["timeline"] == 1  # old keys stay
    res = CliRunner().invoke(app, ["backup", "list", "-c", str(conf)], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "before upgrade to 18" in res.stdout and "Cluster" in res.stdout
