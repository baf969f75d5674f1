"""Pure parts of base backups and restore: tar scanning, label/manifest parsing, restore
planning (backup choice, timelines, WAL coverage), retention, and the restore CLI's target parsing."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from hakeeper.backup import layout
from hakeeper.backup.basebackup import TarFormatError, TarScanner
from hakeeper.backup.catalog import (
    BackupRecord,
    Catalog,
    RestoreRefused,
    Target,
    backup_id_time,
    make_backup_id,
    manifest_wal_ranges,
    parse_backup_label,
    plan_restore,
    record_key,
    required_segments,
)
from hakeeper.backup.repo import ListEntry
from hakeeper.backup.retention import keep_set, plan_expire
from hakeeper.cli.backup_cmds import UsageError, _wal_ranges, build_target, parse_target_time
from hakeeper.core.backup_config import RepositoryConfig, RetentionConfig
from hakeeper.core.lsn import format_lsn

SEG = layout.DEFAULT_SEGMENT_SIZE
T0 = dt.datetime(2026, 11, 24, 7, 0, tzinfo=dt.UTC)
LABEL = (
    "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2000060\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: standby\n"
    "START TIME: 2026-11-24 07:06:18 UTC\n"
    "LABEL: hakeeper x\n"
    "START TIMELINE: 3\n"
)


# ============================================================================ tar scanning


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("seed", range(8))
def test_tar_scanner_captures_label_and_manifest_in_any_chunking(seed: int) -> None:
    rnd = random.Random(seed)
    manifest = json.dumps({"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]})
    members = [
        ("backup_label", LABEL.encode()),
        ("tablespace_map", b""),
        ("base/", b""),
        ("base/1/1234", rnd.randbytes(rnd.randrange(0, 5000))),
        ("base/1/" + "x" * 90, rnd.randbytes(513)),
        ("global/pg_control", rnd.randbytes(8192)),
        ("backup_manifest", manifest.encode()),
    ]
    blob = _tar(members)
    sc = TarScanner()
    i = 0
    while i < len(blob):
        step = rnd.choice([1, 7, 511, 512, 513, 4096, 100_000])
        sc.feed(blob[i : i + step])
        i += step
    assert sc.ended
    assert sc.files["backup_label"] == LABEL.encode()
    assert sc.files["backup_manifest"] == manifest.encode()
    assert sc.files["tablespace_map"] == b""
    assert sc.regular_files == 6
    assert sc.members[-2:] == ["global/pg_control", "backup_manifest"]
    assert sc.between_members


def test_tar_scanner_rejects_garbage() -> None:
    blob = bytearray(_tar([("backup_label", b"abc")]))
    blob[10] ^= 0xFF  # inside the first header's name: checksum mismatch
    with pytest.raises(TarFormatError, match="checksum"):
        TarScanner().feed(bytes(blob))
    with pytest.raises(TarFormatError):
        TarScanner().feed(b"not a tar stream".ljust(512, b"x"))


def test_tar_scanner_not_ended_when_truncated() -> None:
    blob = _tar([("backup_label", b"abc"), ("global/pg_control", b"x" * 9000)])
    sc = TarScanner()
    sc.feed(blob[:2000])
    assert not sc.ended and not sc.between_members


# ============================================================================ label, manifest, ids


def test_parse_backup_label() -> None:
    lab = parse_backup_label(LABEL)
    assert lab.start_lsn == 0x2000028 and lab.checkpoint_lsn == 0x2000060
    assert lab.start_timeline == 3 and lab.from_standby and lab.label == "hakeeper x"
    with pytest.raises(ValueError):
        parse_backup_label("LABEL: nothing else\n")


def test_manifest_wal_ranges() -> None:
    doc = {
        "WAL-Ranges": [
            {"Timeline": 2, "Start-LSN": "0/5000000", "End-LSN": "0/6000100"},
            {"Timeline": 1, "Start-LSN": "0/4000028", "End-LSN": "0/5000000"},
        ]
    }
    r = manifest_wal_ranges(doc)
    assert [(w.timeline, w.start_lsn, w.end_lsn) for w in r] == [
        (1, 0x4000028, 0x5000000),
        (2, 0x5000000, 0x6000100),
    ]
    with pytest.raises(ValueError):
        manifest_wal_ranges({})


def test_required_segments_exclusive_stop() -> None:
    # a stop exactly on a segment boundary needs nothing of the next segment
    assert required_segments(0x2000028, 0x3000000, 1, []) == ["000000010000000000000002"]
    assert required_segments(0x2000028, 0x3000001, 1, []) == [
        "000000010000000000000002",
        "000000010000000000000003",
    ]
    # across a switch, the segment of the switch is read from the new timeline
    hist = [layout.HistoryEntry(1, 0x3000100, "")]
    assert required_segments(0x2000028, 0x4000100, 2, hist) == [
        "000000010000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
    ]


def test_backup_ids_sort_by_time() -> None:
    a = make_backup_id(T0)
    b = make_backup_id(T0 + dt.timedelta(seconds=1))
    assert a == "20261124T070000Z" and a < b
    assert backup_id_time(a) == T0
    assert backup_id_time("nonsense") is None


# ============================================================================ restore planning


def rec(
    bid: str,
    tli: int,
    start: int,
    stop: int,
    stop_time: dt.datetime,
    status: str = "complete",
    **kw: object,
) -> BackupRecord:
    return BackupRecord.model_validate(
        {
            "id": bid,
            "label": bid,
            "status": status,
            "scope": "s",
            "repository": "r",
            "timeline": tli,
            "stop_timeline": kw.pop("stop_timeline", tli),
            "start_lsn": format_lsn(start),
            "stop_lsn": format_lsn(stop),
            "start_time": stop_time - dt.timedelta(minutes=1),
            "stop_time": stop_time,
            "updated_at": stop_time,
            **kw,
        }
    )


def seg(tli: int, segno: int) -> str:
    return layout.segment_name(tli, segno)


def wal(cat: Catalog, names: list[str], modified: dt.datetime = T0) -> None:
    for n in names:
        cat.wal[n] = ListEntry(layout.wal_key("s", n), 100, modified)


def linear() -> Catalog:
    """Timeline 1 only: backups A (segment 2) and B (segment 5); WAL 2..8 archived at T0+1h."""
    cat = Catalog("r")
    cat.records = [
        rec("A", 1, 2 * SEG + 0x28, 2 * SEG + 0x100, T0),
        rec("B", 1, 5 * SEG + 0x28, 5 * SEG + 0x100, T0 + dt.timedelta(minutes=30)),
        rec("F", 1, 6 * SEG, 6 * SEG, T0 + dt.timedelta(minutes=40), status="failed"),
    ]
    wal(cat, [seg(1, i) for i in range(2, 9)], T0 + dt.timedelta(hours=1))
    return cat


def test_plan_time_picks_newest_backup_that_ended_before() -> None:
    cat = linear()
    p = plan_restore(cat, Target("time", time=T0 + dt.timedelta(minutes=10)))
    assert p.backup.id == "A" and p.timeline == 1 and p.proven
    p = plan_restore(cat, Target("time", time=T0 + dt.timedelta(minutes=45)))
    assert p.backup.id == "B" and p.proven
    with pytest.raises(RestoreRefused, match="no backup can reach"):
        plan_restore(cat, Target("time", time=T0 - dt.timedelta(minutes=1)))
    with pytest.raises(RestoreRefused, match="after the target time"):
        plan_restore(cat, Target("time", time=T0 + dt.timedelta(minutes=10)), backup_id="B")
    with pytest.raises(RestoreRefused, match="failed"):
        plan_restore(cat, Target("latest"), backup_id="F")


def test_plan_time_not_proven_when_archive_is_older_than_target() -> None:
    cat = linear()
    p = plan_restore(cat, Target("time", time=T0 + dt.timedelta(hours=2)))
    assert p.backup.id == "B" and not p.proven
    assert p.missing and "no WAL written after" in p.missing


def test_plan_lsn_and_coverage() -> None:
    cat = linear()
    p = plan_restore(cat, Target("lsn", lsn=4 * SEG + 5))
    assert p.backup.id == "A" and p.proven
    assert p.segments == [seg(1, i) for i in range(2, 5)]
    p = plan_restore(cat, Target("lsn", lsn=8 * SEG + 5))
    assert p.backup.id == "B" and p.proven
    p = plan_restore(cat, Target("lsn", lsn=9 * SEG + 5))  # not archived yet: a switch may help
    assert not p.proven and p.missing and seg(1, 9) in p.missing
    with pytest.raises(RestoreRefused, match="after the target LSN"):
        plan_restore(cat, Target("lsn", lsn=3 * SEG), backup_id="B")


def test_plan_refuses_missing_backup_wal_and_gaps() -> None:
    cat = linear()
    del cat.wal[seg(1, 5)]
    p = plan_restore(cat, Target("lsn", lsn=4 * SEG))  # A still fine
    assert p.backup.id == "A"
    with pytest.raises(RestoreRefused, match="000000010000000000000005"):
        plan_restore(cat, Target("latest"), backup_id="B")
    # latest from A would stop silently at the gap: refused
    with pytest.raises(RestoreRefused, match="gap"):
        plan_restore(cat, Target("latest"), backup_id="A")
    # an LSN beyond the gap: refused, not "switch and wait"
    with pytest.raises(RestoreRefused, match="000000010000000000000005"):
        plan_restore(cat, Target("lsn", lsn=7 * SEG), backup_id="A")


def forked() -> Catalog:
    """Timeline 2 forked off 1 at 0/5800000.  Backup A on 1 before the fork, C on the abandoned
    part of 1 (after the fork), D on 2."""
    x = 5 * SEG + SEG // 2
    cat = Catalog("r")
    cat.records = [
        rec("A", 1, 2 * SEG + 0x28, 2 * SEG + 0x100, T0),
        rec("C", 1, 7 * SEG + 0x28, 7 * SEG + 0x100, T0 + dt.timedelta(minutes=50)),
        rec("D", 2, 6 * SEG + 0x28, 6 * SEG + 0x100, T0 + dt.timedelta(minutes=40)),
    ]
    wal(cat, [seg(1, i) for i in range(2, 9)] + [f"{seg(1, 5)}.partial"])
    wal(cat, [seg(2, i) for i in range(5, 10)] + ["00000002.history"])
    cat.histories = {2: [layout.HistoryEntry(1, x, "no recovery target specified")]}
    return cat


def test_plan_lsn_across_the_switch_and_preference_for_the_newest_timeline() -> None:
    cat = forked()
    p = plan_restore(cat, Target("lsn", lsn=6 * SEG))
    assert p.backup.id == "A" and p.timeline == 2
    assert p.segments == [seg(1, 2), seg(1, 3), seg(1, 4), seg(2, 5), seg(2, 6)]
    # latest: C is newer but on the abandoned branch; D (timeline 2) is preferred
    p = plan_restore(cat, Target("latest"))
    assert p.backup.id == "D" and p.timeline == 2 and not p.proven
    # explicitly C: its own timeline (1) is the newest containing it, with a note-free plan
    p = plan_restore(cat, Target("latest"), backup_id="C")
    assert p.timeline == 1


def test_plan_refuses_abandoned_targets_and_backups_off_the_history() -> None:
    cat = forked()
    with pytest.raises(RestoreRefused, match="abandoned at 0/5800000") as e:
        plan_restore(cat, Target("lsn", lsn=7 * SEG, timeline=1))
    assert "timeline 2" in str(e.value)
    p = plan_restore(cat, Target("lsn", lsn=4 * SEG, timeline=1))  # before the fork: fine
    assert p.backup.id == "A" and p.timeline == 1
    with pytest.raises(RestoreRefused, match="not on timeline 2") as e2:
        plan_restore(cat, Target("latest", timeline=2), backup_id="C")
    assert "left timeline 1 at 0/5800000" in str(e2.value)
    with pytest.raises(RestoreRefused, match=r"00000003\.history"):
        plan_restore(cat, Target("latest", timeline=3))
    with pytest.raises(RestoreRefused, match="not in the history of timeline 1"):
        plan_restore(cat, Target("latest", timeline=1), backup_id="D")


def test_plan_missing_history_file() -> None:
    cat = forked()
    cat.histories = {}
    del cat.wal["00000002.history"]
    p = plan_restore(cat, Target("latest"), backup_id="A")
    assert p.timeline == 1  # timeline 2 cannot be followed without its history
    with pytest.raises(RestoreRefused, match="no archived timeline contains it"):
        plan_restore(cat, Target("latest"), backup_id="D")


# ============================================================================ retention


def test_keep_set_rules() -> None:
    done = [
        rec(f"B{i}", 1, i * SEG, i * SEG + 1, T0 - dt.timedelta(days=i)) for i in range(6)
    ]  # newest first
    none = RetentionConfig()
    assert keep_set(done, none, T0)[0] == {b.id for b in done}
    keep, why = keep_set(done, RetentionConfig(full_count=2), T0)
    assert keep == {"B0", "B1"} and set(why) == {"B2", "B3", "B4", "B5"}
    # 2.5 days: B0..B2 inside, plus B3 (the newest older one) to cover the window's start
    keep, _ = keep_set(done, RetentionConfig(full_days=2.5), T0)
    assert keep == {"B0", "B1", "B2", "B3"}
    keep, _ = keep_set(done, RetentionConfig(full_count=5, full_days=0.5), T0)
    assert keep == {"B0", "B1", "B2", "B3", "B4"}
    # never nothing: the newest stays even when every backup is older than the window
    keep, _ = keep_set(done[3:], RetentionConfig(full_days=1), T0)
    assert keep == {"B3"}
    assert keep_set([], RetentionConfig(full_count=1), T0) == (set(), {})


def test_plan_expire_backups_and_wal() -> None:
    now = T0 + dt.timedelta(hours=1)
    cat = Catalog("r")
    cat.records = [
        rec("A", 1, 2 * SEG + 0x28, 2 * SEG + 0x100, T0),
        rec("B", 1, 5 * SEG + 0x28, 5 * SEG + 0x100, T0 + dt.timedelta(minutes=30)),
        rec("F", 1, 6 * SEG, 6 * SEG, T0, status="failed", error="boom"),
        rec("R", 1, 6 * SEG, 6 * SEG, now - dt.timedelta(minutes=1), status="running"),
        rec("Z", 1, 6 * SEG, 6 * SEG, now - dt.timedelta(hours=1), status="running"),
    ]
    for r in cat.records:
        cat.objects[r.id] = [
            ListEntry(record_key("s", r.id), 10, T0),
            ListEntry(f"s/backup/{r.id}/base.tar.00000", 1000, T0),
        ]
    cat.orphans = {"O": [ListEntry("s/backup/O/base.tar.00000", 5, T0 - dt.timedelta(minutes=1))]}
    cat.objects["O"] = cat.orphans["O"]
    wal(cat, [seg(1, i) for i in range(1, 8)] + ["00000001.history", f"{seg(1, 3)}.00000028.backup"])
    plan = plan_expire(cat, "s", RetentionConfig(full_count=1), now)
    gone = {b.id: b for b in plan.backups}
    assert set(gone) == {"A", "F", "Z", "O"}
    assert gone["A"].objects[0] == record_key("s", "A")  # the record goes first
    assert "failed: boom" in gone["F"].reason and "abandoned" in gone["Z"].reason
    assert plan.kept == ["B"] and plan.running == ["R"]
    # WAL before B's start segment (5) goes; the running backup starts later; history stays
    assert plan.wal == [
        f"s/wal/{n}"
        for n in sorted([seg(1, 1), seg(1, 2), seg(1, 3), f"{seg(1, 3)}.00000028.backup", seg(1, 4)])
    ]
    # an orphan younger than an hour may be a backup writing its first objects: left alone
    young = plan_expire(cat, "s", RetentionConfig(full_count=1), T0 + dt.timedelta(minutes=30))
    assert "O" not in {b.id for b in young.backups} and any("O:" in n for n in young.notes)
    # no retention rule: complete backups stay, WAL before the oldest (A) goes
    plan = plan_expire(cat, "s", RetentionConfig(), now)
    assert {b.id for b in plan.backups} == {"F", "Z", "O"}
    assert plan.wal == [f"s/wal/{seg(1, 1)}"]


def test_plan_expire_keeps_wal_without_a_complete_backup_or_with_unreadable_records() -> None:
    cat = Catalog("r")
    wal(cat, [seg(1, 1), seg(1, 2)])
    plan = plan_expire(cat, "s", RetentionConfig(full_count=1), T0)
    assert plan.wal == [] and plan.backups == []
    cat.records = [rec("A", 1, 2 * SEG, 2 * SEG + 1, T0)]
    cat.problems = ["r: backup X: unreadable backup.json"]
    plan = plan_expire(cat, "s", RetentionConfig(full_count=1), T0)
    assert plan.wal == [] and any("unreadable" in n for n in plan.notes)


def test_plan_expire_multi_timeline_boundary() -> None:
    """WAL of a newer timeline, or of an older one past the kept backup's start, stays."""
    cat = Catalog("r")
    cat.records = [rec("D", 2, 6 * SEG + 0x28, 6 * SEG + 0x100, T0)]
    wal(cat, [seg(1, i) for i in range(2, 9)] + [seg(2, i) for i in range(5, 9)])
    plan = plan_expire(cat, "s", RetentionConfig(full_count=1), T0)
    assert plan.wal == [f"s/wal/{n}" for n in [seg(1, 2), seg(1, 3), seg(1, 4), seg(1, 5), seg(2, 5)]]


def test_plan_expire_wal_window() -> None:
    """wal_days: all WAL from the newest backup that ended before the window on; of older kept
    backups only their own start..stop range; without such an older backup, nothing changes."""
    days = dt.timedelta(days=1)

    def b(bid: str, first: int, last: int, age_days: float) -> BackupRecord:
        return rec(bid, 1, first * SEG + 0x28, last * SEG + 0x100, T0 - age_days * days,
                   wal_start=seg(1, first), wal_stop=seg(1, last))  # fmt: skip

    cat = Catalog("r")
    cat.records = [b("W0", 2, 3, 30), b("W1", 10, 11, 20), b("W2", 20, 20, 9), b("W3", 30, 31, 2)]
    wal(cat, [seg(1, i) for i in range(1, 36)] + ["00000001.history"])
    plan = plan_expire(cat, "s", RetentionConfig(full_days=90, wal_days=7), T0)
    assert plan.backups == [] and plan.kept == ["W3", "W2", "W1", "W0"]
    # W2 ended 9 days ago, before the 7-day window: everything from its start (20) stays;
    # W1 and W0 keep 10-11 and 2-3; the rest before 20 goes
    kept_wal = sorted(set(range(1, 36)) - {int(n[-8:], 16) for n in plan.wal})
    assert kept_wal == [2, 3, 10, 11, *range(20, 36)]
    assert any("recovery window" in n for n in plan.notes)
    # a window older than every backup: as without wal_days (everything from the oldest on)
    wide = plan_expire(cat, "s", RetentionConfig(full_days=90, wal_days=60), T0)
    assert wide.wal == [f"s/wal/{seg(1, 1)}"]
    # an old kept backup without its WAL range recorded: all WAL from it on is kept
    cat.records[0] = rec("W0", 1, 2 * SEG + 0x28, 3 * SEG + 0x100, T0 - 30 * days)
    unknown = plan_expire(cat, "s", RetentionConfig(full_days=90, wal_days=7), T0)
    assert unknown.wal == [f"s/wal/{seg(1, 1)}"]


def test_retention_config() -> None:
    cfg = RepositoryConfig.model_validate(
        {"name": "a", "type": "fs", "path": "/x", "retention": {"full_count": 3, "full_days": 7}}
    )
    assert cfg.retention.full_count == 3 and cfg.retention.full_days == 7
    with pytest.raises(ValueError):
        RetentionConfig(full_count=0)
    with pytest.raises(ValueError):
        RetentionConfig.model_validate({"full_cnt": 1})


# ============================================================================ CLI parsing


def test_parse_target_time_zones() -> None:
    assert parse_target_time("2026-11-24T07:15:00Z") == dt.datetime(2026, 11, 24, 7, 15, tzinfo=dt.UTC)
    assert parse_target_time("2026-11-24 08:15:00+01:00") == dt.datetime(2026, 11, 24, 7, 15, tzinfo=dt.UTC)
    bare = parse_target_time("2026-11-24T07:15:00")  # local time
    assert bare == dt.datetime(2026, 11, 24, 7, 15).astimezone().astimezone(dt.UTC)
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_target_time("yesterday")


def test_build_target() -> None:
    t = build_target(None, "0/3000148", None, None, False, True, "latest")
    assert t.kind == "lsn" and t.lsn == 0x3000148 and not t.inclusive and t.timeline == "latest"
    assert build_target(None, None, 1234, None, False, False, "2").timeline == 2
    assert build_target(None, None, None, "rp", False, False, "current").timeline == "current"
    assert build_target(None, None, None, None, True, False, "latest").kind == "latest"
    for args in [
        (None, None, None, None, False),
        ("2026-01-01T00:00Z", None, None, None, True),
    ]:
        with pytest.raises(UsageError, match="exactly one"):
            build_target(*args, False, "latest")
    with pytest.raises(UsageError, match="not an LSN"):
        build_target(None, "3000148", None, None, False, False, "latest")
    with pytest.raises(UsageError, match="timeline"):
        build_target(None, None, None, None, True, False, "newest")
    with pytest.raises(UsageError, match="xid"):
        build_target(None, None, 2, None, False, False, "latest")


def test_wal_ranges_compact_listing() -> None:
    names = [f"s/wal/{seg(1, i)}" for i in (1, 2, 3, 5)] + [
        f"s/wal/{seg(2, 6)}",
        f"s/wal/{seg(1, 3)}.partial",
    ]
    assert _wal_ranges(names) == [
        f"{seg(1, 1)} .. {seg(1, 3)} (3 files)",
        seg(1, 5),
        seg(2, 6),
        f"{seg(1, 3)}.partial",
    ]


# ---------------------------------------------------------------------------------- recovery settings


@pytest.mark.parametrize(
    ("kind", "start", "action"),
    [
        ("time", True, "pause"),  # hakeeper watches the server: pause, then a fast promotion
        ("name", True, "pause"),
        ("time", False, "promote"),  # the user starts it: it must promote by itself
        ("latest", True, "promote"),  # no target to pause at
    ],
)
def test_recovery_target_action(kind: str, start: bool, action: str) -> None:
    from hakeeper.backup.catalog import BackupRecord, BackupStatus, RestorePlan, Target
    from hakeeper.backup.restore import RestoreOptions, recovery_settings
    from hakeeper.core.config import Credentials
    from hakeeper.util.proc import RunAs

    t = Target(kind, time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) if kind == "time" else None, name="rp")  # type: ignore[arg-type]
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rec = BackupRecord(id="b", label="b", status=BackupStatus.COMPLETE, scope="s", repository="r",
                       start_time=now, updated_at=now)  # fmt: skip
    plan = RestorePlan(
        backup=rec, timeline=1, history=[], segments=[], covered_until=None, covered_until_modified=None
    )
    opts = RestoreOptions(
        data_dir=Path("/x"),
        target=t,
        bin_dir=Path("/b"),
        run_as=RunAs(),
        superuser=Credentials(username="postgres"),
        start=start,
        port=5,
    )
    s = recovery_settings(opts, plan, "cmd %f %p", "/tmp")
    assert s["recovery_target_action"] == action
    assert s["archive_mode"] is False
    if action == "pause":
        assert s["hot_standby"] is True


def test_stale_staging_directories_of_dead_backups_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from hakeeper.backup.basebackup import remove_stale_staging

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free once it has been waited for
    stale = tmp_path / f"hakeeper-backup-20260101T000000Z-p{gone.pid}-abc123"
    live = tmp_path / f"hakeeper-backup-20260101T000001Z-p{os.getpid()}-def456"
    other = tmp_path / "hakeeper-backup-unrelated"
    for d in (stale, live, other):
        (d / "pgbb").mkdir(parents=True)
    assert remove_stale_staging(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
