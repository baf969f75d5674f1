"""SyncManager: the leader's synchronous replication state and its I/O (etcd ``sync`` key,
``synchronous_standby_names``).  The rules and their proof are in :mod:`hakeeper.ha.policy.sync`; this
class carries them out one step per HA cycle."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from hakeeper.core.cluster import ClusterView, SyncState
from hakeeper.core.config import DynamicConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.core.pgtypes import LocalState
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.policy.sync import (
    RELOAD_SETTLE,
    FirstStep,
    Quorum,
    choose,
    first_step,
    guc_quorum,
    quorum_step,
    quorum_target,
)
from hakeeper.ha.state import NodeState
from hakeeper.pg.conf import sync_guc
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import Postgres
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.sync")


class SyncManager:
    def __init__(
        self,
        name: str,
        store: ClusterStore,
        pg: Postgres,
        state: NodeState,
        *,
        apply: Callable[[DynamicConfig], Awaitable[None]],
        resync: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self.store = store
        self.pg = pg
        self.state = state
        self.apply = apply  # rewrite and reload PostgreSQL's configuration (PgConfigurator)
        self.resync = resync  # re-read etcd now (after a key change the loop must see)
        self.names: tuple[str, ...] = ()  # in synchronous_standby_names (primary), in order
        self.quorum = 0  # quorum mode: k of ANY k (0: all of the names)
        self.guc_at = 0.0  # quorum mode: monotonic time of the last GUC change
        # A newly promoted primary waits for any standby ('*') until its sync set forms, or
        # non-strict mode gives up at this monotonic time (see new_term).
        self.guard_until = 0.0
        # FIRST mode: (standby, LSN it must flush) to join; quorum mode: (the GUC, WAL position
        # read after it took effect).
        self.pending: tuple[str, int] | None = None

    def guc(self, dyn: DynamicConfig) -> str:
        """``synchronous_standby_names`` now."""
        return sync_guc(dyn, self.names, self.quorum, guard=time.monotonic() < self.guard_until)

    def new_term(self, dyn: DynamicConfig) -> None:
        """We are about to promote: no sync set yet.  In synchronous or quorum mode, guard the
        new primary (``'*'``) for up to 2 x ttl until its sync set forms."""
        self.names = ()
        self.pending = None
        if dyn.replication_mode != "async":
            self.guard_until = time.monotonic() + 2 * dyn.ttl

    async def _write_key(self, term: int, members: tuple[str, ...], quorum: int = -1) -> bool:
        return await self.store.write_sync(term, SyncState(self.name, members, term, quorum))

    async def _current_lsn(self) -> int | None:
        try:
            rows = await self.pg.session.execute("SELECT pg_current_wal_lsn()::text")
            return parse_lsn(str(rows[0][0]))
        except (PgError, IndexError):
            return None

    async def manage(self, view: ClusterView, term: int) -> None:
        """One step towards the sync set this leader's healthy standbys allow (module docstring of
        hakeeper.ha.policy.sync)."""
        dyn = view.config
        if dyn.replication_mode == "async":
            if view.sync is not None:
                await self.store.drop_sync(term)
                log.info("sync_set_dropped", reason="replication_mode is async")
            self.names = ()
            self.quorum = 0
            self.pending = None
            return
        st = self.state.probe
        if st is None or not st.running or st.in_recovery:
            return
        # A standby silent for a ttl (it reports every second) is cut off, even while its walsender
        # has not timed out yet: keeping it would stall every commit until wal_sender_timeout.
        streaming = {
            r.application_name
            for r in st.replication
            if r.state == "streaming" and (r.reply_age is None or r.reply_age <= dyn.ttl)
        }
        healthy = choose(view, streaming, self.name)
        if dyn.replication_mode == "quorum":
            await self._manage_quorum(view, term, st, healthy)
            return
        self.quorum = 0  # FIRST: the GUC waits for every name
        key = tuple(view.sync.members) if view.sync is not None and view.sync.term == term else ()
        if view.sync is None or view.sync.term != term or view.sync.is_quorum:
            # A new term starts with what our GUC guarantees now: nothing yet.  (So does a switch
            # from quorum mode: its key does not say that every member has every commit.)
            if await self._write_key(term, ()):
                log.info("sync_set_started", term=term)
            key = ()

        step = first_step(key, self.names, self.pending, healthy, st.replication, dyn.synchronous_node_count)
        await self._carry_out(step, view, term)

    async def _carry_out(self, step: FirstStep, view: ClusterView, term: int) -> None:
        """One FIRST-mode step, in the order :class:`FirstStep` prescribes."""
        if step.key is not None and not await self._write_key(term, step.key):
            return
        if step.names is not None:
            self.names = step.names
        if step.clear_pending:
            self.pending = None
        facts = dict(step.facts)
        if step.join is not None:
            await self.apply(view.config)  # reload now, then note where WAL stands
            lsn = await self._current_lsn()
            if lsn is None:
                return
            self.pending = (step.join, lsn)
            facts["must_flush"] = lsn
        if step.event is not None:
            (log.warning if step.level == "warning" else log.info)(step.event, **facts)

    async def _manage_quorum(self, view: ClusterView, term: int, st: LocalState, healthy: list[str]) -> None:
        """One step of quorum_step per cycle (see the module docstring)."""
        dyn = view.config
        sync = view.sync
        if sync is None or sync.term != term:
            if await self._write_key(term, ()):
                log.info("sync_set_started", term=term)
                await self.resync()
            return
        key = Quorum.of(sync.members, sync.quorum)
        guc = Quorum.of(self.names, guc_quorum(self.names, self.quorum))
        if not guc.voters and key.voters:
            # Only after an agent restart beside a running primary: what our GUC was is unknown, and
            # the key itself is a GUC that covers it.
            self.names, self.quorum, self.pending = key.names, key.k, None
            self.guc_at = time.monotonic()
            await self.apply(view.config)
            return
        target = quorum_target(healthy, dyn.synchronous_node_count)
        step = quorum_step(guc, key, target)
        if step is None:
            return
        what, q = step
        facts = {"voters": list(q.names), "quorum": q.k}
        if what == "guc":
            self.names, self.quorum, self.pending = q.names, q.k, None
            self.guc_at = time.monotonic()
            await self.apply(view.config)
            log.info("quorum_guc_changed", **facts, key_voters=list(key.names), key_quorum=key.k)
            return
        if not key.covers(q):
            # The new key claims more than the old one: commits acknowledged under an earlier GUC
            # must be on q.k of its voters too.  Wait until q.k of them have flushed past a WAL
            # position read once every WAL sender has applied the current GUC.
            current = sync_guc(dyn, self.names, self.quorum)
            pending = self.pending
            if pending is None or pending[0] != current:
                if time.monotonic() - self.guc_at < RELOAD_SETTLE:
                    return
                lsn = await self._current_lsn()
                if lsn is not None:
                    self.pending = (current, lsn)
                return
            flushed = {r.application_name for r in st.replication if (r.flush_lsn or 0) >= pending[1]}
            if len(flushed & q.voters) < q.k:
                return
        if await self._write_key(term, q.names, q.k):
            log.info("quorum_key_changed", **facts, guc_voters=list(guc.names), guc_quorum=guc.k)
            await self.resync()
