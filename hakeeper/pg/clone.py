"""Cloning a data directory from a running server with pg_basebackup."""

from __future__ import annotations

import asyncio
import time

from hakeeper.core.pgtypes import Upstream
from hakeeper.pg.bins import C_LOCALE, run_program
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.errors import PgError
from hakeeper.pg.files import mkdir_owned, remove_file
from hakeeper.pg.postgres import Postgres
from hakeeper.util.log import get_logger

# The logger every part of local PostgreSQL control logs under (unchanged by the module split).
log = get_logger("hakeeper.pg.postgres")


async def clone_from(
    pg: Postgres,
    source: Upstream,
    *,
    replication_user: str,
    replication_password: str | None,
    timeout: float = 3600,
) -> None:
    """pg_basebackup into ``pg``'s empty or missing data dir (the slot must already exist on
    the source).  Call write_config afterwards.  On failure the partial data dir is removed."""
    if pg.is_running():
        raise PgError("cannot clone: PostgreSQL is running on this data directory")
    if pg.data_dir.exists() and any(pg.data_dir.iterdir()):
        raise PgError(f"cannot clone: {pg.data_dir} is not empty")
    pg.data_dir.parent.mkdir(parents=True, exist_ok=True)
    mkdir_owned(pg.data_dir, pg.run_as)
    await pg.install_tls()  # pg_basebackup verifies the source against the CA copy
    conninfo = build_conninfo(
        host=source.host,
        port=source.port,
        user=replication_user,
        application_name=f"{pg.member_name}-clone",
        connect_timeout=10,
        gssencmode="disable",
        **pg.tools_auth_options,
    )
    argv = [
        pg.program("pg_basebackup"),
        "-D",
        str(pg.data_dir),
        "-d",
        conninfo,
        "-X",
        "stream",
        "--checkpoint=fast",
        "--no-password",
    ]
    if source.slot_name:
        argv += ["-S", source.slot_name]
    env = dict(C_LOCALE)
    if replication_password is not None:
        env["PGPASSWORD"] = replication_password
    log.info("postgres_clone_start", source=source.address, slot=source.slot_name)
    t0 = time.monotonic()
    try:
        r = await run_program(argv, run_as=pg.run_as, timeout=timeout, env=env, what="clone")
        if not r.ok:
            raise PgError(f"pg_basebackup from {source.address} failed (exit {r.returncode}):\n{r.tail(10)}")
    except BaseException:
        await asyncio.to_thread(pg.remove_data_dir)
        raise
    # The source's server log came along; it is not ours.
    remove_file(pg.log_file)
    log.info("postgres_clone_done", source=source.address, seconds=round(time.monotonic() - t0, 3))
