"""What would keep a member from a major upgrade (``POST /upgrade/check``): changes nothing.

Every member: the target major's binaries, a data directory of an older major, PostgreSQL
running; a replica: streaming from the leader, room for the clone; the primary: our own checks
and ``pg_upgrade --check`` against the live server, with a throwaway new cluster initdb'ed
beside it (:mod:`hakeeper.pg.upgrade`)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path
from typing import Any

from hakeeper.ha.actions.context import Ctx
from hakeeper.ha.reinit import dir_size
from hakeeper.ha.upgradejob import problem
from hakeeper.pg import upgrade as pgu
from hakeeper.pg.bins import bin_dir_for_major
from hakeeper.pg.errors import PgError
from hakeeper.pg.version import data_dir_major
from hakeeper.util.proc import CommandFailed


def free_port() -> int:
    """A port number for pg_upgrade's own servers (they listen on a Unix socket only, in a
    directory of their own: the number names the socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def member_problems(
    ctx: Ctx, to_major: int, method: pgu.Method
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pg, pgc = ctx.pg, ctx.cfg.postgresql
    problems: list[dict[str, Any]] = []
    major = data_dir_major(pg.data_dir)
    facts: dict[str, Any] = {"major": major, "to_major": to_major, "bin_dir": None}
    new_bin, looked = await asyncio.to_thread(bin_dir_for_major, to_major, pgc.bin_dir, pgc.bin_dirs)
    if new_bin is None:
        problems.append(
            problem(
                "binaries",
                f"no PostgreSQL {to_major} binaries on {ctx.name} (looked in {looked})",
                f"install PostgreSQL {to_major} there, or set postgresql.bin_dirs.{to_major} "
                "in its node file",
            )
        )
    else:
        facts["bin_dir"] = str(new_bin)
    if major is None:
        problems.append(problem("data directory", f"{pg.data_dir} holds no cluster", "let it clone first"))
        return problems, facts
    if major >= to_major:
        problems.append(
            problem("version", f"{ctx.name} already runs PostgreSQL {major}", "nothing to upgrade here")
        )
        return problems, facts
    probe = await pg.probe()
    facts["role"] = "primary" if probe.in_recovery is False else "replica"
    facts["data_bytes"] = await asyncio.to_thread(dir_size, pg.data_dir)
    if not probe.running:
        problems.append(
            problem("running", f"PostgreSQL is not running on {ctx.name}", "start it (hakeeper restart)")
        )
        return problems, facts
    if probe.in_recovery:
        up = ctx.state.upstream
        if up is None or probe.streaming_from != up.address:
            problems.append(
                problem(
                    "replication",
                    f"{ctx.name} does not stream from the leader "
                    f"({probe.error or 'no WAL receiver streaming'})",
                    "fix its replication first (hakeeper list shows why; hakeeper reinit rebuilds it)",
                )
            )
        need = int(facts["data_bytes"])
        free = (await asyncio.to_thread(shutil.disk_usage, pg.data_dir.parent)).free
        if free + need < need * 1.1:  # the clone replaces the old copy: room for ~one copy
            problems.append(
                problem("disk space", f"{free >> 20} MiB free for a {need >> 20} MiB clone", None)
            )
        return problems, facts
    if new_bin is not None:
        problems += await _primary_problems(ctx, new_bin, to_major, method)
    return problems, facts


async def _primary_problems(
    ctx: Ctx, new_bin: Path, to_major: int, method: pgu.Method
) -> list[dict[str, Any]]:
    """pg_upgrade --check (and our own checks) against the live primary, with a throwaway
    new cluster initdb'ed beside it."""
    pg = ctx.pg
    try:
        facts = await inspect(ctx)
        scratch = pg.data_dir.with_name(f"{pg.data_dir.name}.upgrade-check-{to_major}")
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        try:
            await pgu.init_new_cluster(facts, new_bin, pg.run_as, scratch)
            found = await pgu.check_upgrade(
                facts,
                new_bin,
                scratch,
                method=method,
                run_as=pg.run_as,
                old_port=pg.port,
                new_port=free_port(),
                socket_dir=pg.socket_dir,
                new_preload=None,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
    except (PgError, CommandFailed, OSError) as e:
        return [problem("pg_upgrade --check", str(e), None)]
    return [problem(p.check, p.text, p.fix, p.log_file) for p in found]


async def inspect(ctx: Ctx) -> pgu.ClusterFacts:
    pg = ctx.pg
    return await pgu.inspect_cluster(
        pg.data_dir,
        pg.bin_dir,
        pg.run_as,
        host=str(pg.socket_dir),
        port=pg.port,
        user=ctx.cfg.postgresql.superuser.username,
    )
