"""The rule machinery of the decision tables: :class:`Ctx` (the inputs with the questions the
rules ask of them), :class:`Rule` (one situation -> action row) and :func:`first_match`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hakeeper.core.cluster import ClusterView, Leader, Member, MemberRole, MemberState, Switchover
from hakeeper.ha.policy.decision import Action, Decision, LeaseOwner, LocalFacts
from hakeeper.ha.policy.versions import leader_major_refusal

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
    def key_under_other_lease(self) -> bool:
        """The leader key names us, under a lease that is not our current one."""
        return self.we_lead and self.view.leader is not None and self.view.leader.lease != self.local.lease

    @property
    def key_lease_owner(self) -> LeaseOwner | None:
        """Whose lease the leader key naming us is under, when it is not ours now (else None)."""
        return self.local.leader_lease_owner if self.key_under_other_lease else None

    @property
    def impostor(self) -> str | None:
        """What shows that another agent runs under our name (None: nothing does)."""
        if self.key_lease_owner == LeaseOwner.FOREIGN:
            return "the leader key names us under a live lease that is not ours"
        if self.local.name_conflict:
            return "our member key is kept alive by a lease that is not ours"
        return None

    @property
    def leader_running(self) -> bool:
        """The leader key's holder publishes itself as a running primary."""
        lm = self.view.leader_member
        return lm is not None and lm.role == MemberRole.PRIMARY and lm.state == MemberState.RUNNING

    @property
    def other_major(self) -> str | None:
        """Why we must not clone from or follow the leader: it runs another major than our
        binaries (None: it does not, or either major is unknown)."""
        return leader_major_refusal(self.view, self.local.name, self.local.binaries_major)

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
    def abandoned_bootstrap(self) -> bool:
        """Our data directory is what our own interrupted bootstrap left, and never became the
        cluster's: the marker names it, before the race was won, with no system identifier or
        the directory's own, and the initialize key is not that identifier.  A running
        PostgreSQL is never discarded (nothing runs on such a directory)."""
        left, ours = self.local.bootstrap_left, self.local.system_identifier
        return (
            left is not None
            and not left.won
            and self.local.data_initialized
            and not self.local.pg_running
            and (left.system_identifier is None or left.system_identifier == ours)
            and (ours is None or ours != self.view.initialized)
        )

    @property
    def unfinished_bootstrap(self) -> bool:
        """We won the initialize race with this data directory, and the bootstrap after it (the
        roles, the history entry) did not finish."""
        left, ours = self.local.bootstrap_left, self.local.system_identifier
        return (
            left is not None
            and left.system_identifier is not None
            and left.system_identifier == ours == self.view.initialized
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


def always(c: Ctx) -> bool:
    return True


def first_match(rules: tuple[Rule, ...], c: Ctx) -> Rule:
    """The first row whose situation holds.  Every table ends with a row that always holds."""
    for rule in rules:
        if rule.when(c):
            return rule
    raise AssertionError("no rule matched: a decision table must end with a catch-all row")
