"""The local PostgreSQL instance: initdb, configuration, start/stop, promotion, probing, slots,
cloning (pg_basebackup) and rewinding (pg_rewind).

Every PostgreSQL program runs through :func:`hakeeper.util.proc.run` as ``run_as`` (the unprivileged
OS user when we are root).  SQL goes over TCP to ``postgresql.listen`` as the superuser.

Files the agent owns inside the data directory, rewritten by :meth:`Postgres.write_config` before
every start and after every clone or rewind (both copy the source's files):

* ``postgresql.conf``  - all parameters, agent-owned ones last;
* ``pg_hba.conf``;
* ``standby.signal``   - present iff the role is replica;
* ``hakeeper.pgpass``  - the replication password for ``primary_conninfo`` (mode 0600);
* ``postgresql.auto.conf`` - kept, minus any line setting an agent-owned parameter.

The Unix socket is in ``<data_dir>/pg_stat_tmp`` (private; see SOCKET_SUBDIR).

The server log (``pg_ctl -l``) is ``<data_dir>/log/postgresql.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql as pgsql

from hakeeper.core.config import (
    AGENT_OWNED_PARAMETERS,
    AGENT_SET_PARAMETERS,
    ParamValue,
    PostgresConfig,
    secret_value,
)
from hakeeper.core.lsn import parse_lsn
from hakeeper.core.pgtypes import LocalState, ReplicaInfo, Role, SlotInfo, Upstream, hostport
from hakeeper.pg.bins import find_bin_dir
from hakeeper.pg.conf import (
    build_conninfo,
    clean_auto_conf,
    parse_controldata,
    render_pg_hba,
    render_pgpass,
    render_postgresql_conf,
)
from hakeeper.pg.errors import PgError
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.fsutil import write_atomic
from hakeeper.util.log import get_logger
from hakeeper.util.proc import Result, RunAs, children_of, pid_alive, postmaster_pid, resolve_run_as, run

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

PGPASS_NAME = "hakeeper.pgpass"
LOG_DIR_NAME = "log"
LOG_FILE_NAME = "postgresql.log"
# The Unix socket lives in a private directory inside the data dir, but not in the data dir's
# top level: pg_rewind fetches every file of the source's data dir and fails on a socket.  The
# contents of pg_stat_tmp are skipped by both pg_rewind and pg_basebackup (documented), the
# directory exists in every cluster, and it is 0700 like the data dir.
SOCKET_SUBDIR = "pg_stat_tmp"
# sun_path is 108 bytes including the NUL.
_MAX_SOCKET_PATH = 107
_CLEAN_STATES = ("shut down", "shut down in recovery")
# Keep C-locale output from pg_controldata & co. (we parse it).
_C_LOCALE = {"LC_ALL": "C", "LC_MESSAGES": "C", "LANG": "C"}


_PROBE_SQL = """
SELECT
  pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
  pg_last_wal_receive_lsn()::text,
  pg_last_wal_replay_lsn()::text,
  (SELECT timeline_id FROM pg_control_checkpoint()),
  (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
  CASE WHEN pg_is_in_recovery() THEN
    (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir()
      WHERE name ~ '^[0-9A-F]{8}[.]history$') END,
  (SELECT json_build_object('status', status, 'tli', received_tli,
                            'host', sender_host, 'port', sender_port)
     FROM pg_stat_wal_receiver LIMIT 1),
  (SELECT coalesce(json_agg(json_build_object(
            'application_name', application_name, 'state', state, 'sync_state', sync_state,
            'sent_lsn', sent_lsn::text, 'write_lsn', write_lsn::text,
            'flush_lsn', flush_lsn::text, 'replay_lsn', replay_lsn::text,
            'replay_lag', extract(epoch FROM replay_lag), 'client_addr', client_addr::text,
            'reply_age', extract(epoch FROM now() - reply_time))
          ORDER BY application_name), '[]'::json)
     FROM pg_stat_replication),
  current_setting('data_directory')
"""


def _listen_to_connect_host(host: str) -> str:
    """Where to connect locally, given the host PostgreSQL listens on."""
    if host in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


_DIVERGED = re.compile(r"servers diverged at WAL location ([0-9A-Fa-f]+/[0-9A-Fa-f]+) on timeline (\d+)")


class Postgres:
    """Drives one local PostgreSQL data directory.  Not safe for concurrent lifecycle calls
    (start/stop/rewind/clone); probe and execute may run concurrently with each other."""

    def __init__(self, cfg: PostgresConfig, *, member_name: str, run_as: RunAs | None = None) -> None:
        self.cfg = cfg
        self.member_name = member_name
        self.data_dir = Path(os.path.abspath(cfg.data_dir))
        self.bin_dir = find_bin_dir(cfg.bin_dir)
        self.run_as = run_as if run_as is not None else resolve_run_as(self.data_dir, cfg.os_user)
        listen_host, self.port = cfg.listen_host_port
        self.listen_host = listen_host
        self.connect_host = _listen_to_connect_host(listen_host)
        # Two persistent connections: the probe must not queue behind a slow CHECKPOINT/promote.
        self._probe_conn: psycopg.AsyncConnection[Any] | None = None
        self._probe_lock = asyncio.Lock()
        self._exec_conn: psycopg.AsyncConnection[Any] | None = None
        self._exec_lock = asyncio.Lock()
        self._exec_stmt_timeout_ms: int | None = None

    # ------------------------------------------------------------------ paths & processes

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_DIR_NAME / LOG_FILE_NAME

    @property
    def pgpass_file(self) -> Path:
        return self.data_dir / PGPASS_NAME

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def postmaster_pid(self) -> int | None:
        """PID from postmaster.pid if that process is alive and is this data dir's postgres."""
        return postmaster_pid(self.data_dir)

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def _remove_stale_pidfile(self) -> None:
        """Drop postmaster.pid (and the socket lock files) when their postmaster is gone.
        PostgreSQL itself only asks kill(pid, 0), which succeeds for an unreaped zombie (a killed
        postmaster whose parent is a non-reaping init) or a reused PID, and then refuses to
        start.  The socket directory is private to this data dir, so its locks are ours."""
        if self.is_running():
            return
        pidfile = self.data_dir / "postmaster.pid"
        try:
            stale = pidfile.read_text().split("\n", 1)[0].strip()
        except OSError:
            stale = None
        if _remove(pidfile):
            log.warning("postgres_stale_pidfile_removed", pid=stale)
        with contextlib.suppress(OSError):
            for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
                _remove(lock)
                _remove(lock.with_suffix(""))

    async def _run(
        self,
        argv: list[str],
        *,
        timeout: float | None,
        env: Mapping[str, str] | None = None,
        what: str,
    ) -> Result:
        try:
            return await run(argv, run_as=self.run_as, env=env, timeout=timeout, check=False)
        except TimeoutError as e:
            raise PgError(f"{what}: {Path(argv[0]).name} did not finish within {timeout:.0f}s") from e
        except OSError as e:
            raise PgError(f"{what}: cannot run {argv[0]}: {e}") from e

    def _mkdir_owned(self, path: Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self.run_as.chown(path)

    # ------------------------------------------------------------------ initdb & controldata

    async def initdb(self, extra_args: list[str]) -> None:
        if self.is_initialized():
            raise PgError(f"{self.data_dir} is already initialized")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PgError(f"cannot initdb: {self.data_dir} exists and is not empty")
        self._mkdir_owned(self.data_dir)
        su = self.cfg.superuser
        argv = [
            self._bin("initdb"),
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
                fd, pwfile = tempfile.mkstemp(prefix="hakeeper-pw-")
                try:
                    os.fchmod(fd, 0o600)
                    if self.run_as.uid is not None and self.run_as.gid is not None:
                        os.fchown(fd, self.run_as.uid, self.run_as.gid)
                    os.write(fd, (password + "\n").encode())
                finally:
                    os.close(fd)
                argv.append(f"--pwfile={pwfile}")
            log.info("postgres_initdb_start", data_dir=str(self.data_dir), args=" ".join(extra_args))
            r = await self._run(argv, timeout=300, env=_C_LOCALE, what="initdb")
        finally:
            if pwfile is not None:
                _remove(Path(pwfile))
        if not r.ok:
            raise PgError(f"initdb failed (exit {r.returncode}):\n{r.tail(15)}")
        log.info("postgres_initdb_done", data_dir=str(self.data_dir))

    async def controldata(self) -> dict[str, str]:
        r = await self._run(
            [self._bin("pg_controldata"), "-D", str(self.data_dir)],
            timeout=30,
            env=_C_LOCALE,
            what="pg_controldata",
        )
        if not r.ok:
            raise PgError(f"pg_controldata failed (exit {r.returncode}): {r.tail(5)}")
        return parse_controldata(r.stdout)

    async def system_identifier(self) -> str | None:
        if not self.is_initialized():
            return None
        return (await self.controldata()).get("Database system identifier")

    # ------------------------------------------------------------------ configuration

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / SOCKET_SUBDIR

    def _socket_dir_value(self) -> str:
        path = str(self.socket_dir)
        if len(path) + len(f"/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            log.warning("postgres_socket_disabled", reason="data_dir path too long for a Unix socket")
            return ""
        if '"' in path:
            log.warning("postgres_socket_disabled", reason="data_dir path contains a double quote")
            return ""
        if any(c in path for c in ", \t"):
            return f'"{path}"'
        return path

    def _render_conf(
        self, params: Mapping[str, ParamValue], role: Role, upstream: Upstream | None, has_passfile: bool
    ) -> str:
        merged: dict[str, ParamValue] = {}
        for name in sorted(params):
            if name.lower() in AGENT_OWNED_PARAMETERS - AGENT_SET_PARAMETERS:
                log.warning("postgres_param_ignored", param=name, reason="managed by hakeeper")
                continue
            merged[name] = params[name]
        merged["listen_addresses"] = self.listen_host or "*"
        merged["port"] = self.port
        merged["unix_socket_directories"] = self._socket_dir_value()
        merged["hot_standby"] = True
        merged["recovery_target_timeline"] = "latest"
        if role is Role.REPLICA and upstream is not None:
            merged["primary_conninfo"] = build_conninfo(
                host=upstream.host,
                port=upstream.port,
                user=self.cfg.replication.username,
                passfile=str(self.pgpass_file) if has_passfile else None,
                application_name=self.member_name,
                gssencmode="disable",
            )
            if upstream.slot_name:
                merged["primary_slot_name"] = upstream.slot_name
        return render_postgresql_conf(merged)

    async def write_config(
        self,
        params: dict[str, ParamValue],
        role: Role,
        upstream: Upstream | None,
        *,
        replication_password: str | None,
        password_auth: bool | None = None,
    ) -> None:
        """Write every agent-owned file (see the module docstring).

        ``params`` is the complete parameter set (cluster, node-local and agent-computed values
        merged by the caller); agent-owned names in it are ignored.  ``password_auth`` (default:
        the superuser has a password) selects scram-sha-256 over trust for TCP in pg_hba.conf.
        """
        if not self.is_initialized():
            raise PgError(f"cannot write configuration: {self.data_dir} is not initialized")
        if password_auth is None:
            password_auth = self.cfg.superuser.password is not None
        try:
            conf = self._render_conf(params, role, upstream, replication_password is not None)
            hba = render_pg_hba(
                extra_lines=list(self.cfg.pg_hba),
                superuser=self.cfg.superuser.username,
                replication_user=self.cfg.replication.username,
                password_auth=password_auth,
            )
            pgpass = (
                render_pgpass([("*", "*", "*", self.cfg.replication.username, replication_password)])
                if replication_password is not None
                else None
            )
        except ValueError as e:
            raise PgError(f"cannot render configuration: {e}") from e
        await asyncio.to_thread(self._write_files, conf, hba, pgpass, role)
        log.info(
            "postgres_config_written",
            role=str(role),
            upstream=upstream.address if upstream else None,
            slot=upstream.slot_name if upstream else None,
        )

    def _write_files(self, conf: str, hba: str, pgpass: str | None, role: Role) -> None:
        d = self.data_dir
        ra = self.run_as
        if pgpass is not None:
            write_atomic(self.pgpass_file, pgpass, mode=0o600, run_as=ra)
        else:
            _remove(self.pgpass_file)
        write_atomic(d / "postgresql.conf", conf, mode=0o600, run_as=ra)
        write_atomic(d / "pg_hba.conf", hba, mode=0o600, run_as=ra)
        auto = d / "postgresql.auto.conf"
        try:
            old = auto.read_text()
        except FileNotFoundError:
            old = None
        if old is not None:
            new = clean_auto_conf(old)
            if new != old:
                write_atomic(auto, new, mode=0o600, run_as=ra)
                log.info("postgres_auto_conf_cleaned", file=str(auto))
        if not self.socket_dir.is_dir():
            self._mkdir_owned(self.socket_dir)
        _remove(d / "recovery.signal")
        if role is Role.REPLICA:
            write_atomic(d / "standby.signal", "", mode=0o600, run_as=ra)
        else:
            _remove(d / "standby.signal")
        _fsync_dir(d)

    # ------------------------------------------------------------------ start / stop

    def _log_tail(self, offset: int, lines: int = 20) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                data = f.read()[-64 * 1024 :]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])

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
        self._remove_stale_pidfile()
        await asyncio.to_thread(self._mkdir_owned, self.log_file.parent)
        try:
            offset = self.log_file.stat().st_size
        except FileNotFoundError:
            offset = 0
        secs = max(1, math.ceil(timeout))
        log.info("postgres_starting", data_dir=str(self.data_dir), port=self.port)
        t0 = time.monotonic()
        r = await self._run(
            [
                self._bin("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-w" if wait else "-W",
                "-t",
                str(secs),
                "-l",
                str(self.log_file),
            ],
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
            raise PgError(
                f"PostgreSQL exited right after starting\n--- {self.log_file} ---\n{self._log_tail(offset)}"
            )
        if not r.ok:
            still = " (the postmaster is still running)" if self.is_running() else ""
            tail = self._log_tail(offset)
            raise PgError(
                f"PostgreSQL failed to start{still}: pg_ctl exited {r.returncode}: {r.tail(4)}\n"
                f"--- {self.log_file} ---\n{tail}"
            )
        log.info("postgres_started", pid=self.postmaster_pid(), seconds=round(time.monotonic() - t0, 3))

    async def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60
    ) -> None:
        await self.close()
        pid = self.postmaster_pid()
        if pid is None:
            return
        modes: list[str] = [mode] if mode == "immediate" else [mode, "immediate"]
        for i, m in enumerate(modes):
            t = timeout if i == 0 else max(5.0, min(timeout, 30.0))
            secs = max(1, math.ceil(t))
            log.info("postgres_stopping", mode=m, pid=pid)
            r = await self._run(
                [self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", m, "-w", "-t", str(secs)],
                timeout=secs + 10,
                what="stop",
            )
            if not self.is_running():
                log.info("postgres_stopped", mode=m, pid=pid)
                return
            log.warning("postgres_stop_failed", mode=m, pid=pid, output=r.tail(4))
        await self._kill(pid)

    async def _kill(self, pid: int) -> None:
        """SIGKILL the postmaster and its children (so none keeps the shared memory attached)."""
        kids = children_of(pid)
        log.warning("postgres_killing", pid=pid, children=len(kids))
        for p in (pid, *kids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not pid_alive(pid) and not any(pid_alive(k) for k in kids):
                self._remove_stale_pidfile()
                return
            await asyncio.sleep(0.05)
        raise PgError(f"postmaster {pid} survived SIGKILL")

    async def reload(self) -> None:
        """Re-read the configuration files (``pg_ctl reload``); primary_conninfo and
        primary_slot_name are reloadable in PostgreSQL 13+."""
        if not self.is_running():
            raise PgError("cannot reload: PostgreSQL is not running")
        r = await self._run(
            [self._bin("pg_ctl"), "reload", "-D", str(self.data_dir)], timeout=30, what="reload"
        )
        if not r.ok:
            raise PgError(f"pg_ctl reload failed: {r.tail(4)}")
        log.info("postgres_reloaded")

    # ------------------------------------------------------------------ SQL

    def _conn_kwargs(self, statement_timeout_ms: int, connect_timeout: float) -> dict[str, Any]:
        conninfo = build_conninfo(
            host=self.connect_host,
            port=self.port,
            user=self.cfg.superuser.username,
            dbname="postgres",
            application_name="hakeeper",
            connect_timeout=max(2, math.ceil(connect_timeout)),
            gssencmode="disable",
            # An SQL_ASCII database would otherwise hand every text column back as bytes.
            client_encoding="UTF8",
        )
        kw: dict[str, Any] = {
            "conninfo": conninfo,
            "autocommit": True,
            # The agent's own transactions (roles, passwords) must never wait for a synchronous
            # standby: in strict mode on a fresh cluster none can connect before they commit.
            "options": f"-c statement_timeout={statement_timeout_ms} -c synchronous_commit=local",
        }
        password = secret_value(self.cfg.superuser.password)
        if password is not None:
            kw["password"] = password
        return kw

    @staticmethod
    async def _close_conn(conn: psycopg.AsyncConnection[Any] | None) -> None:
        if conn is None or conn.closed:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await conn.close()

    @staticmethod
    def _usable(conn: psycopg.AsyncConnection[Any] | None) -> bool:
        return (
            conn is not None
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )

    async def probe(self, *, timeout: float = 2.0) -> LocalState:
        """One round trip on the persistent probe connection.  Never raises for "down"."""
        if not self.is_running():
            await self._drop_probe_conn()
            return LocalState.down("postmaster is not running")
        async with self._probe_lock:
            try:
                async with asyncio.timeout(timeout):
                    if not self._usable(self._probe_conn):
                        await self._close_conn(self._probe_conn)
                        self._probe_conn = None
                        self._probe_conn = await psycopg.AsyncConnection.connect(
                            **self._conn_kwargs(max(100, int(timeout * 1000)), timeout)
                        )
                    assert self._probe_conn is not None
                    cur = await self._probe_conn.execute(_PROBE_SQL)
                    row = await cur.fetchone()
            except TimeoutError:
                await self._drop_probe_conn_locked()
                return LocalState.down(f"probe timed out after {timeout}s")
            except psycopg.Error as e:
                if not self._usable(self._probe_conn):
                    await self._drop_probe_conn_locked()
                return LocalState.down(f"{type(e).__name__}: {str(e).strip()}")
            except OSError as e:
                await self._drop_probe_conn_locked()
                return LocalState.down(f"{type(e).__name__}: {e}")
        assert row is not None
        return self._state_from_row(row)

    def _state_from_row(self, row: tuple[Any, ...]) -> LocalState:
        (
            in_recovery,
            cur_lsn,
            walfile,
            recv,
            replay,
            ckpt_tli,
            minrec_tli,
            hist_tli,
            receiver,
            repl,
            data_dir,
        ) = row
        if os.path.realpath(str(data_dir)) != os.path.realpath(self.data_dir):
            return LocalState.down(
                f"port {self.port} is served by another PostgreSQL (data_directory={data_dir})"
            )
        if not in_recovery:
            replicas = tuple(
                ReplicaInfo(
                    application_name=r["application_name"] or "",
                    state=r["state"],
                    sync_state=r["sync_state"],
                    sent_lsn=parse_lsn(r["sent_lsn"]),
                    write_lsn=parse_lsn(r["write_lsn"]),
                    flush_lsn=parse_lsn(r["flush_lsn"]),
                    replay_lsn=parse_lsn(r["replay_lsn"]),
                    replay_lag=None if r["replay_lag"] is None else float(r["replay_lag"]),
                    client_addr=r["client_addr"],
                    reply_age=None if r.get("reply_age") is None else float(r["reply_age"]),
                )
                for r in (repl or [])
            )
            return LocalState(
                running=True,
                in_recovery=False,
                timeline=int(walfile[:8], 16) if walfile else None,
                wal_lsn=parse_lsn(cur_lsn),
                received_lsn=None,
                replayed_lsn=None,
                streaming_from=None,
                replication=replicas,
            )
        received = parse_lsn(recv)
        replayed = parse_lsn(replay)
        streaming_from = None
        # Timeline sources, the highest wins: the WAL receiver's (exact, but gone as soon as the
        # upstream dies, i.e. exactly during a failover); the newest timeline history file in
        # pg_wal (a standby fetches N.history when it follows timeline N, pg_rewind copies them,
        # a diverged old primary never has the newer one); and pg_control's restartpoint and
        # min-recovery timelines, which lag until the next restartpoint.
        tlis = [int(t) for t in (ckpt_tli, minrec_tli, hist_tli) if t]
        if receiver:
            if receiver.get("tli"):
                tlis.append(int(receiver["tli"]))
            if receiver.get("status") == "streaming" and receiver.get("host") is not None:
                streaming_from = hostport(str(receiver["host"]), int(receiver["port"] or 0))
        timeline = max(tlis) if tlis else None
        known = [x for x in (received, replayed) if x is not None]
        return LocalState(
            running=True,
            in_recovery=True,
            timeline=timeline,
            wal_lsn=max(known) if known else None,
            received_lsn=received,
            replayed_lsn=replayed,
            streaming_from=streaming_from,
            replication=(),
        )

    async def _drop_probe_conn(self) -> None:
        async with self._probe_lock:
            await self._drop_probe_conn_locked()

    async def _drop_probe_conn_locked(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        await self._close_conn(conn)

    async def execute(
        self, sql: str | pgsql.SQL | pgsql.Composed, params: tuple[object, ...] = (), *, timeout: float = 5.0
    ) -> list[tuple[Any, ...]]:
        """Run one statement on the (persistent) superuser connection; returns its rows.
        ``timeout`` is enforced by the server (statement_timeout) and by the client.  Any failure
        (connection, SQL error, timeout) raises :class:`PgError` (``sqlstate`` set for SQL errors)."""
        try:
            return await self._execute_raw(sql, params, timeout=timeout)
        except psycopg.Error as e:
            raise PgError(f"{type(e).__name__}: {str(e).strip()}", sqlstate=e.sqlstate) from e
        except TimeoutError as e:
            raise PgError(f"statement did not finish within {timeout}s") from e

    async def _execute_raw(
        self, sql: str | pgsql.SQL | pgsql.Composed, params: tuple[object, ...], *, timeout: float
    ) -> list[tuple[Any, ...]]:
        ms = max(1, int(timeout * 1000))
        async with self._exec_lock:
            try:
                async with asyncio.timeout(timeout + 2):
                    if not self._usable(self._exec_conn):
                        await self._close_conn(self._exec_conn)
                        self._exec_conn = None
                        self._exec_conn = await psycopg.AsyncConnection.connect(
                            **self._conn_kwargs(ms, min(timeout, 10))
                        )
                        self._exec_stmt_timeout_ms = ms
                    conn = self._exec_conn
                    assert conn is not None
                    if self._exec_stmt_timeout_ms != ms:
                        await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(ms),))
                        self._exec_stmt_timeout_ms = ms
                    cur = await conn.execute(sql, params or None)
                    return await cur.fetchall() if cur.description is not None else []
            except BaseException as e:
                # After a timeout/cancellation or a broken link, start afresh next time.
                if isinstance(e, TimeoutError | asyncio.CancelledError) or not self._usable(self._exec_conn):
                    conn, self._exec_conn = self._exec_conn, None
                    await self._close_conn(conn)
                raise

    async def checkpoint(self, *, timeout: float = 300) -> None:
        await self.execute("CHECKPOINT", timeout=timeout)

    async def promote(self, *, timeout: float = 30) -> None:
        (in_recovery,) = (await self.execute("SELECT pg_is_in_recovery()"))[0]
        if not in_recovery:
            log.info("postgres_promote_skipped", reason="not in recovery")
            return
        secs = max(1, math.ceil(timeout))
        log.info("postgres_promoting")
        t0 = time.monotonic()
        try:
            (done,) = (await self.execute("SELECT pg_promote(true, %s::int)", (secs,), timeout=secs + 5))[0]
        except PgError as e:
            raise PgError(f"promote failed: {e}", sqlstate=e.sqlstate) from e
        (in_recovery,) = (await self.execute("SELECT pg_is_in_recovery()"))[0]
        if not done or in_recovery:
            raise PgError(f"promote: still in recovery after {secs}s")
        log.info("postgres_promoted", seconds=round(time.monotonic() - t0, 3))

    async def create_roles(
        self, *, superuser_password: str | None, replication_user: str, replication_password: str | None
    ) -> None:
        """Create/alter the replication role and set passwords.  Passwords are hashed (SCRAM)
        here, so the server never sees (or logs) the plain text."""
        su = self.cfg.superuser.username

        async def verifier(password: str, user: str) -> str:
            conn = self._exec_conn
            if conn is None or conn.closed:
                await self.execute("SELECT 1")
                conn = self._exec_conn
            assert conn is not None
            return conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()

        if superuser_password is not None:
            v = await verifier(superuser_password, su)
            await self.execute(
                pgsql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(pgsql.Identifier(su), pgsql.Literal(v))
            )
        exists = await self.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (replication_user,))
        verb = "ALTER" if exists else "CREATE"
        stmt = pgsql.SQL(verb + " ROLE {} WITH LOGIN REPLICATION").format(pgsql.Identifier(replication_user))
        if replication_password is not None:
            v = await verifier(replication_password, replication_user)
            stmt = pgsql.SQL("{} PASSWORD {}").format(stmt, pgsql.Literal(v))
        await self.execute(stmt)
        log.info(
            "postgres_roles_ensured",
            superuser=su,
            replication_user=replication_user,
            created=not exists,
        )

    async def list_slots(self) -> dict[str, SlotInfo]:
        rows = await self.execute(
            "SELECT slot_name, active, restart_lsn::text FROM pg_replication_slots"
            " WHERE slot_type = 'physical' AND NOT temporary ORDER BY slot_name"
        )
        return {name: SlotInfo(bool(active), parse_lsn(lsn)) for name, active, lsn in rows}

    async def ensure_slots(
        self, wanted: set[str], *, keep: set[str] | frozenset[str] = frozenset()
    ) -> tuple[list[str], list[str]]:
        have = await self.list_slots()
        created: list[str] = []
        dropped: list[str] = []
        for name in sorted(wanted - set(have)):
            try:
                await self.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))
            except PgError as e:
                if e.sqlstate == "42710":  # duplicate_object: created concurrently
                    continue
                raise
            created.append(name)
            log.info("slot_created", slot=name)
        for name, info in sorted(have.items()):
            if name in wanted or name in keep or info.active:
                continue
            try:
                await self.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            except PgError as e:
                if e.sqlstate in ("55006", "42704"):  # object_in_use (became active), undefined_object
                    log.info("slot_drop_skipped", slot=name, sqlstate=e.sqlstate)
                    continue
                raise
            dropped.append(name)
            log.info("slot_dropped", slot=name)
        return created, dropped

    # ------------------------------------------------------------------ clone / rewind

    def _data_dir_empty(self) -> bool:
        return not self.data_dir.exists() or not any(self.data_dir.iterdir())

    async def clone_from(
        self,
        source: Upstream,
        *,
        replication_user: str,
        replication_password: str | None,
        timeout: float = 3600,
    ) -> None:
        """pg_basebackup into an empty or missing data dir (the slot must already exist on the
        source).  Call write_config afterwards.  On failure the partial data dir is removed."""
        if self.is_running():
            raise PgError("cannot clone: PostgreSQL is running on this data directory")
        if not self._data_dir_empty():
            raise PgError(f"cannot clone: {self.data_dir} is not empty")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._mkdir_owned(self.data_dir)
        conninfo = build_conninfo(
            host=source.host,
            port=source.port,
            user=replication_user,
            application_name=f"{self.member_name}-clone",
            connect_timeout=10,
            gssencmode="disable",
        )
        argv = [
            self._bin("pg_basebackup"),
            "-D",
            str(self.data_dir),
            "-d",
            conninfo,
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-password",
        ]
        if source.slot_name:
            argv += ["-S", source.slot_name]
        env = dict(_C_LOCALE)
        if replication_password is not None:
            env["PGPASSWORD"] = replication_password
        log.info("postgres_clone_start", source=source.address, slot=source.slot_name)
        t0 = time.monotonic()
        try:
            r = await self._run(argv, timeout=timeout, env=env, what="clone")
            if not r.ok:
                raise PgError(
                    f"pg_basebackup from {source.address} failed (exit {r.returncode}):\n{r.tail(10)}"
                )
        except BaseException:
            await asyncio.to_thread(self.remove_data_dir)
            raise
        # The source's server log came along; it is not ours.
        _remove(self.log_file)
        log.info("postgres_clone_done", source=source.address, seconds=round(time.monotonic() - t0, 3))

    async def _crash_recover(self) -> None:
        """Bring an uncleanly stopped data dir to a clean shutdown with single-user mode (what
        pg_rewind needs).  Single-user mode refuses standby.signal, so the signal files go (the
        caller rewrites them with write_config)."""
        for name in ("standby.signal", "recovery.signal"):
            _remove(self.data_dir / name)
        self._remove_stale_pidfile()
        log.info("postgres_crash_recovery_start")
        r = await self._run(
            [
                self._bin("postgres"),
                "--single",
                "-F",
                "-D",
                str(self.data_dir),
                "-c",
                "archive_mode=off",
                "template1",
            ],
            timeout=3600,
            env=_C_LOCALE,
            what="crash recovery",
        )
        if not r.ok:
            raise PgError(f"single-user crash recovery failed (exit {r.returncode}):\n{r.tail(10)}")
        log.info("postgres_crash_recovery_done")

    async def _source_checkpoint(self, source: Upstream, superuser: str, password: str | None) -> None:
        """A just-promoted source's pg_control still shows the old timeline until its first
        checkpoint, and pg_rewind would then see nothing to rewind.  Best effort."""
        kw: dict[str, Any] = {
            "conninfo": build_conninfo(
                host=source.host,
                port=source.port,
                user=superuser,
                dbname="postgres",
                application_name="hakeeper",
                connect_timeout=5,
                gssencmode="disable",
            ),
            "autocommit": True,
        }
        if password is not None:
            kw["password"] = password
        try:
            async with asyncio.timeout(120):
                async with await psycopg.AsyncConnection.connect(**kw) as conn:
                    await conn.execute("CHECKPOINT")
        except (psycopg.Error, TimeoutError, OSError) as e:
            log.warning("rewind_source_checkpoint_failed", source=source.address, error=str(e).strip())

    async def rewind(
        self, source: Upstream, *, superuser: str, superuser_password: str | None, timeout: float = 600
    ) -> None:
        if self.is_running():
            raise PgError("cannot rewind: PostgreSQL is running on this data directory")
        if not self.is_initialized():
            raise PgError(f"cannot rewind: {self.data_dir} is not initialized")
        state = (await self.controldata()).get("Database cluster state", "")
        if state not in _CLEAN_STATES:
            log.info("postgres_not_shut_down_cleanly", state=state)
            await self._crash_recover()
        await self._source_checkpoint(source, superuser, superuser_password)
        conninfo = build_conninfo(
            host=source.host,
            port=source.port,
            user=superuser,
            dbname="postgres",
            application_name=f"{self.member_name}-rewind",
            connect_timeout=10,
            gssencmode="disable",
        )
        env = dict(_C_LOCALE)
        if superuser_password is not None:
            env["PGPASSWORD"] = superuser_password
        log.info("postgres_rewind_start", source=source.address)
        t0 = time.monotonic()
        r = await self._run(
            [
                self._bin("pg_rewind"),
                f"--target-pgdata={self.data_dir}",
                f"--source-server={conninfo}",
                "--no-ensure-shutdown",
            ],
            timeout=timeout,
            env=env,
            what="rewind",
        )
        if not r.ok:
            raise PgError(f"pg_rewind from {source.address} failed (exit {r.returncode}):\n{r.tail(12)}")
        log.info(
            "postgres_rewind_done",
            source=source.address,
            seconds=round(time.monotonic() - t0, 3),
            output=r.tail(2),
        )
        out = r.stdout + "\n" + r.stderr
        fork = _DIVERGED.search(out)
        if fork is not None and "no rewind required" in out:
            await self._check_no_wal_past(int(fork.group(2)), fork.group(1))

    async def _check_no_wal_past(self, timeline: int, lsn: str) -> None:
        """pg_rewind judges "no rewind required" from the control file (the last checkpoint or
        minRecoveryPoint), but a standby shut down in recovery may hold WAL in pg_wal past both:
        WAL it received from the old primary that the new one never had (an async replica ahead
        of the promoted sync standby).  Replayed at start, it puts the server past the fork point
        and it can never follow the new timeline.  pg_waldump tells whether a record exists at
        or after the fork point on our timeline; if so, the directory must be re-cloned."""
        r = await self._run(
            [
                self._bin("pg_waldump"),
                f"--path={self.data_dir / 'pg_wal'}",
                f"--timeline={timeline}",
                f"--start={lsn}",
                "--limit=1",
            ],
            timeout=60,
            env=dict(_C_LOCALE),
            what="waldump",
        )
        if r.ok and r.stdout.strip():
            raise PgError(
                f"pg_rewind found nothing to rewind, but pg_wal holds WAL past the fork point {lsn} "
                f"on timeline {timeline} (received from the old primary, never on the new one): "
                "this replica cannot follow the new timeline"
            )

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

    async def close(self) -> None:
        async with self._probe_lock:
            await self._drop_probe_conn_locked()
        async with self._exec_lock:
            conn, self._exec_conn = self._exec_conn, None
            await self._close_conn(conn)
