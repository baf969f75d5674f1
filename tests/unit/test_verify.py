"""Restore drills: the pure parts (snapshot comparison for exact row counts, count comparison,
target choice, old records, metric values)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from hakeeper.backup.basebackup import Snapshot, _full_xid, nothing_committed_between
from hakeeper.backup.catalog import BackupRecord, RowCounts
from hakeeper.backup.errors import CorruptObject
from hakeeper.backup.restore import RestoreError
from hakeeper.backup.verify import (
    DrillResult,
    Rto,
    _corrupt_name,
    _named_in,
    _target_for,
    compare_counts,
    drill_key,
    is_drill_object,
    metric_values,
)

T0 = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def test_snapshot_parse() -> None:
    s = Snapshot.parse("100:105:100,102")
    assert (s.xmin, s.xmax, s.xip) == (100, 105, frozenset({100, 102}))
    assert Snapshot.parse("7:7:").xip == frozenset()


def test_nothing_committed_between() -> None:
    before = Snapshot.parse("100:105:100,102")
    # the same snapshot: nothing happened
    assert nothing_committed_between(before, Snapshot.parse("100:105:100,102"))
    # a new transaction started and is still running: nothing committed
    assert nothing_committed_between(before, Snapshot.parse("100:106:100,102,105"))
    # one that was running ended (committed or aborted)
    assert not nothing_committed_between(before, Snapshot.parse("100:105:100"))
    # a new transaction started and already ended
    assert not nothing_committed_between(before, Snapshot.parse("100:106:100,102"))
    # xmax went backwards: not a later snapshot of the same server
    assert not nothing_committed_between(before, Snapshot.parse("90:95:"))
    # many new transactions: more than can be in progress
    assert not nothing_committed_between(Snapshot.parse("5:5:"), Snapshot.parse("5:10000005:5"))
    # an idle server: equal snapshots without transactions in progress
    assert nothing_committed_between(Snapshot.parse("750:750:"), Snapshot.parse("750:750:"))


def test_compare_counts() -> None:
    recorded = {"postgres": {"public.t": 10, "public.gone": 1}, "shop": {"public.items": 5}}
    restored = {"postgres": {"public.t": 11, "public.new": 0}, "shop": {"public.items": 5}}
    diffs = compare_counts(recorded, restored)
    assert [(d.database, d.table, d.recorded, d.restored) for d in diffs] == [
        ("postgres", "public.gone", 1, None),
        ("postgres", "public.new", None, 0),
        ("postgres", "public.t", 10, 11),
    ]
    assert compare_counts(recorded, recorded) == []
    # a database on one side only: each of its tables differs
    assert [d.table for d in compare_counts({"x": {"a.b": 1}}, {})] == ["a.b"]


def _record(**kw: object) -> BackupRecord:
    return BackupRecord.model_validate(
        {
            "id": "20261124T120000Z",
            "label": "x",
            "status": "complete",
            "scope": "s",
            "repository": "r",
            "start_time": T0.isoformat(),
            "updated_at": T0.isoformat(),
            **kw,
        }
    )


def test_target_choice() -> None:
    counts = RowCounts(taken_at=T0, restore_point="hakeeper-20261124T120000Z", exact=True)
    t, at_point = _target_for(_record(row_counts=counts.model_dump(mode="json")), None)
    assert (t.kind, t.name, at_point) == ("name", "hakeeper-20261124T120000Z", True)
    # counts skipped, or none recorded (an older record): the end of the archive
    skipped = RowCounts(taken_at=T0, skipped="too big")
    assert _target_for(_record(row_counts=skipped.model_dump(mode="json")), None)[0].kind == "latest"
    assert _target_for(_record(), None)[1] is False
    assert _target_for(_record(), None)[0].kind == "latest"
    # a time given: that time, and the counts are not compared
    t, at_point = _target_for(_record(row_counts=counts.model_dump(mode="json")), T0)
    assert (t.kind, t.time, at_point) == ("time", T0, False)


def test_old_records_load_without_row_counts() -> None:
    rec = _record()
    assert rec.row_counts is None
    again = BackupRecord.model_validate_json(rec.to_json())
    assert again.row_counts is None


def test_failed_object_named() -> None:
    key = "s/backup/20261124T120000Z/base.tar.00001"
    inner = CorruptObject(key, "sha256 differs")
    try:
        try:
            raise inner
        except CorruptObject as e:
            raise RestoreError(f"{e} (restore abandoned)") from e
    except RestoreError as outer:
        assert _corrupt_name(outer) == key
    msg = f"backup 20261124T120000Z: {key} is missing from fs1"
    assert _named_in(msg, "s", "20261124T120000Z") == key
    assert _named_in("nothing here", "s", "20261124T120000Z") is None


def test_drill_keys_and_metrics() -> None:
    key = drill_key("s", "20261124T120000Z", "V20261124T130000Z")
    assert key == "s/backup/20261124T120000Z/verify-20261124T130000Z.json"
    assert is_drill_object(key) and not is_drill_object("s/backup/20261124T120000Z/backup.json")
    ok = DrillResult(
        id="V20261124T130000Z",
        ok=True,
        scope="s",
        started_at=T0,
        finished_at=T0 + dt.timedelta(seconds=30),
        rto=Rto(plan=0.1, fetch=1.0, decompress=2.0, wal_replay=3.0, promote=0.5, total=6.6),
    )
    bad = ok.model_copy(update={"ok": False, "finished_at": T0 + dt.timedelta(hours=1), "rto": None})
    v = metric_values(json.dumps(bad.summary()), json.dumps(ok.summary()))
    assert v["last_ok"] == 0
    assert v["last_timestamp"] == (T0 + dt.timedelta(hours=1)).timestamp()
    assert v["last_success_timestamp"] == (T0 + dt.timedelta(seconds=30)).timestamp()
    assert v["rto"] == {
        "plan": 0.1,
        "fetch": 1.0,
        "decompress": 2.0,
        "wal_replay": 3.0,
        "promote": 0.5,
        "total": 6.6,
    }
    none = metric_values(None, b"not json")
    assert none == {"last_timestamp": None, "last_ok": None, "last_success_timestamp": None, "rto": {}}


# ------------------------------------------------------------------------ hakeeper report

METRICS_PAGE = """
# HELP hakeeper_promotion_phase_seconds Duration of each phase
# TYPE hakeeper_promotion_phase_seconds histogram
hakeeper_promotion_phase_seconds_bucket{kind="failover",phase="detect",le="+Inf"} 2.0
hakeeper_promotion_phase_seconds_count{kind="failover",phase="detect"} 2.0
hakeeper_promotion_phase_seconds_sum{kind="failover",phase="detect"} 6.0
hakeeper_promotion_phase_seconds_count{kind="failover",phase="elect"} 2.0
hakeeper_promotion_phase_seconds_sum{kind="failover",phase="elect"} 1.0
hakeeper_promotion_phase_seconds_count{kind="failover",phase="promote"} 2.0
hakeeper_promotion_phase_seconds_sum{kind="failover",phase="promote"} 2.0
hakeeper_promotion_phase_seconds_count{kind="switchover",phase="promote"} 1.0
hakeeper_promotion_phase_seconds_sum{kind="switchover",phase="promote"} 0.5
hakeeper_decisions_total{action="idle"} 3.0
"""


def test_promotion_metrics_parsed_and_merged() -> None:
    from hakeeper.backup.report import merge_promotions, parse_promotion_metrics

    page = parse_promotion_metrics(METRICS_PAGE)
    assert page[("failover", "detect")] == (6.0, 2.0)
    assert page[("switchover", "promote")] == (0.5, 1.0)
    both = merge_promotions([page, {("failover", "detect"): (2.0, 1.0)}])
    assert both[("failover", "detect")] == (8.0, 3.0)
    assert parse_promotion_metrics("garbage {") == {}


def _row(rows: list, name: str):
    return next(r for r in rows if r.scenario == name)


def test_report_without_data_says_not_measured() -> None:
    from hakeeper.backup.report import NOT_MEASURED, Inputs, build_rows

    rows = build_rows(Inputs(now=T0))
    assert [r.scenario for r in rows] == [
        "daily dump",
        "WAL archive + PITR",
        "synchronous replication",
        "failover",
    ]
    for r in rows:
        assert r.rpo_seconds is None and r.rto_seconds is None, r
    assert _row(rows, "WAL archive + PITR").rto == NOT_MEASURED
    assert _row(rows, "daily dump").rto == NOT_MEASURED
    assert _row(rows, "failover").rto == NOT_MEASURED
    # etcd not readable: the replication rows say unknown, not "not configured"
    assert _row(rows, "synchronous replication").rpo == "unknown"
    assert _row(rows, "failover").rpo == "unknown"


def test_report_uses_measured_values() -> None:
    from hakeeper.backup.report import Inputs, build_rows, parse_promotion_metrics

    drill = DrillResult(
        id="V20261124T130000Z",
        ok=True,
        scope="s",
        backup_id="20261124T120000Z",
        started_at=T0,
        finished_at=T0,
        rto=Rto(plan=0.1, fetch=1.0, decompress=2.0, wal_replay=3.0, promote=0.5, total=6.6),
    ).summary()
    drill["dump"] = {"dump_id": "D20261124T020000Z", "seconds": 4.25}
    inp = Inputs(
        now=T0,
        replication_mode="synchronous",
        sync_members=["b"],
        sync_quorum=1,
        replica_lags={"b": 0, "c": 4096},
        archive_rpo={"fs1": 2.5, "s3": 7.0},
        archive_source="the leader",
        newest_dump={
            "id": "D20261124T020000Z",
            "repository": "fs1",
            "stop_time": T0 - dt.timedelta(hours=10),
        },
        last_drill=drill,
        last_success=drill,
        promotions=parse_promotion_metrics(METRICS_PAGE),
        history=[{"reason": "failover: leader lost"}, {"reason": "switchover"}],
    )
    rows = build_rows(inp)
    dump = _row(rows, "daily dump")
    assert dump.rpo_seconds == 36000 and dump.rto_seconds == 4.25
    pitr = _row(rows, "WAL archive + PITR")
    assert pitr.rpo_seconds == 2.5 and pitr.rto_seconds == 6.6
    assert "V20261124T130000Z" in pitr.source and "worst repository 7.0 s" in pitr.rpo
    sync = _row(rows, "synchronous replication")
    assert sync.rpo_seconds == 0.0
    failover = _row(rows, "failover")
    assert failover.rto_seconds == 3.0 + 0.5 + 1.0  # mean detect + elect + promote
    assert "2 failovers" in failover.source and "1 failovers in the history" in failover.source
    assert failover.rpo_seconds == 0.0
    # async: the failover RPO is the closest replica's lag, not a number of seconds invented here
    inp.replication_mode, inp.sync_members = "async", []
    rows = build_rows(inp)
    assert _row(rows, "failover").rpo_seconds is None and "0 bytes" in _row(rows, "failover").rpo
    assert "not configured" in _row(rows, "synchronous replication").rpo
    # the last drill failed: said next to the RTO of the last passed one
    inp.last_drill = {**drill, "ok": False, "id": "V2", "error": "restore failed: x: corrupt object"}
    assert "LAST DRILL FAILED" in _row(build_rows(inp), "WAL archive + PITR").source


def test_scratch_directories_of_killed_drills_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from hakeeper.backup.verify import remove_stale_scratch

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"hakeeper-verify-p{gone.pid}-abc"
    live = tmp_path / f"hakeeper-verify-p{os.getpid()}-def"
    for d in (stale, live):
        (d / "data").mkdir(parents=True)
        (d / "data" / "postmaster.pid").write_text(f"{gone.pid}\n")  # not a running postgres
    assert remove_stale_scratch(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_a_32_bit_xid_is_placed_in_the_epoch_of_the_snapshot_near_it() -> None:
    epoch = 3 << 32
    assert _full_xid(726, epoch + 730) == epoch + 726
    assert _full_xid(0xFFFFFFF0, epoch + 5) == epoch - 16  # just before the wraparound
    assert _full_xid(5, epoch - 16) == epoch + 5  # just after it
