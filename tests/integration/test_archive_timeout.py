"""archive_timeout on an agent-managed PostgreSQL 15 primary (docs/wal-archiving.md).

PostgreSQL 15's checkpointer starts before recovery ends and takes its first sleep (up to
checkpoint_timeout, 5 min) without archive_timeout; a clean start does not wake it, so a freshly
started primary did not switch segments on archive_timeout for minutes.  The agent wakes it with
a reload once per postmaster.  Here a primary that only writes heartbeats (every second) must
ship a segment at least every archive_timeout (5 s) right after the cluster is ready, without
anybody calling pg_switch_wal().
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from pathlib import Path

import pytest

from hakeeper.backup.layout import wal_prefix
from hakeeper.backup.repo import FilesystemRepository
from tests.integration.test_ha import sql, wait_for
from tests.support.cluster import cluster_tmpdir, running_cluster

pytestmark = pytest.mark.integration

SCOPE = "atimeout"
ARCHIVE_TIMEOUT = 5


def archived_segments(repo_dir: Path) -> set[str]:
    """Names of the WAL segments in the repository (no history or backup files)."""

    async def go() -> set[str]:
        repo = FilesystemRepository(repo_dir, name="fs")
        try:
            entries = await repo.list_objects(wal_prefix(SCOPE))
        finally:
            await repo.close()
        names = {e.name.rsplit("/", 1)[1] for e in entries}
        return {n for n in names if len(n) == 24}

    return asyncio.run(go())


def test_an_idle_heartbeating_primary_ships_a_segment_every_archive_timeout_from_its_start() -> None:
    repo_dir = cluster_tmpdir("hk-atimeout-repo-")
    backup = {
        "repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}],
        "schedules": [],
        "heartbeat_interval": 1,
    }
    dynamic = {"postgresql": {"parameters": {"archive_timeout": f"{ARCHIVE_TIMEOUT}s"}}}
    try:
        with running_cluster(nodes=1, backup=backup, scope=SCOPE, dynamic=dynamic) as c:
            node = c.names[0]
            try:
                assert sql(c, node, "SHOW archive_timeout") == [(f"{ARCHIVE_TIMEOUT}s",)]
                wait_for(
                    lambda: sql(c, node, "SELECT to_regclass('hakeeper.heartbeat') IS NOT NULL")[0][0],
                    30,
                    "the heartbeat table",
                )
                # from here on, only the heartbeat writes; watch the archive for 20 s
                t0 = time.monotonic()
                before = archived_segments(repo_dir)
                seen: list[tuple[float, str]] = []
                while time.monotonic() - t0 < 20:
                    time.sleep(0.5)
                    new = archived_segments(repo_dir) - before - {n for _, n in seen}
                    seen.extend((time.monotonic() - t0, n) for n in sorted(new))
                # one segment per archive_timeout: about 4 in 20 s (the heartbeat makes each one
                # "important" WAL); without the checkpointer wake-up there were none
                assert len(seen) >= 3, (seen, sql(c, node, "SELECT * FROM pg_stat_archiver"))
                first = seen[0][0]
                assert first <= ARCHIVE_TIMEOUT + 3, seen
                gaps = [b - a for (a, _), (b, _) in itertools.pairwise(seen)]
                assert max(gaps) <= ARCHIVE_TIMEOUT + 3, seen
                assert "checkpointer_woken" in c.tail_log(node, 2000)
            except BaseException:
                print(f"--- agent log ---\n{c.tail_log(node, 60)}")
                raise
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
