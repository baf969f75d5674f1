"""SQL about replication slots beyond the members' own physical ones (those are
:meth:`Postgres.ensure_slots`): list every slot with its failover state, create and drop the
permanent slots of the dynamic config.  Which major runs is not asked here: the probe's
``server_version`` and :mod:`hakeeper.pg.version` say it.

A logical slot belongs to one database: it is created on a connection to that database (the
agent's own connections go to ``postgres``)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from hakeeper.core.lsn import parse_lsn
from hakeeper.core.slots import SlotState
from hakeeper.pg.errors import PgError
from hakeeper.pg.session import SqlSession as Session
from hakeeper.pg.session import close_quietly, conn_kwargs

_COLUMNS = "slot_name, slot_type, database, plugin, active, restart_lsn::text, confirmed_flush_lsn::text"
# An invalidated copy (WAL removed, a conflict with recovery...) is of no use after a promotion:
# it reads as not synced, so `list` says so and a switchover to that member is refused.
LIST_SQL_17 = (
    f"SELECT {_COLUMNS}, failover, synced AND invalidation_reason IS NULL"
    " FROM pg_replication_slots WHERE NOT temporary ORDER BY 1"
)
# Before 17 there are no failover slots: both columns read as NULL (unknown, not false).
LIST_SQL_OLD = (
    f"SELECT {_COLUMNS}, NULL::bool, NULL::bool FROM pg_replication_slots WHERE NOT temporary ORDER BY 1"
)


def _lsn(v: object) -> int | None:
    return parse_lsn(str(v)) if v is not None else None


async def list_slots(session: Session, major: int) -> list[SlotState]:
    rows = await session.execute(LIST_SQL_17 if major >= 17 else LIST_SQL_OLD)
    return [
        SlotState(
            name=str(r[0]),
            type=str(r[1]),
            database=r[2],
            plugin=r[3],
            active=bool(r[4]),
            restart_lsn=_lsn(r[5]),
            confirmed_flush_lsn=_lsn(r[6]),
            failover=r[7],
            synced=r[8],
        )
        for r in rows
    ]


async def create_physical(session: Session, name: str) -> None:
    """A physical slot that reserves WAL from now on (``immediately_reserve``)."""
    await session.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))


async def create_logical(
    session: Session, name: str, *, database: str, plugin: str, failover: bool, timeout: float = 10.0
) -> None:
    """``pg_create_logical_replication_slot`` on a connection to ``database``, with ``failover``
    on 17+ (``failover=False`` uses the 4-argument form every supported major has).  Creating a
    logical slot waits for transactions running at that moment to end: bounded by ``timeout``."""
    kw = conn_kwargs(
        session.cfg,
        session.host,
        session.port,
        statement_timeout_ms=int(timeout * 1000),
        connect_timeout=timeout,
    )
    kw["conninfo"] = make_conninfo(kw["conninfo"], dbname=database, application_name="hakeeper-slots")
    sql = (
        "SELECT pg_create_logical_replication_slot(%s, %s, false, false, true)"
        if failover
        else "SELECT pg_create_logical_replication_slot(%s, %s, false, false)"
    )
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        async with asyncio.timeout(timeout + 2):
            conn = await psycopg.AsyncConnection.connect(**kw)
            await conn.execute(sql, (name, plugin))
    except psycopg.Error as e:
        raise PgError(f"{type(e).__name__}: {str(e).strip()}", sqlstate=e.sqlstate) from e
    except TimeoutError as e:
        raise PgError(f"creating logical slot {name} did not finish within {timeout}s") from e
    finally:
        await close_quietly(conn)


async def drop_slot(session: Session, name: str) -> None:
    await session.execute("SELECT pg_drop_replication_slot(%s)", (name,))
