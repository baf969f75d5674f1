"""The election: nobody holds the leader key and PostgreSQL runs.  Who campaigns (the best
eligible candidate; the k-th only after k x candidate_grace), who waits and says why, and how a
manual failover or hand-over picks its candidate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hakeeper.core.cluster import Switchover
from hakeeper.ha.policy.candidates import Candidate, assess, rank
from hakeeper.ha.policy.decision import Action, Decision
from hakeeper.ha.policy.rules import Ctx, Rule, always, first_match
from hakeeper.ha.policy.switchover import manual_request


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
        always,
        Action.WAIT,
        "{best} is a better candidate (timeline {timeline}, lsn {lsn})",
        fields=_better_fields,
        facts=_standing_facts,
    ),
)


def election_decision(c: Ctx) -> Decision:
    return first_match(ELECTION, c).decision(c)
