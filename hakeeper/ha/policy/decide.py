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
* I1b: a key that names us under a live lease this node never held means another agent runs
  under our name: nothing is written (``DEMOTE``/``WAIT``, ``RELEASE`` of a key we hold), and the
  key is taken over only when it is under a lease of ours or one whose time-to-live ran out.
* I4: eligible candidates are ranked by (timeline, WAL LSN, failover_priority, name), the same
  order on every node; only the best campaigns, the k-th only after ``k * candidate_grace``
  seconds without a leader.  A node that does not campaign says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hakeeper.core.cluster import ClusterView, SwitchoverStage
from hakeeper.ha.policy.decision import ACTIONS, STALE_VIEW_WHY, Action, Decision, LeaseOwner, LocalFacts
from hakeeper.ha.policy.election import ELECTION, election_decision
from hakeeper.ha.policy.rules import Ctx, Rule, first_match
from hakeeper.ha.policy.slots import slot_refusal
from hakeeper.ha.policy.switchover import switchover_live, switchover_target

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
    """Whom a due request hands over to, or why it cannot be carried out.  The slot guard is
    checked here too: a scheduled request was not checked when it was written (the slots may
    sync by then), and any request is checked against the slots as they are now."""
    target, refusal = switchover_target(c.view, c.request, c.local.name)
    if target is None or c.request.allow_unsynced_slots:
        return target, refusal
    unsynced = slot_refusal(c.view, target)
    return (None, unsynced) if unsynced is not None else (target, None)


def _due(c: Ctx) -> bool:
    sw = c.view.switchover
    return sw is not None and sw.due(c.local.now)


def _abandoned_reason(c: Ctx) -> str:
    if c.local.system_identifier is None:
        return "no readable pg_control"
    if c.view.initialized is None:
        return "the cluster is not initialized: racing again"
    return "another member initialized the cluster"


_IMPOSTOR_WHY = "{evidence}: another agent runs under our name"


def _impostor_fields(c: Ctx) -> Mapping[str, Any]:
    return {"evidence": c.impostor}


RULES: tuple[Rule, ...] = (
    # -- another agent under our name (a copied node file, a cloned VM) ------------------------------
    # Two agents of one name would trade the leader key while both accept writes: whatever else
    # holds, neither writes, takes a key or touches the other's; the operator must stop one.
    Rule(
        "another agent keeps our member key alive, we hold the leader key",
        lambda c: (
            c.local.name_conflict
            and c.we_lead
            and c.leader is not None
            and c.leader.lease == c.local.lease
            and c.local.lease != 0
        ),
        Action.RELEASE,
        _IMPOSTOR_WHY,
        fields=_impostor_fields,
    ),
    Rule(
        "another agent runs under our name, we are writable",
        lambda c: c.impostor is not None and c.local.writable,
        Action.DEMOTE,
        _IMPOSTOR_WHY,
        fields=_impostor_fields,
    ),
    Rule(
        "another agent runs under our name",
        lambda c: c.impostor is not None,
        Action.WAIT,
        _IMPOSTOR_WHY,
        fields=_impostor_fields,
    ),
    Rule(
        "the leader key names us under another lease we could not check, we are writable",
        lambda c: c.key_lease_owner == LeaseOwner.UNKNOWN and c.local.writable,
        Action.DEMOTE,
        "leader key names us under a lease we could not check: not writing under it",
    ),
    Rule(
        "the leader key names us under another lease we could not check",
        lambda c: c.key_lease_owner == LeaseOwner.UNKNOWN,
        Action.WAIT,
        "leader key names us under a lease we could not check: not taking it over",
    ),
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
        "no data directory, a running leader of another PostgreSQL major",
        lambda c: c.no_data and c.leader_running and c.other_major is not None,
        Action.WAIT,
        "clone refused: {refusal}",
        fields=lambda c: {"refusal": c.other_major},
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
    # -- what our own interrupted bootstrap left (docs/decisions.md) ----------------------------------
    # Only with the marker's proof: without it the refusal below protects real data.
    Rule(
        "our data directory is our abandoned bootstrap, paused",
        lambda c: c.abandoned_bootstrap and c.paused,
        Action.WAIT,
        "paused: not discarding the data directory our interrupted bootstrap left",
    ),
    Rule(
        "our data directory is our abandoned bootstrap",
        lambda c: c.abandoned_bootstrap,
        Action.DISCARD_BOOTSTRAP,
        "data directory left by our interrupted bootstrap ({reason})",
        fields=lambda c: {"reason": _abandoned_reason(c)},
        facts=lambda c: {"ours": c.local.system_identifier, "cluster": c.view.initialized},
    ),
    # Not ours to touch, but not to serve writes either (a multi-host DSN would pick it): stopped.
    Rule(
        "our data directory belongs to another cluster, we are writable",
        lambda c: c.foreign_data and c.local.writable,
        Action.DEMOTE,
        "data directory belongs to another cluster and runs read-write: stopping it (nothing removed)",
        facts=lambda c: {"ours": c.local.system_identifier, "cluster": c.view.initialized},
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
        "the leader key names us under an earlier lease of ours (agent restarted)",
        lambda c: c.key_lease_owner == LeaseOwner.OURS,
        Action.TAKEOVER,
        "leader key names us under an earlier lease",
    ),
    Rule(
        "the leader key names us under an expired lease",
        lambda c: c.key_lease_owner == LeaseOwner.EXPIRED,
        Action.TAKEOVER,
        "leader key names us under an expired lease",
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
        "we lead and run read-write, our bootstrap did not finish (agent restarted)",
        lambda c: c.we_lead and c.local.writable and c.unfinished_bootstrap,
        Action.FINISH_BOOTSTRAP,
        "we initialized the cluster but the bootstrap did not finish; finishing it",
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
    # Neither a rewind nor streaming works across majors: wait (read-only, if running) and say why.
    Rule(
        "another node leads and runs another PostgreSQL major",
        lambda c: c.other_leads and c.other_major is not None,
        Action.WAIT,
        "not following {leader}: {refusal}",
        fields=lambda c: {"leader": c.leader_name, "refusal": c.other_major},
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
        lambda c: c.nobody_leads and c.local.writable and election_decision(c).action != Action.CAMPAIGN,
        Action.DEMOTE,
        "running read-write without the leader key ({why})",
        fields=lambda c: {"why": election_decision(c).why},
    ),
    *ELECTION,
)


def decide(view: ClusterView, local: LocalFacts) -> Decision:
    """What this node does next: the first matching row of ``RULES``; with etcd unreachable, an
    action not ``safe_without_etcd`` becomes a ``WAIT`` that says which action it held back."""
    c = Ctx(view, local)
    decision = first_match(RULES, c).decision(c)
    if not local.etcd_reachable and not ACTIONS[decision.action].safe_without_etcd:
        return Decision(Action.WAIT, STALE_VIEW_WHY.format(action=decision.action))
    return decision
