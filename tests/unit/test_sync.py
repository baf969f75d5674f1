"""Synchronous replication: GUC rendering, candidate choice, and what decide() allows."""

from __future__ import annotations

from hakeeper.config import DynamicConfig
from hakeeper.ha.decide import Action, assess, decide
from hakeeper.ha.model import SyncState
from hakeeper.ha.sync import choose, sync_guc
from tests.unit.test_decide import MB, local, primary, replica, view

SYNC = DynamicConfig(replication_mode="synchronous")


def test_guc_lists_exactly_the_sync_set_so_every_member_acknowledges_every_commit() -> None:
    assert sync_guc(SYNC, ("b", "c")) == 'FIRST 2 ("b", "c")'
    assert sync_guc(SYNC, ()) == ""
    assert sync_guc(DynamicConfig(replication_mode="synchronous", synchronous_strict=True), ()) == "*"
    assert sync_guc(DynamicConfig(), ("b",)) == ""
    assert sync_guc(SYNC, ('we"ird',)) == 'FIRST 1 ("we""ird")'


def test_choose_prefers_sync_priority_then_lag_and_skips_nosync_and_laggards() -> None:
    cfg = DynamicConfig(replication_mode="synchronous", maximum_lag_on_syncnode=MB)
    v = view(
        primary("a"),
        replica("b", lag=100, sync_priority=1),
        replica("c", lag=10, sync_priority=1),
        replica("d", lag=0, sync_priority=5),
        replica("e", nosync=True),
        replica("f", lag=2 * MB),
        replica("g", lag=0),  # not streaming from us
        leader="a",
        config=cfg,
    )
    assert choose(v, {"b", "c", "d", "e", "f"}, "a") == ["d", "c", "b"]


def test_only_sync_set_members_are_promoted_automatically() -> None:
    sync = SyncState("a", ("c",), term=42)
    v = view(replica("b", lsn=100 * MB + 100), replica("c"), config=SYNC, sync=sync)
    assert "not a synchronous standby" in (assess(v.members["b"], v).reason or "")
    assert decide(v, local("c", streaming_from=None)).action == Action.CAMPAIGN
    d = decide(v, local("b", streaming_from=None, leaderless_for=600))
    assert d.action == Action.WAIT and "could lose acknowledged writes" in d.why


def test_primary_and_sync_standby_lost_together_refuses_to_promote() -> None:
    sync = SyncState("a", ("c",), term=42)
    v = view(replica("b"), config=SYNC, sync=sync)  # a and c are gone
    d = decide(v, local("b", streaming_from=None, leaderless_for=3600))
    assert d.action == Action.WAIT and "not a synchronous standby" in d.why


def test_empty_sync_set_means_the_primary_ran_async_so_any_caught_up_replica_may_win() -> None:
    v = view(replica("b"), replica("c"), config=SYNC, sync=SyncState("a", (), term=42))
    assert decide(v, local("b", streaming_from=None)).action == Action.CAMPAIGN


def test_replicas_detach_from_a_leaderless_primary_before_the_election_in_sync_mode() -> None:
    v = view(replica("b"), replica("c"), config=SYNC, sync=SyncState("a", ("b",), term=42))
    assert decide(v, local("b", streaming_from="127.0.0.1:5432")).action == Action.DETACH
    async_view = view(replica("b"), replica("c"))
    assert decide(async_view, local("b", streaming_from="127.0.0.1:5432")).action == Action.CAMPAIGN


def test_switchover_in_sync_mode_goes_to_a_sync_standby_only() -> None:
    from hakeeper.ha.model import Switchover, SwitchoverKind

    sync = SyncState("a", ("c",), term=42)
    req = Switchover(SwitchoverKind.SWITCHOVER, "a", "b", requested_at=0.0)
    v = view(primary("a"), replica("b"), replica("c"), leader="a", config=SYNC, sync=sync, switchover=req)
    d = decide(v, local("a", in_recovery=False, now=1.0))
    assert d.action == Action.REJECT_SWITCHOVER and "not a synchronous standby" in d.why
    anyone = Switchover(SwitchoverKind.SWITCHOVER, "a", None, requested_at=0.0)
    v = view(primary("a"), replica("b"), replica("c"), leader="a", config=SYNC, sync=sync, switchover=anyone)
    d = decide(v, local("a", in_recovery=False, now=1.0))
    assert (d.action, d.target) == (Action.SWITCHOVER, "c")
