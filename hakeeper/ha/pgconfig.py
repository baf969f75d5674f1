"""PgConfigurator: the one place that decides what goes into PostgreSQL's configuration files.

Parameters come from the dynamic config (etcd), the node file, the synchronous replication
state (``synchronous_standby_names``) and the backup port (archiving), in that order of
precedence, lowest first.  Every write of the files goes through :meth:`PgConfigurator.write`,
so the agent always knows what the files hold (:attr:`written`, :attr:`written_hosts`) and what a
change must reload.

pg_hba.conf admits replication only from the members' published hosts (and this node's own
addresses): the set is taken from the view at every write, and a change of it (a member joined
or left) rewrites the files and reloads, like a parameter change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from hakeeper.core.config import DynamicConfig, NodeConfig, ParamValue, secret_value
from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.ha.state import NodeState
from hakeeper.pg.conf import replication_addresses
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
        slot_params: Callable[[Role, str], dict[str, ParamValue]] = lambda role, wal_level: {},
    ) -> None:
        self.cfg = cfg
        self.pg = pg
        self.state = state
        self.sync_guc = sync_guc
        self.extra = extra
        self.slot_params = slot_params  # slot failover's parameters per role (ha/slots.py)
        self.written: dict[str, Any] | None = None  # parameters in the files now (None: unknown)
        self.written_hosts: tuple[str, ...] | None = None  # member hosts pg_hba.conf admits now
        self._refused_hosts: frozenset[str] = frozenset()  # logged once per set

    def member_hosts(self) -> tuple[str, ...]:
        """The hosts the members publish in the current view (sorted, without repeats).  A
        published host that is no single host (a network, ``all``, ``samenet``...) is left out
        and logged: member records come from etcd and are not trusted to widen pg_hba.conf."""
        hosts = {m.host for m in self.state.view.members.values() if m.host}
        _, refused = replication_addresses(hosts)
        if frozenset(refused) != self._refused_hosts:
            self._refused_hosts = frozenset(refused)
            if refused:
                log.warning(
                    "member_hosts_refused",
                    hosts=refused,
                    reason="not a single host name or IP address; no replication admitted from it",
                )
        return tuple(sorted(hosts - set(refused)))

    def params(self, dyn: DynamicConfig, role: Role) -> dict[str, Any]:
        base: dict[str, Any] = {**dyn.cluster_parameters(), **self.cfg.postgresql.parameters}
        wal_level = str(base.get("wal_level", "replica")).lower()
        params: dict[str, Any] = {
            **base,
            "synchronous_standby_names": self.sync_guc(dyn),
            **self.slot_params(role, wal_level),
        }
        return {**params, **self.extra(params)}

    async def write(self, dyn: DynamicConfig, role: Role, upstream: Upstream | None) -> None:
        params = self.params(dyn, role)
        hosts = self.member_hosts()
        await self.pg.write_config(
            params,
            role,
            upstream,
            replication_password=secret_value(self.cfg.postgresql.replication.password),
            replication_hosts=hosts,
        )
        self.written = params
        self.written_hosts = hosts

    def current_role(self) -> Role:
        probe = self.state.probe
        return Role.PRIMARY if probe is not None and probe.in_recovery is False else Role.REPLICA

    async def apply_changes(self, dyn: DynamicConfig) -> None:
        """Cluster-wide parameters changed in etcd (PATCH /config), the sync state moved or the
        members' hosts changed (pg_hba.conf): rewrite and reload.

        Parameters that need a restart are reported by PostgreSQL as pending_restart; the agent
        does not restart on its own (POST /restart does)."""
        role = self.current_role()
        params = self.params(dyn, role)
        before = self.written or {}  # None: an agent restarted beside a running server
        hosts, hosts_before = self.member_hosts(), self.written_hosts
        if params == before and hosts == hosts_before:
            return
        changed = sorted(k for k in params.keys() | before.keys() if params.get(k) != before.get(k))
        if hosts != hosts_before:
            old = set(hosts_before or ())
            log.info(
                "pg_hba_members_changed",
                added=sorted(set(hosts) - old),
                removed=sorted(old - set(hosts)),
            )
        if before.get("synchronous_standby_names") == "*" and params.get("synchronous_standby_names") == "":
            log.warning(
                "sync_guard_expired",
                reason="no synchronous standby joined in time; commits stop waiting (not strict)",
            )
        await self.write(dyn, role, self.state.upstream if role == Role.REPLICA else None)
        await self.pg.reload()
        log.info("parameters_applied", changed=changed, pending_restart=await self.pending_restart())

    async def pending_restart(self) -> list[str]:
        """Parameters PostgreSQL has read but applies only at its next start (empty when it
        cannot be asked)."""
        try:
            rows = await self.pg.session.execute("SELECT name FROM pg_settings WHERE pending_restart")
        except PgError:
            return []
        return sorted(str(r[0]) for r in rows)

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
