"""``decide(view, local) -> Decision``: the whole HA policy as data.

Two tables, both rendered into docs/architecture.md (``python -m hakeeper.ha.policy.table``):

* ``ACTIONS``: one row per action with what it does and its guard flags (may PostgreSQL accept
  writes after it, does its executor confirm the lease first, may it run on a stale view).
* ``RULES``: the situations, in order.  The first row whose ``when`` holds decides; each row
  reads as its situation *given that no earlier row matched*.  Its ``why`` is the sentence the
  agent logs verbatim (``decision_<action> why=...``), a ``str.format`` template over the row's
  ``fields``; operators and tests grep for these sentences, so they do not change lightly.

No I/O, no clock: everything arrives in the arguments, so the policy is tested as a table of
situations and with generated views (tests/unit/ha/test_decide.py).  The executors carry
decisions out; anything risky (taking the leader key, promoting) is re-checked against etcd
there.

Invariants kept here (see docs/architecture.md):

* I1: only the holder of the leader key *with its current lease* is told to run read-write
  (``LEAD``, ``PROMOTE``, ``START_PRIMARY``); a writable node without the key is told to
  ``DEMOTE`` unless it is itself the best candidate and may ``CAMPAIGN`` for the key.  With etcd
  unreachable, nothing that could make PostgreSQL writable or change etcd is done at all.
* I4: eligible candidates are ranked by (timeline, WAL LSN, failover_priority, name), the same
  order on every node; only the best campaigns, the k-th only after ``k * candidate_grace``
  seconds without a leader.  A node that does not campaign says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from hakeeper.core.cluster import (
    ClusterView,
    Leader,
    Member,
    MemberRole,
    MemberState,
    Switchover,
    SwitchoverStage,
)
from hakeeper.ha.policy.candidates import Candidate, assess, rank
from hakeeper.ha.policy.switchover import manual_request, switchover_live, switchover_target


class Action(StrEnum):
    """What the agent does next; ``ACTIONS`` says what each one means."""

    INITIALIZE = "initialize"
    CLONE = "clone"
    WAIT = "wait"
    START_REPLICA = "start_replica"
    FOLLOW = "follow"
    REWIND = "rewind"
    CAMPAIGN = "campaign"
    PROMOTE = "promote"
    LEAD = "lead"
    TAKEOVER = "takeover"
    START_PRIMARY = "start_primary"
    RELEASE = "release"
    DEMOTE = "demote"
    DETACH = "detach"
    SWITCHOVER = "switchover"
    REJECT_SWITCHOVER = "reject_switchover"


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One row of ``ACTIONS``."""

    doc: str
    # PostgreSQL may accept writes once the action is done: its executor arms the fence.
    makes_writable: bool = False
    # The executor confirms the lease with a fresh keepalive before it acts.
    fresh_lease: bool = False
    # Carried out on the last view while etcd is unreachable: it never makes PostgreSQL writable
    # and never writes to etcd.
    safe_without_etcd: bool = False


# One row per action: what its executor does (hakeeper/ha/agent.py) and its guard flags.
ACTIONS: Mapping[Action, ActionSpec] = MappingProxyType(
    {
        Action.INITIALIZE: ActionSpec(
            "race for the initialize key; the winner runs initdb (one txn creates `initialize`, "
            "`leader` and `config` together; losers delete their fresh data directory)",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.CLONE: ActionSpec(
            "pg_basebackup from the leader, through the slot it keeps for us",
        ),
        Action.WAIT: ActionSpec(
            "nothing safe to do now; `why` says what we wait for",
            safe_without_etcd=True,
        ),
        Action.START_REPLICA: ActionSpec(
            "start PostgreSQL read-only (following the leader, if any)",
            safe_without_etcd=True,
        ),
        Action.FOLLOW: ActionSpec(
            "running replica: make sure it streams from the leader (rewrite `primary_conninfo` "
            "and reload when the leader changes)",
            safe_without_etcd=True,
        ),
        Action.REWIND: ActionSpec(
            "former primary: pg_rewind from the leader (crash recovery first if needed, else "
            "re-clone), then follow",
        ),
        Action.CAMPAIGN: ActionSpec(
            "try to take the leader key (txn `create_revision == 0`); then promote if needed",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.PROMOTE: ActionSpec(
            "we hold the key but PostgreSQL is still in recovery: `pg_promote`, then record history",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.LEAD: ActionSpec(
            "we hold the key and run read-write: publish status under the term, keep one slot per member",
            makes_writable=True,
        ),
        Action.TAKEOVER: ActionSpec(
            "the key names us under an old lease (agent restarted): re-attach it to our lease (same term)",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.START_PRIMARY: ActionSpec(
            "we hold the key, PostgreSQL is down: restart in place",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.RELEASE: ActionSpec(
            "we hold the key but cannot run a primary: give it up now",
        ),
        Action.DEMOTE: ActionSpec(
            "we run read-write without the key: stop writes (immediate stop), become a replica",
            safe_without_etcd=True,
        ),
        Action.DETACH: ActionSpec(
            "synchronous/quorum mode, no leader: stop streaming from the old primary first",
        ),
        Action.SWITCHOVER: ActionSpec(
            "leader: hand over to `target` (stop writes, wait, release)",
        ),
        Action.REJECT_SWITCHOVER: ActionSpec(
            "leader: drop an impossible or stale request (the reason is logged)",
        ),
    }
)

# What an action that is not safe without etcd becomes while etcd is unreachable (the view is
# then the last one we had).
STALE_VIEW_WHY = "etcd unreachable; not acting on '{action}'"


@dataclass(frozen=True, slots=True)
class LocalFacts:
    """What the agent knows about its own node, gathered fresh before every decision."""

    name: str
    data_initialized: bool
    system_identifier: str | None = None
    pg_running: bool = False
    in_recovery: bool | None = None
    timeline: int | None = None
    wal_lsn: int | None = None
    streaming_from: str | None = None
    pg_down_for: float = 0.0  # seconds PostgreSQL has been down while it should have run
    needs_rewind: bool = False  # set after we stopped being primary, or found a primary's data
    lease: int = 0  # our etcd lease id (0: none)
    lease_valid: bool = False  # keepalive succeeded and the fence deadline is in the future
    leaderless_for: float = 0.0  # seconds since we first saw no leader key
    nofailover: bool = False
    failover_priority: int = 1
    now: float = 0.0  # wall clock (epoch s), for scheduled and stale switchover requests
    etcd_reachable: bool = True  # False: the view is the last one read before etcd went away

    @property
    def writable(self) -> bool:
        return self.pg_running and self.in_recovery is False


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    why: str
    target: str | None = None  # the leader to clone/follow/rewind from
    facts: Mapping[str, Any] = field(default_factory=dict)


# -- the situation, as the rules read it -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ctx:
    """The inputs of one decision with the questions the rules ask of them."""

    view: ClusterView
    local: LocalFacts

    @property
    def leader(self) -> Leader | None:
        return self.view.leader

    @property
    def leader_name(self) -> str:
        """The leader key's holder; only asked by rows that know there is one."""
        assert self.view.leader is not None
        return self.view.leader.name

    @property
    def we_lead(self) -> bool:
        return self.view.leader is not None and self.view.leader.name == self.local.name

    @property
    def other_leads(self) -> bool:
        return self.view.leader is not None and self.view.leader.name != self.local.name

    @property
    def nobody_leads(self) -> bool:
        return self.view.leader is None

    @property
    def leader_running(self) -> bool:
        """The leader key's holder publishes itself as a running primary."""
        lm = self.view.leader_member
        return lm is not None and lm.role == MemberRole.PRIMARY and lm.state == MemberState.RUNNING

    @property
    def paused(self) -> bool:
        return self.view.paused

    @property
    def no_data(self) -> bool:
        return not self.local.data_initialized

    @property
    def foreign_data(self) -> bool:
        """Our data directory was initialized by another cluster."""
        return (
            self.view.initialized is not None
            and self.local.system_identifier is not None
            and self.view.initialized != self.local.system_identifier
        )

    @property
    def lease_unconfirmed(self) -> bool:
        return not self.local.lease_valid

    @property
    def pg_down(self) -> bool:
        return not self.local.pg_running

    @property
    def me(self) -> Member | None:
        """Our own published member record."""
        return self.view.members.get(self.local.name)

    @property
    def request(self) -> Switchover:
        """The switchover key; only asked by rows that know there is one."""
        assert self.view.switchover is not None
        return self.view.switchover


Predicate = Callable[[Ctx], bool]
Builder = Callable[[Ctx], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Rule:
    """One situation -> action row."""

    situation: str
    when: Predicate
    action: Action
    why: str  # logged verbatim: a str.format template over ``fields``
    fields: Builder | None = None
    target: Callable[[Ctx], str | None] | None = None
    facts: Builder | None = None

    def decision(self, c: Ctx) -> Decision:
        why = self.why.format_map(self.fields(c)) if self.fields is not None else self.why
        target = self.target(c) if self.target is not None else None
        facts = self.facts(c) if self.facts is not None else {}
        return Decision(self.action, why, target=target, facts=facts)


def _always(c: Ctx) -> bool:
    return True


# -- the election: nobody leads, PostgreSQL runs ------------------------------------------------------


def _manual(c: Ctx) -> Switchover | None:
    return manual_request(c.view, c.local.now)


def _manual_to_other(c: Ctx) -> bool:
    sw = _manual(c)
    return sw is not None and sw.candidate != c.local.name


def _mine(c: Ctx) -> Candidate:
    """Our own candidacy; only asked once our member record is known to exist."""
    me = c.me
    assert me is not None
    return assess(me, c.view)


def _manual_refused(c: Ctx) -> bool:
    sw = _manual(c)
    return sw is not None and not sw.force and not _mine(c).eligible


def _manual_forced(c: Ctx) -> bool:
    sw = _manual(c)
    return sw is not None and sw.force and not _mine(c).eligible


def _manual_fields(c: Ctx) -> Mapping[str, Any]:
    sw = c.request
    return {"kind": sw.kind, "candidate": sw.candidate, "reason": _mine(c).reason}


def _manual_facts(c: Ctx) -> Mapping[str, Any]:
    sw = c.request
    return {"kind": sw.kind.value, "forced": sw.force}


@dataclass(frozen=True, slots=True)
class _Standing:
    """Where we stand in the automatic ranking (we are eligible)."""

    mine: Candidate
    position: int  # 0: the best
    best: Candidate


def _standing(c: Ctx) -> _Standing:
    order = rank(c.view)
    pos = next(i for i, cand in enumerate(order) if cand.name == c.local.name)
    return _Standing(_mine(c), pos, order[0])


def _standing_facts(c: Ctx) -> Mapping[str, Any]:
    s = _standing(c)
    return {
        "position": s.position,
        "best": s.best.name,
        "timeline": s.mine.timeline,
        "wal_lsn": s.mine.wal_lsn,
    }


def _grace_over(c: Ctx) -> bool:
    return c.local.leaderless_for >= _standing(c).position * c.view.config.candidate_grace


def _better_fields(c: Ctx) -> Mapping[str, Any]:
    best = _standing(c).best
    return {"best": best.name, "timeline": best.timeline, "lsn": best.wal_lsn}


# Evaluated on its own (the writable-without-key row asks what it would say) and as the last
# rows of RULES.
ELECTION: tuple[Rule, ...] = (
    Rule(
        "nobody leads, a hand-over or manual failover names another member",
        _manual_to_other,
        Action.WAIT,
        "{kind} to {candidate} in progress",
        fields=lambda c: {"kind": c.request.kind, "candidate": c.request.candidate},
    ),
    Rule(
        "nobody leads, a request names us but our member key is not published yet",
        lambda c: _manual(c) is not None and c.me is None,
        Action.WAIT,
        "our member key is not published yet",
    ),
    Rule(
        "nobody leads, a request names us but we are not a candidate and it is not forced",
        _manual_refused,
        Action.WAIT,
        "{kind} to us refused: {reason} (an operator may force it)",
        fields=_manual_fields,
        facts=lambda c: {"reason": _mine(c).reason},
    ),
    Rule(
        "nobody leads, a forced request names us although we are not a candidate",
        _manual_forced,
        Action.CAMPAIGN,
        "{kind} to us (forced)",
        fields=_manual_fields,
        facts=_manual_facts,
    ),
    Rule(
        "nobody leads, a request names us",
        lambda c: _manual(c) is not None,
        Action.CAMPAIGN,
        "{kind} to us",
        fields=_manual_fields,
        facts=_manual_facts,
    ),
    Rule("nobody leads, paused", lambda c: c.paused, Action.WAIT, "paused: no automatic failover"),
    Rule(
        "nobody leads, our member key is not published yet",
        lambda c: c.me is None,
        Action.WAIT,
        "our member key is not published yet",
    ),
    Rule(
        "nobody leads, we are not a failover candidate",
        lambda c: not _mine(c).eligible,
        Action.WAIT,
        "not a failover candidate: {reason}",
        fields=lambda c: {"reason": _mine(c).reason},
        facts=lambda c: {"reason": _mine(c).reason},
    ),
    Rule(
        "nobody leads, we are the best candidate",
        lambda c: _standing(c).position == 0,
        Action.CAMPAIGN,
        "no leader and we are the best candidate",
        facts=_standing_facts,
    ),
    Rule(
        "nobody leads, the k-th candidate after k x candidate_grace",
        _grace_over,
        Action.CAMPAIGN,
        "no leader for {leaderless_for:.1f}s and better candidates did not take over",
        fields=lambda c: {"leaderless_for": c.local.leaderless_for},
        facts=_standing_facts,
    ),
    Rule(
        "nobody leads, a better candidate may still take over",
        _always,
        Action.WAIT,
        "{best} is a better candidate (timeline {timeline}, lsn {lsn})",
        fields=_better_fields,
        facts=_standing_facts,
    ),
)


def _election(c: Ctx) -> Decision:
    return first_match(ELECTION, c).decision(c)


# -- every situation ------------------------------------------------------------------------------------


def _down_facts(c: Ctx) -> Mapping[str, Any]:
    return {
        "down_for": round(c.local.pg_down_for, 1),
        "primary_start_timeout": c.view.config.primary_start_timeout,
    }


def _stale_request(c: Ctx) -> bool:
    sw = c.view.switchover
    return sw is not None and (sw.stage != SwitchoverStage.REQUESTED or sw.leader not in (None, c.local.name))


def _handover_target(c: Ctx) -> tuple[str | None, str | None]:
    return switchover_target(c.view, c.request, c.local.name)


def _due(c: Ctx) -> bool:
    sw = c.view.switchover
    return sw is not None and sw.due(c.local.now)


RULES: tuple[Rule, ...] = (
    # -- no data directory yet ------------------------------------------------------------------------
    Rule(
        "no data directory, but the leader key names us",
        lambda c: c.no_data and c.we_lead,
        Action.RELEASE,
        "we hold the leader key but have no data directory",
    ),
    Rule(
        "no data directory, cluster not initialized",
        lambda c: c.no_data and c.view.initialized is None,
        Action.INITIALIZE,
        "cluster not initialized",
    ),
    Rule(
        "no data directory, a running leader, paused",
        lambda c: c.no_data and c.leader_running and c.paused,
        Action.WAIT,
        "paused: not cloning",
    ),
    Rule(
        "no data directory, a running leader",
        lambda c: c.no_data and c.leader_running,
        Action.CLONE,
        "empty data directory",
        target=lambda c: c.leader_name,
    ),
    Rule(
        "no data directory, no running leader",
        lambda c: c.no_data,
        Action.WAIT,
        "empty data directory and no running leader to clone from",
    ),
    Rule(
        "our data directory belongs to another cluster",
        lambda c: c.foreign_data,
        Action.WAIT,
        "data directory belongs to another cluster; refusing to touch it",
        facts=lambda c: {"ours": c.local.system_identifier, "cluster": c.view.initialized},
    ),
    # -- we hold the leader key ---------------------------------------------------------------------
    Rule(
        "the leader key names us under an earlier lease (agent restarted)",
        lambda c: c.we_lead and c.leader is not None and c.leader.lease != c.local.lease,
        Action.TAKEOVER,
        "leader key names us under an earlier lease",
    ),
    # The keepalive is failing; the fence will stop writes.  Never (re)start read-write.
    Rule(
        "we lead, the lease is not confirmed, we are writable",
        lambda c: c.we_lead and c.lease_unconfirmed and c.local.writable,
        Action.DEMOTE,
        "leader lease could not be confirmed",
    ),
    Rule(
        "we lead, the lease is not confirmed, postgres is down",
        lambda c: c.we_lead and c.lease_unconfirmed and c.pg_down,
        Action.START_REPLICA,
        "leader lease could not be confirmed; serving read-only until it is",
    ),
    Rule(
        "we lead, the lease is not confirmed",
        lambda c: c.we_lead and c.lease_unconfirmed,
        Action.WAIT,
        "leader lease could not be confirmed; not going read-write",
    ),
    Rule(
        "we lead, postgres is down, paused",
        lambda c: c.we_lead and c.pg_down and c.paused,
        Action.WAIT,
        "paused: not restarting postgres on the leader",
    ),
    Rule(
        "we lead, postgres down for less than primary_start_timeout",
        lambda c: c.we_lead and c.pg_down and c.local.pg_down_for < c.view.config.primary_start_timeout,
        Action.START_PRIMARY,
        "postgres is down on the leader; restarting it in place",
        facts=_down_facts,
    ),
    Rule(
        "we lead, postgres down for primary_start_timeout",
        lambda c: c.we_lead and c.pg_down,
        Action.RELEASE,
        "postgres did not come back within primary_start_timeout",
        facts=_down_facts,
    ),
    Rule(
        "we lead, postgres is in recovery",
        lambda c: c.we_lead and bool(c.local.in_recovery),
        Action.PROMOTE,
        "we hold the leader key and postgres is in recovery",
    ),
    Rule(
        "we lead, a request we did not hand over (or for another leader)",
        lambda c: c.we_lead and _stale_request(c),
        Action.REJECT_SWITCHOVER,
        "stale request: we lead and did not hand over",
    ),
    Rule(
        "we lead, a request older than switchover_timeout",
        lambda c: (
            c.we_lead
            and c.view.switchover is not None
            and not switchover_live(c.request, c.view, c.local.now)
        ),
        Action.REJECT_SWITCHOVER,
        "request abandoned after switchover_timeout",
    ),
    Rule(
        "we lead, a due request without a possible candidate",
        lambda c: c.we_lead and _due(c) and _handover_target(c)[0] is None,
        Action.REJECT_SWITCHOVER,
        "{kind} refused: {refusal}",
        fields=lambda c: {"kind": c.request.kind, "refusal": _handover_target(c)[1]},
    ),
    Rule(
        "we lead, a due request",
        lambda c: c.we_lead and _due(c),
        Action.SWITCHOVER,
        "{kind} requested",
        fields=lambda c: {"kind": c.request.kind},
        target=lambda c: _handover_target(c)[0],
        facts=lambda c: {"kind": c.request.kind.value, "force": c.request.force},
    ),
    Rule("we lead", lambda c: c.we_lead, Action.LEAD, "we hold the leader key"),
    # -- another node leads -------------------------------------------------------------------------
    Rule(
        "another node leads, we are writable",
        lambda c: c.other_leads and c.local.writable,
        Action.DEMOTE,
        "{leader} holds the leader key",
        fields=lambda c: {"leader": c.leader_name},
        target=lambda c: c.leader_name,
    ),
    Rule(
        "another node leads, paused, postgres down or our data may have diverged",
        lambda c: c.other_leads and c.paused and (c.local.needs_rewind or c.pg_down),
        Action.WAIT,
        "paused: not starting or rewinding postgres",
    ),
    Rule(
        "another node leads and runs, our data may have diverged",
        lambda c: c.other_leads and c.local.needs_rewind and c.leader_running,
        Action.REWIND,
        "our data may have diverged from the leader",
        target=lambda c: c.leader_name,
    ),
    Rule(
        "another node leads but does not run yet, our data may have diverged",
        lambda c: c.other_leads and c.local.needs_rewind,
        Action.WAIT,
        "need a rewind but leader {leader} is not running yet",
        fields=lambda c: {"leader": c.leader_name},
    ),
    Rule(
        "another node leads, postgres is down",
        lambda c: c.other_leads and c.pg_down,
        Action.START_REPLICA,
        "following {leader}",
        fields=lambda c: {"leader": c.leader_name},
        target=lambda c: c.leader_name,
    ),
    Rule(
        "another node leads",
        lambda c: c.other_leads,
        Action.FOLLOW,
        "following {leader}",
        fields=lambda c: {"leader": c.leader_name},
        target=lambda c: c.leader_name,
    ),
    # -- nobody leads ---------------------------------------------------------------------------------
    Rule(
        "nobody leads, postgres is down, paused",
        lambda c: c.nobody_leads and c.pg_down and c.paused,
        Action.WAIT,
        "paused: not starting postgres",
    ),
    Rule(
        "nobody leads, postgres is down",
        lambda c: c.nobody_leads and c.pg_down,
        Action.START_REPLICA,
        "no leader; starting read-only to take part in the election",
    ),
    # The old primary may still run (partitioned from etcd, not from us): stop acknowledging its
    # commits before anyone is elected, so it can never collect another acknowledgement.
    Rule(
        "nobody leads, synchronous or quorum mode, still streaming from the old primary",
        lambda c: (
            c.nobody_leads
            and c.view.config.replication_mode != "async"
            and bool(c.local.in_recovery)
            and bool(c.local.streaming_from)
        ),
        Action.DETACH,
        "no leader: stop streaming from the old primary before the election",
    ),
    Rule(
        "nobody leads, we are writable and would not campaign",
        lambda c: c.nobody_leads and c.local.writable and _election(c).action != Action.CAMPAIGN,
        Action.DEMOTE,
        "running read-write without the leader key ({why})",
        fields=lambda c: {"why": _election(c).why},
    ),
    *ELECTION,
)


def first_match(rules: tuple[Rule, ...], c: Ctx) -> Rule:
    """The first row whose situation holds.  Every table ends with a row that always holds."""
    for rule in rules:
        if rule.when(c):
            return rule
    raise AssertionError("no rule matched: a decision table must end with a catch-all row")


def decide(view: ClusterView, local: LocalFacts) -> Decision:
    """What this node does next: the first matching row of ``RULES``; with etcd unreachable, an
    action not ``safe_without_etcd`` becomes a ``WAIT`` that says which action it held back."""
    c = Ctx(view, local)
    decision = first_match(RULES, c).decision(c)
    if not local.etcd_reachable and not ACTIONS[decision.action].safe_without_etcd:
        return Decision(Action.WAIT, STALE_VIEW_WHY.format(action=decision.action))
    return decision
