"""The leader's heartbeat row (issue 6, item 5a).

While this node is the lease-holding primary, :class:`Heartbeat` upserts its row in
``hakeeper.heartbeat (node text primary key, ts timestamptz, term bigint)`` of the ``postgres``
database every ``backup.heartbeat_interval`` seconds (creating the schema and table first).  So
an idle primary still writes WAL, the archive RPO (hakeeper/backup/archive/rpo.py) measures the age
of the newest durable *write* rather than of an idle segment, and a restore finds the newest
restorable time in the table.

It never blocks anything: its own task and its own connection (not the agent's), statement and
lock timeouts, and ``synchronous_commit = local`` (a synchronous standby that is gone must not
hold the heartbeat, which is not worth waiting for).  Failures are logged once per kind of error
and counted; the next beat retries on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import psycopg

from hakeeper.backup.basebackup import Endpoint, conn_kwargs
from hakeeper.core.config import Credentials
from hakeeper.util.log import get_logger

log = get_logger(__name__)

STATEMENT_TIMEOUT_MS = 2000
SETUP_SQL = (
    "CREATE SCHEMA IF NOT EXISTS hakeeper",
    "CREATE TABLE IF NOT EXISTS hakeeper.heartbeat"
    " (node text PRIMARY KEY, ts timestamptz NOT NULL, term bigint NOT NULL DEFAULT 0)",
)
BEAT_SQL = (
    "INSERT INTO hakeeper.heartbeat (node, ts, term) VALUES (%s, now(), %s)"
    " ON CONFLICT (node) DO UPDATE SET ts = excluded.ts, term = excluded.term"
)


class Heartbeat:
    """``beat()`` every ``interval`` seconds while ``term()`` returns our term (None: not now)."""

    def __init__(
        self,
        *,
        node: str,
        endpoint: Endpoint,
        superuser: Credentials,
        interval: float,
        term: Callable[[], int | None],
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        self.superuser = superuser
        self.interval = interval
        self.term = term
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.table_ready = False
        self.beats = 0
        self.failures = 0
        self.last_beat_at: float | None = None  # wall clock of the last committed beat
        self.last_error: str | None = None

    async def run(self) -> None:
        log.info("heartbeat_started", interval=self.interval, table="hakeeper.heartbeat")
        try:
            while self.interval > 0:  # a reload that turns the heartbeat off sets 0
                try:
                    term = self.term()
                    if term is not None:
                        await self.beat(term)
                except Exception:  # an optional feature must never end the agent's task group
                    log.exception("heartbeat_error")
                    await self.close()
                await asyncio.sleep(self.interval)
        finally:
            await self.close()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def beat(self, term: int) -> bool:
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT_MS / 1000 + 3):
                if self.conn is None or self.conn.closed:
                    kw = conn_kwargs(self.endpoint, self.superuser, timeout=3)
                    kw["options"] = (
                        f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS}"
                        " -c synchronous_commit=local"
                    )
                    kw["application_name"] = "hakeeper-heartbeat"
                    self.conn = await psycopg.AsyncConnection.connect(**kw)
                if not self.table_ready:
                    for stmt in SETUP_SQL:
                        await self.conn.execute(stmt)
                    self.table_ready = True
                await self.conn.execute(BEAT_SQL, (self.node, term))
        except (psycopg.Error, OSError, TimeoutError) as e:
            error = f"{type(e).__name__}: {str(e).strip()}" if str(e).strip() else type(e).__name__
            self.failures += 1
            if error != self.last_error:
                log.warning("heartbeat_failed", error=error)
            self.last_error = error
            await self.close()
            return False
        if self.last_error is not None:
            log.info("heartbeat_back", failures=self.failures)
        self.last_error = None
        self.beats += 1
        self.last_beat_at = time.time()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "beats": self.beats,
            "failures": self.failures,
            "last_beat_at": self.last_beat_at,
            "last_error": self.last_error,
        }
