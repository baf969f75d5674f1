"""Pure parts of logical dumps: TOC parsing, picking a table's related entries, retention."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from hakeeper.backup.dump import (
    DumpCatalog,
    DumpRecord,
    is_dump_id,
    keep_dumps,
    make_dump_id,
    parse_toc,
    plan_dump_expire,
    related_entries,
)

TOC = """;
; Archive created at 2026-01-01 00:00:00 UTC
;
215; 1255 16390 FUNCTION public touch() postgres
216; 1259 16392 TABLE public items postgres
217; 1259 16391 SEQUENCE public items_id_seq postgres
3350; 0 0 SEQUENCE OWNED BY public items_id_seq postgres
218; 1259 16400 TABLE public notes postgres
3190; 2604 16395 DEFAULT public items id postgres
3340; 0 16392 TABLE DATA public items postgres
3341; 0 16400 TABLE DATA public notes postgres
3351; 0 0 SEQUENCE SET public items_id_seq postgres
3195; 2606 16397 CONSTRAINT public items items_pkey postgres
3196; 1259 16399 INDEX public items_sku_idx postgres
3197; 1259 16401 INDEX public notes_body_idx postgres
3198; 2620 16402 TRIGGER public items items_touch postgres
3199; 2606 16403 FK CONSTRAINT public items items_customer_fkey postgres
"""

SCHEMA_SQL = """
CREATE INDEX items_sku_idx ON public.items USING btree (sku);
CREATE INDEX notes_body_idx ON public.notes USING btree (body);
ALTER SEQUENCE public.items_id_seq OWNED BY public.items.id;
"""


def test_toc_lines_are_split_into_description_schema_tag_and_owner() -> None:
    entries = parse_toc(TOC)
    assert len(entries) == 14  # comment lines skipped
    by_id = {e.dump_id: e for e in entries}
    assert (by_id[3340].desc, by_id[3340].schema, by_id[3340].tag) == ("TABLE DATA", "public", "items")
    assert (by_id[3199].desc, by_id[3199].tag) == ("FK CONSTRAINT", "items items_customer_fkey")
    assert (by_id[3350].desc, by_id[3350].tag) == ("SEQUENCE OWNED BY", "items_id_seq")
    assert by_id[215].tag == "touch()" and by_id[215].owner == "postgres"


def test_related_entries_bring_a_tables_indexes_keys_triggers_and_sequence_only() -> None:
    picked = {e.dump_id for e in related_entries(parse_toc(TOC), SCHEMA_SQL, ["items"])}
    assert picked == {216, 217, 3350, 3190, 3340, 3351, 3195, 3196, 3198, 3199}
    assert {e.dump_id for e in related_entries(parse_toc(TOC), SCHEMA_SQL, ["public.notes"])} == {
        218,
        3341,
        3197,
    }
    assert related_entries(parse_toc(TOC), SCHEMA_SQL, ["other.notes"]) == []


def test_dump_ids_differ_from_backup_ids() -> None:
    did = make_dump_id(dt.datetime(2026, 11, 24, 7, 15, tzinfo=dt.UTC))
    assert did == "D20261124T071500Z" and is_dump_id(did)
    assert not is_dump_id("20261124T071500Z")


NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def rec(did: str, days_ago: float, db: str = "shop", status: str = "complete", **kw: object) -> DumpRecord:
    t = NOW - dt.timedelta(days=days_ago)
    return DumpRecord.model_validate(
        {
            "id": did,
            "status": status,
            "scope": "s",
            "repository": "r",
            "dump_format": "custom",
            "start_time": t,
            "stop_time": t if status == "complete" else None,
            "updated_at": t,
            "databases": [{"name": db, "key": "db000"}],
            **kw,
        }
    )


def test_retention_by_count_and_age_per_kind_of_dump() -> None:
    done = [rec("D5", 1), rec("D4", 2), rec("D3", 10), rec("D2", 20), rec("O1", 30, db="other")]
    done.sort(key=lambda r: r.stop_time or NOW, reverse=True)
    keep, why = keep_dumps(done, 2, None, NOW)
    assert keep == {"D5", "D4", "O1"}  # the lone dump of another database is its newest: kept
    assert "number 3" in why["D3"]
    keep, _ = keep_dumps(done, None, 5, NOW)
    assert keep == {"D5", "D4", "O1"}
    keep, _ = keep_dumps(done, 1, 15, NOW)  # either rule keeps
    assert keep == {"D5", "D4", "D3", "O1"}
    keep, _ = keep_dumps(done, None, None, NOW)  # no rule: nothing complete goes
    assert keep == {d.id for d in done}
    keep, _ = keep_dumps([rec("D1", 400)], 1, 1, NOW)  # never the only one, however old
    assert keep == {"D1"}
    # a schema-only dump is no substitute for a full one: separate kinds
    schema = rec("S1", 0.5, options={"schema_only": True})
    keep, _ = keep_dumps([schema, *done], 1, None, NOW)
    assert {"S1", "D5"} <= keep


def test_expire_plan_never_removes_a_running_dump_but_removes_failed_and_abandoned_ones() -> None:
    cat = DumpCatalog(
        "r",
        records=[
            rec("D1", 3),
            rec("D2", 1),
            rec("F1", 5, status="failed", error="boom"),
            rec("R1", 0.001, status="running"),
            rec("A1", 2, status="running"),  # not refreshed for two days: abandoned
        ],
    )
    plan = plan_dump_expire(cat, "s", count=1, now=NOW)
    assert sorted(d.id for d in plan.dumps) == ["A1", "D1", "F1"]
    assert plan.running == ["R1"] and plan.kept == ["D2"]
    reasons = {d.id: d.reason for d in plan.dumps}
    assert reasons["F1"].startswith("failed: boom") and reasons["A1"].startswith("abandoned")


def test_a_schedules_retention_never_touches_another_schedules_or_manual_dumps() -> None:
    """The classic schedule: a daily dump kept 30 days and a monthly export kept a year, both of
    every database.  Each schedule's expire sees only its own dumps."""
    daily = [rec(f"D{i:03}", i, all_databases=True, schedule="daily-dump") for i in range(1, 61)]
    monthly = [
        rec(f"M{i:02}", 30 * i + 0.5, all_databases=True, schedule="monthly-export") for i in range(0, 14)
    ]
    manual = [rec("H1", 90, all_databases=True), rec("H2", 200, all_databases=True)]
    running = rec("DR", 0.001, status="running", all_databases=True, schedule="daily-dump")
    failed_m = rec("MF", 2, status="failed", error="boom", all_databases=True, schedule="monthly-export")
    cat = DumpCatalog("r", records=[*daily, *monthly, *manual, running, failed_m])

    p = plan_dump_expire(cat, "s", days=30, now=NOW, schedule="daily-dump")
    gone = {d.id for d in p.dumps}
    assert gone == {f"D{i:03}" for i in range(31, 61)}  # older than 30 days, daily only
    assert p.running == ["DR"]
    assert set(p.kept) == {f"D{i:03}" for i in range(1, 31)}

    p = plan_dump_expire(cat, "s", days=365, now=NOW, schedule="monthly-export")
    assert {d.id for d in p.dumps} == {"M13", "MF"}  # 390.5 days old, and its own failed dump
    assert "M12" in p.kept  # 360.5 days

    # a schedule whose dumps are all old keeps its newest
    p = plan_dump_expire(cat, "s", days=1, now=NOW, schedule="monthly-export")
    assert "M00" in p.kept and "M01" not in p.kept

    # no selector: every dump as before, but each schedule's newest (and the manual ones') kept
    p = plan_dump_expire(cat, "s", count=1, now=NOW)
    assert set(p.kept) == {"D001", "M00", "H1"}
    assert {"H2", "D002", "M01", "MF"} <= {d.id for d in p.dumps}
    assert p.running == ["DR"]


def test_a_selected_expire_leaves_objects_without_a_record_alone() -> None:
    from hakeeper.backup.repo import ListEntry

    old = NOW - dt.timedelta(days=3)
    orphan = [ListEntry("s/dump/DX/db000/archive.dump", 10, old)]
    cat = DumpCatalog("r", records=[rec("D1", 1, schedule="daily")], orphans={"DX": orphan})
    p = plan_dump_expire(cat, "s", count=1, now=NOW, schedule="daily")
    assert p.dumps == [] and any("DX" in n for n in p.notes)
    p = plan_dump_expire(cat, "s", count=1, now=NOW)
    assert [d.id for d in p.dumps] == ["DX"]


def test_dump_records_carry_their_schedule_and_label_and_old_records_read_without() -> None:
    r = rec("D1", 1, schedule="daily-dump", label="schedule daily-dump 2026-05-31T02:00:00Z")
    again = DumpRecord.model_validate_json(r.to_json())
    assert again.schedule == "daily-dump" and again.label and again.summary(NOW)["schedule"] == "daily-dump"
    assert rec("D2", 1).schedule is None  # a record written before schedules: taken by hand
    assert r.retention_group() == "shop [schedule daily-dump]" and rec("D2", 1).retention_group() == "shop"


def test_two_dumps_started_in_the_same_second_get_different_ids(tmp_path: Path) -> None:
    from hakeeper.backup.dump import _new_id
    from hakeeper.backup.repo import FilesystemRepository

    async def go() -> list[str]:
        repo = FilesystemRepository(tmp_path, name="fs")
        try:
            return list(await asyncio.gather(*(_new_id(repo, "s", NOW) for _ in range(3))))
        finally:
            await repo.close()

    ids = asyncio.run(go())
    assert len(set(ids)) == 3 and min(ids) == make_dump_id(NOW)
