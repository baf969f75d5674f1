"""The local PostgreSQL instance: initdb, configuration, start/stop, promotion, probing and slots.

Every PostgreSQL program runs through :func:`hakeeper.pg.bins.run_program` as ``run_as`` (the
unprivileged OS user when we are root).  SQL goes over :attr:`Postgres.session` (see
:mod:`hakeeper.pg.session`) to ``postgresql.listen`` as the superuser.

The files the agent owns inside the data directory, rewritten by :meth:`Postgres.write_config`
before every start and after every clone or rewind, are described in :mod:`hakeeper.pg.files`.
Cloning (pg_basebackup) is :mod:`hakeeper.pg.clone`, rewinding (pg_rewind) :mod:`hakeeper.pg.rewind`.

The agent's Unix socket is in ``<data_dir>/pg_stat_tmp`` (private; see SOCKET_SUBDIR), listed
first in ``unix_socket_directories``; a node file's own directories follow it.  The replication
passfile is in the runtime directory beside the data directory (:attr:`Postgres.pgpass_file`).

The server log (``pg_ctl -l``) is ``<data_dir>/log/postgresql.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from psycopg import sql as pgsql

from hakeeper.core.config import ParamValue, PostgresConfig, secret_value
from hakeeper.core.lsn import parse_lsn
from hakeeper.core.pgtypes import LocalState, ReplicaInfo, Role, SlotInfo, Upstream
from hakeeper.pg.bins import C_LOCALE, find_bin_dir, read_controldata, run_program, tools_libpq_version
from hakeeper.pg.conf import (
    auth_options,
    render_pg_hba,
    render_pg_ident,
    render_pgpass,
    tls_options,
)
from hakeeper.pg.errors import PgError
from hakeeper.pg.files import (
    PGPASS_NAME,
    TLS_CA_NAME,
    TLS_CERT_NAME,
    TLS_KEY_NAME,
    TlsPaths,
    install_tls_files,
    log_tail,
    mkdir_owned,
    remove_file,
    remove_stale_pidfile,
    render_conf,
    runtime_dir_for,
    write_files,
)
from hakeeper.pg.session import SqlSession
from hakeeper.util.fsutil import UnsafePathError
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, children_of, parent_pid, pid_alive, postmaster_pid, resolve_run_as

__all__ = [
    "LocalState",
    "PgError",
    "Postgres",
    "ReplicaInfo",
    "Role",
    "SlotInfo",
    "Upstream",
]

log = get_logger(__name__)
INITDB_PWFILE_PREFIX = "initdb-pw-"  # initdb --pwfile, in the runtime dir for its run only

LOG_DIR_NAME = "log"
LOG_FILE_NAME = "postgresql.log"
# The Unix socket lives in a private directory inside the data dir, but not in the data dir's
# top level: pg_rewind fetches every file of the source's data dir and fails on a socket.  The
# contents of pg_stat_tmp are skipped by both pg_rewind and pg_basebackup (documented), the
# directory exists in every cluster, and it is 0700 like the data dir.
SOCKET_SUBDIR = "pg_stat_tmp"


_WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::")


def _listen_to_connect_host(host: str) -> str:
    """Where to connect locally, given the host PostgreSQL listens on."""
    if host in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


async def kill_postmaster(pid: int, data_dir: Path, socket_dir: Path) -> None:
    """SIGKILL the postmaster and its children (so none keeps the shared memory attached)."""
    kids = children_of(pid)
    log.warning("postgres_killing", pid=pid, children=len(kids))
    for p in (pid, *kids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not any(pid_alive(k) for k in kids):
            remove_stale_pidfile(data_dir, socket_dir)
            return
        await asyncio.sleep(0.05)
    raise PgError(f"postmaster {pid} survived SIGKILL")


class Postgres:
    """Drives one local PostgreSQL data directory.  Not safe for concurrent lifecycle calls
    (start/stop/rewind/clone); probe and SQL on :attr:`session` may run concurrently with each
    other."""

    def __init__(self, cfg: PostgresConfig, *, member_name: str, run_as: RunAs | None = None) -> None:
        self.cfg = cfg
        self.member_name = member_name
        self.data_dir = Path(os.path.abspath(cfg.data_dir))
        self.bin_dir = find_bin_dir(cfg.bin_dir, self.data_dir, cfg.bin_dirs)
        self.run_as = run_as if run_as is not None else resolve_run_as(self.data_dir, cfg.os_user)
        # Looked up once (a passwd lookup may go to a directory service: not on the event loop).
        try:
            self._agent_os_user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a passwd entry (a container): peer compares names
            self._agent_os_user = str(os.geteuid())
        listen_host, self.port = cfg.listen_host_port
        self.listen_host = listen_host
        self.session = SqlSession(
            cfg, host=_listen_to_connect_host(listen_host), port=self.port, data_dir=self.data_dir
        )

    # ------------------------------------------------------------------ paths & processes

    def program(self, name: str) -> str:
        """Path of PostgreSQL program ``name`` (``pg_ctl``, ``pg_rewind``, ...)."""
        return str(self.bin_dir / name)

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_DIR_NAME / LOG_FILE_NAME

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir_for(self.data_dir)

    @property
    def pgpass_file(self) -> Path:
        """The replication passfile: outside the data directory, which every clone copies."""
        return self.runtime_dir / PGPASS_NAME

    @property
    def tls_paths(self) -> TlsPaths | None:
        """The agent's copies of the TLS files (PostgreSQL and its tools read these), or None
        without ``postgresql.tls``."""
        return TlsPaths.in_dir(self.runtime_dir) if self.cfg.tls is not None else None

    @property
    def tools_auth_options(self) -> dict[str, str]:
        """Extra libpq options for connections made by PostgreSQL's own programs (pg_basebackup,
        pg_rewind, the walreceiver) to another member, which use the libpq the binaries load,
        not psycopg's: SCRAM required, and with TLS verify-full plus channel binding."""
        version = tools_libpq_version(self.bin_dir)
        tls = self.tls_paths
        return {**auth_options(version), **tls_options(str(tls.cafile) if tls else None, version)}

    async def install_tls(self) -> None:
        """Copy the TLS files for PostgreSQL and its tools (see :mod:`hakeeper.pg.files`); a
        no-op without ``postgresql.tls`` but for removing copies left from when it was set.
        Raises PgError when a file cannot be read."""
        tls, dest = self.cfg.tls, self.tls_paths
        if tls is None or dest is None:
            for name in (TLS_CERT_NAME, TLS_KEY_NAME, TLS_CA_NAME):
                remove_file(self.runtime_dir / name)
            return
        try:
            await asyncio.to_thread(install_tls_files, tls, dest, self.run_as)
        except (OSError, ValueError) as e:
            raise PgError(f"cannot install the TLS files of postgresql.tls: {e}") from e

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / SOCKET_SUBDIR

    def superuser_os_users(self) -> list[str]:
        """The OS users that may connect as the superuser through a Unix socket (pg_ident.conf's
        map): PostgreSQL's OS user (``runuser -u postgres -- psql``) and the agent's own (root
        when it runs PostgreSQL as another user), which connects there during a bootstrap
        from a backup."""
        return [self.run_as.name or self._agent_os_user, self._agent_os_user]

    def own_hosts(self) -> list[str]:
        """This node's configured addresses (listen and connect; a wildcard is none): a node
        admits replication from itself even before it has seen any member record."""
        hosts = (self.cfg.connect_host_port[0], self.listen_host)
        return [h for h in dict.fromkeys(hosts) if h not in _WILDCARD_HOSTS]

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def postmaster_pid(self) -> int | None:
        """PID from postmaster.pid if that process is alive and is this data dir's postgres."""
        return postmaster_pid(self.data_dir)

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    # ------------------------------------------------------------------ initdb & controldata

    async def initdb(self, extra_args: list[str]) -> None:
        if self.is_initialized():
            raise PgError(f"{self.data_dir} is already initialized")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PgError(f"cannot initdb: {self.data_dir} exists and is not empty")
        mkdir_owned(self.data_dir, self.run_as)
        su = self.cfg.superuser
        argv = [
            self.program("initdb"),
            "-D",
            str(self.data_dir),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--username={su.username}",
            *extra_args,
        ]
        pwfile: str | None = None
        password = secret_value(su.password)
        try:
            if password is not None:
                # In the agent's private runtime dir, not /tmp: a kill during initdb leaves the
                # file behind (removed at the next initdb), and it holds the superuser password.
                rt = self.runtime_dir if self.runtime_dir.is_dir() else None
                if rt is not None:
                    for old in rt.glob(f"{INITDB_PWFILE_PREFIX}*"):
                        remove_file(old)
                fd, pwfile = tempfile.mkstemp(prefix=INITDB_PWFILE_PREFIX, dir=rt)
                try:
                    os.fchmod(fd, 0o600)
                    if self.run_as.uid is not None and self.run_as.gid is not None:
                        os.fchown(fd, self.run_as.uid, self.run_as.gid)
                    os.write(fd, (password + "\n").encode())
                finally:
                    os.close(fd)
                argv.append(f"--pwfile={pwfile}")
            log.info("postgres_initdb_start", data_dir=str(self.data_dir), args=" ".join(extra_args))
            r = await run_program(argv, run_as=self.run_as, timeout=300, env=C_LOCALE, what="initdb")
        finally:
            if pwfile is not None:
                remove_file(Path(pwfile))
        if not r.ok:
            raise PgError(f"initdb failed (exit {r.returncode}):\n{r.tail(15)}")
        log.info("postgres_initdb_done", data_dir=str(self.data_dir))

    async def controldata(self) -> dict[str, str]:
        return await read_controldata(self.bin_dir, self.data_dir, self.run_as)

    async def system_identifier(self) -> str | None:
        if not self.is_initialized():
            return None
        return (await self.controldata()).get("Database system identifier")

    # ------------------------------------------------------------------ configuration

    async def write_config(
        self,
        params: dict[str, ParamValue],
        role: Role,
        upstream: Upstream | None,
        *,
        replication_password: str | None,
        replication_hosts: Iterable[str] = (),
    ) -> None:
        """Write every agent-owned file (see the module docstring).

        ``params`` is the complete parameter set (cluster, node-local and agent-computed values
        merged by the caller); agent-owned names in it are ignored.  Replication connections
        are admitted from loopback, this node's own listen and connect addresses, and
        ``replication_hosts`` (the members' published hosts).
        """
        if not self.is_initialized():
            raise PgError(f"cannot write configuration: {self.data_dir} is not initialized")
        try:
            conf = render_conf(
                params,
                role,
                upstream,
                listen_host=self.listen_host,
                port=self.port,
                socket_dir=self.socket_dir,
                replication_user=self.cfg.replication.username,
                passfile=self.pgpass_file if replication_password is not None else None,
                application_name=self.member_name,
                conninfo_options=self.tools_auth_options,
                tls=self.tls_paths,
                extra_socket_dirs=self.cfg.socket_dirs,
            )
            hba = render_pg_hba(
                extra_lines=list(self.cfg.pg_hba),
                superuser=self.cfg.superuser.username,
                replication_user=self.cfg.replication.username,
                replication_hosts=[*self.own_hosts(), *replication_hosts],
                tls=self.cfg.tls is not None,
                shared_sockets=bool(self.cfg.socket_dirs),
            )
            ident = render_pg_ident(superuser=self.cfg.superuser.username, os_users=self.superuser_os_users())
            pgpass = (
                render_pgpass([("*", "*", "*", self.cfg.replication.username, replication_password)])
                if replication_password is not None
                else None
            )
        except ValueError as e:
            raise PgError(f"cannot render configuration: {e}") from e
        await self.install_tls()
        await asyncio.to_thread(
            write_files,
            self.data_dir,
            self.run_as,
            conf=conf,
            hba=hba,
            ident=ident,
            pgpass=pgpass,
            pgpass_file=self.pgpass_file,
            socket_dir=self.socket_dir,
            role=role,
        )
        log.info(
            "postgres_config_written",
            role=str(role),
            upstream=upstream.address if upstream else None,
            slot=upstream.slot_name if upstream else None,
        )

    # ------------------------------------------------------------------ start / stop

    async def start(self, *, timeout: float, wait: bool = True) -> None:
        """``pg_ctl start -w``.  A no-op if already running.  On a timeout pg_ctl gives up waiting
        but the server may still be starting (e.g. long crash recovery): the error says so and
        the postmaster is left alone.

        ``wait=False`` (replicas) returns once the postmaster runs, without waiting for it to
        accept connections: a standby does so only once consistent, which may need WAL from a
        leader that first has to see this member (and create its slot) -- the agent must go on
        publishing meanwhile."""
        if self.is_running():
            log.info("postgres_start_skipped", reason="already running", pid=self.postmaster_pid())
            return
        if not self.is_initialized():
            raise PgError(f"cannot start: {self.data_dir} is not initialized")
        remove_stale_pidfile(self.data_dir, self.socket_dir)
        try:
            await asyncio.to_thread(mkdir_owned, self.log_file.parent, self.run_as)
        except UnsafePathError as e:
            log.error("postgres_start_refused", reason=str(e))
            raise PgError(f"cannot start: {e}") from None
        try:
            offset = self.log_file.stat().st_size
        except FileNotFoundError:
            offset = 0
        secs = max(1, math.ceil(timeout))
        log.info("postgres_starting", data_dir=str(self.data_dir), port=self.port)
        t0 = time.monotonic()
        r = await run_program(
            [
                self.program("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-w" if wait else "-W",
                "-t",
                str(secs),
                "-l",
                str(self.log_file),
            ],
            run_as=self.run_as,
            timeout=secs + 15,
            what="start",
        )
        if r.ok and not wait:
            # Up when postmaster.pid names a live postgres; a bad config makes it exit at once.
            for _ in range(min(secs, 30) * 20):
                if self.is_running():
                    break
                await asyncio.sleep(0.05)
            if self.is_running():
                log.info("postgres_started", pid=self.postmaster_pid(), waited_for_ready=False)
                return
            tail = log_tail(self.log_file, offset)
            raise PgError(f"PostgreSQL exited right after starting\n--- {self.log_file} ---\n{tail}")
        if not r.ok:
            still = " (the postmaster is still running)" if self.is_running() else ""
            tail = log_tail(self.log_file, offset)
            raise PgError(
                f"PostgreSQL failed to start{still}: pg_ctl exited {r.returncode}: {r.tail(4)}\n"
                f"--- {self.log_file} ---\n{tail}"
            )
        log.info("postgres_started", pid=self.postmaster_pid(), seconds=round(time.monotonic() - t0, 3))

    async def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60
    ) -> None:
        await self.session.close()
        pid = self.postmaster_pid()
        if pid is None:
            return
        modes: list[str] = [mode] if mode == "immediate" else [mode, "immediate"]
        for i, m in enumerate(modes):
            t = timeout if i == 0 else max(5.0, min(timeout, 30.0))
            secs = max(1, math.ceil(t))
            log.info("postgres_stopping", mode=m, pid=pid)
            r = await run_program(
                [self.program("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", m, "-w", "-t", str(secs)],
                run_as=self.run_as,
                timeout=secs + 10,
                what="stop",
            )
            if not self.is_running():
                log.info("postgres_stopped", mode=m, pid=pid)
                return
            log.warning("postgres_stop_failed", mode=m, pid=pid, output=r.tail(4))
        await kill_postmaster(pid, self.data_dir, self.socket_dir)

    async def reload(self) -> None:
        """Re-read the configuration files (``pg_ctl reload``); primary_conninfo and
        primary_slot_name are reloadable in PostgreSQL 13+."""
        if not self.is_running():
            raise PgError("cannot reload: PostgreSQL is not running")
        r = await run_program(
            [self.program("pg_ctl"), "reload", "-D", str(self.data_dir)],
            run_as=self.run_as,
            timeout=30,
            what="reload",
        )
        if not r.ok:
            raise PgError(f"pg_ctl reload failed: {r.tail(4)}")
        log.info("postgres_reloaded")

    # ------------------------------------------------------------------ SQL

    async def probe(self, *, timeout: float = 2.0) -> LocalState:
        """One round trip on the persistent probe connection.  Never raises for "down"."""
        if not self.is_running():
            await self.session.drop_probe_conn()
            return LocalState.down("postmaster is not running")
        return await self.session.probe(timeout=timeout)

    async def checkpoint(self, *, timeout: float = 300) -> None:
        await self.session.execute("CHECKPOINT", timeout=timeout)

    async def promote(self, *, timeout: float = 30) -> None:
        (in_recovery,) = (await self.session.execute("SELECT pg_is_in_recovery()"))[0]
        if not in_recovery:
            log.info("postgres_promote_skipped", reason="not in recovery")
            return
        secs = max(1, math.ceil(timeout))
        summarizer = await wal_summarizer_pid(self.session)
        log.info("postgres_promoting", wal_summarizer=summarizer)
        t0 = time.monotonic()
        nudge = (
            None
            if summarizer is None
            else asyncio.create_task(nudge_wal_summarizer(self.data_dir, summarizer))
        )
        try:
            (done,) = (
                await self.session.execute("SELECT pg_promote(true, %s::int)", (secs,), timeout=secs + 5)
            )[0]
        except PgError as e:
            raise PgError(f"promote failed: {e}", sqlstate=e.sqlstate) from e
        finally:
            if nudge is not None:
                nudge.cancel()
                await asyncio.gather(nudge, return_exceptions=True)
        (in_recovery,) = (await self.session.execute("SELECT pg_is_in_recovery()"))[0]
        if not done or in_recovery:
            raise PgError(f"promote: still in recovery after {secs}s")
        log.info("postgres_promoted", seconds=round(time.monotonic() - t0, 3))

    async def create_roles(
        self, *, superuser_password: str | None, replication_user: str, replication_password: str | None
    ) -> None:
        """Create/alter the replication role and set passwords.  Passwords are hashed (SCRAM)
        here, so the server never sees (or logs) the plain text."""
        su = self.cfg.superuser.username

        if superuser_password is not None:
            v = await self.session.scram_verifier(superuser_password, su)
            await self.session.execute(
                pgsql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(pgsql.Identifier(su), pgsql.Literal(v))
            )
        exists = await self.session.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (replication_user,))
        verb = "ALTER" if exists else "CREATE"
        stmt = pgsql.SQL(verb + " ROLE {} WITH LOGIN REPLICATION").format(pgsql.Identifier(replication_user))
        if replication_password is not None:
            v = await self.session.scram_verifier(replication_password, replication_user)
            stmt = pgsql.SQL("{} PASSWORD {}").format(stmt, pgsql.Literal(v))
        await self.session.execute(stmt)
        log.info(
            "postgres_roles_ensured",
            superuser=su,
            replication_user=replication_user,
            created=not exists,
        )

    async def list_slots(self) -> dict[str, SlotInfo]:
        rows = await self.session.execute(
            "SELECT slot_name, active, restart_lsn::text FROM pg_replication_slots"
            " WHERE slot_type = 'physical' AND NOT temporary ORDER BY slot_name"
        )
        return {name: SlotInfo(bool(active), parse_lsn(lsn)) for name, active, lsn in rows}

    async def ensure_slots(
        self, wanted: set[str], *, droppable: set[str] | frozenset[str] = frozenset()
    ) -> tuple[list[str], list[str]]:
        """Create the physical slots in ``wanted``; drop the inactive ones in ``droppable`` that
        are not wanted.  Only the caller knows which slots hakeeper made (one per member it has
        seen): any other slot -- a user's, another tool's -- is never dropped, whatever its name."""
        have = await self.list_slots()
        created: list[str] = []
        dropped: list[str] = []
        for name in sorted(wanted - set(have)):
            try:
                await self.session.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))
            except PgError as e:
                if e.sqlstate == "42710":  # duplicate_object: created concurrently
                    continue
                raise
            created.append(name)
            log.info("slot_created", slot=name)
        for name, info in sorted(have.items()):
            if name in wanted or name not in droppable or info.active:
                continue
            try:
                await self.session.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            except PgError as e:
                if e.sqlstate in ("55006", "42704"):  # object_in_use (became active), undefined_object
                    log.info("slot_drop_skipped", slot=name, sqlstate=e.sqlstate)
                    continue
                raise
            dropped.append(name)
            log.info("slot_dropped", slot=name)
        return created, dropped

    # ------------------------------------------------------------------ data directory

    def move_data_dir_aside(self) -> Path:
        """Rename the data directory to ``<data_dir>.failed-<UTC time>`` (kept for an operator,
        never deleted) and return the new path; an OSError (a mount point, a parent we may not
        write) leaves it where it is."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.data_dir.with_name(f"{self.data_dir.name}.failed-{stamp}")
        n = 1
        while os.path.lexists(dest):
            dest = self.data_dir.with_name(f"{self.data_dir.name}.failed-{stamp}-{n}")
            n += 1
        os.rename(self.data_dir, dest)
        log.warning("postgres_data_dir_moved_aside", data_dir=str(self.data_dir), moved_to=str(dest))
        return dest

    def remove_data_dir(self) -> None:
        """Delete the data directory's contents, then the directory itself if we may."""
        d = self.data_dir
        if not d.exists():
            return
        for child in list(d.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        try:
            d.rmdir()
        except OSError as e:
            log.info("postgres_data_dir_kept_empty", data_dir=str(d), reason=e.strerror)
        log.info("postgres_data_dir_removed", data_dir=str(d))


async def wal_summarizer_pid(session: SqlSession) -> int | None:
    """The WAL summarizer's PID on a 17+ server with ``summarize_wal`` on, else None.

    With WAL archiving on too, a promotion waits at the end of recovery until the
    summarizer has summarized the old timeline's WAL (before its last segment becomes
    ``.partial``), and nothing wakes the summarizer for it: idle, it sleeps up to 30 s
    between looks at the WAL, so the promotion took that long (measured on 18.6: 23.8 s
    after 40 s idle; docs/versions.md)."""
    try:
        rows = await session.execute(
            "SELECT current_setting('server_version_num')::int >= 170000"
            " AND current_setting('summarize_wal', true) = 'on'"
        )
        if not rows or not rows[0][0]:
            return None
        rows = await session.execute("SELECT summarizer_pid FROM pg_get_wal_summarizer_state()")
    except PgError as e:
        log.debug("wal_summarizer_pid_unknown", error=str(e))
        return None
    pid = rows[0][0] if rows else None
    return int(pid) if isinstance(pid, int) and pid > 0 else None


async def nudge_wal_summarizer(data_dir: Path, pid: int, every: float = 0.05) -> None:
    """Wake the WAL summarizer (SIGUSR1 sets its latch, as PostgreSQL's own wakeup does)
    every ``every`` seconds while a promotion waits for it.  Only while ``pid`` is still a
    child of this data directory's postmaster: never a signal to a recycled PID."""
    pm = postmaster_pid(data_dir)
    while pm is not None and parent_pid(pid) == pm:
        try:
            os.kill(pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError) as e:
            log.info("wal_summarizer_nudge_stopped", pid=pid, reason=str(e))
            return
        await asyncio.sleep(every)
