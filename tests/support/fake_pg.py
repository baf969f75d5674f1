"""A small PostgreSQL state machine for unit tests of the HA executors and the simulation.

:class:`FakePostgres` has the subset of :class:`hakeeper.pg.postgres.Postgres` that ``hakeeper.ha``
and ``hakeeper.node`` call, with the same signatures; tests pass it where a ``Postgres`` is
expected (``typing.cast``).  Several of them live in one :class:`World`, which plays the network
between them: a replica finds its upstream there by host and port.

What it models:

* a data directory: none (uninitialized) or one with a system identifier, a timeline history and
  a WAL position (``lsn``: written on a primary, received = replayed on a replica);
* the server: stopped, running as a primary, or running in recovery (a replica) -- in recovery
  exactly when the configuration written last was a replica's (``standby.signal``);
* the configuration files: the parameters, role and upstream of the last :meth:`write_config`
  (``config_writes`` counts the writes, like a file's mtime would), taking effect on the next
  start or reload;
* streaming: a running replica whose upstream is a running primary of the same system, holding
  the replica's slot, on a history the replica's is a prefix of (and not behind where the replica
  already is), receives all of its WAL whenever anyone looks (a probe, the primary's probe, a
  question from a switchover); its timeline follows the primary's;
* writes (:meth:`write`) advance a primary's WAL position; a promotion starts a new timeline
  branch.  Two promotions to the same timeline number make two different branches (``token``),
  so a replica of one cannot follow the other, as with real diverged histories;
* a clean stop of a primary writes a shutdown checkpoint and ships it to the replicas streaming
  from it (walsenders do so before they exit); an immediate stop leaves the cluster state "in
  production" (crashed), which is what the agent reads to decide a rewind;
* clone (needs the slot on a running source whose bootstrap created the roles), rewind
  (follows the source's history from the fork point), slots, the handful of SQL statements the
  agent runs (others raise ``NotImplementedError`` so a test notices), and failures on demand
  (``failing``).

Not modelled: time (a start, promote or clone finishes at once), replication lag (WAL ships when
looked at, or not at all), cascading replication, synchronous replication acknowledgements
(``sync_state`` is always "async"), restart-only parameters (``pending_restart`` is empty), the
files themselves (``data_dir`` is only a name), archiving, and the fencer *process*.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hakeeper.core.config import ParamValue, PostgresTls
from hakeeper.core.lsn import format_lsn
from hakeeper.core.pgtypes import LocalState, ReplicaInfo, Role, Upstream, hostport
from hakeeper.pg import slots as slotsql
from hakeeper.pg.errors import PgError

__all__ = ["Branch", "FakePostgres", "World"]

INITIAL_LSN = 0x1_549_A28  # where initdb leaves a new cluster's WAL (any non-zero value will do)
SHUTDOWN_CHECKPOINT_BYTES = 0x78  # the record a clean shutdown writes

_CURRENT_LSN_SQL = "SELECT pg_current_wal_lsn()::text"
_PENDING_RESTART_SQL = "SELECT name FROM pg_settings WHERE pending_restart"
_RELOAD_SQL = "SELECT pg_reload_conf()"
_MAJOR_SQL = "SELECT current_setting('server_version_num')::int / 10000"
FAKE_MAJOR = 15  # the fake server has no failover slots
_HISTORY_FILE_SQL = "SELECT pg_read_file('pg_wal/'"  # the start of ha.actions.leader.switch_point's query


@dataclass(frozen=True, slots=True)
class Branch:
    """One timeline of a data directory's history: ``timeline`` began at ``start_lsn``.
    ``token`` tells apart two timelines with the same number made by two promotions."""

    timeline: int
    start_lsn: int
    token: int


class _RunAs:
    """``Postgres.run_as``: the fake runs as the current user and owns nothing."""

    uid: int | None = None
    gid: int | None = None

    def chown(self, path: Path) -> None:
        return None


class World:
    """The fake servers of one test, and the network between them (by host and port)."""

    def __init__(self) -> None:
        self.servers: dict[str, FakePostgres] = {}
        self.initdbs: list[str] = []  # members that ran initdb, in order
        self.promotions: list[tuple[str, int]] = []  # (member, new timeline), in order
        self._ids: Iterator[int] = itertools.count(7_300_000_000_000_000_001)
        self._tokens: Iterator[int] = itertools.count(1)
        self._pids: Iterator[int] = itertools.count(4000)

    def add(self, name: str, host: str = "127.0.0.1", port: int = 5432) -> FakePostgres:
        pg = FakePostgres(self, name, host, port)
        self.servers[name] = pg
        return pg

    def at(self, host: str, port: int) -> FakePostgres | None:
        return next((s for s in self.servers.values() if (s.host, s.port) == (host, port)), None)

    def writable(self) -> list[str]:
        """Members whose PostgreSQL accepts writes now (running, not in recovery)."""
        return sorted(name for name, s in self.servers.items() if s.writable)

    def new_system_identifier(self) -> str:
        return str(next(self._ids))

    def new_token(self) -> int:
        return next(self._tokens)

    def new_pid(self) -> int:
        return next(self._pids)

    async def wait_received(
        self,
        *,
        name: str,
        host: str,
        port: int,
        user: str,
        password: str | None,
        lsn: int | None,
        timeout: float,
        tls: PostgresTls | None = None,
    ) -> bool:
        """:func:`hakeeper.pg.remote.wait_received` in this world (no TLS in it): whether the standby has
        received WAL past ``lsn``.  It answers at once: nothing ships while nobody looks."""
        standby = self.at(host, port)
        if lsn is None or standby is None or not standby.running:
            return False
        standby.upstream_primary()
        return standby.lsn > lsn


class FakeSession:
    """The SQL side of a FakePostgres (``Postgres.session``)."""

    def __init__(self, pg: FakePostgres) -> None:
        self.pg = pg
        self.host = pg.host

    async def execute(
        self, sql: Any, params: tuple[object, ...] = (), *, timeout: float = 5.0
    ) -> list[tuple[Any, ...]]:
        return await self.pg.execute(sql, params, timeout=timeout)

    async def close(self) -> None:
        await self.pg.close()


async def clone_from(pg: FakePostgres, source: Upstream, **kw: Any) -> None:
    """:func:`hakeeper.pg.clone.clone_from` in this world."""
    await pg.clone_from(source, **kw)


async def rewind(pg: FakePostgres, source: Upstream, **kw: Any) -> None:
    """:func:`hakeeper.pg.rewind.rewind` in this world."""
    await pg.rewind(source, **kw)


class FakePostgres:
    """One data directory and its server (see the module doc)."""

    def __init__(self, world: World, name: str, host: str, port: int) -> None:
        self.world = world
        self.member_name = name
        self.host = host
        self.port = port
        self.session = FakeSession(self)
        self.data_dir = Path(f"/nonexistent/hakeeper-fake/{name}/data")
        self.run_as = _RunAs()
        self.failing: set[str] = set()  # operations that raise PgError: "start", "promote", "clone"...
        self.moved_aside: list[tuple[Path, str | None]] = []  # (new name, system id) of each move
        self.receiving = True  # False: the WAL receiver cannot reach its upstream (a network cut)
        self._wipe()

    def _wipe(self) -> None:
        self.initialized = False
        self.system_id: str | None = None
        self.history: tuple[Branch, ...] = ()
        self.lsn = 0
        self.checkpoint_lsn = 0
        self.cluster_state = ""
        self.pid: int | None = None
        self.in_recovery = False
        self.slots: set[str] = set()
        self.roles_created = False
        # the configuration files, and what the running server took from them
        self.params: dict[str, ParamValue] = {}
        self.hba_hosts: tuple[str, ...] = ()  # replication_hosts of the last write_config
        self.role: Role | None = None
        self.upstream: Upstream | None = None
        self.config_writes = 0
        self.active_upstream: Upstream | None = None

    def __repr__(self) -> str:
        what = "no data" if not self.initialized else "stopped"
        if self.running:
            what = "replica" if self.in_recovery else "primary"
        return f"FakePostgres({self.member_name}, {what}, tl={self.timeline}, lsn={format_lsn(self.lsn)})"

    # -- what tests look at -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def writable(self) -> bool:
        return self.running and not self.in_recovery

    @property
    def timeline(self) -> int | None:
        return self.history[-1].timeline if self.history else None

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def write(self, nbytes: int = 1024) -> int:
        """A client's write; the primary's new WAL position."""
        if not self.writable:
            raise PgError("cannot execute INSERT in a read-only transaction (or postgres is down)")
        self.lsn += nbytes
        return self.lsn

    def crash(self) -> None:
        """The host died (or SIGKILL): the server is gone at once, nothing more is shipped."""
        self.pid = None

    def upstream_primary(self) -> FakePostgres | None:
        """The primary this running replica streams from now (its WAL received), or None."""
        up = self.active_upstream
        if not (self.running and self.in_recovery and self.receiving) or up is None:
            return None
        source = self.world.at(up.host, up.port)
        if source is None or not source.writable or source.system_id != self.system_id:
            return None
        if up.slot_name is not None and up.slot_name not in source.slots:
            return None  # "replication slot does not exist"
        if not source._can_serve(self.history, self.lsn):
            return None  # diverged: the primary's timeline branched off before our position
        self.history, self.lsn = source.history, source.lsn
        return source

    def _can_serve(self, history: tuple[Branch, ...], lsn: int) -> bool:
        """Whether a standby at ``lsn`` on ``history`` can follow this server's WAL."""
        n = len(history)
        if n == 0 or self.history[:n] != history:
            return False
        end = self.lsn if n == len(self.history) else self.history[n].start_lsn
        return lsn <= end

    def _replicas(self) -> list[FakePostgres]:
        return [s for s in self.world.servers.values() if s is not self and s.upstream_primary() is self]

    def _check(self, operation: str) -> None:
        if operation in self.failing:
            raise PgError(f"fake postgres: {operation} fails (as the test asked)")

    # -- Postgres: the data directory -------------------------------------------------------------

    def is_initialized(self) -> bool:
        return self.initialized

    def postmaster_pid(self) -> int | None:
        return self.pid

    def is_running(self) -> bool:
        return self.running

    async def initdb(self, extra_args: list[str]) -> None:
        self._check("initdb")
        if self.initialized:
            raise PgError(f"{self.data_dir} is already initialized")
        self.world.initdbs.append(self.member_name)
        self.initialized = True
        self.system_id = self.world.new_system_identifier()
        self.history = (Branch(1, 0, self.world.new_token()),)
        self.lsn = self.checkpoint_lsn = INITIAL_LSN
        self.cluster_state = "shut down"

    async def controldata(self) -> dict[str, str]:
        if not self.initialized:
            raise PgError("pg_controldata failed (exit 1): could not open pg_control")
        return {
            "Database system identifier": self.system_id or "",
            "Database cluster state": self.cluster_state,
            "Latest checkpoint location": format_lsn(self.checkpoint_lsn),
            "Latest checkpoint's TimeLineID": str(self.timeline),
        }

    async def system_identifier(self) -> str | None:
        return self.system_id if self.initialized else None

    def move_data_dir_aside(self) -> Path:
        if self.running:
            raise RuntimeError("fake postgres: data directory moved under a running server")
        dest = self.data_dir.with_name(f"{self.data_dir.name}.failed-{len(self.moved_aside)}")
        self.moved_aside.append((dest, self.system_id))
        self._wipe()
        return dest

    def remove_data_dir(self) -> None:
        if self.running:
            raise RuntimeError("fake postgres: data directory removed under a running server")
        self._wipe()

    async def clone_from(
        self,
        source: Upstream,
        *,
        replication_user: str,
        replication_password: str | None,
        timeout: float = 3600,
    ) -> None:
        if self.running:
            raise PgError("cannot clone: PostgreSQL is running on this data directory")
        if self.initialized:
            raise PgError(f"cannot clone: {self.data_dir} is not empty")
        self._check("clone")
        src = self.world.at(source.host, source.port)
        if src is None or not src.running:
            raise PgError(f"pg_basebackup from {source.address} failed: connection refused")
        if source.slot_name is not None and source.slot_name not in src.slots:
            raise PgError(f'pg_basebackup: replication slot "{source.slot_name}" does not exist')
        if not src.roles_created:  # the replication role is made by the bootstrap, after initdb
            raise PgError(f'pg_basebackup: password authentication failed for user "{replication_user}"')
        self.initialized = True
        self.roles_created = True  # the roles are in the catalog the clone copies
        self.system_id = src.system_id
        self.history, self.lsn = src.history, src.lsn
        self.checkpoint_lsn = src.lsn
        self.cluster_state = "in production"  # pg_control as copied from a running primary

    async def rewind(
        self, source: Upstream, *, superuser: str, superuser_password: str | None, timeout: float = 600
    ) -> None:
        if self.running:
            raise PgError("cannot rewind: PostgreSQL is running on this data directory")
        if not self.initialized:
            raise PgError(f"cannot rewind: {self.data_dir} is not initialized")
        self._check("rewind")
        src = self.world.at(source.host, source.port)
        if src is None or not src.running:
            raise PgError(f"pg_rewind from {source.address} failed: connection refused")
        if src.system_id != self.system_id:
            raise PgError("pg_rewind: source and target clusters are from different systems")
        if src._can_serve(self.history, self.lsn):
            return  # no rewind required
        common = 0
        while common < min(len(self.history), len(src.history)) and (
            self.history[common] == src.history[common]
        ):
            common += 1
        fork = src.history[common].start_lsn if common < len(src.history) else src.lsn
        self.history, self.lsn = src.history, min(self.lsn, fork)
        self.checkpoint_lsn = self.lsn
        self.cluster_state = "in archive recovery"  # pg_rewind leaves a backup label to replay from

    # -- Postgres: configuration and the server ---------------------------------------------------

    async def write_config(
        self,
        params: dict[str, ParamValue],
        role: Role,
        upstream: Upstream | None,
        *,
        replication_password: str | None,
        replication_hosts: Iterable[str] = (),
    ) -> None:
        if not self.initialized:
            raise PgError(f"cannot write configuration: {self.data_dir} is not initialized")
        self.params = dict(params)
        self.hba_hosts = tuple(replication_hosts)
        self.role = role
        self.upstream = upstream if role == Role.REPLICA else None
        self.config_writes += 1

    async def start(self, *, timeout: float, wait: bool = True) -> None:
        if self.running:
            return
        if not self.initialized:
            raise PgError(f"cannot start: {self.data_dir} is not initialized")
        self._check("start")
        self.pid = self.world.new_pid()
        self.in_recovery = self.role == Role.REPLICA  # standby.signal
        self.active_upstream = self.upstream if self.in_recovery else None
        self.cluster_state = "in archive recovery" if self.in_recovery else "in production"

    async def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60
    ) -> None:
        if not self.running:
            return
        if mode != "immediate":
            if not self.in_recovery:
                self.checkpoint_lsn = self.lsn
                self.lsn += SHUTDOWN_CHECKPOINT_BYTES
                self._replicas()  # the walsenders ship the shutdown checkpoint before they exit
                self.cluster_state = "shut down"
            else:
                self.cluster_state = "shut down in recovery"
        self.pid = None

    async def reload(self) -> None:
        if not self.running:
            raise PgError("cannot reload: PostgreSQL is not running")
        self._check("reload")
        if self.in_recovery:
            self.active_upstream = self.upstream

    async def promote(self, *, timeout: float = 30) -> None:
        if not self.running:
            raise PgError("promote failed: connection refused")
        if not self.in_recovery:
            return
        self._check("promote")
        new = Branch((self.timeline or 0) + 1, self.lsn, self.world.new_token())
        self.history = (*self.history, new)
        self.in_recovery = False
        self.active_upstream = None
        self.role = Role.PRIMARY  # standby.signal is gone
        self.cluster_state = "in production"
        self.world.promotions.append((self.member_name, new.timeline))

    async def close(self) -> None:
        return None

    # -- Postgres: SQL ----------------------------------------------------------------------------

    async def probe(self, *, timeout: float = 2.0) -> LocalState:
        if not self.running:
            return LocalState.down("postmaster is not running")
        if not self.in_recovery:
            rows = tuple(
                ReplicaInfo(
                    application_name=r.member_name,
                    state="streaming",
                    sync_state="async",
                    sent_lsn=r.lsn,
                    write_lsn=r.lsn,
                    flush_lsn=r.lsn,
                    replay_lsn=r.lsn,
                    replay_lag=None,
                    client_addr=r.host,
                    reply_age=0.0,
                )
                for r in self._replicas()
            )
            return LocalState(True, False, self.timeline, self.lsn, None, None, None, rows)
        source = self.upstream_primary()
        return LocalState(
            running=True,
            in_recovery=True,
            timeline=self.timeline,
            wal_lsn=self.lsn,
            received_lsn=self.lsn,
            replayed_lsn=self.lsn,
            streaming_from=source.address if source is not None else None,
            replication=(),
        )

    async def execute(
        self, sql: Any, params: tuple[object, ...] = (), *, timeout: float = 5.0
    ) -> list[tuple[Any, ...]]:
        if not self.running:
            raise PgError("connection to server failed: Connection refused")
        text = str(sql)
        if text == _CURRENT_LSN_SQL:
            if self.in_recovery:
                raise PgError("recovery is in progress", sqlstate="55000")
            return [(format_lsn(self.lsn),)]
        if text == _PENDING_RESTART_SQL:
            return []
        if text == _RELOAD_SQL:
            await self.reload()
            return [(True,)]
        if text.startswith(_HISTORY_FILE_SQL):
            return [(self._history_file(int(str(params[0]))),)]
        if text == _MAJOR_SQL:
            return [(FAKE_MAJOR,)]
        if text == slotsql.LIST_SQL_OLD:  # physical member slots only; no logical decoding here
            return [(s, "physical", None, None, False, None, None, None, None) for s in sorted(self.slots)]
        raise NotImplementedError(f"fake postgres: SQL not modelled: {text}")

    def _history_file(self, timeline: int) -> str:
        """``pg_wal/<timeline>.history``: one line per switch that led to ``timeline``."""
        index = next((i for i, b in enumerate(self.history) if b.timeline == timeline and i > 0), None)
        if index is None:
            raise PgError(f'could not open file "pg_wal/{timeline:08X}.history"', sqlstate="58P01")
        return "".join(
            f"{self.history[i - 1].timeline}\t{format_lsn(self.history[i].start_lsn)}\tno recovery target\n"
            for i in range(1, index + 1)
        )

    async def checkpoint(self, *, timeout: float = 300) -> None:
        if not self.running:
            raise PgError("connection to server failed: Connection refused")
        self._check("checkpoint")
        self.checkpoint_lsn = self.lsn

    async def create_roles(
        self, *, superuser_password: str | None, replication_user: str, replication_password: str | None
    ) -> None:
        if not self.writable:
            raise PgError("cannot create roles: not a running primary")
        self.roles_created = True

    async def ensure_slots(
        self, wanted: set[str], *, droppable: set[str] | frozenset[str] = frozenset()
    ) -> tuple[list[str], list[str]]:
        if not self.running:
            raise PgError("connection to server failed: Connection refused")
        active = {r.active_upstream.slot_name for r in self._replicas() if r.active_upstream is not None}
        created = sorted(wanted - self.slots)
        dropped = sorted(s for s in self.slots if s not in wanted and s in droppable and s not in active)
        self.slots = (self.slots | set(created)) - set(dropped)
        return created, dropped
