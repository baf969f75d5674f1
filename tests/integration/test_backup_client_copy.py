"""The indexed (client-compressed) copy's reader thread against a real PostgreSQL: a primary whose
WAL is never archived holds pg_basebackup's stream after pg_control; the reader's silence check
ends the backup after ``wal_timeout`` (not the 300 s idle timeout) and says why, and no
pg_basebackup or reader thread is left behind."""

from __future__ import annotations

import os
import threading
import time

import pytest

from hakeeper.backup.basebackup import BackupError
from tests.integration.test_backup_restore import area, backup, fs_env, sql, start_primary  # noqa: F401
from tests.support.pg import PgArea

pytestmark = pytest.mark.integration


def test_client_copy_gives_up_when_the_server_waits_for_archiving(area: PgArea) -> None:  # noqa: F811
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    sql(p, "ALTER SYSTEM SET archive_command = '/bin/false'")  # the backup's last segment never leaves
    sql(p, "SELECT pg_reload_conf()")
    time.sleep(0.5)
    threads_before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(BackupError, match="waited more than 4s for the archiving"):
        backup(env, "p", wal_timeout=4, compress_on="client")
    took = time.monotonic() - t0
    assert took < 60, took  # the WAL timeout ended it, not the 300 s idle timeout
    time.sleep(0.5)
    assert threading.active_count() <= threads_before + 1  # the stager thread may have started
    # pg_basebackup was killed (the walsender itself may wait for the archive a while longer:
    # it notices the closed connection only when it sends again)
    assert _pg_basebackups(p) == []


def _pg_basebackups(port: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"pg_basebackup") and any(f"port={port}".encode() in a for a in cmd):
            found.append(int(d))
    return found
