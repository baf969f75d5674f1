"""Exact row counts and their restore point (``record_row_counts``) against a real server.

A commit is WAL-logged before it becomes visible to new snapshots, and a synchronous commit
waits between the two: a restore to the point then holds a row no snapshot of the counting saw.
Found by the upgrade test (a drill of the backup taken under a writer: "recorded 387, restored
388")."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from hakeeper.backup.basebackup import Endpoint, record_row_counts
from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.pg import Postgres, Role
from tests.support.pg import DEFAULT_PARAMS, PgArea

pytestmark = pytest.mark.integration

PARAMS: dict[str, ParamValue] = {**DynamicConfig().cluster_parameters(), **DEFAULT_PARAMS}


async def test_a_commit_waiting_between_its_wal_and_its_visibility_makes_the_counts_inexact(
    area: PgArea,
) -> None:
    pg = Postgres(area.node_config("rc"), member_name="rc")
    await pg.initdb(["--encoding=UTF8", "--locale=C"])
    await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password="repl-secret")
    await pg.start(timeout=60)
    ep = Endpoint("rc", "127.0.0.1", pg.port)
    creds = pg.cfg.superuser
    dsn = f"host=127.0.0.1 port={pg.port} user=postgres password=su-secret dbname=postgres"
    try:
        await pg.session.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)")
        quiet = await record_row_counts(ep, creds, "B0", max_bytes=10**9, timeout=30)
        assert quiet.exact and quiet.tables["postgres"]["public.t"] == 10, quiet

        # a synchronous commit that waits for a standby that does not exist: its commit record
        # is in the WAL, the row is not visible yet
        await pg.session.execute("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")
        await pg.session.execute("SELECT pg_reload_conf()")
        waiter = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        insert = asyncio.ensure_future(waiter.execute("INSERT INTO t VALUES (11)"))
        for _ in range(100):
            rows = await pg.session.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            )
            if rows[0][0]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the INSERT never waited for synchronous replication")
        counted = await record_row_counts(ep, creds, "B1", max_bytes=10**9, timeout=30)
        assert counted.tables["postgres"]["public.t"] == 10
        assert not counted.exact, "a restore to its point replays the waiting commit: 11 rows"
        assert counted.inexact_reason and "postgres" in counted.inexact_reason
    finally:
        with contextlib.suppress(Exception):
            await pg.session.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await pg.session.execute("SELECT pg_reload_conf()")
        if "insert" in locals():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(insert, 10)
            await waiter.close()
        await pg.stop("immediate")
