"""PgConfigurator: the one place that decides what goes into PostgreSQL's configuration files.

Parameters come from the dynamic config (etcd), the node file, the synchronous replication
state (``synchronous_standby_names``) and the backup port (archiving), in that order of
precedence, lowest first.  Every write of the files goes through :meth:`PgConfigurator.write`,
so the agent always knows what the files hold (:attr:`written`) and what a change must reload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from hakeeper.core.config import DynamicConfig, NodeConfig, ParamValue, secret_value
from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.ha.state import NodeState
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import Postgres
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.pgconfig")


class PgConfigurator:
    def __init__(
        self,
        cfg: NodeConfig,
        pg: Postgres,
        state: NodeState,
        *,
        sync_guc: Callable[[DynamicConfig], str],
        extra: Callable[[Mapping[str, ParamValue]], dict[str, ParamValue]],
    ) -> None:
        self.cfg = cfg
        self.pg = pg
        self.state = state
        self.sync_guc = sync_guc
        self.extra = extra
        self.written: dict[str, Any] | None = None  # parameters in the files now (None: unknown)

    def params(self, dyn: DynamicConfig) -> dict[str, Any]:
        params: dict[str, Any] = {
            **dyn.cluster_parameters(),
            **self.cfg.postgresql.parameters,
            "synchronous_standby_names": self.sync_guc(dyn),
        }
        return {**params, **self.extra(params)}

    async def write(self, dyn: DynamicConfig, role: Role, upstream: Upstream | None) -> None:
        params = self.params(dyn)
        await self.pg.write_config(
            params,
            role,
            upstream,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
        )
        self.written = params

    def current_role(self) -> Role:
        probe = self.state.probe
        return Role.PRIMARY if probe is not None and probe.in_recovery is False else Role.REPLICA

    async def apply_changes(self, dyn: DynamicConfig) -> None:
        """Cluster-wide parameters changed in etcd (PATCH /config) or the sync state moved:
        rewrite and reload.

        Parameters that need a restart are reported by PostgreSQL as pending_restart; the agent
        does not restart on its own (POST /restart does)."""
        params = self.params(dyn)
        before = self.written or {}  # None: an agent restarted beside a running server
        if params == before:
            return
        changed = sorted(k for k in params.keys() | before.keys() if params.get(k) != before.get(k))
        if before.get("synchronous_standby_names") == "*" and params.get("synchronous_standby_names") == "":
            log.warning(
                "sync_guard_expired",
                reason="no synchronous standby joined in time; commits stop waiting (not strict)",
            )
        role = self.current_role()
        await self.write(dyn, role, self.state.upstream if role == Role.REPLICA else None)
        await self.pg.reload()
        pending = []
        try:
            rows = await self.pg.session.execute("SELECT name FROM pg_settings WHERE pending_restart")
            pending = [str(r[0]) for r in rows]
        except PgError:
            pass
        log.info("parameters_applied", changed=changed, pending_restart=pending)

    async def wake_checkpointer(self) -> None:
        """Once per postmaster, when it is first seen out of recovery: pg_reload_conf().  Since
        PostgreSQL 15 the checkpointer starts before recovery ends and computes its first sleep
        (checkpoint_timeout, 5 min) without archive_timeout, which only counts outside recovery;
        nothing wakes it at the end of a clean start, so archive_timeout had no effect for up to
        checkpoint_timeout after every start of a primary.  A reload wakes it (docs/wal-archiving.md)."""
        pid = await asyncio.to_thread(self.pg.postmaster_pid)
        if pid is None or pid == self.state.checkpointer_woken_for:
            return
        try:
            await self.pg.session.execute("SELECT pg_reload_conf()", timeout=2.0)
        except PgError as e:
            log.warning("checkpointer_wake_failed", error=str(e))
            return
        self.state.checkpointer_woken_for = pid
        log.info("checkpointer_woken", postmaster_pid=pid, reason="archive_timeout after start")
