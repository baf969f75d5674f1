"""The pure rules of permanent slots and logical slot failover (hakeeper/ha/policy/slots.py),
their config validation, member-record round trip and list summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hakeeper.cli.cluster_cmds import members_rows
from hakeeper.core.cluster import ClusterView, Leader, Member, MemberRole, MemberState, SyncState
from hakeeper.core.config import ConfigError, DynamicConfig, PermanentSlot, parse_dynamic_config
from hakeeper.core.records import InvalidRecord
from hakeeper.core.slots import SlotReport, SlotState, parse_managed_slots, slot_summary
from hakeeper.ha.policy.slots import plan_permanent, slot_refusal, standby_slot_names

LOGICAL = PermanentSlot(type="logical", database="app", plugin="pgoutput")
PHYSICAL = PermanentSlot(type="physical")
WAL = {"postgresql": {"parameters": {"wal_level": "logical"}}}


def logical(
    name: str, *, active: bool = False, failover: bool | None = True, synced: bool | None = False
) -> SlotState:
    return SlotState(name, "logical", failover, synced, active, database="app", plugin="pgoutput")


def physical(name: str, active: bool = False) -> SlotState:
    return SlotState(name, "physical", active=active)


# -- which slots to create and drop -------------------------------------------------------------


def test_creates_missing_slots_and_records_them_first() -> None:
    plan = plan_permanent(
        {"cdc": LOGICAL, "ext": PHYSICAL},
        config_valid=True,
        managed=frozenset(),
        existing={"ext": physical("ext")},
        members=["a", "b"],
    )
    assert plan.create == ("cdc",)
    assert plan.record == {"cdc", "ext"}  # an existing slot the config names is adopted
    assert plan.drop == () and plan.forget == ()


def test_drops_only_slots_removed_from_the_config_that_it_managed() -> None:
    existing = {
        "old": logical("old"),
        "users_own": logical("users_own"),
        "busy": logical("busy", active=True),
    }
    plan = plan_permanent(
        {}, config_valid=True, managed=frozenset({"old", "busy", "gone"}), existing=existing, members=[]
    )
    assert plan.drop == ("old",)  # never users_own (not managed), not busy (active: retried)
    assert plan.forget == ("gone",)  # managed, removed and already absent


@pytest.mark.parametrize("valid, managed", [(False, frozenset({"old"})), (True, None)])
def test_nothing_is_dropped_on_a_fallback_config_or_an_unknown_managed_set(
    valid: bool, managed: frozenset[str] | None
) -> None:
    plan = plan_permanent(
        {}, config_valid=valid, managed=managed, existing={"old": logical("old")}, members=[]
    )
    assert plan.drop == () and plan.forget == ()


def test_a_member_slot_name_or_a_mismatching_slot_is_left_alone() -> None:
    other = SlotState("cdc", "logical", True, False, database="other", plugin="pgoutput")
    plan = plan_permanent(
        {"db_1": PHYSICAL, "cdc": LOGICAL},
        config_valid=True,
        managed=frozenset(),
        existing={"cdc": other},
        members=["db-1"],
    )
    assert plan.create == () and plan.record == frozenset()
    assert [n for n, _ in plan.conflicts] == ["cdc", "db_1"]
    assert "member db-1" in dict(plan.conflicts)["db_1"]


# -- synchronized_standby_slots -----------------------------------------------------------------


def view_of(
    *members: Member, leader: str = "a", mode: str = "async", sync: SyncState | None = None
) -> ClusterView:
    return ClusterView(
        revision=1,
        config=DynamicConfig(replication_mode=mode),
        leader=Leader(leader, 5, 1, 5),
        members={m.name: m for m in members},
        sync=sync,
    )


def member(name: str, **kw: Any) -> Member:
    return Member(name, role=MemberRole.REPLICA, state=MemberState.STREAMING, **kw)


def test_standby_slots_name_streaming_failover_candidates_only() -> None:
    v = view_of(
        member("a"),
        member("b-1"),
        member("c", nofailover=True),
        member("d", failover_priority=0),
        member("e"),  # not streaming from us (gone, or cut off for longer than a ttl)
    )
    phys = {"b_1", "c", "d", "e"}
    assert standby_slot_names(v, "a", {"b-1", "c", "d"}, phys) == ("b_1",)
    # a slot that does not exist (yet) is never named: PostgreSQL would wait for it
    assert standby_slot_names(v, "a", {"b-1"}, set()) == ()


def test_standby_slots_follow_the_sync_set_in_synchronous_mode() -> None:
    sync = SyncState("a", ("c",), 5)
    v = view_of(member("a"), member("b"), member("c"), mode="synchronous", sync=sync)
    assert standby_slot_names(v, "a", {"b", "c"}, {"b", "c"}) == ("c",)
    # no sync set (yet): every streaming candidate
    v2 = view_of(member("a"), member("b"), member("c"), mode="synchronous", sync=SyncState("a", (), 5))
    assert standby_slot_names(v2, "a", {"b", "c"}, {"b", "c"}) == ("b", "c")


# -- the switchover guard -----------------------------------------------------------------------


def test_switchover_refused_while_the_candidates_copy_is_not_synced() -> None:
    lead = member("a", slots=SlotReport(17, (logical("cdc", synced=False),)))
    unsynced = member("b", slots=SlotReport(17, (logical("cdc", synced=False),)))
    missing = member("c", slots=SlotReport(17, ()))
    synced = member("d", slots=SlotReport(17, (logical("cdc", synced=True),)))
    old_agent = member("e")  # publishes no slot state
    v = view_of(lead, unsynced, missing, synced, old_agent)
    for name in ("b", "c", "e"):
        refusal = slot_refusal(v, name)
        assert refusal is not None and "failover slot(s) cdc" in refusal, name
    assert slot_refusal(v, "d") is None


def test_no_guard_without_failover_slots_or_without_a_leader() -> None:
    on15 = member("a", slots=SlotReport(15, (logical("cdc", failover=None, synced=None),)))
    v = view_of(on15, member("b"))
    assert slot_refusal(v, "b") is None  # nothing can be synced on 15: nothing to wait for
    leaderless = ClusterView(revision=1, members={"b": member("b")})
    assert slot_refusal(leaderless, "b") is None


# -- config, records, list ------------------------------------------------------------------------


def test_config_validates_slots_and_names_the_field() -> None:
    cfg = parse_dynamic_config(
        {**WAL, "slots": {"cdc": {"type": "logical", "database": "app", "plugin": "pgoutput"}}}
    )
    assert cfg.slots["cdc"] == LOGICAL
    bad = [
        ({**WAL, "slots": {"CDC": {"type": "physical"}}}, "slots"),
        ({**WAL, "slots": {"cdc": {"type": "logical", "database": "app"}}}, "slots.cdc.plugin"),
        ({**WAL, "slots": {"p": {"type": "physical", "plugin": "x"}}}, "slots.p.plugin"),
        ({"slots": {"cdc": {"type": "logical", "database": "app", "plugin": "x"}}}, "slots.cdc"),  # wal_level
    ]
    for data, field in bad:
        with pytest.raises(ConfigError) as e:
            parse_dynamic_config(data)
        assert e.value.errors[0][0] == field, e.value.errors


def test_member_records_carry_slots_and_old_records_still_parse() -> None:
    m = member("b", slots=SlotReport(17, (logical("cdc", synced=True),)))
    back = Member.parse("b", m.to_json())
    assert back.slots == m.slots
    doc = json.loads(m.to_json())
    doc.pop("slots")
    assert Member.parse("b", json.dumps(doc).encode()).slots is None
    doc["slots"] = {"major": 17, "items": [{"name": "x y", "type": "logical"}]}
    with pytest.raises(InvalidRecord):
        Member.parse("b", json.dumps(doc).encode())


def test_managed_slots_key() -> None:
    assert parse_managed_slots(b'{"managed": ["a", "b_2"]}') == {"a", "b_2"}
    for raw in (b"[]", b'{"managed": "a"}', b'{"managed": ["A"]}'):
        with pytest.raises(InvalidRecord):
            parse_managed_slots(raw)


def test_list_summary() -> None:
    lead17 = SlotReport(17, (logical("cdc"), logical("own", failover=False)))
    assert slot_summary(lead17, None, is_leader=True) == "1 failover, 1 not failover-safe"
    rep = SlotReport(17, (logical("cdc", synced=True),))
    assert slot_summary(rep, lead17, is_leader=False) == "slots 1/1 synced"
    assert slot_summary(None, lead17, is_leader=False) == "slots 0/1 synced"
    lead15 = SlotReport(15, (logical("cdc", failover=None, synced=None),))
    assert slot_summary(lead15, None, is_leader=True) == "1 logical, not failover-safe (PG 15)"
    assert slot_summary(SlotReport(15, ()), lead15, is_leader=False) == ""


def test_list_rows_and_cluster_doc_carry_the_summary() -> None:
    lead = Member(
        "a", role=MemberRole.PRIMARY, state=MemberState.RUNNING, slots=SlotReport(17, (logical("cdc"),))
    )
    rep = member("b", slots=SlotReport(17, (logical("cdc", synced=True),)))
    rows = {r["name"]: r for r in members_rows(view_of(lead, rep))}
    assert rows["a"]["slots"]["summary"] == "1 failover"
    assert rows["b"]["slots"]["summary"] == "slots 1/1 synced"
    assert rows["b"]["slots"]["items"][0] == {
        "name": "cdc",
        "type": "logical",
        "failover": True,
        "synced": True,
        "active": False,
        "database": "app",
        "plugin": "pgoutput",
        "restart_lsn": None,
        "confirmed_flush_lsn": None,
    }
    assert members_rows(view_of(member("a")))[0]["slots"] is None  # an older agent's record
