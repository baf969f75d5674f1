"""Synchronous and quorum replication, the pure planning: how the leader keeps the ``sync`` key
and PostgreSQL's ``synchronous_standby_names`` in step (the I/O shell: ``hakeeper/ha/sync.py``;
the GUC text: ``hakeeper.pg.conf.sync_guc``).

**Synchronous mode** (``FIRST``).  Invariant: **every commit acknowledged to a client is on
every member of the ``sync`` key.**

* ``synchronous_standby_names`` always lists exactly the sync set, as ``FIRST k (n1, ..., nk)``
  with k = the number of names: a commit waits for *all* of them.
* :func:`first_step` plans one cycle of it.
* Adding standby b: the GUC first (b now acknowledges every new commit), then, once b reports
  ``sync`` in ``pg_stat_replication`` and has flushed past the WAL position of that moment (so
  it also holds every earlier commit), the key.
* Removing standby a (gone, nosync, or lagging past ``maximum_lag_on_syncnode``): the key first,
  then the GUC.  In between, commits still wait for a, so the key never names a member that
  lacks an acknowledged commit.
* With no healthy standby: ``''`` (commits stop waiting; the key is empty, so any caught-up
  replica may be promoted) or, with ``synchronous_strict``, ``'*'``: commits wait for a standby.

Only members of a non-empty sync set are promoted automatically (``candidates.assess``).

**Quorum mode** (``ANY``).  Every healthy standby (streaming, not ``nosync``, ``sync_priority``
> 0, within ``maximum_lag_on_syncnode``) is a *voter*.

* GUC: ``ANY k ("a", "b", ...)`` over the voter set V_guc, k = ``synchronous_node_count``
  clamped to 1..|V_guc|: every acknowledged commit is on at least k_guc members of V_guc.
* Key: the voter set V_key and its quorum k_key (``SyncState.members`` / ``.quorum``).  It
  claims: every acknowledged commit is on at least k_key members of V_key.  So any
  |V_key| - k_key + 1 voters include one that has it (R + W > N), and the most advanced of
  them has them all.  An empty key claims nothing (the leader ran without waiting).
* Promotion (``candidates.assess``) with the leader gone: R = the voters whose record was published
  after the leader key disappeared (the old primary had stopped by then: fenced before its
  lease ran out, or released after stopping) and that report a WAL position.  A candidate is
  promoted automatically only if |R| >= |V_key| - k_key + 1, it is in R and no member of R is
  further ahead.  Otherwise nobody is, until an operator forces a failover.
* Invariant, at every instant: ``k_guc - |V_guc \\ V_key| >= k_key``
  (:func:`quorum_transition_safe`): even an acknowledgement from every voter the key does not
  know leaves k_key from the key's voters.  Hence, unlike FIRST mode, a voter is *added* key
  first, then GUC, and *removed* GUC first, then key; k is *raised* GUC first and *lowered* key
  first.  (In FIRST mode the key names standbys that have *every* commit, so a standby may
  only enter the key once the GUC makes it acknowledge; in quorum mode growing V_key *weakens*
  the claim, since more voters must then be found for an election, while growing V_guc lets
  more standbys acknowledge in place of the key's voters.)  :func:`quorum_step` plans each
  change as one such step.
* A key change that claims more than the key it replaces (a voter removed, k raised, or the
  first voters of a term) must also hold for commits acknowledged under the *previous* GUC:
  it waits until k_key of the new voters have flushed past the WAL position read after the
  current GUC took effect (``RELOAD_SETTLE`` after the reload).
* With no voter: ``''`` or ``'*'`` under ``synchronous_strict``, as in FIRST mode.  Losing a
  voter does not stop commits as long as k voters remain; it is then removed (GUC, then key).

Both modes: a new term starts with an empty key; a switchover goes only to a sync standby or
voter; with no leader, replicas stop streaming from the old primary before the election
(``decide``: ``DETACH``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hakeeper.core.cluster import ClusterView, guc_quorum

__all__ = [
    "RELOAD_SETTLE",
    "FirstStep",
    "Quorum",
    "ReplicationRow",
    "choose",
    "first_step",
    "guc_quorum",
    "quorum_step",
    "quorum_target",
    "quorum_transition_safe",
]

# PostgreSQL's WAL senders apply a reload within milliseconds; a key change that depends on a new
# GUC reads its WAL position no sooner than this after the reload (seconds).
RELOAD_SETTLE = 1.0


def choose(view: ClusterView, streaming: set[str], leader: str) -> list[str]:
    """Healthy sync candidates, best first: streaming from us, not nosync, sync_priority > 0,
    within maximum_lag_on_syncnode; by (sync_priority desc, lag, name)."""
    dyn = view.config
    out = []
    for m in view.members.values():
        if m.name == leader or m.name not in streaming or m.nosync or m.sync_priority <= 0:
            continue
        if dyn.maximum_lag_on_syncnode >= 0 and (m.lag or 0) > dyn.maximum_lag_on_syncnode:
            continue
        out.append(m)
    out.sort(key=lambda m: (-m.sync_priority, m.lag or 0, m.name))
    return [m.name for m in out]


# -- quorum mode: pure planning ----------------------------------------------------------------------


def quorum_transition_safe(v_guc: Collection[str], k_guc: int, v_key: Collection[str], k_key: int) -> bool:
    """Does every commit acknowledged under ``ANY k_guc (v_guc)`` satisfy the key's claim "on at
    least k_key of v_key"?

    Definition (brute force in the unit test): for every ack set A ⊆ v_guc with |A| >= k_guc
    and every S ⊆ v_key with |S| >= |v_key| - k_key + 1, A ∩ S is not empty.  The worst A
    takes every voter the key does not know first, so it holds at least
    ``k_guc - |v_guc \\ v_key|`` of the key's voters; S misses such an A exactly when that is
    below k_key.  Vacuously true when no S exists (k_key <= 0: the key claims nothing) or no A
    does (k_guc > |v_guc|: nothing is ever acknowledged).

    The same test tells whether one key implies another (pass the old key as the GUC).
    """
    g, k = set(v_guc), set(v_key)
    return k_key <= 0 or k_guc > len(g) or k_guc - len(g - k) >= k_key


@dataclass(frozen=True, slots=True)
class Quorum:
    """At least ``k`` of ``voters``: the rule of the GUC or the claim of the key."""

    voters: frozenset[str]
    k: int

    @classmethod
    def of(cls, voters: Collection[str], k: int) -> Quorum:
        return cls(frozenset(voters), k if voters else 0)

    def covers(self, other: Quorum) -> bool:
        """Whatever satisfies us satisfies ``other``."""
        return quorum_transition_safe(self.voters, self.k, other.voters, other.k)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.voters))


def quorum_target(healthy: Collection[str], node_count: int) -> Quorum:
    """Every healthy standby votes; k = synchronous_node_count, at most the number of voters."""
    return Quorum.of(healthy, min(node_count, len(healthy)))


def quorum_step(guc: Quorum, key: Quorum, target: Quorum) -> tuple[Literal["guc", "key"], Quorum] | None:
    """The next single change towards ``target`` after which the GUC still covers the key.

    The GUC moves first when the key already covers the target (a voter removed, k raised); else
    the key, when the GUC already covers the target (a voter added, k lowered); else (voters
    swapped) the key first widens to the old and new voters at a quorum both GUCs cover, after
    which the GUC can move.  At most three steps reach the target; None once there."""
    if guc == target and key == target:
        return None
    if guc != target and target.covers(key):
        return "guc", target
    if key != target and guc.covers(target):
        return "key", target
    wide = key.voters | target.voters
    k = min(key.k, target.k, guc.k - len(guc.voters - wide))
    if k < 1:  # unreachable while the GUC covers the key (tested)
        return None
    return "key", Quorum(wide, k)


# -- synchronous mode (FIRST): pure planning -----------------------------------------------------------


class ReplicationRow(Protocol):
    """The columns of a ``pg_stat_replication`` row that FIRST mode reads."""

    @property
    def application_name(self) -> str: ...

    @property
    def sync_state(self) -> str | None: ...

    @property
    def flush_lsn(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class FirstStep:
    """One cycle of synchronous (FIRST) mode, for the shell to carry out in this order:

    1. ``key`` set: write the ``sync`` key with these members (guarded by the term).  If the
       write fails, stop: nothing else changes this cycle.
    2. ``names`` set: ``synchronous_standby_names`` lists these from now on.
    3. ``clear_pending``: forget the join in progress.
    4. ``join`` set: apply the new names (reload) now, then read the current WAL position; if it
       is unknown, stop; else the join in progress becomes (``join``, that position).
    5. ``event`` set: log it at ``level`` with ``facts`` (a join adds ``must_flush``).

    ``FirstStep()`` means nothing to do this cycle.
    """

    key: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    clear_pending: bool = False
    join: str | None = None
    event: str | None = None
    level: Literal["info", "warning"] = "info"
    facts: Mapping[str, object] = field(default_factory=dict)


def first_step(
    key: Sequence[str],
    names: Sequence[str],
    pending: tuple[str, int] | None,
    healthy: Sequence[str],
    replication: Iterable[ReplicationRow],
    node_count: int,
) -> FirstStep:
    """The next change in synchronous mode, keeping "the key only names standbys that
    acknowledge every commit": a standby leaves the key before the GUC and joins it after.

    ``key``: the ``sync`` key's members for the current term; ``names``: the standbys the GUC
    lists now; ``pending``: a join in progress (standby, WAL position it must have flushed);
    ``healthy``: the healthy candidates, best first (:func:`choose`); ``replication``: the rows
    of ``pg_stat_replication``; ``node_count``: ``synchronous_node_count``.
    """
    # Step 1: remove unhealthy members, the key first, then the GUC.
    bad = tuple(n for n in key if n not in healthy)
    if bad:
        keep = tuple(n for n in key if n not in bad)
        return FirstStep(
            key=keep,
            names=tuple(n for n in names if n not in bad),
            event="sync_standby_removed",
            level="warning",
            facts={"standbys": list(bad), "sync_set": list(keep)},
        )
    # A standby in the GUC but not the key that became unhealthy: just drop it from the GUC.
    stale = tuple(n for n in names if n not in key and n not in healthy)
    if stale:
        return FirstStep(names=tuple(n for n in names if n not in stale), clear_pending=True)

    # Step 2: add a standby while the set is short, the GUC first, then (once it acks) the key.
    if len(key) >= node_count:
        return FirstStep(names=tuple(key))
    if pending is not None and pending[0] in healthy and pending[0] in names:
        name, must_flush = pending
        row = next((r for r in replication if r.application_name == name), None)
        if row is not None and row.sync_state == "sync" and (row.flush_lsn or 0) >= must_flush:
            # It acknowledges every commit since the GUC named it and holds every earlier one.
            return FirstStep(
                key=(*key, name),
                clear_pending=True,
                event="sync_standby_added",
                facts={"standby": name, "sync_set": [*key, name]},
            )
        return FirstStep()  # still catching up
    candidates = [n for n in healthy if n not in key]
    if not candidates:
        return FirstStep(names=tuple(key), clear_pending=True)
    name = candidates[0]
    return FirstStep(
        names=(*key, name),
        join=name,
        event="sync_standby_joining",
        facts={"standby": name},
    )
