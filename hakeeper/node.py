"""The composition root: builds one node's agent from its configuration and runs it.

Tasks running side by side on one event loop:

* ``PrefixMirror.run``  keeps a copy of the cluster's keys (range + watch, resumes itself);
* ``LeaseKeeper.run``   keeps our lease alive about every second and moves the fence deadline;
* ``WriteGuard.watch``  first-line fence: stops PostgreSQL itself if the deadline passes;
* ``HaLoop.run``        the HA loop;
* backup's tasks (schedules, heartbeat; the archiver outlives PostgreSQL's stop);
* the HTTP API, which reads :class:`~hakeeper.ha.snapshot.NodeSnapshot` copies.

The fencer *process* (``hakeeper.ha.fence``) is the last line of defence when this loop stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from hakeeper import __version__
from hakeeper.api.server import ApiServer
from hakeeper.backup.hooks import AgentBackup
from hakeeper.core.cluster import ClusterView
from hakeeper.core.config import ConfigError, NodeConfig
from hakeeper.core.config_diff import POLICY, ConfigDiff, Rule, diff
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdClient, EtcdError
from hakeeper.dcs.mirror import PrefixMirror, stall_timeout_for
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.actions.lifecycle import fenced, inspect_data_dir, leave, stop_postgres
from hakeeper.ha.bootmark import MARKER_NAME, BootstrapFile, BootstrapRecord
from hakeeper.ha.fence import FenceClient
from hakeeper.ha.guard import WriteGuard
from hakeeper.ha.identity import refusal_at_start
from hakeeper.ha.lease import LeaseFile, LeaseKeeper, LeaseRecord
from hakeeper.ha.loop import HaLoop
from hakeeper.ha.metrics import HaMetrics
from hakeeper.ha.operator import Operator
from hakeeper.ha.pgconfig import PgConfigurator
from hakeeper.ha.policy.observe import Identity
from hakeeper.ha.ports import BackupHooks, NoBackup
from hakeeper.ha.slots import SlotKeeper
from hakeeper.ha.snapshots import SnapshotSource
from hakeeper.ha.state import NodeState
from hakeeper.ha.syncer import SyncManager
from hakeeper.ha.upgrade import Upgrader
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import Postgres
from hakeeper.pg.version import binaries_version
from hakeeper.util import clock
from hakeeper.util.fsutil import UnsafePathError, ensure_private_dir, open_nofollow
from hakeeper.util.log import get_logger, register_secrets, secrets_of, setup_logging

log = get_logger("hakeeper.node")


def identity_of(cfg: NodeConfig) -> Identity:
    host, port = cfg.postgresql.connect_host_port
    tags = cfg.tags
    return Identity(
        name=cfg.name,
        host=host,
        port=port,
        api_url=cfg.api.url,
        nofailover=tags.nofailover,
        failover_priority=tags.failover_priority,
        noloadbalance=tags.noloadbalance,
        nosync=tags.nosync,
        sync_priority=tags.sync_priority,
        version=__version__,
    )


class Node:
    """One node: its components, wired together, and their lifecycle."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        client: EtcdClient | None = None,
        pg: Postgres | None = None,
        fence: FenceClient | None = None,
        lease_record: LeaseRecord | None = None,
        bootstrap_record: BootstrapRecord | None = None,
        reread: Callable[[], NodeConfig] | None = None,
    ) -> None:
        """``client``, ``pg``, ``fence``, ``lease_record`` and ``bootstrap_record`` are built from
        ``cfg`` unless given: the unit tests run this same wiring over in-memory fakes
        (tests/support/sim.py).
        ``reread``: load the node file again with every check (raises ConfigError), for reload
        and SIGHUP; None: the agent has no file to re-read."""
        self.cfg = cfg
        self.reread = reread
        data_dir = cfg.postgresql.data_dir
        self.runtime_dir = data_dir.parent / f".{data_dir.name}.hakeeper"
        self.metrics = HaMetrics()
        self.client = EtcdClient.from_config(cfg.etcd) if client is None else client
        self.client.on_request = self.metrics.etcd_observer
        self.store = ClusterStore(self.client, Keys(cfg.prefix))
        self.mirror = PrefixMirror(
            self.client, self.store.keys.all, stall_timeout=stall_timeout_for(cfg.bootstrap.dcs.ttl)
        )
        self.pg = Postgres(cfg.postgresql, member_name=cfg.name) if pg is None else pg
        self.state = NodeState(view=ClusterView(config=cfg.bootstrap.dcs))
        self.wake = asyncio.Event()
        dyn = cfg.bootstrap.dcs
        self.fence = FenceClient(self.runtime_dir, data_dir) if fence is None else fence
        self.lease = LeaseKeeper(
            self.client,
            ttl=dyn.ttl,
            interval=dyn.keepalive_interval,
            margin=dyn.fence_margin,
            on_deadline=lambda deadline: self.guard.on_deadline(deadline),
            on_lost=self.wake.set,
            record=LeaseFile(self.runtime_dir / "lease") if lease_record is None else lease_record,
        )
        self.guard = WriteGuard(cfg.name, self.lease, self.fence, self.state)
        self.backup: BackupHooks = self._backup()
        self.sync = SyncManager(
            cfg.name,
            self.store,
            self.pg,
            self.state,
            apply=lambda dyn: self.pgconf.apply_changes(dyn),
            resync=self.mirror.resync,
        )
        self.slots = SlotKeeper(cfg.name, self.store, self.pg.session, lambda: self.state.binaries_major)
        self.pgconf = PgConfigurator(
            cfg,
            self.pg,
            self.state,
            sync_guc=self.sync.guc,
            extra=self.backup.pg_parameters,
            slot_params=self.slots.params,
        )
        identity = identity_of(cfg)
        self.action_lock = asyncio.Lock()
        self.loop: HaLoop
        self.ctx = Ctx(
            cfg=cfg,
            store=self.store,
            pg=self.pg,
            state=self.state,
            guard=self.guard,
            pgconf=self.pgconf,
            sync=self.sync,
            backup=self.backup,
            metrics=self.metrics,
            wake=self.wake,
            resync=self.mirror.resync,
            fresh_view=lambda: self.loop.view(),
            publish=lambda view: self.loop.publish_member(view),
            bootstrap=bootstrap_record or BootstrapFile(self.runtime_dir / MARKER_NAME),
            slots=self.slots,
        )
        self.loop = HaLoop(self.ctx, self.mirror, identity, self.action_lock)
        self.operator = Operator(
            self.ctx, self.action_lock, observe=self.loop.observe, reconfigure=self.reconfigure
        )
        self.upgrader = Upgrader(
            self.ctx,
            self.action_lock,
            self.operator,
            backup_after=self.backup.backup_after_upgrade,
            rebind=self.backup.rebind_after_upgrade,
        )
        self.snapshots = SnapshotSource(
            cfg,
            identity,
            self.state,
            self.guard,
            initialized=self.pg.is_initialized,
            backup_status=self.backup.status,
        )
        self.metrics.add_refresher(self.backup.refresh_metrics)
        self._lock_fd: int | None = None
        self.api: ApiServer | None = None
        self._tg: asyncio.TaskGroup | None = None  # while the agent runs: backup tasks a reload starts
        self._tasks: list[asyncio.Task[None]] = []
        self._running = asyncio.Event()
        self._signal_tasks: set[asyncio.Task[None]] = set()

    def _backup(self) -> BackupHooks:
        b = self.cfg.backup
        if not b.repositories and not b.effective_schedules():
            return NoBackup()
        return AgentBackup(
            self.cfg,
            self.client,
            self.pg,
            registry=self.metrics.registry,
            lookup=lambda key: self.mirror.kvs.get(key),  # the mirror replaces its dict on a re-list
            view=lambda: self.state.view,
            refusal=self.guard.refusal,
            term=self.guard.leader_term,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        # The runtime directory holds the fencer's state (fence.json, fencer.pid, fencer.log) and
        # this lock: it belongs to the agent's own user, never to the PostgreSQL user, who could
        # otherwise disarm the fence or (as root) plant links the agent writes through.  As root
        # it is 0711: the PostgreSQL user may reach a file given to it there, but not list or
        # change the directory.
        try:
            ensure_private_dir(self.runtime_dir, mode=0o711 if os.geteuid() == 0 else 0o700)
            fd = open_nofollow(self.runtime_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except UnsafePathError as e:
            log.error("agent_start_refused", reason=str(e))
            raise SystemExit(f"refusing to start: {e}") from None
        except PermissionError as e:  # e.g. left root-owned by an agent that ran as root
            log.error("agent_start_refused", runtime_dir=str(self.runtime_dir), reason=str(e))
            raise SystemExit(
                f"refusing to start: cannot take the runtime directory {self.runtime_dir}: {e}"
            ) from None
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

    async def run(self) -> int:
        self._take_lock()
        # A bootstrap marker its predecessor left: read once, now that the runtime dir is ours.
        self.ctx.bootstrap.current  # noqa: B018
        if self.fence.inherit():
            log.warning(
                "fence_inherited",
                reason="an earlier agent left its primary fenced; keeping its deadline until we re-confirm",
                deadline_in=round(self.fence.state.deadline - clock.boottime(), 2),
            )
        self.fence.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.loop.stopping.set)
        # `systemctl reload` (ExecReload) and `kill -HUP`: the same reload as POST /reload
        # (SIGHUP's default action would end the agent)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        if not await self._check_identity():
            await self.client.close()
            return 0
        self.state.binaries_major = await self._binaries_major()
        await inspect_data_dir(self.ctx)
        await self.backup.prepare()
        self.api = api = ApiServer(
            self.cfg.api,
            snapshot=self.snapshots.snapshot,
            store=self.store,
            operator=self.operator,
            metrics=self.metrics.render,
            upgrader=self.upgrader,
        )
        await api.start()
        log.info(
            "agent_started",
            name=self.cfg.name,
            scope=self.cfg.scope,
            data_dir=str(self.pg.data_dir),
            api=self.cfg.api.url,
            version=__version__,
        )
        # not in the TaskGroup: the archiver must outlive PostgreSQL's stop
        lasting = [asyncio.create_task(c, name="archiver") for c in self.backup.lasting_tasks()]
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._tasks = [
                    tg.create_task(self.mirror.run(), name="mirror"),
                    tg.create_task(self.lease.run(), name="lease"),
                    tg.create_task(self.guard.watch(lambda: fenced(self.ctx)), name="fence"),
                    tg.create_task(self.loop.run(), name="loop"),
                ]
                self._start_backup_tasks(self.backup.tasks())
                self._running.set()
                await self.loop.stopping.wait()
                log.info("agent_stopping")
                self._tg = None
                for t in [*self._tasks, *self._signal_tasks]:
                    t.cancel()
        finally:
            await self.shutdown()  # the archiver still answers archive_command while PG stops
            for t in lasting:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self.backup.close()
            await api.stop()
        return 0

    def _start_backup_tasks(self, work: Sequence[Coroutine[Any, Any, None]]) -> None:
        if self._tg is None:  # stopping: nothing new starts
            for c in work:
                c.close()
            return
        self._tasks += [self._tg.create_task(_contained(c)) for c in work]

    # -- reload (POST /reload, SIGHUP) ---------------------------------------------------------------

    def _sighup(self) -> None:
        log.info("reload_signalled", signal="SIGHUP")
        task = asyncio.create_task(self._reload_on_signal(), name="sighup-reload")
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    async def _reload_on_signal(self) -> None:
        await self._running.wait()  # a SIGHUP while the agent starts is applied once it runs
        try:
            await self.operator.reload()  # logs reload_done, or reload_refused with the reason
        except Refused:
            pass

    async def reconfigure(self) -> ConfigDiff:
        """Re-read the node file and apply what may change at run time (the operator calls this
        under the action lock).  An invalid file, or one that changes a field only a restart can
        (:mod:`hakeeper.core.config_diff`), raises :class:`Refused` and nothing is applied."""
        if self.reread is None:
            return ConfigDiff(())
        try:
            new = await asyncio.to_thread(self.reread)
        except ConfigError as e:
            raise Refused(
                RefusalKind.INVALID,
                f"{e.source} is invalid; nothing was changed: "
                + "; ".join(f"{field}: {msg}" for field, msg in e.errors),
                errors=[{"field": field, "message": msg} for field, msg in e.errors],
            ) from None
        d = diff(self.cfg, new)
        if d.refused:
            raise Refused(
                RefusalKind.CONFLICT,
                f"nothing was changed: {d.refusal()} (restart the agent to apply the file)",
                errors=[
                    {"field": c.field, "message": f"cannot change at run time: {c.why}"} for c in d.refused
                ],
            )
        if d.changes:
            self._apply(new, d)
        return d

    def _apply(self, new: NodeConfig, d: ConfigDiff) -> None:
        """Take the changed run-time fields of ``new`` into the one NodeConfig every component
        holds (Ctx, PgConfigurator, Postgres, ApiServer, AgentBackup read it where they use it),
        then refresh what was derived from them at start."""
        register_secrets(secrets_of(new))
        for path, decision in POLICY.items():
            if decision.rule == Rule.RUNTIME and d.touches(path):
                _take(self.cfg, new, path)
        if d.touches("log"):
            setup_logging(self.cfg.log.format, self.cfg.log.level)
        if d.touches("tags"):
            identity = identity_of(self.cfg)
            self.loop.identity = identity
            self.snapshots.retag(identity)
        if d.touches("api") and self.api is not None:
            self.api.reauthenticate()
        if d.touches("backup"):
            self._start_backup_tasks(self.backup.reconfigure())
        log.info("config_reloaded", changes=[c.describe() for c in d.changes])

    async def _check_identity(self) -> bool:
        """Before PostgreSQL is started or anything is written under our name: refuse to start
        (SystemExit) while a key of our name lives on another agent's live lease.  Retried
        until etcd answers; False when asked to stop meanwhile."""
        while not self.loop.stopping.is_set():
            try:
                reason = await refusal_at_start(self.store, self.lease, self.cfg.name)
            except EtcdError as e:
                log.warning("identity_check_failed", error=str(e), reason="etcd did not answer; retrying")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.loop.stopping.wait()
                continue
            if reason is not None:
                # The fencer is left alone: armed (an earlier agent's primary here), it still
                # fires; unarmed, it exits once this process is gone.
                await self.client.close()
                log.error("member_name_in_use", name=self.cfg.name, reason=reason)
                raise SystemExit(reason)
            if self.lease.previous:
                log.info("identity_checked", name=self.cfg.name, previous_lease=hex(self.lease.previous))
            return True
        return False

    async def _binaries_major(self) -> int | None:
        """The major of our binaries: already read (and cached) by the check before the agent
        started; in a thread all the same, as it may run `postgres --version`."""
        try:
            return (await asyncio.to_thread(binaries_version, self.pg.bin_dir)).major
        except PgError as e:
            log.warning("binaries_version_unknown", bin_dir=str(self.pg.bin_dir), error=str(e))
            return None

    async def shutdown(self) -> None:
        # a scheduled restart must not start PostgreSQL again; a reinitialize in the background
        # ends before PostgreSQL stops
        await self.upgrader.close()
        await self.operator.close()
        view = self.loop.view() if self.mirror.synced else self.state.view
        await stop_postgres(self.ctx)
        self.fence.stop()
        await leave(self.ctx, view)
        await self.lease.revoke()
        await self.pg.session.close()
        await self.client.close()
        log.info("agent_stopped")


async def run_agent(cfg: NodeConfig, reread: Callable[[], NodeConfig] | None = None) -> int:
    setup_logging(cfg.log.format, cfg.log.level)
    register_secrets(secrets_of(cfg))  # no configured secret in any log line, whatever the text
    node = Node(cfg, reread=reread)
    try:
        return await node.run()
    except SystemExit as e:
        log.error("agent_refused_to_start", reason=str(e))
        # Also in plain words on stderr, whatever the log format: whoever started the agent by
        # hand or reads the unit's journal sees why it exited.
        print(f"hakeeper: refusing to start: {e}", file=sys.stderr, flush=True)
        return 1


async def _contained(work: Coroutine[Any, Any, None]) -> None:
    """A backup task (scheduler, heartbeat) that fails ends alone, logged: in the TaskGroup its
    exception would end the agent, whose shutdown stops PostgreSQL -- a backup bug must never
    cost the cluster its primary."""
    try:
        await work
    except Exception:
        log.exception("backup_task_crashed", task=getattr(work, "__qualname__", repr(work)))


def _take(cfg: NodeConfig, new: NodeConfig, path: str) -> None:
    """Set the field at ``path`` (dotted) of ``cfg`` to ``new``'s value, in the model object
    that already holds it (components keep references to the sections).  Written past
    pydantic's assignment check on purpose: ``new`` was validated as a whole, and checking
    field by field would judge mixtures of old and new (a username without its password)."""
    *parents, field = path.split(".")
    _walk(cfg, parents).__dict__[field] = getattr(_walk(new, parents), field)


def _walk(model: Any, parts: list[str]) -> Any:
    for part in parts:
        model = getattr(model, part)
    return model
