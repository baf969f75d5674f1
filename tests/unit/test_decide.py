"""decide() as a truth table, plus generated views checked against the invariants."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakeeper.core.cluster import (
    ClusterView,
    Member,
    MemberRole,
    MemberState,
    Status,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
    SyncState,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.ha.policy.candidates import assess, rank
from hakeeper.ha.policy.decide import Action, decide
from tests.support.builders import MB, local, primary, replica, view

# -- bootstrap -------------------------------------------------------------------------------------


def test_uninitialized_cluster_races_for_initialize() -> None:
    d = decide(ClusterView(), local("a", data_initialized=False, pg_running=False))
    assert d.action == Action.INITIALIZE


def test_empty_node_clones_from_running_leader() -> None:
    v = view(primary("a"), leader="a")
    d = decide(v, local("b", data_initialized=False, pg_running=False))
    assert (d.action, d.target) == (Action.CLONE, "a")


def test_empty_node_waits_without_a_running_leader() -> None:
    v = view(replica("b"))
    d = decide(v, local("c", data_initialized=False, pg_running=False))
    assert d.action == Action.WAIT


def test_foreign_data_directory_is_never_touched() -> None:
    v = view(primary("a"), leader="a")
    d = decide(v, local("b", system_identifier="999"))
    assert d.action == Action.WAIT
    assert "another cluster" in d.why


# -- leader ------------------------------------------------------------------------------------------


def test_leader_with_running_primary_leads() -> None:
    v = view(primary("a"), replica("b"), leader="a")
    assert decide(v, local("a", in_recovery=False)).action == Action.LEAD


def test_leader_in_recovery_promotes() -> None:
    v = view(replica("a"), replica("b"), leader="a")
    assert decide(v, local("a")).action == Action.PROMOTE


def test_crashed_primary_restarts_in_place_within_timeout() -> None:
    v = view(primary("a"), replica("b"), leader="a")
    d = decide(v, local("a", pg_running=False, in_recovery=None, pg_down_for=3))
    assert d.action == Action.START_PRIMARY


def test_crashed_primary_releases_after_primary_start_timeout() -> None:
    v = view(primary("a"), replica("b"), leader="a", config=DynamicConfig(primary_start_timeout=10))
    d = decide(v, local("a", pg_running=False, in_recovery=None, pg_down_for=11))
    assert d.action == Action.RELEASE


def test_leader_without_confirmed_lease_never_starts_read_write() -> None:
    v = view(primary("a"), leader="a")
    d = decide(v, local("a", pg_running=False, lease_valid=False))
    assert (d.action, d.target) == (Action.START_REPLICA, None)  # read-only, no upstream
    assert decide(v, local("a", lease_valid=False)).action == Action.WAIT
    d = decide(v, local("a", in_recovery=False, lease_valid=False))
    assert d.action == Action.DEMOTE


def test_restarted_agent_takes_its_leader_key_over() -> None:
    v = view(primary("a"), leader="a", lease=5)
    assert decide(v, local("a", in_recovery=False, lease=9)).action == Action.TAKEOVER


# -- followers -------------------------------------------------------------------------------------


def test_writable_node_demotes_when_another_leads() -> None:
    v = view(primary("b", tl=2), replica("a"), leader="b")
    d = decide(v, local("a", in_recovery=False))
    assert (d.action, d.target) == (Action.DEMOTE, "b")


def test_former_primary_rewinds_before_following() -> None:
    v = view(primary("b", tl=2), leader="b")
    d = decide(v, local("a", pg_running=False, needs_rewind=True))
    assert (d.action, d.target) == (Action.REWIND, "b")


def test_stopped_replica_starts_following_leader() -> None:
    v = view(primary("b"), leader="b")
    d = decide(v, local("a", pg_running=False))
    assert (d.action, d.target) == (Action.START_REPLICA, "b")


def test_running_replica_follows_leader() -> None:
    v = view(primary("b"), replica("a"), leader="b")
    assert decide(v, local("a")).action == Action.FOLLOW


# -- elections -------------------------------------------------------------------------------------


def test_most_caught_up_replica_campaigns_and_others_wait() -> None:
    v = view(replica("a", lsn=100 * MB - 900), replica("b", lsn=100 * MB), replica("c", lsn=100 * MB - 500))
    assert decide(v, local("b")).action == Action.CAMPAIGN
    assert decide(v, local("a")).action == Action.WAIT
    d = decide(v, local("c"))
    assert d.action == Action.WAIT and "b is a better candidate" in d.why


def test_lagging_replica_is_never_promoted() -> None:
    cfg = DynamicConfig(maximum_lag_on_failover=MB)
    v = view(replica("a", lsn=10 * MB), status=Status(lsn=100 * MB, timeline=1), config=cfg)
    d = decide(v, local("a", leaderless_for=3600))
    assert d.action == Action.WAIT
    assert "maximum_lag_on_failover" in d.why


def test_nofailover_is_respected() -> None:
    v = view(replica("a", nofailover=True, lsn=100 * MB + 500), replica("b", lsn=100 * MB))
    d = decide(v, local("a", leaderless_for=3600))
    assert d.action == Action.WAIT and "nofailover" in d.why
    assert decide(v, local("b")).action == Action.CAMPAIGN


def test_equal_lsn_falls_to_priority_then_name() -> None:
    v = view(replica("a"), replica("b", failover_priority=5), replica("c", failover_priority=5))
    assert [c.name for c in rank(v)] == ["b", "c", "a"]
    assert decide(v, local("b")).action == Action.CAMPAIGN
    assert decide(v, local("c")).action == Action.WAIT


def test_old_primary_on_lower_timeline_never_takes_the_lead() -> None:
    v = view(replica("old", tl=1, lsn=500 * MB), replica("b", tl=2, lsn=100 * MB))
    assert rank(v)[0].name == "b"  # the diverged old timeline does not make b look lagging
    d = decide(v, local("old", timeline=1, leaderless_for=3600))
    assert d.action == Action.WAIT and "timeline 1 is behind" in d.why


def test_next_candidate_campaigns_after_grace_when_best_is_silent() -> None:
    cfg = DynamicConfig(candidate_grace=2)
    v = view(replica("a", lsn=100 * MB), replica("b", lsn=100 * MB - 10), config=cfg)
    assert decide(v, local("b", leaderless_for=1.0)).action == Action.WAIT
    assert decide(v, local("b", leaderless_for=2.5)).action == Action.CAMPAIGN


def test_stopped_node_without_leader_starts_read_only_first() -> None:
    v = view(replica("b"))
    assert decide(v, local("a", pg_running=False)).action == Action.START_REPLICA


def test_writable_node_without_leader_keeps_writing_only_if_best() -> None:
    v = view(primary("a", lsn=100 * MB), replica("b", lsn=100 * MB))
    assert decide(v, local("a", in_recovery=False)).action == Action.CAMPAIGN
    v2 = view(primary("a", lsn=50 * MB), replica("b", lsn=100 * MB))
    assert decide(v2, local("a", in_recovery=False)).action == Action.DEMOTE


def test_ineligible_member_reason_is_reported() -> None:
    m = replace(replica("a"), state=MemberState.STOPPED)
    assert assess(m, view(m)).reason == "postgres is not running (state stopped)"


# -- generated views ---------------------------------------------------------------------------------

NAMES = ["n1", "n2", "n3", "n4"]


@st.composite
def members(draw: st.DrawFn) -> list[Member]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    out = []
    for n in names:
        out.append(
            Member(
                name=n,
                role=draw(st.sampled_from(list(MemberRole))),
                state=draw(st.sampled_from(list(MemberState))),
                timeline=draw(st.one_of(st.none(), st.integers(1, 4))),
                wal_lsn=draw(st.one_of(st.none(), st.integers(0, 8 * MB))),
                nofailover=draw(st.booleans()),
                failover_priority=draw(st.integers(0, 3)),
            )
        )
    return out


@given(
    ms=members(),
    leader=st.one_of(st.none(), st.sampled_from(NAMES)),
    leaderless_for=st.floats(0, 1.9),
    max_lag=st.integers(0, 4 * MB),
)
def test_generated_views_never_elect_two_campaigners_within_grace(
    ms: list[Member], leader: str | None, leaderless_for: float, max_lag: int
) -> None:
    cfg = DynamicConfig(maximum_lag_on_failover=max_lag, candidate_grace=2)
    v = view(*ms, leader=leader, config=cfg)
    campaigners = []
    for m in ms:
        lf = local(
            m.name,
            pg_running=m.state in (MemberState.RUNNING, MemberState.STREAMING, MemberState.IN_RECOVERY),
            in_recovery=True,
            timeline=m.timeline,
            wal_lsn=m.wal_lsn,
            leaderless_for=leaderless_for,
        )
        d = decide(v, lf)
        if d.action == Action.CAMPAIGN:
            campaigners.append(m.name)
            assert leader is None, "nobody campaigns while a leader key exists"
            assert assess(m, v).eligible
    assert len(campaigners) <= 1


@given(
    ms=members(),
    leader=st.one_of(st.none(), st.sampled_from(NAMES)),
    me=st.sampled_from(NAMES),
    running=st.booleans(),
    in_recovery=st.booleans(),
    lease_valid=st.booleans(),
    same_lease=st.booleans(),
    down_for=st.floats(0, 100),
)
def test_only_the_lease_holder_is_told_to_run_read_write(
    ms: list[Member],
    leader: str | None,
    me: str,
    running: bool,
    in_recovery: bool,
    lease_valid: bool,
    same_lease: bool,
    down_for: float,
) -> None:
    v = view(*ms, leader=leader, lease=7)
    lf = local(
        me,
        pg_running=running,
        in_recovery=in_recovery if running else None,
        lease=7 if same_lease else 8,
        lease_valid=lease_valid,
        pg_down_for=down_for,
    )
    d = decide(v, lf)
    holds = leader == me and same_lease and lease_valid
    if d.action in (Action.LEAD, Action.PROMOTE, Action.START_PRIMARY):
        assert holds
    if lf.writable and leader is not None and leader != me:
        assert d.action == Action.DEMOTE
    if lf.writable and leader is None:
        assert d.action in (Action.CAMPAIGN, Action.DEMOTE)


@pytest.mark.parametrize("action", list(Action))
def test_every_action_has_an_executor(action: Action) -> None:
    from hakeeper.ha.agent import EXECUTORS

    assert action in EXECUTORS


# -- switchover, manual failover, pause --------------------------------------------------------------

NOW = 1_800_000_000.0


def sw(**kw: object) -> Switchover:
    base: dict[str, object] = dict(
        kind=SwitchoverKind.SWITCHOVER, leader="a", candidate=None, requested_at=NOW
    )
    base.update(kw)
    return Switchover(**base)  # type: ignore[arg-type]


def test_leader_hands_over_to_the_named_candidate() -> None:
    v = view(primary("a"), replica("b"), replica("c"), leader="a", switchover=sw(candidate="c"))
    d = decide(v, local("a", in_recovery=False, now=NOW))
    assert (d.action, d.target) == (Action.SWITCHOVER, "c")


def test_switchover_without_candidate_picks_the_best_streaming_replica() -> None:
    v = view(
        primary("a"),
        replica("b", lsn=100 * MB - 10),
        replica("c", lsn=100 * MB),
        leader="a",
        switchover=sw(),
    )
    assert decide(v, local("a", in_recovery=False, now=NOW)).target == "c"


def test_switchover_to_a_lagging_or_nofailover_candidate_is_refused() -> None:
    cfg = DynamicConfig(maximum_lag_on_failover=MB)
    v = view(primary("a"), replica("b", lsn=10 * MB), leader="a", switchover=sw(candidate="b"), config=cfg)
    d = decide(v, local("a", in_recovery=False, now=NOW))
    assert d.action == Action.REJECT_SWITCHOVER and "maximum_lag_on_failover" in d.why
    v = view(primary("a"), replica("b", nofailover=True), leader="a", switchover=sw(candidate="b"))
    assert decide(v, local("a", in_recovery=False, now=NOW)).action == Action.REJECT_SWITCHOVER


def test_scheduled_switchover_waits_for_its_time() -> None:
    v = view(primary("a"), replica("b"), leader="a", switchover=sw(candidate="b", scheduled_at=NOW + 60))
    assert decide(v, local("a", in_recovery=False, now=NOW)).action == Action.LEAD
    assert decide(v, local("a", in_recovery=False, now=NOW + 61)).action == Action.SWITCHOVER


def test_stale_switchover_request_is_dropped() -> None:
    v = view(primary("a"), replica("b"), leader="a", switchover=sw(candidate="b"))
    d = decide(v, local("a", in_recovery=False, now=NOW + 3600))
    assert d.action == Action.REJECT_SWITCHOVER


def test_during_handover_only_the_candidate_campaigns() -> None:
    handover = sw(candidate="c", stage=SwitchoverStage.HANDOVER, handover_at=NOW)
    # b is ahead of c by a little: automatic ranking would pick b, the hand-over picks c
    v = view(replica("a"), replica("b", lsn=100 * MB + 5), replica("c"), switchover=handover)
    assert decide(v, local("c", now=NOW)).action == Action.CAMPAIGN
    d = decide(v, local("b", now=NOW, leaderless_for=60))
    assert d.action == Action.WAIT and "switchover to c" in d.why


def test_manual_failover_to_a_lagging_candidate_needs_force() -> None:
    cfg = DynamicConfig(maximum_lag_on_failover=MB)
    req = sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="c")
    v = view(replica("b", lsn=100 * MB), replica("c", lsn=10 * MB), switchover=req, config=cfg)
    d = decide(v, local("c", wal_lsn=10 * MB, now=NOW))
    assert d.action == Action.WAIT and "refused" in d.why
    forced = view(
        replica("b", lsn=100 * MB), replica("c", lsn=10 * MB), switchover=replace(req, force=True), config=cfg
    )
    assert decide(forced, local("c", wal_lsn=10 * MB, now=NOW)).action == Action.CAMPAIGN
    assert decide(forced, local("b", now=NOW, leaderless_for=60)).action == Action.WAIT


def test_pause_stops_automatic_actions_but_not_demotion() -> None:
    paused = DynamicConfig(pause=True)
    v = view(replica("a"), replica("b"), config=paused)
    d = decide(v, local("a", leaderless_for=600))
    assert d.action == Action.WAIT and "paused" in d.why
    v = view(primary("a"), replica("b"), leader="a", config=paused)
    d = decide(v, local("a", pg_running=False, pg_down_for=600))
    assert d.action == Action.WAIT and "paused" in d.why
    v = view(primary("b"), replica("a"), leader="b", config=paused)
    assert decide(v, local("a", in_recovery=False)).action == Action.DEMOTE
    assert decide(v, local("a", pg_running=False)).action == Action.WAIT


def test_manual_failover_works_while_paused() -> None:
    req = sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="b")
    v = view(replica("a"), replica("b"), switchover=req, config=DynamicConfig(pause=True))
    assert decide(v, local("b", now=NOW)).action == Action.CAMPAIGN


# -- quorum mode (ANY k): who may be promoted ----------------------------------------------------------

QUORUM = DynamicConfig(replication_mode="quorum")


def voter(name: str, lsn: int = 100 * MB, **kw: object) -> Member:
    """A replica whose record was published after the leader key disappeared."""
    return replica(name, lsn=lsn, leaderless=True, **kw)


def quorum_key(*members: str, k: int) -> SyncState:
    return SyncState("a", members, term=42, quorum=k)


def test_quorum_promotes_a_voter_when_enough_voters_are_reachable() -> None:
    # ANY 1 of (b, c): every acknowledged commit is on b or c; with both reachable, the more
    # advanced one has them all.
    v = view(voter("b"), voter("c", lsn=100 * MB + 10), config=QUORUM, sync=quorum_key("b", "c", k=1))
    assert decide(v, local("c")).action == Action.CAMPAIGN
    d = decide(v, local("b", leaderless_for=600))
    assert d.action == Action.WAIT and "quorum voter c is further ahead" in d.why
    assert [c.name for c in rank(v)] == ["c"]


def test_quorum_picks_the_most_advanced_voter_and_ties_go_to_priority_then_name() -> None:
    key = quorum_key("b", "c", "d", k=2)  # any 2 of the 3 voters include one with every commit
    v = view(
        voter("b", lsn=100 * MB),
        voter("c", lsn=101 * MB),
        replica("e", lsn=102 * MB),
        config=QUORUM,
        sync=key,
    )
    assert [c.name for c in rank(v)] == ["c"]  # e is further ahead but not a voter
    assert "not a quorum voter" in (assess(v.members["e"], v).reason or "")
    tie = view(
        voter("b", lsn=101 * MB), voter("c", lsn=101 * MB, failover_priority=2), config=QUORUM, sync=key
    )
    assert [c.name for c in rank(tie)] == ["c", "b"]
    assert decide(tie, local("c", wal_lsn=101 * MB)).action == Action.CAMPAIGN


def test_quorum_refuses_with_too_few_reachable_voters_and_says_why() -> None:
    # ANY 1 of (b, c): a commit acknowledged by c alone is not on b, so b alone is not enough.
    v = view(voter("b"), config=QUORUM, sync=quorum_key("b", "c", k=1))
    d = decide(v, local("b", leaderless_for=3600))
    assert d.action == Action.WAIT
    assert "only 1 of 2 quorum voters reachable (b); 2 needed" in d.why
    assert "could lose acknowledged writes" in d.why
    # A voter whose postgres is down does not count either.
    down = replace(voter("c"), state=MemberState.STOPPED, wal_lsn=None, timeline=None)
    v = view(voter("b"), down, config=QUORUM, sync=quorum_key("b", "c", k=1))
    assert decide(v, local("b", leaderless_for=3600)).action == Action.WAIT


def test_quorum_waits_for_positions_read_after_the_leader_was_lost() -> None:
    # c's record predates the leader's loss: c may have received (and acknowledged) more since.
    v = view(voter("b"), replica("c", lsn=99 * MB), config=QUORUM, sync=quorum_key("b", "c", k=1))
    d = decide(v, local("b"))
    assert d.action == Action.WAIT and "waiting for quorum voters c to report" in d.why
    assert "could lose" not in d.why


def test_quorum_forced_failover_overrides_the_refusal() -> None:
    req = sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="b")
    key = quorum_key("b", "c", k=1)
    v = view(voter("b"), config=QUORUM, sync=key, switchover=req)
    d = decide(v, local("b", now=NOW))
    assert d.action == Action.WAIT and "refused" in d.why and "quorum voters reachable" in d.why
    forced = view(voter("b"), config=QUORUM, sync=key, switchover=replace(req, force=True))
    d = decide(forced, local("b", now=NOW))
    assert d.action == Action.CAMPAIGN and "(forced)" in d.why


def test_quorum_rules_apply_only_without_a_leader_and_never_to_the_old_leader() -> None:
    key = quorum_key("b", "c", k=1)
    # With a leader, a switchover waits for the candidate to receive everything: any voter.
    v = view(primary("a"), replica("b"), replica("c", lsn=99 * MB), leader="a", config=QUORUM, sync=key)
    assert assess(v.members["c"], v).eligible
    # The old primary back as a replica has every commit it acknowledged.
    v = view(voter("a", lsn=101 * MB), config=QUORUM, sync=key)
    assert decide(v, local("a", wal_lsn=101 * MB)).action == Action.CAMPAIGN
    # A switchover handed over: the candidate has received the old primary's last WAL.
    handover = sw(candidate="b", stage=SwitchoverStage.HANDOVER, handover_at=NOW)
    v = view(voter("b"), config=QUORUM, sync=key, switchover=handover)
    assert decide(v, local("b", now=NOW)).action == Action.CAMPAIGN
    # k == number of voters reads like synchronous mode: every voter has every commit.
    v = view(voter("b"), config=QUORUM, sync=quorum_key("b", "c", k=2))
    assert decide(v, local("b")).action == Action.CAMPAIGN
    # An empty key claims nothing (the leader ran without waiting): any caught-up replica.
    v = view(replica("b"), replica("c"), config=QUORUM, sync=SyncState("a", (), term=42, quorum=0))
    assert decide(v, local("b")).action == Action.CAMPAIGN


def test_quorum_replicas_detach_and_switchover_goes_to_a_voter_only() -> None:
    v = view(replica("b"), replica("c"), config=QUORUM, sync=quorum_key("b", "c", k=1))
    assert decide(v, local("b", streaming_from="127.0.0.1:5432")).action == Action.DETACH
    key = quorum_key("c", "d", k=1)
    members = (primary("a"), replica("b"), replica("c"), replica("d"))
    v = view(*members, leader="a", config=QUORUM, sync=key, switchover=sw(candidate="b"))
    d = decide(v, local("a", in_recovery=False, now=NOW))
    assert d.action == Action.REJECT_SWITCHOVER and "not a quorum voter" in d.why
    v = view(*members, leader="a", config=QUORUM, sync=key, switchover=sw())
    d = decide(v, local("a", in_recovery=False, now=NOW))
    assert (d.action, d.target) == (Action.SWITCHOVER, "c")


def test_a_quorum_key_is_read_as_quorum_also_after_a_switch_to_synchronous_mode() -> None:
    v = view(voter("b"), config=DynamicConfig(replication_mode="synchronous"), sync=quorum_key("b", "c", k=1))
    assert "quorum voters reachable" in (assess(v.members["b"], v).reason or "")
