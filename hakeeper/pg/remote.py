"""Questions asked of another member's PostgreSQL (not the local one)."""

from __future__ import annotations

import asyncio
import time

import psycopg

from hakeeper.core.config import PostgresTls
from hakeeper.core.lsn import parse_lsn
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.session import client_auth_options
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.pg")


async def wait_received(
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
    """Poll the standby ``name`` directly until it has received (or replayed) WAL past ``lsn``;
    False when ``lsn`` is unknown or ``timeout`` seconds passed."""
    if lsn is None:
        return False
    deadline = time.monotonic() + timeout
    conninfo = build_conninfo(
        host=host,
        port=port,
        user=user,
        password=password,
        dbname="postgres",
        connect_timeout=2,
        application_name="hakeeper-switchover",
        **client_auth_options(tls),
    )
    while time.monotonic() < deadline:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                while time.monotonic() < deadline:
                    cur = await conn.execute(
                        "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
                    )
                    row = await cur.fetchone()
                    got = max((parse_lsn(x) or 0) for x in (row or (None, None)))
                    if got > lsn:
                        return True
                    await asyncio.sleep(0.01)
        except psycopg.Error as e:
            log.warning("switchover_candidate_unreachable", candidate=name, error=str(e).strip())
            await asyncio.sleep(0.1)
    return False
