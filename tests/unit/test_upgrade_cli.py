"""The pure parts of ``hakeeper upgrade`` and what etcd records of an upgrade (issue 15)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hakeeper.cli.cluster_cmds import list_document, members_table, upgrade_note
from hakeeper.cli.upgrade_cmds import cluster_problems, member_major, report_rows
from hakeeper.core.cluster import (
    HistoryEntry,
    MemberState,
    Switchover,
    SwitchoverKind,
    Upgrade,
    build_view,
    parse_history_strict,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.core.records import InvalidRecord
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action
from tests.support.builders import local, primary, replica, view

KEYS = Keys("/hakeeper/c")


def test_a_healthy_cluster_has_no_problem_and_each_unhealthy_part_is_named() -> None:
    v = view(primary("a"), replica("b"), replica("c"), leader="a")
    assert cluster_problems(v, 18) == []
    down = replace(v.members["b"], state=MemberState.STOPPED)
    lagging = replace(v.members["c"], state=MemberState.IN_RECOVERY)
    bad = replace(v, members={**v.members, "b": down, "c": lagging})
    found = {(p["member"], p["check"]) for p in cluster_problems(bad, 18)}
    assert found == {("b", "running"), ("c", "replication")}
    assert all(p["fix"] for p in cluster_problems(bad, 18))


def test_no_leader_a_pending_switchover_a_pause_or_another_upgrade_are_problems() -> None:
    v = view(replica("b"), replica("c"))
    assert [p["check"] for p in cluster_problems(v, 18)] == ["leader"]
    v = view(primary("a"), replica("b"), leader="a")
    sw = replace(
        v, switchover=Switchover(leader="a", candidate="b", kind=SwitchoverKind.SWITCHOVER, requested_at=1.0)
    )
    assert [p["check"] for p in cluster_problems(sw, 18)] == ["switchover"]
    paused = replace(v, config=DynamicConfig(pause=True))
    assert [p["check"] for p in cluster_problems(paused, 18)] == ["pause"]
    other = replace(v, upgrade=Upgrade("u", 16, 17, "link", 1.0))
    assert [p["check"] for p in cluster_problems(other, 18)] == ["upgrade"]
    assert cluster_problems(replace(v, upgrade=Upgrade("u", 17, 18, "link", 1.0)), 18) == []


def test_member_major_reads_the_running_servers_release() -> None:
    m = replica("b")
    assert member_major(m) is None
    assert member_major(replace(m, server_version="17.10")) == 17
    assert member_major(replace(m, server_version="garbage")) is None


def test_the_report_has_downtime_phases_replicas_size_and_backup() -> None:
    job = {
        "from_major": 17,
        "to_major": 18,
        "method": "link",
        "downtime_s": 2.6159,
        "phases": {"pg_upgrade": 2.2, "replicas": 3.04},
        "data_bytes": 134 * 2**20,
        "backup": {"repositories": {"local": {"backup": "B1"}, "s3": {"error": "down"}}},
    }
    rows = dict(report_rows(job, {"n2": {"summary": "cloned and streaming in 3.0 s"}}))
    assert rows["upgrade"] == "PostgreSQL 17 -> 18 (link)"
    assert rows["write downtime"] == "2.62 s"
    assert rows["primary: pg_upgrade"] == "2.20 s" and rows["replicas: clone to streaming"] == "3.04 s"
    assert rows["replica n2"] == "cloned and streaming in 3.0 s"
    assert rows["data size"] == "134.0 MB"
    assert rows["backup after"] == "local: B1; s3: failed: down"
    assert dict(report_rows({}, {}))["write downtime"] == "-"


def test_an_upgrade_key_pauses_the_cluster_and_an_unreadable_one_too() -> None:
    rec = Upgrade("u1", 17, 18, "link", 5.0, by="me", phase="pausing")
    kvs = {KEYS.upgrade: (rec.to_json(), 3, 9, 0)}
    v = build_view(KEYS, kvs, 9, DynamicConfig())
    assert v.upgrade == replace(rec, mod_revision=9) and v.paused and v.upgrading
    for garbage in (
        b"{",
        b'{"id": "u"}',
        b'{"id": "u", "from_major": 17, "to_major": 1000, "method": "link", "started_at": 1}',
    ):
        v = build_view(KEYS, {KEYS.upgrade: (garbage, 3, 9, 0)}, 9, DynamicConfig())
        assert v.upgrade is None and v.upgrade_invalid and v.paused
        assert [p.key for p in v.invalid] == [KEYS.upgrade]
    with pytest.raises(InvalidRecord):
        Upgrade.parse(b'{"id": "x", "from_major": "17"}')


def test_during_an_upgrade_no_agent_starts_or_fails_over_on_its_own() -> None:
    up = Upgrade("u1", 17, 18, "link", 5.0)
    # the leader's PostgreSQL is down (pg_upgrade runs): nobody elects, the leader does not restart it
    v = view(primary("a"), replica("b"), leader="a", upgrade=up)
    assert decide(v, local("a", pg_running=False, in_recovery=None, lease=7)).action == Action.WAIT
    assert decide(v, local("b", pg_running=False, in_recovery=None)).action == Action.WAIT
    nobody = view(replica("b"), replica("c"), upgrade=up)
    assert decide(nobody, local("b")).action not in (Action.CAMPAIGN, Action.PROMOTE)
    assert decide(nobody, local("b")).action != Action.CAMPAIGN
    # without the key the same replica would be restarted
    assert decide(replace(v, upgrade=None), local("b", pg_running=False, in_recovery=None)).action == (
        Action.START_REPLICA
    )


def test_a_history_entry_of_an_upgrade_round_trips_and_older_entries_stay_as_they_were() -> None:
    plain = HistoryEntry(2, 100, 1.0, "failover", "a", "b")
    assert "upgrade" not in plain.to_dict()
    summary = {
        "from_major": 17,
        "to_major": 18,
        "method": "link",
        "downtime_s": 2.5,
        "phases": {"pg_upgrade": 2.0},
        "old_system_identifier": "7300000000000000001",
        "system_identifier": "7300000000000000002",
    }
    up = HistoryEntry(3, 200, 2.0, "major upgrade 17 -> 18 (link)", "b", "b", upgrade=summary)
    raw = json.dumps([plain.to_dict(), up.to_dict()]).encode()
    back = parse_history_strict(raw)
    assert back[0] == plain and back[1].upgrade == summary
    assert upgrade_note(back[1].upgrade) == "; write downtime 2.50 s (pg_upgrade 2.0 s)"
    assert upgrade_note(None) == ""
    bad = json.dumps([{**up.to_dict(), "upgrade": {**summary, "system_identifier": "x"}}]).encode()
    with pytest.raises(InvalidRecord):
        parse_history_strict(bad)


def test_a_member_left_on_the_old_cluster_never_leads_the_upgraded_one() -> None:
    """After the upgrade etcd names the new system identifier: a node whose data directory is
    still the old cluster's (its agent was down during the upgrade) waits, whoever leads."""
    new_sysid = "7300000000000000002"
    old_data = local("c", system_identifier="7300000000000000001", timeline=1, wal_lsn=999 * 2**20)
    nobody = replace(view(replica("c"), replica("b", tl=2)), initialized=new_sysid)
    assert decide(nobody, old_data).action not in (Action.CAMPAIGN, Action.TAKEOVER, Action.PROMOTE)
    led = replace(view(primary("b", tl=2), replica("c"), leader="b"), initialized=new_sysid)
    d = decide(led, old_data)
    assert d.action == Action.WAIT and "another cluster" in d.why
    writable = local("c", system_identifier="7300000000000000001", in_recovery=False)
    assert decide(led, writable).action == Action.DEMOTE


def test_list_says_an_upgrade_is_in_progress() -> None:
    v = view(primary("a"), replica("b"), leader="a", upgrade=Upgrade("u9", 17, 18, "link", 5.0))
    assert "major upgrade 17 -> 18 in progress (u9): paused" in str(members_table(v, "c").title)
    doc = list_document(v, "c")
    assert doc["paused"] is True and doc["upgrade"]["to_major"] == 18
    assert list_document(replace(v, upgrade=None), "c")["upgrade"] is None
