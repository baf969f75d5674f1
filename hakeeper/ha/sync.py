"""Synchronous replication: the leader keeps the sync set in etcd and in PostgreSQL in step.

Invariant: **every commit acknowledged to a client is on every member of the ``sync`` key.**

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hakeeper.config import DynamicConfig
from hakeeper.dcs.etcd import cmp_create, op_delete, op_put
from hakeeper.ha.model import ClusterView, SyncState
from hakeeper.lsn import parse_lsn
from hakeeper.pg.errors import PgError

if TYPE_CHECKING:
    from hakeeper.ha.agent import Agent

from hakeeper.log import get_logger

log = get_logger("hakeeper.agent")


def sync_guc(dyn: DynamicConfig, names: tuple[str, ...]) -> str:
    if dyn.replication_mode != "synchronous":
        return ""
    if names:
        quoted = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        return f"FIRST {len(names)} ({quoted})"
    return "*" if dyn.synchronous_strict else ""


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


async def _write_key(agent: Agent, term: int, members: tuple[str, ...]) -> bool:
    k = agent.keys
    state = SyncState(agent.name, members, term)
    res = await agent.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.sync, state.to_json())])
    return res.succeeded


async def manage_sync(agent: Agent, view: ClusterView, term: int) -> None:
    dyn = view.config
    k = agent.keys
    if dyn.replication_mode != "synchronous":
        if view.sync is not None:
            await agent.client.txn([cmp_create(k.leader, "=", term)], [op_delete(k.sync)])
            log.info("sync_set_dropped", reason="replication_mode is async")
        agent._sync_names = ()
        agent._sync_pending = None
        return
    st = agent.state
    if st is None or not st.running or st.in_recovery:
        return
    streaming = {r.application_name for r in st.replication if r.state == "streaming"}
    healthy = choose(view, streaming, agent.name)
    key = tuple(view.sync.members) if view.sync is not None and view.sync.term == term else ()
    if view.sync is None or view.sync.term != term:
        # A new term starts with what our GUC guarantees now: nothing yet.
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
    try:
        rows = await agent.pg.execute("SELECT pg_current_wal_lsn()::text")
        need = parse_lsn(str(rows[0][0])) or 0
    except (PgError, IndexError):
        return
    agent._sync_pending = (name, need)
    log.info("sync_standby_joining", standby=name, must_flush=need)
