"""Synchronous and quorum replication: the leader keeps the ``sync`` key and PostgreSQL's
``synchronous_standby_names`` in step.

**Synchronous mode** (``FIRST``).  Invariant: **every commit acknowledged to a client is on
every member of the ``sync`` key.**

* ``synchronous_standby_names`` always lists exactly the sync set, as ``FIRST k (n1, ..., nk)``
  with k = the number of names: a commit waits for *all* of them.
* Adding standby b: the GUC first (b now acknowledges every new commit), then, once b reports
  ``sync`` in ``pg_stat_replication`` and has flushed past the WAL position of that moment (so
  it also holds every earlier commit), the key.
* Removing standby a (gone, nosync, or lagging past ``maximum_lag_on_syncnode``): the key first,
  then the GUC.  In between, commits still wait for a, so the key never names a member that
  lacks an acknowledged commit.
* With no healthy standby: ``''`` (commits stop waiting; the key is empty, so any caught-up
  replica may be promoted) or, with ``synchronous_strict``, ``'*'``: commits wait for a standby.

Only members of a non-empty sync set are promoted automatically (``decide.assess``).

**Quorum mode** (``ANY``).  Every healthy standby (streaming, not ``nosync``, ``sync_priority``
> 0, within ``maximum_lag_on_syncnode``) is a *voter*.

* GUC: ``ANY k ("a", "b", ...)`` over the voter set V_guc, k = ``synchronous_node_count``
  clamped to 1..|V_guc|: every acknowledged commit is on at least k_guc members of V_guc.
* Key: the voter set V_key and its quorum k_key (``SyncState.members`` / ``.quorum``).  It
  claims: every acknowledged commit is on at least k_key members of V_key.  So any
  |V_key| - k_key + 1 voters include one that has it (R + W > N), and the most advanced of
  them has them all.  An empty key claims nothing (the leader ran without waiting).
* Promotion (``decide.assess``) with the leader gone: R = the voters whose record was published
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

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hakeeper.core.cluster import ClusterView, SyncState
from hakeeper.core.config import DynamicConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.etcd import cmp_create, op_delete, op_put
from hakeeper.pg.errors import PgError

if TYPE_CHECKING:
    from hakeeper.ha.agent import Agent
    from hakeeper.pg.postgres import LocalState

from hakeeper.util.log import get_logger

log = get_logger("hakeeper.agent")

# PostgreSQL's WAL senders apply a reload within milliseconds; a key change that depends on a new
# GUC reads its WAL position no sooner than this after the reload (seconds).
RELOAD_SETTLE = 1.0


def guc_quorum(names: Collection[str], quorum: int) -> int:
    """The k the GUC waits for: ``quorum`` if it is 1..len(names), else all of them (0 = FIRST
    mode's "every name", which quorum mode reads as ANY len(names), the same rule)."""
    return quorum if 1 <= quorum <= len(names) else len(names)


def sync_guc(dyn: DynamicConfig, names: tuple[str, ...], quorum: int = 0, guard: bool = False) -> str:
    """``synchronous_standby_names`` for ``names``.  With no names: ``'*'`` (commits wait for any
    standby) under ``synchronous_strict`` or while a new primary's ``guard`` lasts, else ``''``."""
    if dyn.replication_mode == "async":
        return ""
    if names:
        quoted = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        if dyn.replication_mode == "quorum":
            return f"ANY {guc_quorum(names, quorum)} ({quoted})"
        return f"FIRST {len(names)} ({quoted})"
    return "*" if dyn.synchronous_strict or guard else ""


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


# -- executing -----------------------------------------------------------------------------------------


async def _write_key(agent: Agent, term: int, members: tuple[str, ...], quorum: int = -1) -> bool:
    k = agent.keys
    state = SyncState(agent.name, members, term, quorum)
    res = await agent.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.sync, state.to_json())])
    return res.succeeded


async def _current_lsn(agent: Agent) -> int | None:
    try:
        rows = await agent.pg.execute("SELECT pg_current_wal_lsn()::text")
        return parse_lsn(str(rows[0][0]))
    except (PgError, IndexError):
        return None


async def manage_sync(agent: Agent, view: ClusterView, term: int) -> None:
    dyn = view.config
    k = agent.keys
    if dyn.replication_mode == "async":
        if view.sync is not None:
            await agent.client.txn([cmp_create(k.leader, "=", term)], [op_delete(k.sync)])
            log.info("sync_set_dropped", reason="replication_mode is async")
        agent._sync_names = ()
        agent._sync_quorum = 0
        agent._sync_pending = None
        return
    st = agent.state
    if st is None or not st.running or st.in_recovery:
        return
    # A standby silent for a ttl (it reports every second) is cut off, even while its walsender
    # has not timed out yet: keeping it would stall every commit until wal_sender_timeout.
    streaming = {
        r.application_name
        for r in st.replication
        if r.state == "streaming" and (r.reply_age is None or r.reply_age <= dyn.ttl)
    }
    healthy = choose(view, streaming, agent.name)
    if dyn.replication_mode == "quorum":
        await _manage_quorum(agent, view, term, st, healthy)
        return
    agent._sync_quorum = 0  # FIRST: the GUC waits for every name
    key = tuple(view.sync.members) if view.sync is not None and view.sync.term == term else ()
    if view.sync is None or view.sync.term != term or view.sync.is_quorum:
        # A new term starts with what our GUC guarantees now: nothing yet.  (So does a switch
        # from quorum mode: its key does not say that every member has every commit.)
        if await _write_key(agent, term, ()):
            log.info("sync_set_started", term=term)
        key = ()

    # 1. Remove unhealthy members: the key first, then the GUC.
    bad = tuple(n for n in key if n not in healthy)
    if bad:
        keep = tuple(n for n in key if n not in bad)
        if not await _write_key(agent, term, keep):
            return
        agent._sync_names = tuple(n for n in agent._sync_names if n not in bad)
        log.warning("sync_standby_removed", standbys=list(bad), sync_set=list(keep))
        return  # the GUC follows in _apply_parameter_changes right after this cycle
    # A standby in the GUC but not the key that became unhealthy: just drop it from the GUC.
    stale = tuple(n for n in agent._sync_names if n not in key and n not in healthy)
    if stale:
        agent._sync_names = tuple(n for n in agent._sync_names if n not in stale)
        agent._sync_pending = None
        return

    # 2. Add a standby while the set is short: the GUC first, then (once it acks) the key.
    if len(key) >= dyn.synchronous_node_count:
        agent._sync_names = key
        return
    pending = agent._sync_pending
    if pending is not None and pending[0] in healthy and pending[0] in agent._sync_names:
        name, need = pending
        row = next((r for r in st.replication if r.application_name == name), None)
        if row is not None and row.sync_state == "sync" and (row.flush_lsn or 0) >= need:
            if await _write_key(agent, term, (*key, name)):
                agent._sync_pending = None
                log.info("sync_standby_added", standby=name, sync_set=[*key, name])
        return
    candidates = [n for n in healthy if n not in key]
    if not candidates:
        agent._sync_names = key
        agent._sync_pending = None
        return
    name = candidates[0]
    agent._sync_names = (*key, name)
    await agent._apply_parameter_changes(view)  # reload now, then note where WAL stands
    lsn = await _current_lsn(agent)
    if lsn is None:
        return
    agent._sync_pending = (name, lsn)
    log.info("sync_standby_joining", standby=name, must_flush=lsn)


async def _manage_quorum(
    agent: Agent, view: ClusterView, term: int, st: LocalState, healthy: list[str]
) -> None:
    """One step of quorum_step per cycle (see the module docstring)."""
    dyn = view.config
    sync = view.sync
    if sync is None or sync.term != term:
        if await _write_key(agent, term, ()):
            log.info("sync_set_started", term=term)
            await agent.mirror.resync()
        return
    key = Quorum.of(sync.members, sync.quorum)
    guc = Quorum.of(agent._sync_names, guc_quorum(agent._sync_names, agent._sync_quorum))
    if not guc.voters and key.voters:
        # Only after an agent restart beside a running primary: what our GUC was is unknown, and
        # the key itself is a GUC that covers it.
        agent._sync_names, agent._sync_quorum, agent._sync_pending = key.names, key.k, None
        agent._sync_guc_at = time.monotonic()
        await agent._apply_parameter_changes(view)
        return
    target = quorum_target(healthy, dyn.synchronous_node_count)
    step = quorum_step(guc, key, target)
    if step is None:
        return
    what, q = step
    facts = {"voters": list(q.names), "quorum": q.k}
    if what == "guc":
        agent._sync_names, agent._sync_quorum, agent._sync_pending = q.names, q.k, None
        agent._sync_guc_at = time.monotonic()
        await agent._apply_parameter_changes(view)
        log.info("quorum_guc_changed", **facts, key_voters=list(key.names), key_quorum=key.k)
        return
    if not key.covers(q):
        # The new key claims more than the old one: commits acknowledged under an earlier GUC
        # must be on q.k of its voters too.  Wait until q.k of them have flushed past a WAL
        # position read once every WAL sender has applied the current GUC.
        current = sync_guc(dyn, agent._sync_names, agent._sync_quorum)
        pending = agent._sync_pending
        if pending is None or pending[0] != current:
            if time.monotonic() - agent._sync_guc_at < RELOAD_SETTLE:
                return
            lsn = await _current_lsn(agent)
            if lsn is not None:
                agent._sync_pending = (current, lsn)
            return
        flushed = {r.application_name for r in st.replication if (r.flush_lsn or 0) >= pending[1]}
        if len(flushed & q.voters) < q.k:
            return
    if await _write_key(agent, term, q.names, q.k):
        log.info("quorum_key_changed", **facts, guc_voters=list(guc.names), guc_quorum=guc.k)
        await agent.mirror.resync()
