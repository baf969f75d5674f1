"""decide() as one table of situations, plus generated views checked against the invariants.

Each ``Case`` is a situation built with the builders of ``tests/support/builders.py`` and the
decision expected for it: the action, the upstream it names and the exact sentence the agent
logs (operators and tests grep for those sentences, so a change to one shows up here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

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
from hakeeper.core.slots import SlotReport, SlotState
from hakeeper.ha.policy.candidates import assess, rank
from hakeeper.ha.policy.decide import RULES, decide
from hakeeper.ha.policy.decision import (
    ACTIONS,
    STALE_VIEW_WHY,
    Action,
    BootstrapLeft,
    Decision,
    LeaseOwner,
    LocalFacts,
)
from hakeeper.ha.policy.election import ELECTION
from hakeeper.ha.policy.rules import Ctx, Rule, first_match
from tests.support.builders import MB, SYSID, local, primary, replica, view

NOW = 1_800_000_000.0
SYNC = DynamicConfig(replication_mode="synchronous")
QUORUM = DynamicConfig(replication_mode="quorum")


def sw(**kw: object) -> Switchover:
    base: dict[str, object] = dict(
        kind=SwitchoverKind.SWITCHOVER, leader="a", candidate=None, requested_at=NOW
    )
    base.update(kw)
    return Switchover(**base)  # type: ignore[arg-type]


def on_major(m: Member, release: str) -> Member:
    """``m`` running PostgreSQL ``release`` (its member record's ``server_version``)."""
    return replace(m, server_version=release)


def voter(name: str, lsn: int = 100 * MB, **kw: Any) -> Member:
    """A replica whose record was published after the leader key disappeared."""
    return replica(name, lsn=lsn, leaderless=True, **kw)


def quorum_key(*members: str, k: int) -> SyncState:
    return SyncState("a", members, term=42, quorum=k)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    view: ClusterView
    local: LocalFacts
    action: Action
    why: str  # exactly what the agent logs
    target: str | None = None
    why_has: tuple[str, ...] = ()  # the fragments operators and older tests grep for
    facts: Mapping[str, object] | None = None  # checked when given


# Views shared by several rows.
_LAGGING = view(
    replica("a", lsn=10 * MB),
    status=Status(lsn=100 * MB, timeline=1),
    config=DynamicConfig(maximum_lag_on_failover=MB),
)
_THREE = view(replica("a", lsn=100 * MB - 900), replica("b", lsn=100 * MB), replica("c", lsn=100 * MB - 500))
_NOFAILOVER = view(replica("a", nofailover=True, lsn=100 * MB + 500), replica("b", lsn=100 * MB))
_PRIORITY = view(replica("a"), replica("b", failover_priority=5), replica("c", failover_priority=5))
_OLD_TIMELINE = view(replica("old", tl=1, lsn=500 * MB), replica("b", tl=2, lsn=100 * MB))
_GRACE = view(
    replica("a", lsn=100 * MB), replica("b", lsn=100 * MB - 10), config=DynamicConfig(candidate_grace=2)
)
_LEASE_UNCONFIRMED = view(primary("a"), leader="a")
_SCHEDULED = view(primary("a"), replica("b"), leader="a", switchover=sw(candidate="b", scheduled_at=NOW + 60))
_B_ON_18 = view(on_major(primary("b"), "18.6"), leader="b")
_NOT_FOLLOWING_18 = (
    "not following b: the leader b runs PostgreSQL 18.6, this node's binaries are PostgreSQL 17"
)


def _SLOTS_SCHEDULED(*, synced: bool, allow: bool = False) -> ClusterView:
    """Leader a with failover slot cdc, replica b with a copy (``synced`` or not), and a
    switchover to b scheduled for NOW + 60."""
    cdc = SlotState("cdc", "logical", True, False, False, database="app", plugin="pgoutput")
    return view(
        replace(primary("a"), slots=SlotReport(17, (cdc,))),
        replica("b", slots=SlotReport(17, (replace(cdc, synced=synced),))),
        leader="a",
        switchover=sw(candidate="b", scheduled_at=NOW + 60, allow_unsynced_slots=allow),
    )


_HANDOVER = view(
    # b is ahead of c by a little: automatic ranking would pick b, the hand-over picks c
    replica("a"),
    replica("b", lsn=100 * MB + 5),
    replica("c"),
    switchover=sw(candidate="c", stage=SwitchoverStage.HANDOVER, handover_at=NOW),
)
_MANUAL_LAGGING = sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="c")
_MANUAL_LAGGING_CFG = DynamicConfig(maximum_lag_on_failover=MB)
_FORCED_LAGGING = view(
    replica("b", lsn=100 * MB),
    replica("c", lsn=10 * MB),
    switchover=replace(_MANUAL_LAGGING, force=True),
    config=_MANUAL_LAGGING_CFG,
)
_PAUSED = DynamicConfig(pause=True)
_PAUSED_OTHER_LEADS = view(primary("b"), replica("a"), leader="b", config=_PAUSED)
_QUORUM_BC1 = view(voter("b"), voter("c", lsn=100 * MB + 10), config=QUORUM, sync=quorum_key("b", "c", k=1))
_QUORUM_FAILOVER = sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="b")
_QUORUM_MEMBERS = (primary("a"), replica("b"), replica("c"), replica("d"))
_SYNC_C = SyncState("a", ("c",), term=42)
_SYNC_ONLY_C = view(replica("b", lsn=100 * MB + 100), replica("c"), config=SYNC, sync=_SYNC_C)

_LEFT_999 = BootstrapLeft("999", won=False)  # killed after initdb made "999", before the race
_LEFT_INITDB = BootstrapLeft(None, won=False)  # killed in initdb
_WON_999 = BootstrapLeft("999", won=True)

CASES = [
    # -- bootstrap ---------------------------------------------------------------------------------
    Case(
        "cluster not initialized: race for the initialize key",
        ClusterView(),
        local("a", data_initialized=False, pg_running=False),
        Action.INITIALIZE,
        why="cluster not initialized",
    ),
    Case(
        "empty data directory, running leader: clone from it",
        view(primary("a"), leader="a"),
        local("b", data_initialized=False, pg_running=False),
        Action.CLONE,
        why="empty data directory",
        target="a",
    ),
    Case(
        "empty data directory, no running leader: wait",
        view(replica("b")),
        local("c", data_initialized=False, pg_running=False),
        Action.WAIT,
        why="empty data directory and no running leader to clone from",
    ),
    Case(
        "foreign data directory is never touched",
        view(primary("a"), leader="a"),
        local("b", system_identifier="999"),
        Action.WAIT,
        why="data directory belongs to another cluster; refusing to touch it",
        why_has=("another cluster",),
        facts={"ours": "999", "cluster": SYSID},
    ),
    Case(
        "foreign data directory running read-write is stopped, not touched",
        view(primary("a"), leader="a"),
        local("b", system_identifier="999", in_recovery=False),
        Action.DEMOTE,
        why="data directory belongs to another cluster and runs read-write: stopping it (nothing removed)",
        facts={"ours": "999", "cluster": SYSID},
    ),
    # -- what our interrupted bootstrap left (its marker: BootstrapLeft) -------------------------
    Case(
        "our abandoned bootstrap, another member initialized the cluster: discard it",
        view(primary("a"), leader="a"),
        local("b", system_identifier="999", pg_running=False, in_recovery=None, bootstrap_left=_LEFT_999),
        Action.DISCARD_BOOTSTRAP,
        why="data directory left by our interrupted bootstrap (another member initialized the cluster)",
        facts={"ours": "999", "cluster": SYSID},
    ),
    Case(
        "our abandoned bootstrap, killed in initdb (no pg_control): discard it",
        view(primary("a"), leader="a"),
        local("b", system_identifier=None, pg_running=False, in_recovery=None, bootstrap_left=_LEFT_INITDB),
        Action.DISCARD_BOOTSTRAP,
        why="data directory left by our interrupted bootstrap (no readable pg_control)",
    ),
    Case(
        "our abandoned bootstrap, cluster still not initialized: discard it and race again",
        ClusterView(),
        local("a", system_identifier="999", pg_running=False, in_recovery=None, bootstrap_left=_LEFT_INITDB),
        Action.DISCARD_BOOTSTRAP,
        why="data directory left by our interrupted bootstrap (the cluster is not initialized: racing again)",
    ),
    Case(
        "our abandoned bootstrap, paused: leave it",
        view(primary("a"), leader="a", config=_PAUSED),
        local("b", system_identifier="999", pg_running=False, in_recovery=None, bootstrap_left=_LEFT_999),
        Action.WAIT,
        why="paused: not discarding the data directory our interrupted bootstrap left",
    ),
    Case(
        "a marker of a won race is no proof: the foreign data directory is not touched",
        view(primary("a"), leader="a"),
        local("b", system_identifier="999", pg_running=False, in_recovery=None, bootstrap_left=_WON_999),
        Action.WAIT,
        why="data directory belongs to another cluster; refusing to touch it",
    ),
    Case(
        "a marker of another system identifier is no proof: the foreign data directory is not touched",
        view(primary("a"), leader="a"),
        local(
            "b",
            system_identifier="999",
            pg_running=False,
            in_recovery=None,
            bootstrap_left=BootstrapLeft("888", won=False),
        ),
        Action.WAIT,
        why="data directory belongs to another cluster; refusing to touch it",
    ),
    Case(
        "a marker is no proof for a running PostgreSQL: the foreign data directory is not touched",
        view(primary("a"), leader="a"),
        local("b", system_identifier="999", bootstrap_left=_LEFT_999),
        Action.WAIT,
        why="data directory belongs to another cluster; refusing to touch it",
    ),
    Case(
        "leader, our bootstrap was killed before the roles existed: finish it",
        view(primary("a"), leader="a"),
        local("a", in_recovery=False, bootstrap_left=BootstrapLeft(SYSID, won=True)),
        Action.FINISH_BOOTSTRAP,
        why="we initialized the cluster but the bootstrap did not finish; finishing it",
    ),
    Case(
        "leader, killed right after winning the race (marker still says race): finish it",
        view(primary("a"), leader="a"),
        local("a", in_recovery=False, bootstrap_left=BootstrapLeft(SYSID, won=False)),
        Action.FINISH_BOOTSTRAP,
        why="we initialized the cluster but the bootstrap did not finish; finishing it",
    ),
    Case(
        "leader with an unfinished bootstrap in recovery: promote first",
        view(replica("a"), leader="a"),
        local("a", bootstrap_left=BootstrapLeft(SYSID, won=True)),
        Action.PROMOTE,
        why="we hold the leader key and postgres is in recovery",
    ),
    # -- we hold the leader key --------------------------------------------------------------------
    Case(
        "leader with a running primary leads",
        view(primary("a"), replica("b"), leader="a"),
        local("a", in_recovery=False),
        Action.LEAD,
        why="we hold the leader key",
    ),
    Case(
        "leader in recovery promotes",
        view(replica("a"), replica("b"), leader="a"),
        local("a"),
        Action.PROMOTE,
        why="we hold the leader key and postgres is in recovery",
    ),
    Case(
        "leader, postgres down within primary_start_timeout: restart in place",
        view(primary("a"), replica("b"), leader="a"),
        local("a", pg_running=False, in_recovery=None, pg_down_for=3),
        Action.START_PRIMARY,
        why="postgres is down on the leader; restarting it in place",
        facts={"down_for": 3, "primary_start_timeout": 30},
    ),
    Case(
        "leader, postgres down past primary_start_timeout: release the key",
        view(primary("a"), replica("b"), leader="a", config=DynamicConfig(primary_start_timeout=10)),
        local("a", pg_running=False, in_recovery=None, pg_down_for=11),
        Action.RELEASE,
        why="postgres did not come back within primary_start_timeout",
    ),
    Case(
        "leader without a confirmed lease, postgres down: start read-only, no upstream",
        _LEASE_UNCONFIRMED,
        local("a", pg_running=False, lease_valid=False),
        Action.START_REPLICA,
        why="leader lease could not be confirmed; serving read-only until it is",
    ),
    Case(
        "leader without a confirmed lease, in recovery: never go read-write",
        _LEASE_UNCONFIRMED,
        local("a", lease_valid=False),
        Action.WAIT,
        why="leader lease could not be confirmed; not going read-write",
    ),
    Case(
        "leader without a confirmed lease, writable: demote",
        _LEASE_UNCONFIRMED,
        local("a", in_recovery=False, lease_valid=False),
        Action.DEMOTE,
        why="leader lease could not be confirmed",
    ),
    Case(
        "restarted agent takes its leader key over",
        view(primary("a"), leader="a", lease=5),
        local("a", in_recovery=False, lease=9, leader_lease_owner=LeaseOwner.OURS),
        Action.TAKEOVER,
        why="leader key names us under an earlier lease",
    ),
    Case(
        "the leader key under an expired lease is taken over",
        view(primary("a"), leader="a", lease=5),
        local("a", in_recovery=False, lease=9, leader_lease_owner=LeaseOwner.EXPIRED),
        Action.TAKEOVER,
        why="leader key names us under an expired lease",
    ),
    # -- another agent under our name ---------------------------------------------------------------
    Case(
        "the leader key under another agent's live lease: a writable node demotes, never takes it",
        view(primary("a"), leader="a", lease=5),
        local("a", in_recovery=False, lease=9, leader_lease_owner=LeaseOwner.FOREIGN),
        Action.DEMOTE,
        why="the leader key names us under a live lease that is not ours: another agent runs under our name",
    ),
    Case(
        "the leader key under another agent's live lease: a replica waits",
        view(primary("a"), leader="a", lease=5),
        local("a", lease=9, leader_lease_owner=LeaseOwner.FOREIGN),
        Action.WAIT,
        why="the leader key names us under a live lease that is not ours: another agent runs under our name",
    ),
    Case(
        "a copy with no data never releases the key another agent of its name holds",
        view(primary("a"), leader="a", lease=5),
        local(
            "a",
            data_initialized=False,
            pg_running=False,
            in_recovery=None,
            lease=9,
            leader_lease_owner=LeaseOwner.FOREIGN,
        ),
        Action.WAIT,
        why="the leader key names us under a live lease that is not ours: another agent runs under our name",
    ),
    Case(
        "our member key under another agent's live lease while we hold the key: give it up",
        view(primary("a"), leader="a"),
        local("a", in_recovery=False, name_conflict=True),
        Action.RELEASE,
        why="our member key is kept alive by a lease that is not ours: another agent runs under our name",
    ),
    Case(
        "our member key under another agent's live lease, writable without the key: demote",
        view(primary("a"), leader="a", lease=5),
        local("a", in_recovery=False, lease=9, leader_lease_owner=LeaseOwner.OURS, name_conflict=True),
        Action.DEMOTE,
        why="our member key is kept alive by a lease that is not ours: another agent runs under our name",
    ),
    Case(
        "our member key under another agent's live lease, no leader: no campaign",
        view(replica("a"), replica("b", lsn=10 * MB)),
        local("a", name_conflict=True),
        Action.WAIT,
        why="our member key is kept alive by a lease that is not ours: another agent runs under our name",
    ),
    Case(
        "the leader key's other lease could not be checked, writable: demote",
        view(primary("a"), leader="a", lease=5),
        local("a", in_recovery=False, lease=9),
        Action.DEMOTE,
        why="leader key names us under a lease we could not check: not writing under it",
    ),
    Case(
        "the leader key's other lease could not be checked: wait",
        view(primary("a"), leader="a", lease=5),
        local("a", pg_running=False, in_recovery=None, lease=9),
        Action.WAIT,
        why="leader key names us under a lease we could not check: not taking it over",
    ),
    # -- another node leads ------------------------------------------------------------------------
    Case(
        "writable node demotes when another leads",
        view(primary("b", tl=2), replica("a"), leader="b"),
        local("a", in_recovery=False),
        Action.DEMOTE,
        why="b holds the leader key",
        target="b",
    ),
    Case(
        "former primary rewinds before following",
        view(primary("b", tl=2), leader="b"),
        local("a", pg_running=False, needs_rewind=True),
        Action.REWIND,
        why="our data may have diverged from the leader",
        target="b",
    ),
    Case(
        "stopped replica starts following the leader",
        view(primary("b"), leader="b"),
        local("a", pg_running=False),
        Action.START_REPLICA,
        why="following b",
        target="b",
    ),
    Case(
        "running replica follows the leader",
        view(primary("b"), replica("a"), leader="b"),
        local("a"),
        Action.FOLLOW,
        why="following b",
        target="b",
    ),
    # -- a leader of another PostgreSQL major (issue 14): never cloned from, rewound from, followed -
    Case(
        "empty data directory, the running leader is of another major: wait",
        view(on_major(primary("a"), "18.6"), leader="a"),
        local("b", data_initialized=False, pg_running=False, binaries_major=17),
        Action.WAIT,
        why="clone refused: the leader a runs PostgreSQL 18.6, this node's binaries are PostgreSQL 17",
    ),
    Case(
        "empty data directory, the running leader is of our major: clone from it",
        view(on_major(primary("a"), "17.10"), leader="a"),
        local("b", data_initialized=False, pg_running=False, binaries_major=17),
        Action.CLONE,
        why="empty data directory",
        target="a",
    ),
    Case(
        "former primary, the leader is of another major: no rewind",
        view(on_major(primary("b", tl=2), "18.6"), leader="b"),
        local("a", pg_running=False, needs_rewind=True, binaries_major=17),
        Action.WAIT,
        why=_NOT_FOLLOWING_18,
    ),
    Case(
        "stopped replica, the leader is of another major: not started to follow it",
        _B_ON_18,
        local("a", pg_running=False, binaries_major=17),
        Action.WAIT,
        why=_NOT_FOLLOWING_18,
    ),
    Case(
        "running replica, the leader is of another major: not re-pointed at it",
        view(on_major(primary("b"), "15.18"), replica("a"), leader="b"),
        local("a", binaries_major=17),
        Action.WAIT,
        why="not following b: the leader b runs PostgreSQL 15.18, this node's binaries are PostgreSQL 17",
    ),
    Case(
        "writable, another node of another major leads: demoted all the same",
        _B_ON_18,
        local("a", in_recovery=False, binaries_major=17),
        Action.DEMOTE,
        why="b holds the leader key",
        target="b",
    ),
    Case(
        "stopped replica, the leader publishes no release (an older agent): follows as before",
        view(primary("b"), leader="b"),
        local("a", pg_running=False, binaries_major=17),
        Action.START_REPLICA,
        why="following b",
        target="b",
    ),
    # -- elections ---------------------------------------------------------------------------------
    Case(
        "most caught-up replica campaigns",
        _THREE,
        local("b"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
        facts={"position": 0, "best": "b", "timeline": 1, "wal_lsn": 100 * MB},
    ),
    Case(
        "least caught-up replica waits",
        _THREE,
        local("a"),
        Action.WAIT,
        why="b is a better candidate (timeline 1, lsn 104857600)",
    ),
    Case(
        "second-best replica waits and names the best",
        _THREE,
        local("c"),
        Action.WAIT,
        why="b is a better candidate (timeline 1, lsn 104857600)",
        why_has=("b is a better candidate",),
    ),
    Case(
        "lagging replica is never promoted",
        _LAGGING,
        local("a", leaderless_for=3600),
        Action.WAIT,
        why="not a failover candidate: lag 94371840 bytes exceeds maximum_lag_on_failover 1048576",
        why_has=("maximum_lag_on_failover",),
    ),
    Case(
        "nofailover is respected even when ahead",
        _NOFAILOVER,
        local("a", leaderless_for=3600),
        Action.WAIT,
        why="not a failover candidate: tagged nofailover",
        why_has=("nofailover",),
        facts={"reason": "tagged nofailover"},
    ),
    Case(
        "nofailover: the next one campaigns",
        _NOFAILOVER,
        local("b"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "equal LSN: higher priority campaigns",
        _PRIORITY,
        local("b"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "equal LSN and priority: the name decides",
        _PRIORITY,
        local("c"),
        Action.WAIT,
        why="b is a better candidate (timeline 1, lsn 104857600)",
    ),
    Case(
        "old primary on a lower timeline never takes the lead",
        _OLD_TIMELINE,
        local("old", timeline=1, leaderless_for=3600),
        Action.WAIT,
        why="not a failover candidate: timeline 1 is behind the cluster's timeline 2",
        why_has=("timeline 1 is behind",),
    ),
    Case(
        "next candidate waits within its grace",
        _GRACE,
        local("b", leaderless_for=1.0),
        Action.WAIT,
        why="a is a better candidate (timeline 1, lsn 104857600)",
    ),
    Case(
        "next candidate campaigns after its grace when the best is silent",
        _GRACE,
        local("b", leaderless_for=2.5),
        Action.CAMPAIGN,
        why="no leader for 2.5s and better candidates did not take over",
    ),
    Case(
        "stopped node without a leader starts read-only first",
        view(replica("b")),
        local("a", pg_running=False),
        Action.START_REPLICA,
        why="no leader; starting read-only to take part in the election",
    ),
    Case(
        "writable node without a leader keeps writing if it is the best",
        view(primary("a", lsn=100 * MB), replica("b", lsn=100 * MB)),
        local("a", in_recovery=False),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "writable node without a leader demotes if it is not the best",
        view(primary("a", lsn=50 * MB), replica("b", lsn=100 * MB)),
        local("a", in_recovery=False),
        Action.DEMOTE,
        why=(
            "running read-write without the leader key (not a failover candidate: lag 52428800 "
            "bytes exceeds maximum_lag_on_failover 1048576)"
        ),
    ),
    # -- switchover, manual failover, pause --------------------------------------------------------
    Case(
        "leader hands over to the named candidate",
        view(primary("a"), replica("b"), replica("c"), leader="a", switchover=sw(candidate="c")),
        local("a", in_recovery=False, now=NOW),
        Action.SWITCHOVER,
        why="switchover requested",
        target="c",
    ),
    Case(
        "switchover without candidate picks the best streaming replica",
        view(
            primary("a"),
            replica("b", lsn=100 * MB - 10),
            replica("c", lsn=100 * MB),
            leader="a",
            switchover=sw(),
        ),
        local("a", in_recovery=False, now=NOW),
        Action.SWITCHOVER,
        why="switchover requested",
        target="c",
    ),
    Case(
        "switchover to a lagging candidate is refused",
        view(
            primary("a"),
            replica("b", lsn=10 * MB),
            leader="a",
            switchover=sw(candidate="b"),
            config=DynamicConfig(maximum_lag_on_failover=MB),
        ),
        local("a", in_recovery=False, now=NOW),
        Action.REJECT_SWITCHOVER,
        why=(
            "switchover refused: candidate b is not eligible: lag 94371840 bytes exceeds "
            "maximum_lag_on_failover 1048576"
        ),
        why_has=("maximum_lag_on_failover",),
    ),
    Case(
        "switchover to a nofailover candidate is refused",
        view(primary("a"), replica("b", nofailover=True), leader="a", switchover=sw(candidate="b")),
        local("a", in_recovery=False, now=NOW),
        Action.REJECT_SWITCHOVER,
        why="switchover refused: candidate b is not eligible: tagged nofailover",
    ),
    Case(
        "scheduled switchover waits for its time",
        _SCHEDULED,
        local("a", in_recovery=False, now=NOW),
        Action.LEAD,
        why="we hold the leader key",
    ),
    Case(
        "scheduled switchover runs once due",
        _SCHEDULED,
        local("a", in_recovery=False, now=NOW + 61),
        Action.SWITCHOVER,
        why="switchover requested",
        target="b",
    ),
    Case(
        "scheduled switchover once due: the candidate's copy of a failover slot is not synced",
        _SLOTS_SCHEDULED(synced=False),
        local("a", in_recovery=False, now=NOW + 61),
        Action.REJECT_SWITCHOVER,
        why="switchover refused: candidate b has no synced copy of failover slot(s) cdc: its logical "
        "consumers would lose their position (wait for the slot sync worker, or override with "
        "allow_unsynced_slots)",
    ),
    Case(
        "scheduled switchover once due: the candidate's copy is synced",
        _SLOTS_SCHEDULED(synced=True),
        local("a", in_recovery=False, now=NOW + 61),
        Action.SWITCHOVER,
        why="switchover requested",
        target="b",
    ),
    Case(
        "scheduled switchover once due, not synced, the guard overridden when it was requested",
        _SLOTS_SCHEDULED(synced=False, allow=True),
        local("a", in_recovery=False, now=NOW + 61),
        Action.SWITCHOVER,
        why="switchover requested",
        target="b",
    ),
    Case(
        "switchover without a candidate once due: the replica the leader picks is checked",
        replace(_SLOTS_SCHEDULED(synced=False), switchover=sw(scheduled_at=NOW + 60)),
        local("a", in_recovery=False, now=NOW + 61),
        Action.REJECT_SWITCHOVER,
        why="switchover refused: candidate b has no synced copy of failover slot(s) cdc: its logical "
        "consumers would lose their position (wait for the slot sync worker, or override with "
        "allow_unsynced_slots)",
    ),
    Case(
        "stale switchover request is dropped",
        view(primary("a"), replica("b"), leader="a", switchover=sw(candidate="b")),
        local("a", in_recovery=False, now=NOW + 3600),
        Action.REJECT_SWITCHOVER,
        why="request abandoned after switchover_timeout",
    ),
    Case(
        "during a hand-over the candidate campaigns",
        _HANDOVER,
        local("c", now=NOW),
        Action.CAMPAIGN,
        why="switchover to us",
    ),
    Case(
        "during a hand-over everyone else waits, even a better one",
        _HANDOVER,
        local("b", now=NOW, leaderless_for=60),
        Action.WAIT,
        why="switchover to c in progress",
        why_has=("switchover to c",),
    ),
    Case(
        "manual failover to a lagging candidate is refused without force",
        view(
            replica("b", lsn=100 * MB),
            replica("c", lsn=10 * MB),
            switchover=_MANUAL_LAGGING,
            config=_MANUAL_LAGGING_CFG,
        ),
        local("c", wal_lsn=10 * MB, now=NOW),
        Action.WAIT,
        why=(
            "failover to us refused: lag 94371840 bytes exceeds maximum_lag_on_failover 1048576 "
            "(an operator may force it)"
        ),
        why_has=("refused",),
    ),
    Case(
        "forced manual failover to a lagging candidate campaigns",
        _FORCED_LAGGING,
        local("c", wal_lsn=10 * MB, now=NOW),
        Action.CAMPAIGN,
        why="failover to us (forced)",
    ),
    Case(
        "forced manual failover: the others wait",
        _FORCED_LAGGING,
        local("b", now=NOW, leaderless_for=60),
        Action.WAIT,
        why="failover to c in progress",
    ),
    Case(
        "pause stops automatic failover",
        view(replica("a"), replica("b"), config=_PAUSED),
        local("a", leaderless_for=600),
        Action.WAIT,
        why="paused: no automatic failover",
        why_has=("paused",),
    ),
    Case(
        "pause stops the restart of the leader's postgres",
        view(primary("a"), replica("b"), leader="a", config=_PAUSED),
        local("a", pg_running=False, pg_down_for=600),
        Action.WAIT,
        why="paused: not restarting postgres on the leader",
        why_has=("paused",),
    ),
    Case(
        "pause does not stop demotion",
        _PAUSED_OTHER_LEADS,
        local("a", in_recovery=False),
        Action.DEMOTE,
        why="b holds the leader key",
        target="b",
    ),
    Case(
        "pause stops the start of a replica",
        _PAUSED_OTHER_LEADS,
        local("a", pg_running=False),
        Action.WAIT,
        why="paused: not starting or rewinding postgres",
    ),
    Case(
        "manual failover works while paused",
        view(replica("a"), replica("b"), switchover=_QUORUM_FAILOVER, config=_PAUSED),
        local("b", now=NOW),
        Action.CAMPAIGN,
        why="failover to us",
    ),
    # -- synchronous mode (FIRST): who may be promoted ---------------------------------------------
    Case(
        "sync mode: a sync standby campaigns",
        _SYNC_ONLY_C,
        local("c", streaming_from=None),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "sync mode: a standby outside the sync set waits, even when ahead",
        _SYNC_ONLY_C,
        local("b", streaming_from=None, leaderless_for=600),
        Action.WAIT,
        why=(
            "not a failover candidate: not a synchronous standby (sync set: c); promoting it could "
            "lose acknowledged writes"
        ),
        why_has=("could lose acknowledged writes",),
    ),
    Case(
        "sync mode: primary and sync standby lost together: nobody is promoted",
        view(replica("b"), config=SYNC, sync=_SYNC_C),
        local("b", streaming_from=None, leaderless_for=3600),
        Action.WAIT,
        why=(
            "not a failover candidate: not a synchronous standby (sync set: c); promoting it could "
            "lose acknowledged writes"
        ),
        why_has=("not a synchronous standby",),
    ),
    Case(
        "sync mode: an empty sync set means any caught-up replica may win",
        view(replica("b"), replica("c"), config=SYNC, sync=SyncState("a", (), term=42)),
        local("b", streaming_from=None),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "sync mode: replicas detach from a leaderless primary before the election",
        view(replica("b"), replica("c"), config=SYNC, sync=SyncState("a", ("b",), term=42)),
        local("b", streaming_from="127.0.0.1:5432"),
        Action.DETACH,
        why="no leader: stop streaming from the old primary before the election",
    ),
    Case(
        "async mode: no detach before the election",
        view(replica("b"), replica("c")),
        local("b", streaming_from="127.0.0.1:5432"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "sync mode: switchover to a standby outside the sync set is refused",
        view(
            primary("a"),
            replica("b"),
            replica("c"),
            leader="a",
            config=SYNC,
            sync=_SYNC_C,
            switchover=Switchover(SwitchoverKind.SWITCHOVER, "a", "b", requested_at=0.0),
        ),
        local("a", in_recovery=False, now=1.0),
        Action.REJECT_SWITCHOVER,
        why=(
            "switchover refused: candidate b is not eligible: not a synchronous standby (sync set: "
            "c); promoting it could lose acknowledged writes"
        ),
        why_has=("not a synchronous standby",),
    ),
    Case(
        "sync mode: switchover without candidate goes to a sync standby",
        view(
            primary("a"),
            replica("b"),
            replica("c"),
            leader="a",
            config=SYNC,
            sync=_SYNC_C,
            switchover=Switchover(SwitchoverKind.SWITCHOVER, "a", None, requested_at=0.0),
        ),
        local("a", in_recovery=False, now=1.0),
        Action.SWITCHOVER,
        why="switchover requested",
        target="c",
    ),
    # -- quorum mode (ANY k): who may be promoted --------------------------------------------------
    # ANY 1 of (b, c): every acknowledged commit is on b or c; with both reachable, the more
    # advanced one has them all.
    Case(
        "quorum: the most advanced voter campaigns",
        _QUORUM_BC1,
        local("c"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "quorum: a voter behind another waits",
        _QUORUM_BC1,
        local("b", leaderless_for=600),
        Action.WAIT,
        why=(
            "not a failover candidate: quorum voter c is further ahead (timeline 1, lsn "
            "104857610); promoting us could lose acknowledged writes"
        ),
        why_has=("quorum voter c is further ahead",),
    ),
    Case(
        "quorum: ties go to priority then name",
        view(
            voter("b", lsn=101 * MB),
            voter("c", lsn=101 * MB, failover_priority=2),
            config=QUORUM,
            sync=quorum_key("b", "c", "d", k=2),
        ),
        local("c", wal_lsn=101 * MB),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        # ANY 1 of (b, c): a commit acknowledged by c alone is not on b, so b alone is not enough.
        "quorum: too few reachable voters: refuse and say why",
        view(voter("b"), config=QUORUM, sync=quorum_key("b", "c", k=1)),
        local("b", leaderless_for=3600),
        Action.WAIT,
        why=(
            "not a failover candidate: only 1 of 2 quorum voters reachable (b); 2 needed (quorum "
            "1); promoting could lose acknowledged writes"
        ),
        why_has=("only 1 of 2 quorum voters reachable (b); 2 needed", "could lose acknowledged writes"),
    ),
    Case(
        "quorum: a voter whose postgres is down does not count",
        view(
            voter("b"),
            replace(voter("c"), state=MemberState.STOPPED, wal_lsn=None, timeline=None),
            config=QUORUM,
            sync=quorum_key("b", "c", k=1),
        ),
        local("b", leaderless_for=3600),
        Action.WAIT,
        why=(
            "not a failover candidate: only 1 of 2 quorum voters reachable (b); 2 needed (quorum "
            "1); promoting could lose acknowledged writes"
        ),
    ),
    Case(
        # c's record predates the leader's loss: c may have received (and acknowledged) more since.
        "quorum: wait for positions read after the leader was lost",
        view(voter("b"), replica("c", lsn=99 * MB), config=QUORUM, sync=quorum_key("b", "c", k=1)),
        local("b"),
        Action.WAIT,
        why="not a failover candidate: waiting for quorum voters c to report their WAL position",
        why_has=("waiting for quorum voters c to report",),
    ),
    Case(
        "quorum: manual failover is refused without force",
        view(voter("b"), config=QUORUM, sync=quorum_key("b", "c", k=1), switchover=_QUORUM_FAILOVER),
        local("b", now=NOW),
        Action.WAIT,
        why=(
            "failover to us refused: only 1 of 2 quorum voters reachable (b); 2 needed (quorum 1); "
            "promoting could lose acknowledged writes (an operator may force it)"
        ),
        why_has=("refused", "quorum voters reachable"),
    ),
    Case(
        "quorum: a forced failover overrides the refusal",
        view(
            voter("b"),
            config=QUORUM,
            sync=quorum_key("b", "c", k=1),
            switchover=replace(_QUORUM_FAILOVER, force=True),
        ),
        local("b", now=NOW),
        Action.CAMPAIGN,
        why="failover to us (forced)",
        why_has=("(forced)",),
    ),
    Case(
        # The old primary back as a replica has every commit it acknowledged.
        "quorum: the old leader may campaign",
        view(voter("a", lsn=101 * MB), config=QUORUM, sync=quorum_key("b", "c", k=1)),
        local("a", wal_lsn=101 * MB),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        # A switchover handed over: the candidate has received the old primary's last WAL.
        "quorum: the hand-over candidate campaigns",
        view(
            voter("b"),
            config=QUORUM,
            sync=quorum_key("b", "c", k=1),
            switchover=sw(candidate="b", stage=SwitchoverStage.HANDOVER, handover_at=NOW),
        ),
        local("b", now=NOW),
        Action.CAMPAIGN,
        why="switchover to us",
    ),
    Case(
        # k == number of voters reads like synchronous mode: every voter has every commit.
        "quorum: k equal to the voters reads as synchronous mode",
        view(voter("b"), config=QUORUM, sync=quorum_key("b", "c", k=2)),
        local("b"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        # An empty key claims nothing (the leader ran without waiting): any caught-up replica.
        "quorum: an empty key lets any caught-up replica campaign",
        view(replica("b"), replica("c"), config=QUORUM, sync=SyncState("a", (), term=42, quorum=0)),
        local("b"),
        Action.CAMPAIGN,
        why="no leader and we are the best candidate",
    ),
    Case(
        "quorum: replicas detach before the election",
        view(replica("b"), replica("c"), config=QUORUM, sync=quorum_key("b", "c", k=1)),
        local("b", streaming_from="127.0.0.1:5432"),
        Action.DETACH,
        why="no leader: stop streaming from the old primary before the election",
    ),
    Case(
        "quorum: switchover to a non-voter is refused",
        view(
            *_QUORUM_MEMBERS,
            leader="a",
            config=QUORUM,
            sync=quorum_key("c", "d", k=1),
            switchover=sw(candidate="b"),
        ),
        local("a", in_recovery=False, now=NOW),
        Action.REJECT_SWITCHOVER,
        why=(
            "switchover refused: candidate b is not eligible: not a quorum voter (voters: c, d); "
            "promoting it could lose acknowledged writes"
        ),
        why_has=("not a quorum voter",),
    ),
    Case(
        "quorum: switchover without candidate goes to a voter",
        view(*_QUORUM_MEMBERS, leader="a", config=QUORUM, sync=quorum_key("c", "d", k=1), switchover=sw()),
        local("a", in_recovery=False, now=NOW),
        Action.SWITCHOVER,
        why="switchover requested",
        target="c",
    ),
    # -- rows no older test reached ----------------------------------------------------------------
    Case(
        "no data directory but the leader key names us: give it up",
        view(primary("b"), leader="a"),
        local("a", data_initialized=False, pg_running=False),
        Action.RELEASE,
        why="we hold the leader key but have no data directory",
    ),
    Case(
        "no data directory, running leader, paused: no clone",
        view(primary("a"), leader="a", config=_PAUSED),
        local("b", data_initialized=False, pg_running=False),
        Action.WAIT,
        why="paused: not cloning",
    ),
    Case(
        "leader sees a hand-over it did not make: drop it",
        view(
            primary("a"),
            replica("b"),
            leader="a",
            switchover=sw(candidate="b", stage=SwitchoverStage.HANDOVER, handover_at=NOW),
        ),
        local("a", in_recovery=False, now=NOW),
        Action.REJECT_SWITCHOVER,
        why="stale request: we lead and did not hand over",
    ),
    Case(
        "leader sees a request addressed to another leader: drop it",
        view(primary("a"), replica("b"), leader="a", switchover=sw(candidate="b", leader="c")),
        local("a", in_recovery=False, now=NOW),
        Action.REJECT_SWITCHOVER,
        why="stale request: we lead and did not hand over",
    ),
    Case(
        "rewind needed but the leader does not run yet: wait",
        view(replace(primary("b", tl=2), state=MemberState.STARTING), leader="b"),
        local("a", pg_running=False, needs_rewind=True),
        Action.WAIT,
        why="need a rewind but leader b is not running yet",
    ),
    Case(
        "nobody leads, postgres down, paused: not started",
        view(replica("b"), config=_PAUSED),
        local("a", pg_running=False),
        Action.WAIT,
        why="paused: not starting postgres",
    ),
    Case(
        "manual failover to us before our member key is published: wait",
        view(replica("b"), switchover=sw(kind=SwitchoverKind.FAILOVER, leader=None, candidate="a")),
        local("a", now=NOW),
        Action.WAIT,
        why="our member key is not published yet",
    ),
    Case(
        "no leader and our member key not published yet: wait",
        view(replica("b")),
        local("a"),
        Action.WAIT,
        why="our member key is not published yet",
    ),
    # -- etcd unreachable: decide on the last view, act only where that is safe ---------------------
    Case(
        "etcd unreachable: the best candidate does not campaign",
        _THREE,
        local("b", etcd_reachable=False),
        Action.WAIT,
        why="etcd unreachable; not acting on 'campaign'",
    ),
    Case(
        "etcd unreachable: the leader does not lead on a stale view",
        view(primary("a"), replica("b"), leader="a"),
        local("a", in_recovery=False, etcd_reachable=False),
        Action.WAIT,
        why="etcd unreachable; not acting on 'lead'",
    ),
    Case(
        "etcd unreachable: no promotion",
        view(replica("a"), replica("b"), leader="a"),
        local("a", etcd_reachable=False),
        Action.WAIT,
        why="etcd unreachable; not acting on 'promote'",
    ),
    Case(
        "etcd unreachable: no restart of the leader's postgres read-write",
        view(primary("a"), replica("b"), leader="a"),
        local("a", pg_running=False, in_recovery=None, pg_down_for=3, etcd_reachable=False),
        Action.WAIT,
        why="etcd unreachable; not acting on 'start_primary'",
    ),
    Case(
        "etcd unreachable: no rewind",
        view(primary("b", tl=2), leader="b"),
        local("a", pg_running=False, needs_rewind=True, etcd_reachable=False),
        Action.WAIT,
        why="etcd unreachable; not acting on 'rewind'",
    ),
    Case(
        "etcd unreachable: the leader without a confirmed lease still goes read-only",
        _LEASE_UNCONFIRMED,
        local("a", pg_running=False, lease_valid=False, etcd_reachable=False),
        Action.START_REPLICA,
        why="leader lease could not be confirmed; serving read-only until it is",
    ),
    Case(
        "etcd unreachable: a writable node without the key still demotes",
        view(primary("b", tl=2), replica("a"), leader="b"),
        local("a", in_recovery=False, etcd_reachable=False),
        Action.DEMOTE,
        why="b holds the leader key",
        target="b",
    ),
    Case(
        "etcd unreachable: a replica keeps following",
        view(primary("b"), replica("a"), leader="b"),
        local("a", etcd_reachable=False),
        Action.FOLLOW,
        why="following b",
        target="b",
    ),
    Case(
        "etcd unreachable: a waiting replica keeps its reason",
        _THREE,
        local("c", etcd_reachable=False),
        Action.WAIT,
        why="b is a better candidate (timeline 1, lsn 104857600)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    d = decide(case.view, case.local)
    assert (d.action, d.target, d.why) == (case.action, case.target, case.why)
    for fragment in case.why_has:
        assert fragment in d.why
    if case.facts is not None:
        assert dict(d.facts) == case.facts


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


# -- the tables themselves ---------------------------------------------------------------------------


def test_every_rule_is_reached_by_a_case() -> None:
    reached = {first_match(RULES, Ctx(c.view, c.local)).situation for c in CASES}
    assert [r.situation for r in RULES if r.situation not in reached] == []


def test_rule_situations_are_unique_and_the_tables_end_with_a_catch_all() -> None:
    assert len({r.situation for r in RULES}) == len(RULES)
    assert RULES[-len(ELECTION) :] == ELECTION
    anything = Ctx(ClusterView(), local("x"))
    assert RULES[-1].when(anything) and ELECTION[-1].when(anything)


@pytest.mark.parametrize("action", list(Action))
def test_every_action_has_a_row(action: Action) -> None:
    assert action in ACTIONS
    assert ACTIONS[action].doc


@pytest.mark.parametrize("rule", RULES, ids=[r.situation for r in RULES])
def test_every_rule_names_a_known_action_and_a_fixed_or_filled_why(rule: Rule) -> None:
    assert rule.action in Action and rule.action in ACTIONS
    if rule.fields is None:  # logged as written: no placeholder left unfilled
        assert "{" not in rule.why and "}" not in rule.why


def test_every_action_decide_returns_in_the_table_has_a_row() -> None:
    returned = {decide(c.view, c.local).action for c in CASES}
    assert returned <= set(ACTIONS)
    assert set(Action) - returned == set()  # and the cases reach every action


def test_action_flags_are_consistent() -> None:
    for action, spec in ACTIONS.items():
        # A stale view never makes PostgreSQL writable ...
        assert not (spec.makes_writable and spec.safe_without_etcd), action
        # ... and whatever confirms the lease first is about to go (or stay) read-write.
        assert spec.makes_writable or not spec.fresh_lease, action
    writable = {a for a, s in ACTIONS.items() if s.makes_writable}
    assert writable == {
        Action.FINISH_BOOTSTRAP,
        Action.INITIALIZE,
        Action.CAMPAIGN,
        Action.PROMOTE,
        Action.LEAD,
        Action.TAKEOVER,
        Action.START_PRIMARY,
    }
    assert {a for a, s in ACTIONS.items() if s.fresh_lease} == writable - {Action.LEAD}
    assert {a for a, s in ACTIONS.items() if s.safe_without_etcd} == {
        Action.WAIT,
        Action.START_REPLICA,
        Action.FOLLOW,
        Action.DEMOTE,
    }


@pytest.mark.parametrize("action", list(Action))
def test_every_action_has_an_executor(action: Action) -> None:
    from hakeeper.ha.actions.table import STEPS

    assert action in STEPS


# -- ranking and eligibility -------------------------------------------------------------------------


def test_equal_lsn_falls_to_priority_then_name() -> None:
    assert [c.name for c in rank(_PRIORITY)] == ["b", "c", "a"]


def test_old_primary_on_lower_timeline_does_not_make_the_new_timeline_look_lagging() -> None:
    assert rank(_OLD_TIMELINE)[0].name == "b"


def test_ineligible_member_reason_is_reported() -> None:
    m = replace(replica("a"), state=MemberState.STOPPED)
    assert assess(m, view(m)).reason == "postgres is not running (state stopped)"


def test_sync_mode_reports_why_a_standby_outside_the_set_is_not_a_candidate() -> None:
    assert "not a synchronous standby" in (assess(_SYNC_ONLY_C.members["b"], _SYNC_ONLY_C).reason or "")


def test_quorum_ranks_only_the_most_advanced_reachable_voter() -> None:
    assert [c.name for c in rank(_QUORUM_BC1)] == ["c"]


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


def test_quorum_rules_apply_only_without_a_leader() -> None:
    # With a leader, a switchover waits for the candidate to receive everything: any voter.
    key = quorum_key("b", "c", k=1)
    v = view(primary("a"), replica("b"), replica("c", lsn=99 * MB), leader="a", config=QUORUM, sync=key)
    assert assess(v.members["c"], v).eligible


def test_a_quorum_key_is_read_as_quorum_also_after_a_switch_to_synchronous_mode() -> None:
    v = view(voter("b"), config=DynamicConfig(replication_mode="synchronous"), sync=quorum_key("b", "c", k=1))
    assert "quorum voters reachable" in (assess(v.members["b"], v).reason or "")


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


@given(
    ms=members(),
    leader=st.one_of(st.none(), st.sampled_from(NAMES)),
    me=st.sampled_from(NAMES),
    data_initialized=st.booleans(),
    running=st.booleans(),
    in_recovery=st.booleans(),
    lease_valid=st.booleans(),
    needs_rewind=st.booleans(),
    paused=st.booleans(),
    mode=st.sampled_from(["async", "synchronous", "quorum"]),
)
def test_a_stale_view_only_leads_to_actions_safe_without_etcd(
    ms: list[Member],
    leader: str | None,
    me: str,
    data_initialized: bool,
    running: bool,
    in_recovery: bool,
    lease_valid: bool,
    needs_rewind: bool,
    paused: bool,
    mode: str,
) -> None:
    cfg = DynamicConfig(pause=paused, replication_mode=mode)
    v = view(*ms, leader=leader, config=cfg)
    lf = local(
        me,
        data_initialized=data_initialized,
        pg_running=running,
        in_recovery=in_recovery if running else None,
        lease_valid=lease_valid,
        needs_rewind=needs_rewind,
        streaming_from="127.0.0.1:5432" if running and in_recovery else None,
    )
    fresh = decide(v, lf)
    stale = decide(v, replace(lf, etcd_reachable=False))
    assert fresh.action in ACTIONS and stale.action in ACTIONS  # whatever decide returns has a row
    assert ACTIONS[stale.action].safe_without_etcd
    if ACTIONS[fresh.action].safe_without_etcd:
        assert stale == fresh
    else:
        assert stale == Decision(Action.WAIT, STALE_VIEW_WHY.format(action=fresh.action))
        assert stale.why == f"etcd unreachable; not acting on '{fresh.action.value}'"


@given(
    ms=members(),
    leader=st.one_of(st.none(), st.sampled_from(NAMES)),
    me=st.sampled_from(NAMES),
    data_initialized=st.booleans(),
    running=st.booleans(),
    in_recovery=st.booleans(),
    same_lease=st.booleans(),
    owner=st.sampled_from(list(LeaseOwner)),
    conflict=st.booleans(),
)
def test_under_a_name_another_agent_holds_nothing_goes_read_write_or_takes_a_key(
    ms: list[Member],
    leader: str | None,
    me: str,
    data_initialized: bool,
    running: bool,
    in_recovery: bool,
    same_lease: bool,
    owner: LeaseOwner,
    conflict: bool,
) -> None:
    v = view(*ms, leader=leader, lease=7)
    lf = local(
        me,
        data_initialized=data_initialized,
        pg_running=running,
        in_recovery=in_recovery if running else None,
        lease=7 if same_lease else 8,
        leader_lease_owner=owner,
        name_conflict=conflict,
    )
    d = decide(v, lf)
    foreign_key = leader == me and not same_lease and owner in (LeaseOwner.FOREIGN, LeaseOwner.UNKNOWN)
    if conflict or foreign_key:
        assert not ACTIONS[d.action].makes_writable, d
        assert d.action in (Action.WAIT, Action.DEMOTE, Action.RELEASE), d
        if lf.writable:
            assert d.action in (Action.DEMOTE, Action.RELEASE), d
        if d.action == Action.RELEASE:
            assert conflict and leader == me and same_lease, "only our own key on our own lease is given up"
    if d.action == Action.TAKEOVER:
        assert owner in (LeaseOwner.OURS, LeaseOwner.EXPIRED) and not conflict
