"""`hakeeper list` as a patronictl user reads it, the restart order planner and `flush`'s
argument rules (issue 13, item 7)."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rich.console import Console

from hakeeper.cli.cluster_cmds import human_bytes, list_document, members_table, role_label, scope_of
from hakeeper.cli.restart_cmds import RoleFilter, back_after_restart, plan_restart
from hakeeper.core.cluster import ClusterView, MemberState, SyncState
from tests.support.builders import MB, SYSID, primary, replica, view


def render(v: ClusterView, scope: str = "prod", *, extended: bool = False) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(members_table(v, scope, extended=extended, now=2000.0))
    return console.export_text()


def three(sync: SyncState | None = None) -> ClusterView:
    return view(
        primary("a"),
        replica("b", lag=0, pending_restart=True, pending_restart_reasons=("max_connections",)),
        replica("c", lag=16 * MB, updated_at=1990.0, api_url="https://c:8008", nofailover=True),
        leader="a",
        sync=sync,
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 kB"),
        (16 * MB, "16 MB"),
        (int(1.2 * 1024 * MB), "1.2 GB"),
        (int(9.99 * MB), "10 MB"),
        (5 * 1024**4, "5.0 TB"),
    ],
)
def test_lag_in_human_units(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_title_names_scope_and_system_identifier_and_rows_show_lag_and_pending() -> None:
    text = render(three())
    assert f"cluster prod (system {SYSID})" in text
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 3}
    assert "16 MB" in lines["c"] and str(16 * MB) not in lines["c"]
    assert "0 B" in lines["b"]
    pending_col = [c.strip() for c in lines["b"].split("│")][7]
    assert pending_col == "*"
    assert [c.strip() for c in lines["c"].split("│")][7] == ""
    assert "leader" in lines["a"]
    # the basic table leaves the extended columns out
    assert "max_connections" not in text and "https://c:8008" not in text


def test_extended_adds_lsn_tags_api_reasons_last_seen() -> None:
    text = render(three(), extended=True)
    assert "max_connections" in text and "https://c:8008" in text and "nofailover" in text
    assert "10s ago" in text and "0/6400000" in text  # 100 MB of WAL from the builders


def test_sync_and_quorum_standbys_are_told_from_replicas() -> None:
    v = three(SyncState("a", ("b",), 42, 1))
    assert role_label(v, v.members["b"]) == "sync standby"
    assert role_label(v, v.members["c"]) == "replica"
    assert role_label(v, v.members["a"]) == "primary"
    q = three(SyncState("a", ("b", "c"), 42, 1))
    assert role_label(q, q.members["b"]) == role_label(q, q.members["c"]) == "quorum standby"
    assert "quorum standby" in render(q)
    # a sync key of a former leader says nothing about the current one
    stale = three(SyncState("x", ("b",), 41, 1))
    assert role_label(stale, stale.members["b"]) == "replica"


def test_json_document_has_the_new_fields_and_raw_bytes() -> None:
    doc = list_document(three(SyncState("a", ("b",), 42, 1)), "prod")
    assert doc["scope"] == "prod" and doc["system_identifier"] == SYSID
    rows = {r["name"]: r for r in doc["members"]}
    assert rows["c"]["lag"] == 16 * MB and rows["c"]["lag_pretty"] == "16 MB"
    assert rows["b"]["pending_restart"] is True and rows["b"]["pending_restart_reasons"] == [
        "max_connections"
    ]
    assert rows["c"]["pending_restart"] is False
    assert rows["b"]["role"] == "replica" and rows["b"]["display_role"] == "sync standby"
    assert rows["b"]["standby"] == "sync" and rows["c"]["standby"] is None
    assert rows["c"]["api_url"] == "https://c:8008" and rows["c"]["tags"]["nofailover"] is True
    assert scope_of("/hakeeper/prod") == "prod"


def test_whole_cluster_restarts_replicas_first_async_before_sync_leader_last() -> None:
    v = view(
        primary("b"), replica("a"), replica("c"), replica("d"), leader="b", sync=SyncState("b", ("a",), 42, 1)
    )
    plan = plan_restart(v)
    assert plan.order == ("c", "d", "a", "b") and plan.leader == "b" and plan.skipped == ()


def test_role_and_pending_filters_and_named_members() -> None:
    v = three()
    assert plan_restart(v, role=RoleFilter.REPLICA).order == ("b", "c")
    p = plan_restart(v, role=RoleFilter.PRIMARY)
    assert p.order == ("a",) and p.leader == "a" and {n for n, _ in p.skipped} == {"b", "c"}
    pend = plan_restart(v, pending=True)
    assert pend.order == ("b",) and pend.leader is None
    assert dict(pend.skipped)["c"] == "no restart pending (--pending)"
    # named members are restarted in the safe order, not the order given, each once
    assert plan_restart(v, ["a", "c", "a"]).order == ("c", "a")
    everyone_pending = ClusterView(
        initialized=SYSID,
        members={n: replace(m, pending_restart=True) for n, m in v.members.items()},
        leader=v.leader,
    )
    assert plan_restart(everyone_pending, pending=True).order == ("b", "c", "a")


def test_a_member_is_back_only_with_a_fresh_record_in_the_right_state() -> None:
    v = three()
    fresh = replace(v.members["b"], updated_at=100.0)
    ok = replace(v, members={**v.members, "b": fresh})
    assert back_after_restart(ok, "b", since=99.0, was_leader=False) is None
    assert (
        back_after_restart(ok, "b", since=101.0, was_leader=False) == "no record published since the restart"
    )
    starting = replace(v, members={**v.members, "b": replace(fresh, state=MemberState.IN_RECOVERY)})
    assert back_after_restart(starting, "b", since=99.0, was_leader=False) == "state in recovery"
    lead = replace(v, members={**v.members, "a": replace(v.members["a"], updated_at=100.0)})
    assert back_after_restart(lead, "a", since=99.0, was_leader=True) is None
    lost = replace(lead, leader=None)
    assert back_after_restart(lost, "a", since=99.0, was_leader=True) == "not the leader any more"
    assert back_after_restart(v, "zz", since=0.0, was_leader=False) == "no member record"
