"""Rewinding a data directory that diverged from a running server with pg_rewind, and what
that needs: a clean shutdown (crash recovery in single-user mode), a checkpoint on the source,
and a last check that no WAL past the fork point stays behind."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import psycopg

from hakeeper.core.config import PostgresTls
from hakeeper.core.pgtypes import Upstream
from hakeeper.pg.bins import C_LOCALE, run_program
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.errors import PgError
from hakeeper.pg.files import remove_file, remove_stale_pidfile
from hakeeper.pg.postgres import Postgres
from hakeeper.pg.session import client_auth_options
from hakeeper.util.log import get_logger

# The logger every part of local PostgreSQL control logs under (unchanged by the module split).
log = get_logger("hakeeper.pg.postgres")

_CLEAN_STATES = ("shut down", "shut down in recovery")
_DIVERGED = re.compile(r"servers diverged at WAL location ([0-9A-Fa-f]+/[0-9A-Fa-f]+) on timeline (\d+)")


async def rewind(
    pg: Postgres, source: Upstream, *, superuser: str, superuser_password: str | None, timeout: float = 600
) -> None:
    """pg_rewind ``pg``'s stopped data directory from ``source``.  Call write_config afterwards
    (pg_rewind copies the source's configuration files)."""
    if pg.is_running():
        raise PgError("cannot rewind: PostgreSQL is running on this data directory")
    if not pg.is_initialized():
        raise PgError(f"cannot rewind: {pg.data_dir} is not initialized")
    state = (await pg.controldata()).get("Database cluster state", "")
    if state not in _CLEAN_STATES:
        log.info("postgres_not_shut_down_cleanly", state=state)
        await crash_recover(pg)
    await checkpoint_source(source, superuser, superuser_password, tls=pg.cfg.tls)
    await pg.install_tls()  # pg_rewind verifies the source against the CA copy
    conninfo = build_conninfo(
        host=source.host,
        port=source.port,
        user=superuser,
        dbname="postgres",
        application_name=f"{pg.member_name}-rewind",
        connect_timeout=10,
        gssencmode="disable",
        **pg.tools_auth_options,
    )
    env = dict(C_LOCALE)
    if superuser_password is not None:
        env["PGPASSWORD"] = superuser_password
    log.info("postgres_rewind_start", source=source.address)
    t0 = time.monotonic()
    r = await run_program(
        [
            pg.program("pg_rewind"),
            f"--target-pgdata={pg.data_dir}",
            f"--source-server={conninfo}",
            "--no-ensure-shutdown",
        ],
        run_as=pg.run_as,
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
        await check_no_wal_past(pg, int(fork.group(2)), fork.group(1))


async def crash_recover(pg: Postgres) -> None:
    """Bring an uncleanly stopped data dir to a clean shutdown with single-user mode (what
    pg_rewind needs).  Single-user mode refuses standby.signal, so the signal files go (the
    caller rewrites them with write_config)."""
    for name in ("standby.signal", "recovery.signal"):
        remove_file(pg.data_dir / name)
    remove_stale_pidfile(pg.data_dir, pg.socket_dir)
    log.info("postgres_crash_recovery_start")
    r = await run_program(
        [
            pg.program("postgres"),
            "--single",
            "-F",
            "-D",
            str(pg.data_dir),
            "-c",
            "archive_mode=off",
            "template1",
        ],
        run_as=pg.run_as,
        timeout=3600,
        env=C_LOCALE,
        what="crash recovery",
    )
    if not r.ok:
        raise PgError(f"single-user crash recovery failed (exit {r.returncode}):\n{r.tail(10)}")
    log.info("postgres_crash_recovery_done")


async def checkpoint_source(
    source: Upstream, superuser: str, password: str | None, *, tls: PostgresTls | None = None
) -> None:
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
            **client_auth_options(tls),
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


async def check_no_wal_past(pg: Postgres, timeline: int, lsn: str) -> None:
    """pg_rewind judges "no rewind required" from the control file (the last checkpoint or
    minRecoveryPoint), but a standby shut down in recovery may hold WAL in pg_wal past both:
    WAL it received from the old primary that the new one never had (an async replica ahead
    of the promoted sync standby).  Replayed at start, it puts the server past the fork point
    and it can never follow the new timeline.  pg_waldump tells whether a record exists at
    or after the fork point on our timeline; if so, the directory must be re-cloned."""
    r = await run_program(
        [
            pg.program("pg_waldump"),
            f"--path={pg.data_dir / 'pg_wal'}",
            f"--timeline={timeline}",
            f"--start={lsn}",
            "--limit=1",
        ],
        run_as=pg.run_as,
        timeout=60,
        env=dict(C_LOCALE),
        what="waldump",
    )
    if r.ok and r.stdout.strip():
        raise PgError(
            f"pg_rewind found nothing to rewind, but pg_wal holds WAL past the fork point {lsn} "
            f"on timeline {timeline} (received from the old primary, never on the new one): "
            "this replica cannot follow the new timeline"
        )
