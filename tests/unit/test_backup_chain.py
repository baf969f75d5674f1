"""Chains of incremental backups: the parent of a new incremental (and when there is none: a
timeline switch, a re-bootstrap, another major, a broken chain), broken chains in restore
planning, and retention that keeps or removes whole chains."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from hakeeper.backup import layout
from hakeeper.backup.basebackup import BackupError, _check_chain_still_there
from hakeeper.backup.catalog import (
    BackupRecord,
    BrokenChain,
    Catalog,
    RestoreRefused,
    Target,
    load_catalog,
    object_key,
    plan_restore,
    record_key,
    required_segments,
)
from hakeeper.backup.chain import ancestors, chain_groups, chain_of, choose_parent
from hakeeper.backup.copy import CopyError, copy_item
from hakeeper.backup.info import summarize
from hakeeper.backup.repo import FilesystemRepository, ListEntry
from hakeeper.backup.retention import plan_expire
from hakeeper.backup.scan import scan_repository
from hakeeper.core.backup_config import RetentionConfig
from hakeeper.core.lsn import format_lsn

SEG = layout.DEFAULT_SEGMENT_SIZE
T0 = dt.datetime(2026, 11, 24, 7, 0, tzinfo=dt.UTC)
SYSID = "7300000000000000001"
MANIFEST = {"name": "backup_manifest", "size": 10, "stored_size": 10, "sha256": "0" * 64}
PARTS = [{**MANIFEST, "name": "base.tar.00000"}]


def rec(
    bid: str,
    n: int,
    parent: str | None = None,
    root: str | None = None,
    *,
    tli: int = 1,
    status: str = "complete",
    **kw: object,
) -> BackupRecord:
    """Backup number ``n``: starts in segment 2n, ends n hours after T0."""
    t = T0 + dt.timedelta(hours=n)
    return BackupRecord.model_validate(
        {
            "id": bid,
            "label": bid,
            "status": status,
            "scope": "s",
            "repository": "r",
            "kind": "incremental" if parent else "full",
            "parent": parent,
            "chain_root": root,
            "timeline": tli,
            "stop_timeline": tli,
            "start_lsn": format_lsn(2 * n * SEG + 0x28),
            "stop_lsn": format_lsn(2 * n * SEG + 0x100),
            "start_time": t - dt.timedelta(minutes=1),
            "stop_time": t,
            "updated_at": t,
            "system_identifier": SYSID,
            "pg_version": 170010,
            "manifest": MANIFEST,
            **kw,
        }
    )


def chain_abc() -> list[BackupRecord]:
    return [rec("A", 1), rec("B", 2, "A", "A"), rec("C", 3, "B", "A")]


def test_old_records_read_as_full() -> None:
    old = BackupRecord.model_validate_json(
        '{"id": "X", "label": "x", "status": "complete", "scope": "s", "repository": "r",'
        ' "start_time": "2026-11-24T07:00:00Z", "updated_at": "2026-11-24T07:00:00Z"}'
    )
    assert (old.kind, old.parent, old.root) == ("full", None, "X")
    s = old.summary()
    assert (s["type"], s["parent"], s["chain"]) == ("full", None, "X")


def test_parent_is_the_newest_complete_backup() -> None:
    recs = chain_abc()
    got = choose_parent(recs, system_identifier=SYSID, timeline=1, version_num=170010)
    assert got.parent is not None and got.parent.id == "C" and got.chain_root == "A" and got.reason is None
    # a failed newer backup is not a parent; the newest complete one is
    recs.append(rec("D", 4, "C", "A", status="failed"))
    assert choose_parent(recs, system_identifier=SYSID, timeline=1, version_num=170010).parent.id == "C"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"timeline": 2}, "never crosses a timeline switch"),
        ({"system_identifier": "7399999999999999999"}, "never spans two clusters"),
        ({"version_num": 180001}, "PostgreSQL 17, the server runs 18"),
    ],
)
def test_no_parent_across_timeline_sysid_or_major(kw: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"system_identifier": SYSID, "timeline": 1, "version_num": 170010, **kw}
    got = choose_parent(chain_abc(), **args)  # type: ignore[arg-type]
    assert got.parent is None and got.reason is not None and reason in got.reason


def test_no_parent_without_backups_manifest_or_with_a_broken_chain() -> None:
    assert "no complete backup" in str(
        choose_parent([], system_identifier=SYSID, timeline=1, version_num=170010).reason
    )
    no_manifest = [rec("A", 1, manifest=None)]
    got = choose_parent(no_manifest, system_identifier=SYSID, timeline=1, version_num=170010)
    assert got.parent is None and "no stored backup_manifest" in str(got.reason)
    broken = [rec("A", 1, status="failed"), rec("B", 2, "A", "A")]
    got = choose_parent(broken, system_identifier=SYSID, timeline=1, version_num=170010)
    assert got.parent is None and "broken" in str(got.reason) and "A" in str(got.reason)


def test_chain_of_and_groups() -> None:
    recs = [*chain_abc(), rec("D", 4), rec("E", 5, "D", "D")]
    by_id = {r.id: r for r in recs}
    assert [r.id for r in chain_of(by_id["C"], by_id)] == ["A", "B", "C"]
    assert [r.id for r in chain_of(by_id["A"], by_id)] == ["A"]
    assert ancestors(by_id["C"], by_id) == ["B", "A"]
    assert {k: [r.id for r in v] for k, v in chain_groups(recs).items()} == {
        "A": ["A", "B", "C"],
        "D": ["D", "E"],
    }
    del by_id["B"]
    with pytest.raises(BrokenChain, match=r"its link B .* is missing"):
        chain_of(by_id["C"], by_id)


def _catalog(recs: list[BackupRecord]) -> Catalog:
    cat = Catalog("r")
    cat.records = recs
    cat.objects = {r.id: [ListEntry(f"s/backup/{r.id}/backup.json", 1, T0)] for r in recs}
    for seg in range(0, 24):
        name = layout.segment_name(1, seg)
        cat.wal[name] = ListEntry(f"s/wal/{name}", 1, T0 + dt.timedelta(hours=seg))
    return cat


def test_restore_plans_skip_a_broken_chain() -> None:
    recs = chain_abc()
    recs[1] = rec("B", 2, "A", "A", status="failed")
    cat = _catalog(recs)
    with pytest.raises(RestoreRefused, match="chain of backup C is broken"):
        plan_restore(cat, Target("latest"), backup_id="C")
    # automatic choice: the newest restorable backup instead
    assert plan_restore(cat, Target("latest")).backup.id == "A"


def test_expire_keeps_and_removes_whole_chains() -> None:
    # chain A (A, B, C), chain D (D, E), chain F (F)
    recs = [*chain_abc(), rec("D", 4), rec("E", 5, "D", "D"), rec("F", 6)]
    now = T0 + dt.timedelta(hours=7)
    p = plan_expire(_catalog(recs), "s", RetentionConfig(full_count=2), now)
    assert sorted(b.id for b in p.backups) == ["A", "B", "C"]  # the oldest chain, whole
    assert p.kept == ["F", "E", "D"]
    assert "chain A not among the newest 2 full backups" in p.backups[1].reason
    # the WAL before the oldest kept chain's full backup goes, not the WAL its incremental needs
    assert [n.rsplit("/", 1)[1] for n in p.wal] == [layout.segment_name(1, s) for s in range(8)]
    # one full backup: only the newest chain
    p = plan_expire(_catalog(recs), "s", RetentionConfig(full_count=1), now)
    assert p.kept == ["F"]
    # a window that reaches into chain D's incremental keeps D whole (its parent too)
    p = plan_expire(
        _catalog(recs),
        "s",
        RetentionConfig(full_days=(now - (T0 + dt.timedelta(hours=4.5))).total_seconds() / 86400),
        now,
    )
    assert sorted(p.kept) == ["D", "E", "F"]


def test_expire_removes_broken_incrementals_and_protects_a_running_ones_chain() -> None:
    recs = [rec("A", 1), rec("B", 2, "A", "A"), rec("X", 3, "GONE", "GONE"), rec("F", 4)]
    now = T0 + dt.timedelta(hours=5)
    p = plan_expire(_catalog(recs), "s", RetentionConfig(full_count=1), now)
    reasons = {b.id: b.reason for b in p.backups}
    assert set(reasons) == {"A", "B", "X"} and "GONE" in reasons["X"] and "is missing" in reasons["X"]
    # an incremental against B still running: chain A is kept whole
    running = rec("R", 5, "B", "A", status="running", updated_at=now)
    p = plan_expire(_catalog([*recs, running]), "s", RetentionConfig(full_count=1), now)
    assert {b.id for b in p.backups} == {"X"} and p.running == ["R"]
    assert sorted(p.kept) == ["A", "B", "F"]


def test_expire_never_removes_a_chain_whose_missing_link_may_be_an_unreadable_record() -> None:
    """A full's record could not be read (a transient error, a damaged file): its incrementals
    look broken, but the missing link may be that record -- nothing of them is removed."""
    recs = [rec("B", 2, "A", "A"), rec("C", 3, "B", "A"), rec("F", 4)]
    now = T0 + dt.timedelta(hours=5)
    cat = _catalog(recs)
    cat.problems.append("r: backup A: unreadable backup.json: ...")
    for retention in (RetentionConfig(full_count=1), RetentionConfig()):
        p = plan_expire(cat, "s", retention, now)
        assert p.backups == [] and sorted(p.kept) == ["B", "C", "F"], retention
    # once the catalog reads cleanly, the broken chain goes as before
    p = plan_expire(_catalog(recs), "s", RetentionConfig(full_count=1), now)
    assert {b.id for b in p.backups} == {"B", "C"}


def test_expire_follows_the_parents_not_a_records_chain_root() -> None:
    """C, the newest, claims chain_root F (a tampered or buggy record) but its parents lead to A:
    keeping C keeps A and B (read as F's chain, they were removed and C left unrestorable)."""
    recs = [rec("A", 1), rec("B", 2, "A", "A"), rec("F", 3), rec("C", 4, "B", "F")]
    p = plan_expire(_catalog(recs), "s", RetentionConfig(full_count=1), T0 + dt.timedelta(hours=5))
    assert p.backups == [] and sorted(p.kept) == ["A", "B", "C", "F"]


# ============================================================================ backup copy


async def _stock(repo: FilesystemRepository, recs: list[BackupRecord]) -> None:
    for r in recs:
        for name in ("base.tar.00000", "backup_manifest"):
            await repo.put(object_key("s", r.id, name), f"{r.id} {name}".encode())
        assert r.timeline is not None
        for seg in required_segments(r.start_lsn_int, r.stop_lsn_int, r.timeline, []):
            await repo.put(layout.wal_key("s", seg), seg.encode())
        await repo.put(record_key("s", r.id), r.to_json())


def test_copy_of_an_incremental_copies_its_chain_parents_first(tmp_path: Path) -> None:
    recs = [rec("A", 1, parts=PARTS), rec("B", 2, "A", "A", parts=PARTS), rec("C", 3, "B", "A", parts=PARTS)]

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()

    async def go() -> None:
        src = FilesystemRepository(tmp_path / "src", name="src")
        dst = FilesystemRepository(tmp_path / "dst", name="dst")
        await _stock(src, recs)
        res = await copy_item(src, dst, "s", "B")
        assert "chain copied parents first: A -> B" in res.notes and res.objects == 4
        got = await load_catalog(dst, "s")
        assert [r.id for r in got.records] == ["A", "B"] and all(r.repository == "dst" for r in got.records)
        assert (await dst.get(object_key("s", "A", "base.tar.00000"))) == b"A base.tar.00000"
        # again, one link further: A and B are there already
        res = await copy_item(src, dst, "s", "C")
        assert res.objects == 2 and not res.already_there
        # a broken chain is refused before anything is copied
        broken = rec("E", 5, "D", "D", parts=PARTS)
        await _stock(src, [rec("D", 4, status="failed", parts=PARTS), broken])
        with pytest.raises(CopyError, match="chain of backup E is broken"):
            await copy_item(src, dst, "s", "E")
        assert (await load_catalog(dst, "s")).get("E") is None

    asyncio.run(go())


# ============================================================================ repo info / repo verify


def test_repo_info_and_scan_report_a_broken_chain(tmp_path: Path) -> None:
    recs = [rec("A", 1, parts=PARTS), rec("B", 2, "A", "A", parts=PARTS), rec("C", 3, parts=PARTS)]
    (tmp_path / "r").mkdir()

    async def go() -> None:
        repo = FilesystemRepository(tmp_path / "r", name="r")
        await _stock(repo, recs)
        cat = await load_catalog(repo, "s")
        info = summarize("r", "s", await repo.list_objects("s/"), cat)
        assert (info.chains, info.problems) == (2, [])
        assert info.to_dict()["newest_backup"]["type"] == "full"
        # (the stocked objects are not what the records' checksums say: only chains matter here)
        assert [p for p in (await scan_repository(repo, "s")).problems if p.kind == "broken-chain"] == []
        # the full backup of B's chain disappears: B cannot be restored, both say so
        for e in await repo.list_objects("s/backup/A/"):
            await repo.delete(e.name)
        cat = await load_catalog(repo, "s")
        info = summarize("r", "s", await repo.list_objects("s/"), cat)
        assert any("chain of backup B is broken" in p for p in info.problems), info.problems
        scan = await scan_repository(repo, "s")
        broken = [(p.kind, p.object) for p in scan.problems if p.kind == "broken-chain"]
        assert broken == [("broken-chain", record_key("s", "B"))]

    asyncio.run(go())


def test_a_killed_chain_restore_leaves_nothing_the_next_one_keeps(tmp_path: Path) -> None:
    from hakeeper.backup.restore import _remove_stale_stages, chain_stage_path

    mine = chain_stage_path(tmp_path / "data")  # this process: alive
    dead = tmp_path / ".data.hakeeper-chain-999999999"  # no such pid
    other = tmp_path / "data2"
    for d in (mine, dead, other):
        d.mkdir()
    _remove_stale_stages(tmp_path)
    assert (mine.exists(), dead.exists(), other.exists()) == (True, False, True)


def test_an_incremental_whose_chain_was_expired_meanwhile_is_not_completed(tmp_path: Path) -> None:
    """The parent is chosen before the new backup's record exists: an expire in between may
    remove the chain.  The check before `complete` names the lost link."""
    (tmp_path / "r").mkdir()

    async def go() -> None:
        repo = FilesystemRepository(tmp_path / "r", name="r")
        await _stock(repo, [rec("A", 1), rec("B", 2, "A", "A")])
        new = rec("C", 3, "B", "A", status="running")
        await _check_chain_still_there(repo, "s", new)  # whole: no error
        await repo.delete(record_key("s", "A"))
        with pytest.raises(BackupError, match="lost backup A"):
            await _check_chain_still_there(repo, "s", new)
        await _stock(repo, [rec("A", 1, status="failed")])
        with pytest.raises(BackupError, match="backup A of this incremental's chain is failed"):
            await _check_chain_still_there(repo, "s", new)

    asyncio.run(go())
