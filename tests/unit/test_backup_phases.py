"""Per-phase timings of backups, restores, drills and dumps (issue 16, item 6), and their gauges."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hakeeper.backup.catalog import BackupRecord, BackupStatus, RowCounts
from hakeeper.backup.dump import DumpRestoreResult
from hakeeper.backup.phase_metrics import PhaseGauges, drill_phases, schedule_phases
from hakeeper.backup.phases import (
    PhaseStats,
    backup_phases,
    describe,
    parse_phases,
    phases_dict,
    restore_phases,
)
from hakeeper.backup.restore import RestoreResult, replay_goal
from hakeeper.backup.verify import DrillResult

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
GiB = 1 << 30


def record(**kw: object) -> BackupRecord:
    base: dict[str, object] = {
        "id": "20261207T120000Z",
        "label": "x",
        "status": BackupStatus.COMPLETE,
        "scope": "s",
        "repository": "local",
        "start_time": NOW,
        "updated_at": NOW,
        "size": 2 * GiB,
        "seconds_copy": 2.0,
        "seconds_wal_wait": 0.5,
    }
    base.update(kw)
    return BackupRecord.model_validate(base)


def result(**kw: object) -> RestoreResult:
    r = RestoreResult(
        backup_id="b",
        repository="local",
        target="latest",
        timeline=1,
        data_dir="/d",
        size=GiB,
        parts=4,
        started=True,
        seconds_plan=0.2,
        seconds_fetch=4.0,
        seconds_fetch_wait=1.0,
        seconds_decompress=3.0,
        seconds_replay=2.0,
        seconds_promote=0.5,
        stored_size=GiB // 4,
        replay_start_lsn=0x3000028,
        replay_end_lsn=0x5000000,
    )
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_rate_is_bytes_per_second_and_none_where_meaningless() -> None:
    assert PhaseStats(seconds=2.0, bytes=GiB).rate == GiB / 2
    assert PhaseStats(seconds=2.0).rate is None  # no bytes
    assert PhaseStats(seconds=0.0, bytes=10).rate is None  # no time
    assert PhaseStats(seconds=1.0, bytes=10, overlaps="copy").rate is None  # a split of a pipeline
    # the JSON form carries the rate (what -o json and the stored records show)
    assert PhaseStats(seconds=4.0, bytes=400).model_dump(mode="json") == {
        "seconds": 4.0,
        "bytes": 400,
        "overlaps": None,
        "rate": 100.0,
    }


def test_backup_phases_from_the_record_and_stored_with_it() -> None:
    rec = record()
    rec.phases = backup_phases(rec)
    assert list(rec.phases) == ["copy", "wal_wait"]
    assert rec.phases["copy"] == PhaseStats(seconds=2.0, bytes=2 * GiB)
    assert rec.phases["copy"].rate == GiB
    assert rec.phases["wal_wait"].bytes is None
    back = BackupRecord.model_validate_json(rec.to_json())  # the record in the repository
    assert back.phases == rec.phases
    doc = json.loads(rec.to_json())
    assert doc["phases"]["copy"] == {"seconds": 2.0, "bytes": 2 * GiB, "overlaps": None, "rate": float(GiB)}
    # row counts run beside the WAL wait: an overlapping phase
    counted = record(
        row_counts=RowCounts(taken_at=NOW, seconds=0.4, bytes_counted=1000, restore_point="p", exact=True)
    )
    assert backup_phases(counted)["row_counts"] == PhaseStats(seconds=0.4, bytes=1000, overlaps="wal_wait")
    skipped = record(row_counts=RowCounts(taken_at=NOW, skipped="too big"))
    assert "row_counts" not in backup_phases(skipped)


def test_older_records_without_phases_still_load() -> None:
    doc = json.loads(record().to_json())
    del doc["phases"]
    assert BackupRecord.model_validate(doc).phases == {}


def test_restore_phases_split_the_copy_and_count_the_replayed_wal() -> None:
    ph = restore_phases(result())
    assert list(ph) == ["plan", "copy", "fetch", "decompress_write", "wal_replay", "end_of_recovery"]
    assert ph["copy"] == PhaseStats(seconds=4.0, bytes=GiB)
    assert ph["copy"].rate == GiB / 4
    assert ph["fetch"].overlaps == "copy" and ph["fetch"].bytes == GiB // 4 and ph["fetch"].rate is None
    assert ph["decompress_write"].overlaps == "copy"
    assert ph["wal_replay"].bytes == 0x5000000 - 0x3000028
    assert ph["end_of_recovery"].seconds == 0.5
    # the phases of their own add up to the restore (the overlapping ones do not count twice)
    own = sum(p.seconds for p in ph.values() if p.overlaps is None)
    assert own == pytest.approx(0.2 + 4.0 + 2.0 + 0.5)
    # a copy without a start: no replay phases
    cold = restore_phases(result(seconds_replay=None, seconds_promote=None, replay_end_lsn=None))
    assert "wal_replay" not in cold and "end_of_recovery" not in cold
    assert result(phases=ph).to_dict()["phases"]["copy"]["rate"] == GiB / 4


def test_replay_goal() -> None:
    from hakeeper.backup.catalog import RestorePlan, Target

    plan = RestorePlan(
        backup=record(), timeline=1, history=[], segments=[], covered_until=None, covered_until_modified=None
    )
    assert replay_goal(plan, Target("lsn", lsn=0x7000000)) == 0x7000000
    assert replay_goal(plan, Target("latest")) is None
    plan.covered_until = "000000010000000000000005"
    assert replay_goal(plan, Target("latest")) == 6 * 16 * 2**20  # the end of that segment


def test_drill_result_and_its_etcd_summary_carry_the_phases() -> None:
    d = DrillResult(id="d1", scope="s", repository="local", started_at=NOW, ok=True)
    d.phases = restore_phases(result())
    summary = d.summary()
    assert summary["phases"]["copy"]["bytes"] == GiB
    assert parse_phases(summary["phases"]) == d.phases


def test_dump_restore_result_phases_in_json() -> None:
    r = DumpRestoreResult("D1", "local", "db", "h:1/db", "custom", False, [], 3, 2.0)
    r.phases = {"fetch": PhaseStats(seconds=1.0, bytes=100), "restore": PhaseStats(seconds=1.0, bytes=100)}
    doc: Any = r.to_dict()
    assert doc["phases"]["fetch"]["rate"] == 100.0


def test_parse_phases_skips_what_it_cannot_read() -> None:
    got = parse_phases({"copy": {"seconds": 1, "bytes": 5}, "x": "nonsense", "y": {"bytes": 1}, 3: {}})
    assert got == {"copy": PhaseStats(seconds=1.0, bytes=5)}
    assert parse_phases(None) == {} and parse_phases([1]) == {}


def test_describe_for_humans() -> None:
    text = describe(restore_phases(result()))
    assert "copy 1.0 GiB in 4.0 s (256.0 MiB/s)" in text
    assert "fetch 256.0 MiB in 1.0 s [within copy]" in text
    assert "end_of_recovery 0.5 s" in text


# ---------------------------------------------------------------------------------- gauges


def _metrics(reg: CollectorRegistry) -> str:
    return generate_latest(reg).decode()


def test_gauges_from_the_drill_summary_and_the_schedule_records() -> None:
    drill = DrillResult(id="d1", scope="s", repository="s3", started_at=NOW, ok=True)
    drill.phases = restore_phases(result())
    sched = {
        "name": "weekly-full",
        "since": 0,
        "runs": [
            {
                "slot": 1,
                "details": {"repositories": {"local": {"backup": "a", "phases": {"copy": {"seconds": 9}}}}},
            },
            {
                "slot": 2,
                "details": {
                    "repositories": {
                        "local": {"backup": "b", "phases": phases_dict(backup_phases(record()))},
                        "s3": {"backup": "b", "copied_from": "local"},  # a copy: no phases
                    }
                },
            },
        ],
    }
    latest = drill_phases(json.dumps(drill.summary()))
    latest.update(schedule_phases("full", json.dumps(sched)))
    assert set(latest) == {("drill", "s3"), ("backup", "local")}
    assert latest[("backup", "local")]["copy"].seconds == 2.0  # the newest run, not the first
    reg = CollectorRegistry()
    g = PhaseGauges(reg)
    g.refresh(latest.items())

    def value(name: str, kind: str, repo: str, phase: str) -> float | None:
        return reg.get_sample_value(name, {"kind": kind, "repository": repo, "phase": phase})

    assert value("hakeeper_backup_phase_seconds", "backup", "local", "copy") == 2.0
    assert value("hakeeper_backup_phase_bytes", "backup", "local", "copy") == 2 * GiB
    assert value("hakeeper_backup_phase_rate_bytes_per_second", "backup", "local", "copy") == GiB
    assert value("hakeeper_backup_phase_rate_bytes_per_second", "drill", "s3", "copy") == GiB / 4
    assert value("hakeeper_backup_phase_bytes", "backup", "local", "wal_wait") is None  # a wait
    # an overlapping phase has seconds and bytes, no rate
    assert value("hakeeper_backup_phase_seconds", "drill", "s3", "fetch") == 1.0
    assert value("hakeeper_backup_phase_bytes", "drill", "s3", "fetch") == GiB // 4
    assert value("hakeeper_backup_phase_rate_bytes_per_second", "drill", "s3", "fetch") is None
    # the next refresh replaces everything: a drill that is gone leaves no stale series
    g.refresh([])
    assert "repository=" not in _metrics(reg)


def test_no_gauges_from_a_failed_drill_or_other_schedules() -> None:
    failed = DrillResult(id="d1", scope="s", repository="s3", started_at=NOW, ok=False)
    failed.phases = restore_phases(result())
    assert drill_phases(json.dumps(failed.summary())) == {}
    assert drill_phases(None) == {} and drill_phases(b"not json") == {}
    assert schedule_phases("verify", json.dumps({"runs": []})) == {}
    assert schedule_phases("full", "[]") == {}


def test_schedule_dump_runs_are_kind_dump(tmp_path: Path) -> None:
    raw = json.dumps(
        {"runs": [{"details": {"repositories": {"local": {"phases": {"dump db": {"seconds": 1}}}}}}]}
    )
    assert list(schedule_phases("dump", raw)) == [("dump", "local")]
