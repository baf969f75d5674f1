"""The load a chaos run puts on the cluster, and what it saw.

* The **writer** inserts unique ids through the multi-host DSN (``target_session_attrs=
  read-write``), one at a time, reconnecting after errors -- an application's view.
* A **probe** per node tries a tiny insert on that node every 50 ms over a session it keeps open
  -- the view of a client that still reaches an old primary.  It is what catches a second
  writable node.

Every attempt is recorded with the runner's monotonic clock: when it was sent, when it was
answered, and its outcome:

* ``ok``: the server acknowledged the commit.  The row must survive (in sync and quorum modes);
* ``failed``: the server answered with an error and the session is still usable, so the
  transaction certainly did not commit;
* ``unknown``: no answer in time, or the connection broke -- the commit may or may not have
  happened (a sync-rep wait cut short by a shutdown commits locally, for instance).

Acknowledged inserts return the timeline they were written on (the first 8 hex digits of
``pg_walfile_name``, which uses the insertion timeline) and the WAL insert position just before
their commit record, for the timeline audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from hakeeper.core.lsn import parse_lsn

INSERT = (
    "INSERT INTO chaos_acks (id, src) VALUES (%s, %s) "
    "RETURNING pg_walfile_name(pg_current_wal_insert_lsn()), pg_current_wal_insert_lsn()::text"
)
SCHEMA = "CREATE TABLE IF NOT EXISTS chaos_acks (id bigint PRIMARY KEY, src text NOT NULL)"
PROBE_ID_OFFSET = 100_000_000  # probe ids of node i start at run base + offset * i
RUN_ID_SPAN = 1_000_000_000  # every run owns [run * span, (run + 1) * span)


@dataclass(slots=True)
class Attempt:
    src: str  # "writer" or the probed node's name
    id: int
    send: float
    done: float
    outcome: str  # ok | failed | unknown
    node: str | None = None  # who acknowledged (ok only)
    tli: int | None = None
    lsn: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Recorder:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.attempts: list[Attempt] = []

    def now(self) -> float:
        return time.monotonic() - self.t0


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


async def _attempt(
    conn: psycopg.AsyncConnection[Any], rec: Recorder, src: str, ident: int, timeout: float, node_of: Any
) -> Attempt:
    send = rec.now()
    try:
        async with asyncio.timeout(timeout):
            cur = await conn.execute(INSERT, (ident, src))
            row = await cur.fetchone()
    except TimeoutError:
        return Attempt(src, ident, send, rec.now(), "unknown", error="no answer in time")
    except psycopg.Error as e:
        outcome = "unknown" if conn.closed or conn.broken else "failed"
        return Attempt(src, ident, send, rec.now(), outcome, error=_short(e))
    done = rec.now()
    assert row is not None
    node = node_of(conn.info.host, conn.info.port)
    return Attempt(
        src, ident, send, done, "ok", node=node, tli=int(str(row[0])[:8], 16), lsn=parse_lsn(str(row[1]))
    )


async def _connect(dsn: str, timeout: float) -> psycopg.AsyncConnection[Any] | None:
    try:
        async with asyncio.timeout(timeout):
            return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except (psycopg.Error, TimeoutError, OSError):
        return None


async def _close(conn: psycopg.AsyncConnection[Any] | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await conn.close()


async def writer(
    dsn: str, rec: Recorder, first_id: int, stop: asyncio.Event, node_of: Any, interval: float = 0.02
) -> None:
    ident = first_id
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        while not stop.is_set():
            if conn is None or conn.closed:
                conn = await _connect(dsn, 5.0)
                if conn is None:
                    await asyncio.sleep(0.05)
                    continue
            a = await _attempt(conn, rec, "writer", ident, 5.0, node_of)
            rec.attempts.append(a)
            ident += 1
            if a.outcome != "ok":
                await _close(conn)
                conn = None
            await asyncio.sleep(interval)
    finally:
        await _close(conn)


async def probe(
    name: str,
    dsn: str,
    rec: Recorder,
    first_id: int,
    stop: asyncio.Event,
    node_of: Any,
    interval: float = 0.05,
) -> None:
    ident = first_id
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        while not stop.is_set():
            t = time.monotonic()
            if conn is None or conn.closed:
                conn = await _connect(dsn, 2.0)
            if conn is not None:
                a = await _attempt(conn, rec, name, ident, 2.0, node_of)
                ident += 1
                if a.outcome != "failed" or a.error is None or "read-only" not in a.error:
                    rec.attempts.append(a)  # read-only refusals of a replica are the normal case
                if a.outcome == "unknown":
                    await _close(conn)
                    conn = None
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t)))
    finally:
        await _close(conn)
