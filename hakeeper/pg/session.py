"""The agent's SQL connections to its local PostgreSQL, as the superuser.

Two persistent connections: the probe must not queue behind a slow CHECKPOINT/promote on the
other one.  Each is reopened when it breaks, times out or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from hakeeper.core.config import PostgresConfig, PostgresTls, secret_value
from hakeeper.core.pgtypes import LocalState
from hakeeper.pg.conf import auth_options, build_conninfo, tls_options
from hakeeper.pg.errors import PgError
from hakeeper.pg.probe import PROBE_SQL, state_from_row


def client_auth_options(tls: PostgresTls | None = None) -> dict[str, str]:
    """:func:`~hakeeper.pg.conf.auth_options` for psycopg's own libpq (psycopg-binary bundles
    one, usually newer than the system's); with ``tls`` (a connection to another member) also
    :func:`~hakeeper.pg.conf.tls_options` against its CA file, which the agent reads itself."""
    version = psycopg.pq.version()
    cafile = str(tls.cafile) if tls is not None else None
    return {**auth_options(version), **tls_options(cafile, version)}


def conn_kwargs(
    cfg: PostgresConfig, host: str, port: int, *, statement_timeout_ms: int, connect_timeout: float
) -> dict[str, Any]:
    """psycopg connection arguments for the superuser of ``cfg`` on ``host``:``port``."""
    conninfo = build_conninfo(
        host=host,
        port=port,
        user=cfg.superuser.username,
        dbname="postgres",
        application_name="hakeeper",
        connect_timeout=max(2, math.ceil(connect_timeout)),
        gssencmode="disable",
        # An SQL_ASCII database would otherwise hand every text column back as bytes.
        client_encoding="UTF8",
        # Over TCP the server must ask for SCRAM.  Not on our own Unix socket: it is in a private
        # directory of our data directory (nobody can stand in for the server there), and pg_hba
        # trusts the superuser on it (a restored cluster's roles still have the source's passwords).
        # No verify-full here even with TLS: this is the node's own server, reached on its listen
        # address (127.0.0.1 for a wildcard), which its certificate need not name.
        **({} if host.startswith("/") else client_auth_options()),
    )
    kw: dict[str, Any] = {
        "conninfo": conninfo,
        "autocommit": True,
        # The agent's own transactions (roles, passwords) must never wait for a synchronous
        # standby: in strict mode on a fresh cluster none can connect before they commit.
        "options": f"-c statement_timeout={statement_timeout_ms} -c synchronous_commit=local",
    }
    password = secret_value(cfg.superuser.password)
    if password is not None:
        kw["password"] = password
    return kw


async def close_quietly(conn: psycopg.AsyncConnection[Any] | None) -> None:
    """Close ``conn`` if open, giving up after 2 s and ignoring errors (it is being dropped)."""
    if conn is None or conn.closed:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await conn.close()


def is_usable(conn: psycopg.AsyncConnection[Any] | None) -> bool:
    """Open, not broken, and idle (not in the middle of a transaction)."""
    return (
        conn is not None
        and not conn.closed
        and not conn.broken
        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    )


class SqlSession:
    """The superuser's probe and statement connections to the PostgreSQL of ``data_dir``.
    ``host`` is where they connect (TCP host, or a Unix socket directory); a change applies to
    the connections opened after the next :meth:`close`.  Probe and execute may run
    concurrently with each other."""

    def __init__(self, cfg: PostgresConfig, *, host: str, port: int, data_dir: Path) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self._probe_conn: psycopg.AsyncConnection[Any] | None = None
        self._probe_lock = asyncio.Lock()
        self._exec_conn: psycopg.AsyncConnection[Any] | None = None
        self._exec_lock = asyncio.Lock()
        self._exec_stmt_timeout_ms: int | None = None

    async def probe(self, *, timeout: float) -> LocalState:
        """One round trip of :data:`~hakeeper.pg.probe.PROBE_SQL` on the probe connection.
        Never raises for "down": a failure is a down state with the reason."""
        async with self._probe_lock:
            try:
                async with asyncio.timeout(timeout):
                    if not is_usable(self._probe_conn):
                        await close_quietly(self._probe_conn)
                        self._probe_conn = None
                        self._probe_conn = await psycopg.AsyncConnection.connect(
                            **conn_kwargs(
                                self.cfg,
                                self.host,
                                self.port,
                                statement_timeout_ms=max(100, int(timeout * 1000)),
                                connect_timeout=timeout,
                            )
                        )
                    assert self._probe_conn is not None
                    cur = await self._probe_conn.execute(PROBE_SQL)
                    row = await cur.fetchone()
                    # sent by the server at connect (no query): 170010 for 17.10
                    version_num = self._probe_conn.info.server_version
            except TimeoutError:
                await self._drop_probe_conn_locked()
                return LocalState.down(f"probe timed out after {timeout}s")
            except psycopg.Error as e:
                if not is_usable(self._probe_conn):
                    await self._drop_probe_conn_locked()
                return LocalState.down(f"{type(e).__name__}: {str(e).strip()}")
            except OSError as e:
                await self._drop_probe_conn_locked()
                return LocalState.down(f"{type(e).__name__}: {e}")
        assert row is not None
        return state_from_row(row, data_dir=self.data_dir, port=self.port, server_version_num=version_num)

    async def drop_probe_conn(self) -> None:
        """Close the probe connection (the server is gone; the next probe reconnects)."""
        async with self._probe_lock:
            await self._drop_probe_conn_locked()

    async def _drop_probe_conn_locked(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        await close_quietly(conn)

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
                    if not is_usable(self._exec_conn):
                        await close_quietly(self._exec_conn)
                        self._exec_conn = None
                        self._exec_conn = await psycopg.AsyncConnection.connect(
                            **conn_kwargs(
                                self.cfg,
                                self.host,
                                self.port,
                                statement_timeout_ms=ms,
                                connect_timeout=min(timeout, 10),
                            )
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
                if isinstance(e, TimeoutError | asyncio.CancelledError) or not is_usable(self._exec_conn):
                    conn, self._exec_conn = self._exec_conn, None
                    await close_quietly(conn)
                raise

    async def scram_verifier(self, password: str, user: str) -> str:
        """The SCRAM-SHA-256 verifier of ``password`` for ``user``, computed by libpq on this
        side, so the server never sees (or logs) the plain text."""
        conn = self._exec_conn
        if conn is None or conn.closed:
            await self.execute("SELECT 1")
            conn = self._exec_conn
        assert conn is not None
        return conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()

    async def close(self) -> None:
        """Close both connections (the next probe or statement reconnects)."""
        async with self._probe_lock:
            await self._drop_probe_conn_locked()
        async with self._exec_lock:
            conn, self._exec_conn = self._exec_conn, None
            await close_quietly(conn)
