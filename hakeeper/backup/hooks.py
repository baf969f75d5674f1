"""AgentBackup: what backup, archiving and recovery do inside a running agent.

It implements the HA agent's backup port (``hakeeper.ha.ports.BackupHooks``) structurally,
without importing ``hakeeper.ha``: the WAL archiver, the backup schedules, the heartbeat that
keeps the archive's RPO measurable, seeding replicas and bootstrapping a cluster from a backup
(docs/backup-bootstrap.md), and the restore drills' gauges.  The composition root
(``hakeeper/node.py``) builds it with the few callables it needs from the HA side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from hakeeper.backup import seed
from hakeeper.backup.archive.archiver import Archiver, archive_repository_config
from hakeeper.backup.basebackup import BackupError, Endpoint
from hakeeper.backup.binding import rebind_configured
from hakeeper.backup.copy import CopyError, copy_item
from hakeeper.backup.errors import RepoError
from hakeeper.backup.heartbeat import Heartbeat
from hakeeper.backup.phase_metrics import PhaseGauges, drill_phases, schedule_phases
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreError
from hakeeper.backup.schedule import ScheduleRunner
from hakeeper.backup.source import SourceChoice, backup_node, choose_source
from hakeeper.backup.verify import metric_values
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.cluster import ClusterView, Succession
from hakeeper.core.config import NodeConfig, ParamValue, secret_value
from hakeeper.core.errors import BootstrapFailed, BootstrapRefused
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV, EtcdClient
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import Postgres
from hakeeper.util.log import get_logger
from hakeeper.util.proc import CommandFailed

log = get_logger("hakeeper.backup")


def server_major(data_dir: Path) -> int | None:
    """The major version of the data directory (its ``PG_VERSION``; None before initdb)."""
    try:
        return int((data_dir / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


class BootstrapCopy:
    """A data directory restored for a bootstrap, not yet recovered."""

    def __init__(self, seeded: seed.Seeded) -> None:
        self.seeded = seeded

    @property
    def backup_id(self) -> str:
        return self.seeded.result.backup_id

    @property
    def repository(self) -> str:
        return self.seeded.result.repository

    @property
    def target(self) -> str:
        return self.seeded.result.target

    @property
    def seconds_replay(self) -> float | None:
        return self.seeded.result.seconds_replay


class _VerifyGauges:
    """The last restore drill's result, read from etcd (the CLI that ran it is short-lived, so
    every agent exports it from ``<prefix>/verify/last`` and ``last_success``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.last_success = Gauge(
            "hakeeper_verify_last_success_timestamp",
            "End of the last restore drill that passed (Unix time)",
            registry=r,
        )
        self.last = Gauge(
            "hakeeper_verify_last_timestamp", "End of the last restore drill (Unix time)", registry=r
        )
        self.last_ok = Gauge(
            "hakeeper_verify_last_result", "1 if the last restore drill passed, 0 if it failed", registry=r
        )
        self.rto = Gauge(
            "hakeeper_verify_rto_seconds",
            "RTO measured by the last restore drill that passed, by phase (plan, fetch, decompress, "
            "wal_replay, promote, total)",
            ["phase"],
            registry=r,
        )

    def refresh(self, last: KV | None, success: KV | None) -> None:
        v = metric_values(last.value if last else None, success.value if success else None)
        for gauge, key in (
            (self.last, "last_timestamp"),
            (self.last_ok, "last_ok"),
            (self.last_success, "last_success_timestamp"),
        ):
            gauge.set(float("nan") if v[key] is None else v[key])
        self.rto.clear()
        for phase, seconds in v["rto"].items():
            self.rto.labels(phase).set(seconds)


class AgentBackup:
    def __init__(
        self,
        cfg: NodeConfig,
        client: EtcdClient,
        pg: Postgres,
        *,
        registry: CollectorRegistry,
        lookup: Callable[[str], KV | None],
        view: Callable[[], ClusterView],
        refusal: Callable[[], str | None],
        term: Callable[[], int | None],
    ) -> None:
        """``lookup``: a key from the agent's etcd mirror; ``view``: the agent's last view;
        ``refusal``: why this node may not write now (None: it may); ``term``: our term while we
        may write as the leader."""
        self.cfg = cfg
        self.client = client
        self.pg = pg
        self.lookup = lookup
        self.keys = Keys(cfg.prefix)
        self._overridden: set[str] = set()
        self._wal_server: asyncio.Task[None] | None = None  # serves a seeded replica's WAL
        self._bootstrap: BootstrapCopy | None = None  # restored, not yet recovered
        self._verify = _VerifyGauges(registry)
        self._phases = PhaseGauges(registry)
        b = cfg.backup
        self.archiver: Archiver | None = None
        if b.repositories and b.archive.enabled:
            data_dir = pg.data_dir
            self.archiver = Archiver(
                scope=cfg.scope,
                pg_wal=data_dir / "pg_wal",
                spool_dir=b.archive.spool_dir or data_dir.parent / f"{cfg.name}.spool",
                repositories=[
                    make_repository(archive_repository_config(r, b.archive)) for r in b.repositories
                ],
                cfg=b.archive,
                may_archive=lambda: refusal() is None,
                refusal_reason=refusal,
                run_as=pg.run_as,
                registry=registry,
                node=cfg.name,
                system_identifier=pg.system_identifier,
            )
        self._registry, self._view, self._refusal, self._term = registry, view, refusal, term
        schedules = b.effective_schedules()
        self.scheduler: ScheduleRunner | None = self._scheduler() if schedules else None
        self.heartbeat: Heartbeat | None = self._heartbeat()

    def _scheduler(self) -> ScheduleRunner:
        return ScheduleRunner(
            cfg=self.cfg,
            schedules=self.cfg.backup.effective_schedules(),
            client=self.client,
            lookup=self.lookup,
            view=self._view,
            refusal=self._refusal,
            registry=self._registry,
        )

    def _heartbeat(self) -> Heartbeat | None:
        b, cfg, pg = self.cfg.backup, self.cfg, self.pg
        if not b.repositories or b.heartbeat_interval <= 0:
            return None
        return Heartbeat(
            node=cfg.name,
            endpoint=Endpoint(cfg.name, pg.session.host, pg.port),
            superuser=cfg.postgresql.superuser,
            interval=b.heartbeat_interval,
            term=self._term,
        )

    def reconfigure(self) -> Sequence[Coroutine[Any, Any, None]]:
        """``cfg.backup`` was replaced by a reload (repositories and archive settings unchanged:
        a reload refuses to change those).  The scheduler plans from the new schedules (a job
        that runs goes on); the heartbeat follows the new interval.  Returns tasks to start."""
        start: list[Coroutine[Any, Any, None]] = []
        schedules = self.cfg.backup.effective_schedules()
        if self.scheduler is not None:
            self.scheduler.schedules = schedules
        elif schedules:
            # the first schedules of this agent: its gauges are registered for the first time
            self.scheduler = self._scheduler()
            start.append(self.scheduler.run())
        interval = self.cfg.backup.heartbeat_interval
        if self.heartbeat is not None and interval > 0:
            self.heartbeat.interval = interval
        elif self.heartbeat is not None:
            self.heartbeat.interval = 0  # its loop ends after the current sleep
            self.heartbeat = None
        else:
            self.heartbeat = self._heartbeat()
            if self.heartbeat is not None:
                start.append(self.heartbeat.run())
        return start

    # -- archiving --------------------------------------------------------------------------------

    def pg_parameters(self, params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        """archive_mode and archive_command on every node (only a primary archives with 'on';
        archive_mode needs a restart, so it is there from a node's first start), and
        archive_timeout 60s unless set: an idle primary still ships a segment a minute."""
        if self.archiver is None:
            return {}
        ours: dict[str, ParamValue] = {
            "archive_mode": "on",
            "archive_command": self.archiver.archive_command(),
        }
        for k, v in ours.items():
            if k in params and params[k] != v and k not in self._overridden:
                self._overridden.add(k)
                log.warning(
                    "archive_parameter_overridden", parameter=k, value=params[k], reason="backup.archive"
                )
        if "archive_timeout" not in params:
            ours["archive_timeout"] = "60s"
        # Incremental base backups (PostgreSQL 17+) need the WAL summaries of every server a
        # backup may be taken from; reloadable, so no restart.  Never on 15 (no such setting:
        # the server would not start).  A value the user set wins.
        if "summarize_wal" not in params and (server_major(self.cfg.postgresql.data_dir) or 0) >= 17:
            ours["summarize_wal"] = "on"
        return ours

    async def prepare(self) -> None:
        if self.archiver is not None:
            # before PostgreSQL can start: the archive_command script and its directories
            await asyncio.to_thread(self.archiver.prepare)

    def tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        out: list[Coroutine[Any, Any, None]] = []
        if self.scheduler is not None:
            out.append(self.scheduler.run())
        if self.heartbeat is not None:
            out.append(self.heartbeat.run())
        return out

    def lasting_tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        return [] if self.archiver is None else [self.archiver.run()]

    def after_promotion(self, timeline: int | None) -> None:
        if self.archiver is not None:  # is the old timeline's WAL in the archive up to the switch?
            self.archiver.after_promotion(timeline)

    # -- a major upgrade --------------------------------------------------------------------------

    async def rebind_after_upgrade(self, succession: Succession) -> list[str]:
        """Every repository now belongs to the upgraded cluster, the old one in its history
        (:func:`~hakeeper.backup.binding.rebind_configured`); one problem per repository that
        refused.  The archiver checks the binding again for the new system identifier."""
        results = await rebind_configured(
            self.cfg.backup.repositories, self.cfg.scope, succession, by=f"upgrade {self.cfg.name}"
        )
        if self.archiver is not None:  # check the bindings again before the next write
            for rs in self.archiver.repos.values():
                rs.bound = False
        return [f"{r.repository}: {r.error}" for r in results if not r.ok]

    async def backup_after_upgrade(self) -> dict[str, Any]:
        """A full backup of the upgraded cluster (from a streaming standby if there is one, as
        ``backup create --from auto``; else this node, the new primary) into the first
        repository that takes it, copied into the others (as a schedule's full backup does)."""
        repos = self.cfg.backup.repositories
        if not repos:
            return {"skipped": "no backup repository is configured"}
        me = Endpoint(self.cfg.name, self.pg.session.host, self.pg.port)
        try:
            choice = choose_source(self._view(), "auto")
        except BackupError:
            choice = SourceChoice(me, me, f"the primary {self.cfg.name}")
        out: dict[str, Any] = {"source": choice.what, "repositories": {}}
        taken: tuple[str, RepositoryConfig] | None = None
        for rc in repos:
            one: dict[str, Any] = {}
            out["repositories"][rc.name] = one
            try:
                async with make_repository(rc) as r:
                    if taken is None:
                        rec = await backup_node(
                            r,
                            self.cfg,
                            choice,
                            bin_dir=self.pg.bin_dir,
                            label="after major upgrade",
                            backup_type="full",
                        )
                        taken = (rec.id, rc)
                        one["backup"] = rec.id
                    else:
                        async with make_repository(taken[1]) as src:
                            await copy_item(src, r, self.cfg.scope, taken[0])
                        one["backup"], one["copied_from"] = taken[0], taken[1].name
            except (BackupError, CopyError, RepoError, PgError, OSError) as e:
                log.warning("upgrade_backup_failed", repository=rc.name, reason=str(e))
                one["error"] = str(e)
        return out

    def status(self) -> Mapping[str, Any] | None:
        if self.archiver is None:
            return None
        hb = self.heartbeat
        return {"archive": self.archiver.status(), "heartbeat": None if hb is None else hb.status()}

    def refresh_metrics(self) -> None:
        last_success = self.lookup(self.keys.verify_last_success)
        self._verify.refresh(self.lookup(self.keys.verify_last), last_success)
        latest = drill_phases(last_success.value if last_success else None)
        for s in self.cfg.backup.effective_schedules():
            kv = self.lookup(self.keys.schedule(s.name))
            latest.update(schedule_phases(s.kind, kv.value if kv else None))
        self._phases.refresh(latest.items())

    async def close(self) -> None:
        self._stop_wal_server()
        if self.archiver is not None:
            await self.archiver.close()

    # -- replicas from a backup -----------------------------------------------------------------

    def seeds_replicas(self) -> bool:
        b = self.cfg.backup
        return bool(b.repositories) and b.replica_from_backup

    async def seed_replica(
        self, leader: str, system_identifier: str, timeline: int, lsn: int | None, *, delta: bool = False
    ) -> bool:
        """``backup.replica_from_backup``: restore the newest complete backup of this cluster
        (same system identifier, on the leader's timeline history, not too far behind) into the
        empty data directory, keeping only ``restore_command`` (walfetch) of its recovery
        settings, and answer its WAL requests until it streams.  False (logged with the reason)
        means: use pg_basebackup.  ``delta`` (``hakeeper reinit --delta``): the directory holds
        an older copy of this cluster; only the blocks that differ from the backup are fetched
        and written (a refusal -- no file index, another system -- also means pg_basebackup)."""
        pg = self.pg
        t0 = time.monotonic()
        log.info(
            "clone_from_backup_started",
            leader=leader,
            system_identifier=system_identifier,
            timeline=timeline,
            delta=delta,
        )
        try:
            seeded = await seed.restore_for_replica(
                self.cfg, pg, system_identifier, timeline, lsn, delta=delta
            )
            await asyncio.to_thread(seed.set_seed_settings, pg.data_dir, pg.run_as, seeded.settings)
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
            await asyncio.to_thread(pg.remove_data_dir)
            return False
        res = seeded.result
        self._stop_wal_server()
        self._wal_server = asyncio.create_task(
            seed.serve_replica_wal(self.cfg, pg, seeded), name="replica-wal-handover"
        )
        log.info(
            "clone_from_backup_finished",
            backup=res.backup_id,
            chain=res.chain or None,  # an incremental: its chain was combined, full first
            repository=res.repository,
            seconds=round(time.monotonic() - t0, 2),
            delta=res.delta,
            bytes_fetched=res.bytes_fetched,  # an indexed backup: stored bytes of the parts fetched
            bytes_written=res.bytes_written,
            bytes_total=res.bytes_total,
            note="replays archived WAL, then streams from the leader",
        )
        return True

    async def on_streaming(self) -> None:
        """A replica seeded from a backup streams now: its restore_command (walfetch) goes
        (a standby stops when walfetch cannot reach a repository)."""
        if not self.cfg.backup.repositories:
            return
        pg = self.pg
        if not seed.has_seed_settings(pg.data_dir):
            self._stop_wal_server()
            return
        await asyncio.to_thread(seed.drop_seed_settings, pg.data_dir, pg.run_as)
        await pg.reload()
        self._stop_wal_server()
        log.info("clone_from_backup_settings_removed", reason="streaming from the leader")

    def _stop_wal_server(self) -> None:
        if self._wal_server is not None:
            self._wal_server.cancel()
            self._wal_server = None

    # -- bootstrap from a backup ------------------------------------------------------------------

    async def bootstrap_restore(self) -> BootstrapCopy:
        """Restore ``bootstrap.from_backup`` (every check of ``hakeeper restore`` first) into the
        empty data directory, without its recovery settings yet (the agent writes its own
        configuration first, once it has won the initialize race)."""
        fb = self.cfg.bootstrap.from_backup
        assert fb is not None
        cfg, pg = self.cfg, self.pg
        source = fb.scope or cfg.scope
        primary = None
        if source != cfg.scope:
            primary = await seed.source_primary(self.client, cfg.namespace, source)
        log.info(
            "bootstrap_from_backup_started",
            source_scope=source,
            repo=fb.repo,
            backup=fb.backup,
            target=seed.target_of(fb).describe(),
            source_primary=primary.address if primary else None,
        )
        try:
            seeded = await seed.restore_for_bootstrap(cfg, pg, fb, primary)
        except seed.RestoreRefused as e:
            raise BootstrapRefused(str(e)) from e
        except (RestoreError, RepoError, PgError, CommandFailed, OSError) as e:
            log.error("bootstrap_from_backup_failed", stage="copy", error=str(e))
            await asyncio.to_thread(pg.remove_data_dir)
            raise BootstrapFailed(str(e)) from e
        res = seeded.result
        log.info(
            "bootstrap_from_backup_copied",
            backup=res.backup_id,
            repository=res.repository,
            target_timeline=res.timeline,
            seconds=round(res.seconds_fetch, 2),
            notes=res.notes,
        )
        await asyncio.to_thread(seed.set_seed_settings, pg.data_dir, pg.run_as, {})
        self._bootstrap = BootstrapCopy(seeded)
        return self._bootstrap

    async def bootstrap_recover(self) -> None:
        """The recovery settings on top of the agent's configuration, recovery to the target and
        promotion on a new timeline, then this cluster's passwords for our roles (the restored
        roles have the source's)."""
        fb = self.cfg.bootstrap.from_backup
        assert fb is not None
        pg = self.pg
        copy, self._bootstrap = self._bootstrap, None
        if copy is None:
            raise BootstrapFailed("no restored copy to recover")
        seeded = copy.seeded
        await asyncio.to_thread(
            seed.set_seed_settings, pg.data_dir, pg.run_as, seeded.settings, recovery_signal=True
        )
        await seed.recover(self.cfg, pg, seeded, fb.timeout)
        await asyncio.to_thread(seed.drop_seed_settings, pg.data_dir, pg.run_as)
        pgc = self.cfg.postgresql
        async with seed.over_socket(pg):
            await pg.create_roles(
                superuser_password=secret_value(pgc.superuser.password),
                replication_user=pgc.replication.username,
                replication_password=secret_value(pgc.replication.password),
            )
