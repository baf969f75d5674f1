"""Slot logic of backup schedules (hakeeper/backup/schedule.py) and their configuration."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hakeeper.backup.basebackup import BackupError
from hakeeper.backup.schedule import (
    MAX_ATTEMPTS,
    Run,
    RunResult,
    ScheduleRecord,
    ScheduleStep,
    describe,
    due_slots,
    next_slot,
    plan,
)
from hakeeper.backup.source import NoStandby, choose_source
from hakeeper.core.backup_config import BackupConfig, ScheduleConfig

T0 = dt.datetime(2024, 3, 4, 0, 0, tzinfo=dt.UTC).timestamp()  # a Monday
HOUR = 3600.0
REPO = {"name": "fs", "type": "fs", "path": "/tmp/hk-unit-repo"}


def rec(*runs: Run, since: float = T0) -> ScheduleRecord:
    return ScheduleRecord("s", since=since, runs=tuple(runs))


def run(slot: float, result: RunResult, *, leader: str = "n1", term: int = 7, attempt: int = 1) -> Run:
    return Run(slot=slot, attempt=attempt, term=term, leader=leader, started_at=slot, result=result)


def test_a_new_schedule_is_armed_and_never_runs_for_the_past() -> None:
    p = plan(None, "0 * * * *", "UTC", T0 + 5 * HOUR, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.ARM
    p = plan(
        rec(since=T0 + 5 * HOUR), "0 * * * *", "UTC", T0 + 5 * HOUR + 10, me="n1", term=7, running_here=False
    )
    assert p.action is ScheduleStep.IDLE


def test_slots_missed_during_an_outage_run_once_the_newest() -> None:
    now = T0 + 5 * HOUR + 30
    p = plan(rec(run(T0, RunResult.OK)), "0 * * * *", "UTC", now, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.RUN
    assert p.slot == T0 + 5 * HOUR and p.missed == 4 and p.attempt == 1


def test_a_claimed_slot_does_not_run_again() -> None:
    for result in (RunResult.OK, RunResult.FAILED):
        p = plan(
            rec(run(T0 + HOUR, result)),
            "0 * * * *",
            "UTC",
            T0 + HOUR + 600,
            me="n1",
            term=7,
            running_here=False,
        )
        assert p.action is ScheduleStep.IDLE, result


def test_a_run_of_a_dead_leader_is_marked_interrupted_then_run_once_more() -> None:
    now = T0 + HOUR + 60
    r = rec(run(T0 + HOUR, RunResult.RUNNING, leader="n2", term=3))
    p = plan(r, "0 * * * *", "UTC", now, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.INTERRUPTED and "failover" in p.why and "n2" in p.why
    r2 = r.with_run(run(T0 + HOUR, RunResult.INTERRUPTED, leader="n2", term=3))
    p = plan(r2, "0 * * * *", "UTC", now, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.RUN and p.slot == T0 + HOUR and p.attempt == 2
    r3 = r2.with_run(run(T0 + HOUR, RunResult.INTERRUPTED, term=7, attempt=MAX_ATTEMPTS))
    assert plan(r3, "0 * * * *", "UTC", now, me="n1", term=7, running_here=False).action is ScheduleStep.IDLE


def test_an_interrupted_slot_gives_way_to_a_newer_slot() -> None:
    r = rec(run(T0 + HOUR, RunResult.INTERRUPTED))
    p = plan(r, "0 * * * *", "UTC", T0 + 2 * HOUR + 1, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.RUN and p.slot == T0 + 2 * HOUR and p.attempt == 1


def test_our_own_running_job_is_left_alone_but_a_lost_one_is_interrupted() -> None:
    r = rec(run(T0 + HOUR, RunResult.RUNNING, leader="n1", term=7))
    assert (
        plan(r, "0 * * * *", "UTC", T0 + HOUR + 5, me="n1", term=7, running_here=True).action
        is ScheduleStep.IDLE
    )
    p = plan(r, "0 * * * *", "UTC", T0 + HOUR + 5, me="n1", term=7, running_here=False)
    assert p.action is ScheduleStep.INTERRUPTED and "restarted" in p.why


def test_seconds_field_and_time_zone() -> None:
    assert next_slot("* * * * * */10", "UTC", T0 + 1) == T0 + 10
    # 02:00 in Berlin is 01:00 UTC in winter (March 4th: CET)
    assert next_slot("0 2 * * *", "Europe/Berlin", T0) == T0 + HOUR


def test_record_json_round_trip_and_last_success() -> None:
    r = rec(run(T0, RunResult.RUNNING))
    done = Run(T0, 1, 7, "n1", T0, RunResult.OK, T0 + 42, None, {"repositories": {"fs": {"backup": "b1"}}})
    r = r.with_run(done)
    assert len(r.runs) == 1 and r.last_success_at == T0 + 42
    assert ScheduleRecord.from_json(r.to_json()) == r
    assert r.last is not None and r.last.duration == 42


@settings(max_examples=200, deadline=None)
@given(
    minute=st.integers(0, 59),
    start=st.floats(T0, T0 + 400 * 24 * HOUR),
    gap=st.floats(0, 30 * 24 * HOUR),
)
def test_due_slots_is_the_newest_slot_of_the_interval(minute: int, start: float, gap: float) -> None:
    expr = f"{minute} */3 * * *"
    newest, count = due_slots(expr, "UTC", start, start + gap)
    if newest is None:
        assert count == 0 and next_slot(expr, "UTC", start) > start + gap
    else:
        assert start < newest <= start + gap
        assert next_slot(expr, "UTC", newest) > start + gap
        assert count >= 1


@settings(max_examples=200, deadline=None)
@given(
    slots_done=st.lists(st.sampled_from(list(RunResult)), max_size=5),
    now_offset=st.floats(0, 10 * HOUR),
    leader=st.sampled_from(["n1", "n2"]),
    term=st.sampled_from([6, 7]),
    running_here=st.booleans(),
)
def test_plan_never_runs_a_slot_twice_nor_one_in_the_future(
    slots_done: list[RunResult], now_offset: float, leader: str, term: int, running_here: bool
) -> None:
    runs = [run(T0 + i * HOUR, r, leader=leader, term=term) for i, r in enumerate(slots_done)]
    r = rec(*runs)
    now = T0 + now_offset + len(runs) * HOUR
    p = plan(r, "0 * * * *", "UTC", now, me="n1", term=7, running_here=running_here)
    if p.action is ScheduleStep.RUN:
        assert p.slot is not None and p.slot <= now
        last = r.last
        if last is not None and p.slot == last.slot:  # only a retry of an interrupted slot
            assert last.result is RunResult.INTERRUPTED and p.attempt == last.attempt + 1 <= MAX_ATTEMPTS
        elif last is not None:
            assert p.slot > last.slot
    if (
        r.last is not None
        and r.last.result is RunResult.RUNNING
        and not (r.last.leader == "n1" and r.last.term == 7 and running_here)
    ):
        assert p.action is ScheduleStep.INTERRUPTED


# ---------------------------------------------------------------------------------- config


def test_default_schedules_only_with_a_repository_and_empty_list_disables() -> None:
    assert BackupConfig().effective_schedules() == []
    names = [s.name for s in BackupConfig.model_validate({"repositories": [REPO]}).effective_schedules()]
    assert names == ["weekly-full", "daily-dump", "monthly-export"]
    assert BackupConfig.model_validate({"repositories": [REPO], "schedules": []}).effective_schedules() == []


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"name": "a", "kind": "full", "cron": "61 * * * *"}, "cron"),
        ({"name": "a", "kind": "full", "cron": "0 * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "a", "kind": "fulll", "cron": "0 * * * *"}, "kind"),
        ({"name": "a", "kind": "full", "cron": "0 * * * *", "repositories": ["nope"]}, "repositories"),
        ({"name": "a", "kind": "full", "cron": "0 * * * *", "retention": {"count": 0}}, "count"),
        ({"name": "a", "kind": "full", "cron": "0 * * * *", "databases": ["app"]}, "databases"),
        ({"name": "a", "kind": "verify", "cron": "0 * * * *", "format": "plain"}, "format"),
        ({"name": "a", "kind": "dump", "cron": "0 * * * *", "format": "tar"}, "format"),
        ({"name": "a", "kind": "dump", "cron": "0 * * * *", "databases": []}, "databases"),
        ({"name": "a", "kind": "full", "cron": "0 * * * *", "type": "differential"}, "type"),
        ({"name": "a", "kind": "dump", "cron": "0 * * * *", "type": "incremental"}, "type"),
    ],
)
def test_schedule_config_errors_name_the_field(entry: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        BackupConfig.model_validate({"repositories": [REPO], "schedules": [entry]})
    assert field in str(e.value)


def test_two_full_schedules_may_not_both_set_a_repositorys_retention() -> None:
    entries = [
        {"name": "a", "kind": "full", "cron": "0 * * * *", "retention": {"count": 2}},
        {"name": "b", "kind": "full", "cron": "30 * * * *", "retention": {"days": 3}},
    ]
    with pytest.raises(ValidationError, match="both set the retention"):
        BackupConfig.model_validate({"repositories": [REPO], "schedules": entries})


def test_weekly_full_and_daily_incremental_schedules_mix_kinds() -> None:
    entries = [
        {"name": "weekly-full", "kind": "full", "cron": "0 1 * * 0", "retention": {"count": 4}},
        {"name": "daily-incr", "kind": "full", "type": "incremental", "cron": "0 1 * * 1-6"},
    ]
    got = BackupConfig.model_validate({"repositories": [REPO], "schedules": entries}).effective_schedules()
    assert [(s.name, s.type) for s in got] == [("weekly-full", "full"), ("daily-incr", "incremental")]
    assert describe(got[1], None, T0)["type"] == "incremental"
    assert describe(ScheduleConfig(name="d", kind="dump", cron="0 2 * * *"), None, T0)["type"] is None


def test_every_kind_is_available_and_a_dump_schedule_shows_what_it_dumps() -> None:
    s = ScheduleConfig(name="d", kind="dump", cron="0 2 * * *", databases=["app"], format="directory")
    d = describe(s, None, T0)
    assert d["available"] is True and d["unavailable_reason"] is None
    assert d["next_run"] == "2024-03-04T02:00:00Z"
    assert d["databases"] == ["app"] and d["format"] == "directory"
    f = describe(ScheduleConfig(name="f", kind="full", cron="0 1 * * 0"), None, T0)
    assert f["available"] is True and f["next_run"] == "2024-03-10T01:00:00Z"
    assert f["databases"] is None and f["format"] is None
    v = describe(ScheduleConfig(name="v", kind="verify", cron="0 4 * * 0"), None, T0)
    assert v["available"] is True


def test_the_classic_schedule_dumps_every_database_daily_and_monthly_each_with_its_own_retention() -> None:
    by_name = {s.name: s for s in BackupConfig.model_validate({"repositories": [REPO]}).effective_schedules()}
    daily, monthly = by_name["daily-dump"], by_name["monthly-export"]
    assert daily.kind == monthly.kind == "dump"
    assert daily.databases is None and monthly.databases is None and daily.format == "custom"
    assert daily.retention.days == 30 and monthly.retention.days == 365


def test_the_source_is_the_least_lagging_streaming_standby() -> None:
    from hakeeper.core.cluster import ClusterView, Leader, Member, MemberRole, MemberState

    def m(name: str, role: MemberRole, state: MemberState, lag: int | None) -> Member:
        return Member(name=name, role=role, state=state, host="127.0.0.1", port=5432, lag=lag)

    members = {
        "p": m("p", MemberRole.PRIMARY, MemberState.RUNNING, 0),
        "a": m("a", MemberRole.REPLICA, MemberState.STREAMING, 500),
        "b": m("b", MemberRole.REPLICA, MemberState.STREAMING, 100),
        "c": m("c", MemberRole.REPLICA, MemberState.IN_RECOVERY, 0),
    }
    view = ClusterView(leader=Leader("p", 5, 1, 5), members=members)
    c = choose_source(view, "auto")
    assert c.source.name == "b" and c.primary is not None and c.primary.name == "p"
    assert c.what == "standby b (lag 100 bytes)"
    assert choose_source(view, "standby").source.name == "b"
    assert choose_source(view, "primary").source.name == "p"
    assert choose_source(view, "primary").what == "the primary p"
    lonely = ClusterView(leader=Leader("p", 5, 1, 5), members={"p": members["p"]})
    assert choose_source(lonely, "auto").source.name == "p"
    assert choose_source(lonely, "auto").what == "the primary p (no streaming standby)"
    with pytest.raises(NoStandby):
        choose_source(lonely, "standby")
    headless = ClusterView(leader=None, members={"a": members["a"]})
    assert choose_source(headless, "auto").primary is None  # a standby, and no primary to switch WAL
    with pytest.raises(BackupError, match="no running primary"):
        choose_source(headless, "primary")
