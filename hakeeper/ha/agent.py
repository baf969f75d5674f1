"""The agent: gather facts -> decide() -> execute, on a loop woken by etcd watch events.

Tasks running side by side on one event loop:

* ``PrefixMirror.run``  keeps a copy of the cluster's keys (range + watch, resumes itself);
* ``LeaseKeeper.run``   keeps our lease alive about every second and moves the fence deadline;
* ``_fence_watch``      first-line fence: stops PostgreSQL itself if the deadline passes;
* ``_loop``             the HA loop;
* the HTTP API.

The fencer *process* (``hakeeper.ha.fence``) is the last line of defence when this loop stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hakeeper import __version__
from hakeeper.core.cluster import (
    ClusterView,
    HistoryEntry,
    Member,
    MemberRole,
    MemberState,
    Status,
    build_view,
    slot_name_for,
)
from hakeeper.core.config import DynamicConfig, NodeConfig, secret_value
from hakeeper.core.keys import Keys
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.etcd import (
    EtcdClient,
    EtcdError,
    cmp_create,
    cmp_mod,
    cmp_value,
    op_delete,
    op_put,
)
from hakeeper.dcs.mirror import PrefixMirror
from hakeeper.ha import switchover
from hakeeper.ha.decide import Action, Decision, LocalFacts, assess, decide, reference_lsn
from hakeeper.ha.fence import FenceClient
from hakeeper.ha.lease import LeaseKeeper
from hakeeper.ha.ops import OperationError
from hakeeper.ha.sync import manage_sync, sync_guc
from hakeeper.metrics import Metrics
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import LocalState, Postgres, Role, Upstream
from hakeeper.util.log import get_logger, setup_logging
from hakeeper.util.proc import CommandFailed

if TYPE_CHECKING:
    from hakeeper.backup.archiver import Archiver
    from hakeeper.backup.heartbeat import Heartbeat
    from hakeeper.backup.schedule import ScheduleRunner

log = get_logger("hakeeper.agent")

# What the agent may still do on a stale view while etcd is unreachable: nothing that could make
# PostgreSQL writable or change etcd.
SAFE_WITHOUT_ETCD = frozenset({Action.WAIT, Action.START_REPLICA, Action.FOLLOW, Action.DEMOTE})

# How long a replica may fail to stream from a leader on a newer timeline before we rewind.
NOT_STREAMING_REWIND_AFTER = 8.0

# After a refused or failed bootstrap from a backup, the next attempt waits this long (s).
BOOTSTRAP_RETRY_AFTER = 10.0


class Agent:
    def __init__(self, cfg: NodeConfig, *, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.keys = Keys(cfg.prefix)
        self.client = EtcdClient.from_config(cfg.etcd)
        self.mirror = PrefixMirror(self.client, cfg.prefix + "/")
        self.pg = Postgres(cfg.postgresql, member_name=cfg.name)
        data_dir = cfg.postgresql.data_dir
        self.runtime_dir = data_dir.parent / f".{data_dir.name}.hakeeper"
        self.fence = FenceClient(self.runtime_dir, data_dir)
        self.bootstrap_dcs = cfg.bootstrap.dcs
        dyn = self.bootstrap_dcs
        self.lease = LeaseKeeper(
            self.client,
            ttl=dyn.ttl,
            interval=dyn.keepalive_interval,
            margin=dyn.fence_margin,
            on_deadline=self._on_deadline,
            on_lost=self._on_lease_lost,
        )
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.state: LocalState | None = None
        self.activity: MemberState | None = None  # a long action in progress (cloning, ...)
        self.pg_down_since: float | None = None
        self.leaderless_since: float | None = None
        self.not_streaming_since: float | None = None
        self.needs_rewind = False
        self.upstream: Upstream | None = None  # what our replica config points at
        self.last_decision: Decision | None = None
        self.last_view: ClusterView = ClusterView(config=dyn)
        self.slot_seen: dict[str, float] = {}
        self.loop_heartbeat = time.monotonic()
        self.started_at = time.monotonic()
        self._lock_fd: int | None = None
        self._sysid: str | None = None
        self.metrics = Metrics()
        self.client.on_request = self.metrics.etcd_observer
        # The HA cycle and operator actions (restart, reinitialize, reload) never interleave.
        self.action_lock = asyncio.Lock()
        self.loop_duration = 0.0
        self._leader_last_alive: float | None = None  # wall clock of the leader's last member update
        self._published: tuple[Member, int | None, float] | None = None  # last put: record, lease, when
        self._wal_server: asyncio.Task[None] | None = None  # serves a seeded replica's WAL (seed.py)
        self._promotion: dict[str, float | str] | None = None  # phases of our current promotion
        self._written_params: dict[str, Any] | None = None  # parameters in the config files now
        self._sync_names: tuple[str, ...] = ()  # in synchronous_standby_names (primary), in order
        self._sync_quorum = 0  # quorum mode: k of ANY k (0: all of the names)
        self._sync_guc_at = 0.0  # quorum mode: monotonic time of the last GUC change
        # A newly promoted primary waits for any standby ('*') until its sync set forms, or
        # non-strict mode gives up at this monotonic time (see _promote).
        self._sync_guard_until = 0.0
        # FIRST mode: (standby, LSN it must flush) to join; quorum mode: (the GUC, WAL position
        # read after it took effect).  See hakeeper/ha/sync.py.
        self._sync_pending: tuple[str, int] | None = None
        self._member_cache: tuple[LocalState | None, ClusterView, MemberState | None, Member] | None = None
        self._archive_overridden: set[str] = set()
        self._checkpointer_woken_for: int | None = None  # postmaster pid (see _wake_checkpointer)
        self._bootstrap_retry_at = 0.0
        self.archiver: Archiver | None = self._make_archiver()
        self.scheduler: ScheduleRunner | None = self._make_scheduler()
        self.heartbeat: Heartbeat | None = self._make_heartbeat()

    # -- fence plumbing ---------------------------------------------------------------------------

    def _on_deadline(self, deadline: float) -> None:
        if self.fence.armed:
            self.fence.arm(deadline)

    def _on_lease_lost(self) -> None:
        self.wake.set()

    def _arm_fence(self) -> None:
        """Called before anything makes PostgreSQL writable."""
        self.fence.ensure_running()
        self.fence.arm(self.lease.deadline)

    async def _fence_watch(self) -> None:
        while True:
            if self.fence.expired():
                log.error(
                    "fence_fired",
                    reason="leader lease not renewed before the fence deadline",
                    late_by=round(time.monotonic() - self.fence.state.deadline, 3),
                )
                self.fence.disarm()
                self.metrics.fence_events.inc()
                self.activity = MemberState.FENCED
                try:
                    await self.pg.stop("immediate", timeout=10)
                except PgError as e:
                    log.error("fence_stop_failed", error=str(e))
                self.needs_rewind = True
                self.pg_down_since = None
                self.wake.set()
            await asyncio.sleep(0.1)

    def is_writable_leader(self) -> bool:
        """Lease-holding writable primary whose fence is armed and not expired."""
        st = self.state
        view = self.last_view
        return (
            st is not None
            and st.running
            and st.in_recovery is False
            and view.leader is not None
            and view.leader.name == self.name
            and view.leader.lease == self.lease.lease
            and self.lease.valid()
            and self.fence.armed
            and not self.fence.expired()
        )

    # -- gathering facts --------------------------------------------------------------------------

    @property
    def dyn(self) -> DynamicConfig:
        return self.last_view.config

    def view(self) -> ClusterView:
        kvs = {
            k: (kv.value, kv.create_revision, kv.mod_revision, kv.lease) for k, kv in self.mirror.kvs.items()
        }
        return build_view(self.keys, kvs, self.mirror.revision, self.bootstrap_dcs)

    async def _system_identifier(self) -> str | None:
        if self._sysid is None and self.pg.is_initialized():
            try:
                self._sysid = await self.pg.system_identifier()
            except (PgError, CommandFailed) as e:
                log.warning("controldata_failed", error=str(e))
        return self._sysid

    async def gather(self, view: ClusterView) -> LocalFacts:
        now = time.monotonic()
        st = await self.pg.probe(timeout=2.0)
        self.state = st
        if st.running:
            self.pg_down_since = None
            if self.activity in (MemberState.STARTING, MemberState.FENCED, MemberState.CRASHED):
                self.activity = None
            if st.in_recovery is False:
                await self._wake_checkpointer()
        elif self.pg_down_since is None:
            self.pg_down_since = now
        if view.leader is None:
            self.leaderless_since = self.leaderless_since or now
        else:
            self.leaderless_since = None
            lm = view.leader_member
            if lm is not None and lm.name != self.name:
                self._leader_last_alive = lm.updated_at
        # A replica that cannot stream from a leader on a newer timeline has diverged.
        if st.running and st.in_recovery and view.leader is not None and view.leader.name != self.name:
            lm = view.leader_member
            if st.streaming_from is None:
                self.not_streaming_since = self.not_streaming_since or now
                newer = lm is not None and (lm.timeline or 0) > (st.timeline or 0)
                if newer and now - self.not_streaming_since > NOT_STREAMING_REWIND_AFTER:
                    if not self.needs_rewind:
                        log.warning(
                            "rewind_needed",
                            reason="not streaming from a leader on a newer timeline",
                            our_timeline=st.timeline,
                            leader_timeline=lm.timeline if lm else None,
                        )
                    self.needs_rewind = True
            else:
                self.not_streaming_since = None
                self.needs_rewind = False
        else:
            self.not_streaming_since = None
        tags = self.cfg.tags
        return LocalFacts(
            name=self.name,
            data_initialized=self.pg.is_initialized(),
            system_identifier=await self._system_identifier(),
            pg_running=st.running,
            in_recovery=st.in_recovery,
            timeline=st.timeline,
            wal_lsn=st.wal_lsn,
            streaming_from=st.streaming_from,
            pg_down_for=0.0 if self.pg_down_since is None else now - self.pg_down_since,
            needs_rewind=self.needs_rewind,
            lease=self.lease.lease,
            lease_valid=self.lease.valid(now),
            leaderless_for=0.0 if self.leaderless_since is None else now - self.leaderless_since,
            nofailover=tags.nofailover,
            failover_priority=tags.failover_priority,
            now=time.time(),
        )

    def member_record(self, view: ClusterView) -> Member:
        st = self.state
        pgc = self.cfg.postgresql
        host, port = pgc.connect_host_port
        role = MemberRole.UNKNOWN
        state = MemberState.STOPPED if self.pg.is_initialized() else MemberState.UNINITIALIZED
        if st is not None and st.running:
            if st.in_recovery:
                role = MemberRole.REPLICA
                state = MemberState.STREAMING if st.streaming_from else MemberState.IN_RECOVERY
            else:
                role = MemberRole.PRIMARY
                state = MemberState.RUNNING
        elif self.activity is not None:
            state = self.activity
        if self.activity in (MemberState.PROMOTING, MemberState.REWINDING, MemberState.CLONING):
            state = self.activity
        tags = self.cfg.tags
        m = Member(
            name=self.name,
            role=role,
            state=state,
            timeline=st.timeline if st else None,
            wal_lsn=st.wal_lsn if st else None,
            received_lsn=st.received_lsn if st else None,
            replayed_lsn=st.replayed_lsn if st else None,
            host=host,
            port=port,
            api_url=self.cfg.api.url,
            nofailover=tags.nofailover,
            failover_priority=tags.failover_priority,
            noloadbalance=tags.noloadbalance,
            nosync=tags.nosync,
            sync_priority=tags.sync_priority,
            streaming_from=st.streaming_from if st else None,
            leaderless=view.leader is None,
            updated_at=time.time(),
            version=__version__,
        )
        ref = reference_lsn(view)
        lag = None if m.wal_lsn is None else max(0, ref - m.wal_lsn)
        if role == MemberRole.PRIMARY:
            lag = 0
        cand = assess(replace(m, lag=lag), replace(view, members={**view.members, self.name: m}))
        return replace(m, lag=lag, eligible=cand.eligible, ineligible_reason=cand.reason)

    def current_member(self) -> Member:
        """This node's member record for the API, rebuilt only when what it is made of changed
        (a new probe, another activity, a new view): health checks stay cheap."""
        c = self._member_cache
        # Holding the objects themselves (not their ids) keeps their identities unique.
        if c is None or c[0] is not self.state or c[1] is not self.last_view or c[2] != self.activity:
            c = self._member_cache = (
                self.state,
                self.last_view,
                self.activity,
                self.member_record(self.last_view),
            )
        return c[3]

    async def publish(self, view: ClusterView) -> Member | None:
        if not self.lease.lease:
            return None
        m = self.member_record(view)
        # Every put wakes the other agents (they watch the keys).  An unchanged record (but for
        # its timestamp) is written at most once per loop_wait: publishing on every cycle made
        # the agents wake each other at etcd's round-trip rate (hundreds of puts a second and
        # half a CPU per idle agent).
        same = replace(m, updated_at=0.0)
        now = time.monotonic()
        if (
            self._published is not None
            and self._published[0] == same
            and self._published[1] == self.lease.lease
            and now - self._published[2] < self.dyn.loop_wait
        ):
            return m
        try:
            await self.client.put(self.keys.member(self.name), m.to_json(), lease=self.lease.lease)
        except EtcdError as e:
            log.warning("member_publish_failed", error=str(e))
            return None
        self._published = (same, self.lease.lease, now)
        return m

    # -- the loop -----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self.stopping.is_set():
            self.loop_heartbeat = time.monotonic()
            started = time.monotonic()
            try:
                async with self.action_lock:
                    await self.cycle()
            except (PgError, CommandFailed, EtcdError, OSError) as e:
                log.error("ha_cycle_failed", error=str(e), error_type=type(e).__name__)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ha_cycle_crashed")
            self.loop_duration = time.monotonic() - started
            self.metrics.loop_duration.observe(self.loop_duration)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.dyn.loop_wait):
                    await self._wait_event()

    async def _wait_event(self) -> None:
        """Until something in etcd changed that this agent should act on at once, or ``wake``.
        Routine member updates (positions, timestamps) of non-leaders while there is a leader
        do not end the wait: the next regular cycle sees them."""
        while True:
            mirror_changed = asyncio.ensure_future(self.mirror.changed.wait())
            woke = asyncio.ensure_future(self.wake.wait())
            try:
                await asyncio.wait({mirror_changed, woke}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                mirror_changed.cancel()
                woke.cancel()
            self.mirror.changed.clear()
            if self.wake.is_set() or not self._routine_only(self.mirror.take_changed()):
                return

    def _routine_only(self, keys: set[str]) -> bool:
        if not keys or "" in keys:  # "" = a re-list: anything may have changed
            return False
        leader = self.mirror.kvs.get(self.keys.leader)
        if leader is None:  # no leader: every member's fresh position matters to the election
            return False
        leader_name = leader.value.decode(errors="replace")
        prefix = self.keys.members
        for k in keys:
            if not k.startswith(prefix) or k not in self.mirror.kvs:  # other keys, a member left
                return False
            name = k[len(prefix) :]
            if name == leader_name and name != self.name:  # followers react to the leader at once
                return False
        return True

    async def cycle(self) -> None:
        stale = not self.mirror.synced
        if stale:
            if self.last_view.revision == 0:
                log.info("ha_waiting", reason="no etcd view yet (etcd unreachable?)")
                return
            # etcd is unreachable: decide on the last view we had, but only act locally in
            # ways that never make PostgreSQL writable (see SAFE_WITHOUT_ETCD).
            view = self.last_view
        else:
            view = self.view()
        if view.config_error:
            log.warning("dynamic_config_invalid", error=view.config_error)
        self.last_view = view
        self._apply_timing(view.config)
        facts = await self.gather(view)
        published = await self.publish(view)
        if published is not None:
            view = replace(view, members={**view.members, self.name: published})
            # Our own put no longer wakes the loop: the API's facts (lag, ...) come from
            # last_view, which must hold what we just published, not the record of a cycle ago.
            self.last_view = view
        decision = decide(view, facts)
        if stale and decision.action not in SAFE_WITHOUT_ETCD:
            decision = Decision(Action.WAIT, f"etcd unreachable; not acting on '{decision.action}'")
        self._log_decision(decision, facts)
        self.metrics.decisions.labels(decision.action.value).inc()
        await EXECUTORS[decision.action](self, view, facts, decision)
        if decision.action in (Action.LEAD, Action.FOLLOW) and not stale:
            await self._apply_parameter_changes(view)

    def _apply_timing(self, cfg: DynamicConfig) -> None:
        self.lease.ttl = cfg.ttl
        self.lease.interval = cfg.keepalive_interval
        self.lease.margin = cfg.fence_margin

    def _log_decision(self, d: Decision, facts: LocalFacts) -> None:
        prev = self.last_decision
        self.last_decision = d
        if prev is not None and prev.action == d.action and prev.why == d.why:
            return
        level = log.info
        if d.action in (Action.WAIT, Action.DEMOTE, Action.RELEASE):
            level = log.warning
        level(
            "decision_" + d.action.value,
            why=d.why,
            target=d.target,
            facts=dict(d.facts),
            timeline=facts.timeline,
            wal_lsn=facts.wal_lsn,
        )

    # -- executors ----------------------------------------------------------------------------------

    async def do_wait(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        return None

    async def do_initialize(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        if not await self.lease.refresh():
            log.warning("initialize_refused", reason="no valid lease")
            return
        if self.cfg.bootstrap.from_backup is not None:
            if time.monotonic() >= self._bootstrap_retry_at:
                await self._initialize_from_backup()
                if self._sysid is None:  # refused or failed: not again every loop_wait
                    self._bootstrap_retry_at = time.monotonic() + BOOTSTRAP_RETRY_AFTER
            return
        self.activity = MemberState.INITIALIZING
        log.info("initdb_started", data_dir=str(self.pg.data_dir))
        try:
            await self.pg.initdb(self.cfg.bootstrap.initdb)
            sysid = await self.pg.system_identifier()
            if sysid is None:
                raise PgError("initdb left no readable pg_control")
            k = self.keys
            cfg_json = self.bootstrap_dcs.model_dump_json().encode()
            res = await self.client.txn(
                [cmp_create(k.initialize, "=", 0), cmp_create(k.leader, "=", 0)],
                [
                    op_put(k.initialize, sysid),
                    op_put(k.leader, self.name, lease=self.lease.lease),
                    op_put(k.config, cfg_json),
                ],
            )
            if not res.succeeded:
                log.info("initialize_lost", reason="another member initialized the cluster first")
                await asyncio.to_thread(self.pg.remove_data_dir)
                self._sysid = None
                return
            self._sysid = sysid
            log.info("initialize_won", system_identifier=sysid)
            await self.mirror.resync()
            await self._start_as_primary(self.bootstrap_dcs)
            pgc = self.cfg.postgresql
            await self.pg.create_roles(
                superuser_password=secret_value(pgc.superuser.password),
                replication_user=pgc.replication.username,
                replication_password=secret_value(pgc.replication.password),
            )
            term = await self.client.get(k.leader)
            if term is not None:
                await self._append_history(term.create_revision, "bootstrap", None, 1, None)
        except BaseException:
            if self._sysid is None and self.pg.is_initialized():
                with contextlib.suppress(Exception):
                    await self.pg.stop("immediate")
                    await asyncio.to_thread(self.pg.remove_data_dir)
            raise
        finally:
            self.activity = None

    async def _initialize_from_backup(self) -> None:
        """``bootstrap.from_backup`` (hakeeper/backup/seed.py, docs/backup-bootstrap.md): restore
        the backup (every check of ``hakeeper restore`` first), take the initialize race like
        initdb, then let PostgreSQL recover to the target and promote on a new timeline with
        this node's own configuration (archive_mode on, into this cluster's scope), remove the
        recovery settings and set our roles' passwords.  Any failure removes the data directory
        and, once the race was won, the keys it created, so the next attempt starts clean."""
        from hakeeper.backup import seed
        from hakeeper.backup.errors import RepoError
        from hakeeper.backup.restore import RestoreError

        fb = self.cfg.bootstrap.from_backup
        assert fb is not None
        source = fb.scope or self.cfg.scope
        self.activity = MemberState.INITIALIZING
        k = self.keys
        term: int | None = None
        t0 = time.monotonic()
        try:
            primary = None
            if source != self.cfg.scope:
                primary = await seed.source_primary(self.client, self.cfg.namespace, source)
            log.info(
                "bootstrap_from_backup_started",
                source_scope=source,
                repo=fb.repo,
                backup=fb.backup,
                target=seed.target_of(fb).describe(),
                source_primary=primary.address if primary else None,
            )
            try:
                seeded = await seed.restore_for_bootstrap(self.cfg, self.pg, fb, primary)
            except seed.RestoreRefused as e:
                log.error("bootstrap_from_backup_refused", reason=str(e), retry_in=self.dyn.loop_wait)
                return
            except (RestoreError, RepoError, PgError, CommandFailed, OSError) as e:
                log.error("bootstrap_from_backup_failed", stage="copy", error=str(e))
                await asyncio.to_thread(self.pg.remove_data_dir)
                return
            res = seeded.result
            log.info(
                "bootstrap_from_backup_copied",
                backup=res.backup_id,
                repository=res.repository,
                target_timeline=res.timeline,
                seconds=round(res.seconds_fetch, 2),
                notes=res.notes,
            )
            ra = self.pg.run_as
            await asyncio.to_thread(seed.set_seed_settings, self.pg.data_dir, ra, {})
            sysid = await self.pg.system_identifier()
            if sysid is None:
                raise PgError("the restored backup left no readable pg_control")
            if not await self.lease.refresh():
                raise PgError("lease lost while restoring")
            cfg_json = self.bootstrap_dcs.model_dump_json().encode()
            won = await self.client.txn(
                [cmp_create(k.initialize, "=", 0), cmp_create(k.leader, "=", 0)],
                [
                    op_put(k.initialize, sysid),
                    op_put(k.leader, self.name, lease=self.lease.lease),
                    op_put(k.config, cfg_json),
                ],
            )
            if not won.succeeded:
                log.info("initialize_lost", reason="another member initialized the cluster first")
                await asyncio.to_thread(self.pg.remove_data_dir)
                return
            term = won.revision
            log.info("initialize_won", system_identifier=sysid, source="backup")
            await self.mirror.resync()
            # Our configuration (archive_mode on, our scope's archive_command, port, pg_hba),
            # then the recovery settings on top of it (write_config drops the timeline).
            self._arm_fence()
            await self._write_config(
                self._params(self.bootstrap_dcs),
                Role.PRIMARY,
                None,
                replication_password=secret_value(self.cfg.postgresql.replication.password),
            )
            self.upstream = None
            await asyncio.to_thread(
                seed.set_seed_settings, self.pg.data_dir, ra, seeded.settings, recovery_signal=True
            )
            await seed.recover(self.cfg, self.pg, seeded, fb.timeout)
            await asyncio.to_thread(seed.drop_seed_settings, self.pg.data_dir, ra)
            pgc = self.cfg.postgresql
            async with seed.over_socket(self.pg):  # the restored roles have the source's passwords
                await self.pg.create_roles(
                    superuser_password=secret_value(pgc.superuser.password),
                    replication_user=pgc.replication.username,
                    replication_password=secret_value(pgc.replication.password),
                )
            self._sysid = sysid
            st = await self.pg.probe()
            self.state = st
            switch_lsn = await self._switch_point(st.timeline)
            log.info(
                "bootstrap_from_backup_done",
                backup=res.backup_id,
                repository=res.repository,
                source_scope=source,
                target=res.target,
                new_timeline=st.timeline,
                switch_lsn=switch_lsn,
                seconds_replay=None if res.seconds_replay is None else round(res.seconds_replay, 2),
                seconds=round(time.monotonic() - t0, 2),
            )
            await self._append_history(
                term,
                f"bootstrap from backup {res.backup_id} of scope {source} ({res.target})",
                None,
                st.timeline or 0,
                switch_lsn,
            )
        except BaseException as e:
            if self._sysid is None:
                log.error(
                    "bootstrap_from_backup_failed",
                    stage="recovery" if term is not None else "prepare",
                    error=str(e) or type(e).__name__,
                    action="data directory removed"
                    + (", initialize and leader keys deleted" if term else ""),
                )
                self.fence.disarm()
                with contextlib.suppress(Exception):
                    await self.pg.stop("immediate")
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.pg.remove_data_dir)
                if term is not None:
                    with contextlib.suppress(Exception):
                        await self.client.txn(
                            [cmp_value(k.leader, "=", self.name), cmp_create(k.leader, "=", term)],
                            [op_delete(k.initialize), op_delete(k.config), op_delete(k.leader)],
                        )
                        await self.mirror.resync()
            if isinstance(e, Exception):
                return
            raise
        finally:
            self.activity = None

    async def _start_as_primary(self, dyn: DynamicConfig) -> None:
        self._arm_fence()
        await self._write_config(
            self._params(dyn),
            Role.PRIMARY,
            None,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        self.upstream = None
        self.activity = MemberState.STARTING
        await self.pg.start(timeout=max(30.0, dyn.primary_start_timeout))

    async def _write_config(
        self,
        params: dict[str, Any],
        role: Role,
        upstream: Upstream | None,
        *,
        replication_password: str | None,
    ) -> None:
        await self.pg.write_config(params, role, upstream, replication_password=replication_password)
        self._written_params = params

    async def _apply_parameter_changes(self, view: ClusterView) -> None:
        """Cluster-wide parameters changed in etcd (PATCH /config): rewrite and reload.

        Parameters that need a restart are reported by PostgreSQL as pending_restart; the agent
        does not restart on its own (POST /restart does)."""
        params = self._params(view.config)
        before = self._written_params or {}  # None: an agent restarted beside a running server
        if params == before:
            return
        changed = sorted(k for k in params.keys() | before.keys() if params.get(k) != before.get(k))
        if before.get("synchronous_standby_names") == "*" and params.get("synchronous_standby_names") == "":
            log.warning(
                "sync_guard_expired",
                reason="no synchronous standby joined in time; commits stop waiting (not strict)",
            )
        role = Role.PRIMARY if self.state is not None and self.state.in_recovery is False else Role.REPLICA
        await self._write_config(
            params,
            role,
            self.upstream if role == Role.REPLICA else None,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        await self.pg.reload()
        pending = []
        try:
            rows = await self.pg.execute("SELECT name FROM pg_settings WHERE pending_restart")
            pending = [str(r[0]) for r in rows]
        except PgError:
            pass
        log.info("parameters_applied", changed=changed, pending_restart=pending)

    def _params(self, dyn: DynamicConfig) -> dict[str, Any]:
        params = {
            **dyn.cluster_parameters(),
            **self.cfg.postgresql.parameters,
            "synchronous_standby_names": sync_guc(
                dyn, self._sync_names, self._sync_quorum, guard=time.monotonic() < self._sync_guard_until
            ),
        }
        return {**params, **self._archive_params(params)}

    # -- WAL archiving (hakeeper/backup/archiver.py) ------------------------------------------------

    def _make_archiver(self) -> Archiver | None:
        """The archiver when ``backup.repositories`` is not empty and ``backup.archive.enabled``."""
        b = self.cfg.backup
        if not b.repositories or not b.archive.enabled:
            return None
        from hakeeper.backup.archiver import Archiver, archive_repository_config
        from hakeeper.backup.repos import make_repository

        data_dir = self.pg.data_dir
        return Archiver(
            scope=self.cfg.scope,
            pg_wal=data_dir / "pg_wal",
            spool_dir=b.archive.spool_dir or data_dir.parent / f"{self.name}.spool",
            repositories=[make_repository(archive_repository_config(r, b.archive)) for r in b.repositories],
            cfg=b.archive,
            may_archive=lambda: self.archive_refusal() is None,
            refusal_reason=self.archive_refusal,
            run_as=self.pg.run_as,
            registry=self.metrics.registry,
            node=self.name,
        )

    # -- backup schedules and heartbeat (hakeeper/backup/schedule.py, heartbeat.py) --------------

    def _make_scheduler(self) -> ScheduleRunner | None:
        schedules = self.cfg.backup.effective_schedules()
        if not schedules:
            return None
        from hakeeper.backup.schedule import ScheduleRunner

        return ScheduleRunner(
            cfg=self.cfg,
            schedules=schedules,
            client=self.client,
            lookup=lambda key: self.mirror.kvs.get(key),  # the mirror replaces its dict on a re-list
            view=lambda: self.last_view,
            refusal=self.archive_refusal,
            registry=self.metrics.registry,
        )

    def _make_heartbeat(self) -> Heartbeat | None:
        b = self.cfg.backup
        if not b.repositories or b.heartbeat_interval <= 0:
            return None
        from hakeeper.backup.basebackup import Endpoint
        from hakeeper.backup.heartbeat import Heartbeat

        return Heartbeat(
            node=self.name,
            endpoint=Endpoint(self.name, self.pg.connect_host, self.pg.port),
            superuser=self.cfg.postgresql.superuser,
            interval=b.heartbeat_interval,
            term=self._leader_term,
        )

    def _leader_term(self) -> int | None:
        """Our term while we may write as the leader (the archive's conditions), else None."""
        leader = self.last_view.leader
        return leader.term if leader is not None and self.archive_refusal() is None else None

    def _archive_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """archive_mode and archive_command on every node (only a primary archives with 'on';
        archive_mode needs a restart, so it is there from a node's first start), and
        archive_timeout 60s unless set: an idle primary still ships a segment a minute."""
        if self.archiver is None:
            return {}
        ours: dict[str, Any] = {"archive_mode": "on", "archive_command": self.archiver.archive_command()}
        for k, v in ours.items():
            if k in params and params[k] != v and k not in self._archive_overridden:
                self._archive_overridden.add(k)
                log.warning(
                    "archive_parameter_overridden", parameter=k, value=params[k], reason="backup.archive"
                )
        if "archive_timeout" not in params:
            ours["archive_timeout"] = "60s"
        return ours

    async def _wake_checkpointer(self) -> None:
        """Once per postmaster, when it is first seen out of recovery: pg_reload_conf().  Since
        PostgreSQL 15 the checkpointer starts before recovery ends and computes its first sleep
        (checkpoint_timeout, 5 min) without archive_timeout, which only counts outside recovery;
        nothing wakes it at the end of a clean start, so archive_timeout had no effect for up to
        checkpoint_timeout after every start of a primary.  A reload wakes it (docs/wal-archiving.md)."""
        pid = await asyncio.to_thread(self.pg.postmaster_pid)
        if pid is None or pid == self._checkpointer_woken_for:
            return
        try:
            await self.pg.execute("SELECT pg_reload_conf()", timeout=2.0)
        except PgError as e:
            log.warning("checkpointer_wake_failed", error=str(e))
            return
        self._checkpointer_woken_for = pid
        log.info("checkpointer_woken", postmaster_pid=pid, reason="archive_timeout after start")

    def archive_refusal(self) -> str | None:
        """Why this node may not archive now (None: it may): only the running primary that
        holds the leader key under a valid lease, in its current view, and is not fenced."""
        st = self.state
        if st is None or not st.running:
            return "postgres is not running"
        if st.in_recovery is not False:
            return "not a primary (in recovery)"
        leader = self.last_view.leader
        if leader is None:
            return "no leader key"
        if leader.name != self.name:
            return f"the leader key is held by {leader.name}"
        if leader.lease != self.lease.lease or not self.lease.valid():
            return "our leader lease is not valid"
        if self.fence.expired():
            return "fenced"
        return None

    def _upstream_for(self, view: ClusterView, leader: str | None) -> Upstream | None:
        if leader is None:
            return None
        m = view.members.get(leader)
        if m is None or not m.host:
            return None
        return Upstream(m.host, m.port, slot_name_for(self.name))

    async def do_clone(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        up = self._upstream_for(view, d.target)
        if up is None:
            return
        self.activity = MemberState.CLONING
        await self.publish(view)
        pgc = self.cfg.postgresql
        t0 = time.monotonic()
        try:
            seeded = await self._clone_from_backup(view, d)
            if not seeded:
                log.info("clone_started", source=d.target, host=up.host, port=up.port, slot=up.slot_name)
                await self.pg.clone_from(
                    up,
                    replication_user=pgc.replication.username,
                    replication_password=secret_value(pgc.replication.password),
                )
        except (PgError, CommandFailed) as e:
            log.warning("clone_failed", source=d.target, error=str(e), retry_in=self.dyn.loop_wait)
            return
        finally:
            self.activity = None
        self._sysid = None
        log.info("clone_finished", source=d.target, seconds=round(time.monotonic() - t0, 2))
        self.needs_rewind = False
        await self._start_as_replica(view, d.target)

    async def _clone_from_backup(self, view: ClusterView, d: Decision) -> bool:
        """``backup.replica_from_backup``: restore the newest complete backup of this cluster
        (same system identifier, on the leader's timeline history, not too far behind) into the
        empty data directory, keeping only ``restore_command`` (walfetch) of its recovery
        settings; _start_as_replica then makes it a standby of the leader, which replays the
        archive and then streams.  False (logged with the reason) means: use pg_basebackup."""
        b = self.cfg.backup
        if not b.repositories or not b.replica_from_backup:
            return False
        from hakeeper.backup import seed

        lm = view.members.get(d.target or "")
        sysid = view.initialized
        tli = (lm.timeline if lm else None) or (view.status.timeline if view.status else None)
        if lm is None or not sysid or not tli:
            log.info("clone_from_backup_skipped", reason="leader's system identifier or timeline unknown")
            return False
        lsn = lm.wal_lsn if lm.wal_lsn is not None else (view.status.lsn if view.status else None)
        t0 = time.monotonic()
        log.info("clone_from_backup_started", leader=d.target, system_identifier=sysid, timeline=tli)
        try:
            seeded = await seed.restore_for_replica(self.cfg, self.pg, sysid, tli, lsn)
            await asyncio.to_thread(seed.set_seed_settings, self.pg.data_dir, self.pg.run_as, seeded.settings)
        except seed.RestoreRefused as e:
            log.info("clone_from_backup_skipped", reason=str(e), fallback="pg_basebackup")
            return False
        except Exception as e:  # any failure: the data dir goes, pg_basebackup follows
            log.warning(
                "clone_from_backup_failed",
                error=str(e) or type(e).__name__,
                error_type=type(e).__name__,
                fallback="pg_basebackup",
            )
            await asyncio.to_thread(self.pg.remove_data_dir)
            return False
        res = seeded.result
        self._stop_wal_server()
        self._wal_server = asyncio.create_task(
            seed.serve_replica_wal(self.cfg, self.pg, seeded), name="replica-wal-handover"
        )
        log.info(
            "clone_from_backup_finished",
            backup=res.backup_id,
            repository=res.repository,
            seconds=round(time.monotonic() - t0, 2),
            note="replays archived WAL, then streams from the leader",
        )
        return True

    async def _start_as_replica(self, view: ClusterView, leader: str | None) -> None:
        up = self._upstream_for(view, leader)
        await self._write_config(
            self._params(view.config),
            Role.REPLICA,
            up,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        self.upstream = up
        self.activity = MemberState.STARTING
        await self.pg.start(timeout=120, wait=False)  # see Postgres.start: keep publishing

    async def do_start_replica(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        self.fence.disarm()
        if facts.pg_down_for > 0 and self.pg.is_running():
            return  # the postmaster is up but not accepting connections yet
        await self._start_as_replica(view, d.target)

    async def do_follow(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        self.fence.disarm()
        if facts.streaming_from and self.cfg.backup.repositories:
            await self._drop_seed_settings()
        up = self._upstream_for(view, d.target)
        if up is None or up == self.upstream:
            return
        log.info("upstream_changed", old=_addr(self.upstream), new=_addr(up), leader=d.target)
        await self._write_config(
            self._params(view.config),
            Role.REPLICA,
            up,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        self.upstream = up
        await self.pg.reload()

    async def _drop_seed_settings(self) -> None:
        """A replica seeded from a backup streams now: its restore_command (walfetch) goes
        (a standby stops when walfetch cannot reach a repository)."""
        from hakeeper.backup import seed

        if not seed.has_seed_settings(self.pg.data_dir):
            self._stop_wal_server()
            return
        await asyncio.to_thread(seed.drop_seed_settings, self.pg.data_dir, self.pg.run_as)
        await self.pg.reload()
        self._stop_wal_server()
        log.info("clone_from_backup_settings_removed", reason="streaming from the leader")

    def _stop_wal_server(self) -> None:
        if self._wal_server is not None:
            self._wal_server.cancel()
            self._wal_server = None

    async def do_rewind(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        self.fence.disarm()
        lm = view.members.get(d.target or "")
        if lm is None:
            return
        pgc = self.cfg.postgresql
        self.activity = MemberState.REWINDING
        await self.publish(view)
        try:
            if self.pg.is_running():
                await self.pg.stop("fast", timeout=60)
            if not pgc.use_pg_rewind:
                raise PgError("use_pg_rewind is off")
            log.info("rewind_started", source=d.target)
            t0 = time.monotonic()
            await self.pg.rewind(
                Upstream(lm.host, lm.port, None),
                superuser=pgc.superuser.username,
                superuser_password=secret_value(pgc.superuser.password),
            )
            log.info("rewind_finished", source=d.target, seconds=round(time.monotonic() - t0, 2))
        except (PgError, CommandFailed) as e:
            if not pgc.remove_data_directory_on_rewind_failure:
                log.error("rewind_failed", source=d.target, error=str(e), action="waiting for an operator")
                return
            log.warning("rewind_failed", source=d.target, error=str(e), action="re-cloning from the leader")
            await self.pg.stop("immediate")
            await asyncio.to_thread(self.pg.remove_data_dir)
            self._sysid = None
            self.needs_rewind = False
            return
        finally:
            self.activity = None
        self.needs_rewind = False
        await self._start_as_replica(view, d.target)

    async def _confirm_lease(self) -> bool:
        """A fresh keepalive: never go read-write on a lease we have not just confirmed."""
        ok = await self.lease.refresh()
        if not ok:
            log.warning("read_write_refused", reason="lease could not be confirmed with etcd")
        return ok

    async def do_campaign(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        if not await self._confirm_lease():
            return
        k = self.keys
        res = await self.client.txn(
            [cmp_create(k.leader, "=", 0)], [op_put(k.leader, self.name, lease=self.lease.lease)]
        )
        if not res.succeeded:
            log.info("campaign_lost", reason="another member took the leader key first")
            await self.mirror.resync()
            return
        term = res.revision
        log.info("leader_acquired", term=term, why=d.why, facts=dict(d.facts))
        self._arm_fence()
        old = view.history[-1].new_leader if view.history else None
        sw = view.switchover
        kind = sw.kind.value if sw is not None and sw.candidate == self.name else "failover"
        now_m, now_w = time.monotonic(), time.time()
        noticed = self.leaderless_since or now_m
        self._promotion = {"kind": kind, "key_taken": now_m}
        self.metrics.phase.labels(kind, "elect").observe(now_m - noticed)
        if self._leader_last_alive is not None:
            detect = (now_w - (now_m - noticed)) - self._leader_last_alive
            self.metrics.phase.labels(kind, "detect").observe(max(0.0, detect))
        self.metrics.promotions.labels(kind).inc()
        reason = f"failover: {d.why}"
        if sw is not None and sw.candidate == self.name:
            reason = f"{sw.kind.value} from {sw.leader or old}" + (" (forced)" if sw.force else "")
            await self.client.txn(
                [cmp_create(k.leader, "=", term), cmp_mod(k.switchover, "=", sw.mod_revision)],
                [op_delete(k.switchover)],
            )
        if facts.in_recovery:
            await self._promote(term, reason, old)
        await self.mirror.resync()

    async def do_promote(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        if not await self._confirm_lease():
            return
        assert view.leader is not None
        self._arm_fence()
        old = view.history[-1].new_leader if view.history else None
        await self._promote(view.leader.term, d.why, old)

    async def _promote(self, term: int, reason: str, old_leader: str | None) -> None:
        self.activity = MemberState.PROMOTING
        self._sync_names = ()
        self._sync_pending = None
        t0 = time.monotonic()
        if self.dyn.replication_mode != "async":
            await self._arm_sync_guard()
        try:
            await self.pg.promote(timeout=30)
        finally:
            self.activity = None
        kind = str(self._promotion["kind"]) if self._promotion else "failover"
        self.metrics.phase.labels(kind, "promote").observe(time.monotonic() - t0)
        st = await self.pg.probe()
        self.state = st
        self.upstream = None
        switch_lsn = await self._switch_point(st.timeline)
        log.info(
            "promoted",
            timeline=st.timeline,
            switch_lsn=switch_lsn,
            seconds=round(time.monotonic() - t0, 3),
            reason=reason,
        )
        await self._write_config(
            self._params(self.dyn),
            Role.PRIMARY,
            None,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        await self._append_history(term, reason, old_leader, st.timeline or 0, switch_lsn)
        if self.archiver is not None:  # is the old timeline's WAL in the archive up to the switch?
            self.archiver.after_promotion(st.timeline)
        await self._lead(self.view(), term)

    async def _arm_sync_guard(self) -> None:
        """Before promoting in synchronous or quorum mode: ``synchronous_standby_names = '*'``,
        reloaded while still a standby (where it has no effect), so that no commit of the new
        primary is acknowledged before a standby has it -- not even in the cycles before
        manage_sync has formed the new term's sync set.  Without a standby, non-strict mode
        stops waiting after 2 x ttl (logged); strict mode waits on."""
        self._sync_guard_until = time.monotonic() + 2 * self.dyn.ttl
        try:
            await self._write_config(
                self._params(self.dyn),
                Role.REPLICA,
                self.upstream,
                replication_password=secret_value(self.cfg.postgresql.replication.password),
            )
            await self.pg.reload()
        except (PgError, CommandFailed, OSError) as e:
            log.warning("sync_guard_failed", error=str(e))

    async def _switch_point(self, timeline: int | None) -> int | None:
        if not timeline or timeline < 2:
            return None
        try:
            rows = await self.pg.execute(
                "SELECT pg_read_file('pg_wal/' || lpad(upper(to_hex(%s::int)), 8, '0') || '.history')",
                (timeline,),
            )
            last = [ln for ln in str(rows[0][0]).splitlines() if ln.strip() and not ln.startswith("#")][-1]
            return parse_lsn(last.split()[1])
        except (PgError, IndexError, ValueError) as e:
            log.warning("switch_point_unknown", error=str(e))
            return None

    async def _append_history(
        self, term: int, reason: str, old: str | None, timeline: int, lsn: int | None
    ) -> None:
        k = self.keys
        for _ in range(3):
            cur = await self.client.get(k.history)
            items = json.loads(cur.value) if cur is not None and cur.value else []
            items.append(HistoryEntry(timeline, lsn, time.time(), reason, old, self.name).to_dict())
            res = await self.client.txn(
                [cmp_create(k.leader, "=", term), cmp_mod(k.history, "=", cur.mod_revision if cur else 0)],
                [op_put(k.history, json.dumps(items))],
            )
            if res.succeeded:
                return
        log.warning("history_write_failed", reason="lost the leader key or concurrent writes")

    async def do_takeover(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        assert view.leader is not None
        if not await self._confirm_lease():
            return
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", self.name), cmp_create(k.leader, "=", view.leader.term)],
            [op_put(k.leader, self.name, lease=self.lease.lease)],
        )
        if res.succeeded:
            log.info("leader_key_reattached", term=view.leader.term, old_lease=hex(view.leader.lease))
            if facts.writable:
                self._arm_fence()
        await self.mirror.resync()

    async def do_lead(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        assert view.leader is not None
        self._arm_fence()
        await self._lead(view, view.leader.term)

    async def _lead(self, view: ClusterView, term: int) -> None:
        st = self.state
        k = self.keys
        p = self._promotion
        if p is not None and st is not None and any(r.state == "streaming" for r in st.replication):
            self.metrics.phase.labels(str(p["kind"]), "reconfigure").observe(
                time.monotonic() - float(p["key_taken"])
            )
            self._promotion = None
        if st is not None and st.wal_lsn is not None:
            status = Status(lsn=st.wal_lsn, timeline=st.timeline, term=term)
            if status != view.status:
                await self.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.status, status.to_json())])
        await self._manage_slots(view)
        await manage_sync(self, view, term)

    async def _manage_slots(self, view: ClusterView) -> None:
        now = time.monotonic()
        for name in view.members:
            if name != self.name:
                self.slot_seen[slot_name_for(name)] = now
        ttl = view.config.member_slots_ttl
        wanted = {s for s in self.slot_seen if now - self.slot_seen[s] <= ttl}
        created, dropped = await self.pg.ensure_slots(wanted)
        if created or dropped:
            log.info("slots_changed", created=created, dropped=dropped)
        for s in dropped:
            self.slot_seen.pop(s, None)

    async def do_start_primary(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        if not await self._confirm_lease():
            return
        log.warning("primary_restarting", down_for=round(facts.pg_down_for, 1))
        try:
            await self._start_as_primary(view.config)
        except (PgError, CommandFailed) as e:
            log.error("primary_restart_failed", error=str(e))

    async def do_release(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        self.fence.disarm()
        if self.pg.is_running():
            await self.pg.stop("immediate")
        await self._release_key(view)

    async def _release_key(self, view: ClusterView) -> None:
        if view.leader is None or view.leader.name != self.name:
            return
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", self.name), cmp_create(k.leader, "=", view.leader.term)],
            [op_delete(k.leader)],
        )
        log.warning("leader_released", term=view.leader.term, succeeded=res.succeeded)
        await self.mirror.resync()

    async def do_detach(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        log.warning("replication_detached", old_upstream=facts.streaming_from, why=d.why)
        await self._write_config(
            self._params(view.config),
            Role.REPLICA,
            None,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        self.upstream = None
        await self.pg.reload()
        self.wake.set()

    async def do_demote(self, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
        log.warning("demoting", why=d.why, mode="immediate")
        await self.pg.stop("immediate", timeout=30)
        self.fence.disarm()
        self.needs_rewind = True
        self.pg_down_since = None
        self.wake.set()

    # -- operator actions (API) ------------------------------------------------------------------

    async def op_restart(self) -> str:
        """Restart PostgreSQL in its current role (a primary re-confirms its lease first)."""
        async with self.action_lock:
            if not self.pg.is_initialized():
                raise OperationError(409, "postgres has no data directory yet")
            view = self.last_view
            leading = view.leader is not None and view.leader.name == self.name
            log.info("restart_requested", leader=leading)
            if self.pg.is_running():
                await self.pg.stop("fast", timeout=120)
            if leading:
                if not await self._confirm_lease():
                    raise OperationError(503, "could not confirm our leader lease; not restarting read-write")
                await self._start_as_primary(view.config)
            else:
                await self._start_as_replica(view, view.leader.name if view.leader else None)
            self.pg_down_since = None
            self.wake.set()
            return "postgres restarted"

    async def op_reinitialize(self) -> str:
        """Throw this replica's data away and clone it again from the leader."""
        async with self.action_lock:
            view = self.last_view
            if view.leader is None:
                raise OperationError(503, "no leader to clone from")
            if view.leader.name == self.name:
                raise OperationError(409, "this node is the leader; it cannot be reinitialized")
            lm = view.leader_member
            if lm is None or lm.state != MemberState.RUNNING:
                raise OperationError(503, f"leader {view.leader.name} is not running")
            log.warning("reinitialize_requested", leader=view.leader.name)
            self.fence.disarm()
            if self.pg.is_running():
                await self.pg.stop("immediate", timeout=60)
            await asyncio.to_thread(self.pg.remove_data_dir)
            self._sysid = None
            self.needs_rewind = False
            d = Decision(Action.CLONE, "reinitialize requested", target=view.leader.name)
            await self.do_clone(view, await self.gather(view), d)
            self.wake.set()
            return f"reinitialized from {view.leader.name}"

    async def op_reload(self) -> str:
        """Rewrite the configuration files from the current dynamic config and reload PostgreSQL."""
        async with self.action_lock:
            if not self.pg.is_running():
                raise OperationError(409, "postgres is not running")
            view = self.last_view
            st = await self.pg.probe()
            role = Role.REPLICA if st.in_recovery else Role.PRIMARY
            await self._write_config(
                self._params(view.config),
                role,
                self.upstream if role == Role.REPLICA else None,
                replication_password=secret_value(self.cfg.postgresql.replication.password),
            )
            await self.pg.reload()
            log.info("reload_done", role=role.value)
            return "configuration reloaded"

    # -- lifecycle -----------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pg.run_as.chown(self.runtime_dir)
        fd = os.open(self.runtime_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(
                f"another hakeeper agent already runs for {self.cfg.postgresql.data_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _initial_rewind_state(self, controldata: dict[str, str]) -> None:
        state = controldata.get("Database cluster state", "")
        if state in ("in production", "shut down"):
            # Data last ran as a primary; if another node leads now, we may have diverged.
            self.needs_rewind = True
            log.info("former_primary_data_found", cluster_state=state)

    async def run(self) -> int:
        self._take_lock()
        if self.fence.inherit():
            log.warning(
                "fence_inherited",
                reason="an earlier agent left its primary fenced; keeping its deadline until we re-confirm",
                deadline_in=round(self.fence.state.deadline - time.monotonic(), 2),
            )
        self.fence.start()
        if self.pg.is_initialized() and not self.pg.is_running():
            with contextlib.suppress(PgError, CommandFailed):
                self._initial_rewind_state(await self.pg.controldata())
        elif self.pg.is_running():
            st = await self.pg.probe()
            if st.running and st.in_recovery is False:
                self.needs_rewind = True
        if self.archiver is not None:
            # before PostgreSQL can start: the archive_command script and its directories
            await asyncio.to_thread(self.archiver.prepare)
        from hakeeper.api.server import ApiServer

        api = ApiServer(self)
        await api.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info(
            "agent_started",
            name=self.name,
            scope=self.cfg.scope,
            data_dir=str(self.pg.data_dir),
            api=self.cfg.api.url,
            version=__version__,
        )
        archiver_task: asyncio.Task[None] | None = None
        if self.archiver is not None:  # not in the TaskGroup: it must outlive PostgreSQL's stop
            archiver_task = asyncio.create_task(self.archiver.run(), name="archiver")
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.mirror.run(), name="mirror"),
                    tg.create_task(self.lease.run(), name="lease"),
                    tg.create_task(self._fence_watch(), name="fence"),
                    tg.create_task(self._loop(), name="loop"),
                ]
                if self.scheduler is not None:
                    tasks.append(tg.create_task(self.scheduler.run(), name="scheduler"))
                if self.heartbeat is not None:
                    tasks.append(tg.create_task(self.heartbeat.run(), name="heartbeat"))
                await self.stopping.wait()
                log.info("agent_stopping")
                for t in tasks:
                    t.cancel()
        finally:
            await self.shutdown()  # the archiver still answers archive_command while PG stops
            if archiver_task is not None and self.archiver is not None:
                archiver_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await archiver_task
                await self.archiver.close()
            await api.stop()
        return 0

    async def shutdown(self) -> None:
        self._stop_wal_server()
        view = self.view() if self.mirror.synced else self.last_view
        was_leader = view.leader is not None and view.leader.name == self.name
        try:
            if self.pg.is_running():
                log.info("postgres_stopping", mode="fast")
                await self.pg.stop("fast", timeout=60)
        except (PgError, CommandFailed) as e:
            log.error("postgres_stop_failed", error=str(e))
            with contextlib.suppress(Exception):
                await self.pg.stop("immediate")
        self.fence.stop()
        if was_leader:
            with contextlib.suppress(EtcdError):
                await self._release_key(view)
        with contextlib.suppress(EtcdError):
            await self.client.delete(self.keys.member(self.name))
        await self.lease.revoke()
        await self.pg.close()
        await self.client.close()
        log.info("agent_stopped")


Executor = Callable[[Agent, ClusterView, LocalFacts, Decision], Awaitable[None]]

EXECUTORS: dict[Action, Executor] = {
    Action.INITIALIZE: Agent.do_initialize,
    Action.CLONE: Agent.do_clone,
    Action.WAIT: Agent.do_wait,
    Action.START_REPLICA: Agent.do_start_replica,
    Action.FOLLOW: Agent.do_follow,
    Action.REWIND: Agent.do_rewind,
    Action.CAMPAIGN: Agent.do_campaign,
    Action.PROMOTE: Agent.do_promote,
    Action.LEAD: Agent.do_lead,
    Action.TAKEOVER: Agent.do_takeover,
    Action.START_PRIMARY: Agent.do_start_primary,
    Action.RELEASE: Agent.do_release,
    Action.DEMOTE: Agent.do_demote,
    Action.DETACH: Agent.do_detach,
    Action.SWITCHOVER: switchover.switchover,
    Action.REJECT_SWITCHOVER: switchover.reject_switchover,
}


def _addr(u: Upstream | None) -> str | None:
    return None if u is None else f"{u.host}:{u.port}"


async def run_agent(cfg: NodeConfig, *, config_path: Path | None = None) -> int:
    setup_logging(cfg.log.format, cfg.log.level)
    agent = Agent(cfg, config_path=config_path)
    try:
        return await agent.run()
    except SystemExit as e:
        log.error("agent_refused_to_start", reason=str(e))
        return 1
