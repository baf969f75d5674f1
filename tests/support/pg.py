"""Helpers for tests that run real PostgreSQL servers.

``PgArea`` is a temporary directory the PostgreSQL OS user can traverse (pytest's tmp_path is
root-owned 0700), node configurations on free ports inside it, and a cleanup that kills, by PID,
every postmaster whose data directory lives in it, then removes the directory.

    area = PgArea()
    try:
        cfg = area.node_config("node1")
        ...
    finally:
        area.cleanup()
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from hakeeper.core.config import PostgresConfig
from hakeeper.localcluster import pgbuilds
from hakeeper.util.proc import children_of, pid_alive, resolve_run_as
from tests.support.ports import free_ports

DEFAULT_PARAMS: dict[str, str | int | float | bool] = {
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "128MB",
    "wal_log_hints": "on",
    "hot_standby_feedback": "on",
    "max_connections": 30,
    "shared_buffers": "16MB",
    "password_encryption": "scram-sha-256",
    "fsync": "off",  # tests only: much faster, and crash safety is not under test here
    "log_line_prefix": "%m [%p] ",
}


def kill_postmaster(data_dir: Path) -> int | None:
    """SIGKILL the postmaster of ``data_dir`` (from its postmaster.pid) and its children; returns
    the PID killed, if any.  Only a live ``postgres`` process whose cwd is data_dir is touched."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cwd = os.path.realpath(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    if comm != "postgres" or cwd != os.path.realpath(data_dir):
        return None
    kids = children_of(pid)
    for p in (pid, *kids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (pid_alive(pid) or any(pid_alive(k) for k in kids)):
        time.sleep(0.05)
    return pid


@functools.cache
def bin_dir_under_test() -> Path:
    """The binaries of the major under test (``$TEST_PG_VERSION``, else 15) that PostgreSQL's OS
    user can run: the tests that start servers without LocalCluster use it, so that the matrix
    runs of `make integration` (17, 18) test those majors and not Debian's 15."""
    probe = Path(tempfile.gettempdir()) / "hk-pg-probe"  # a root-owned parent: the default OS user
    return pgbuilds.reachable_bin_dir(pgbuilds.default_major(), resolve_run_as(probe))


class PgArea:
    """A scratch directory (``/tmp/hk-pg-*``, mode 0755) for PostgreSQL data dirs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hk-pg-"))
        os.chmod(self.root, 0o755)
        self.data_dirs: list[Path] = []

    def data_dir(self, name: str) -> Path:
        d = self.root / name / "data"
        d.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(d.parent, 0o755)
        self.data_dirs.append(d)
        return d

    def node_config(self, name: str, port: int | None = None, **overrides: Any) -> PostgresConfig:
        if port is None:
            (port,) = free_ports(1)
        fields: dict[str, Any] = {
            "data_dir": self.data_dir(name),
            "listen": f"127.0.0.1:{port}",
            "superuser": {"username": "postgres", "password": "su-secret"},
            "replication": {"username": "replicator", "password": "repl-secret"},
            "bin_dir": bin_dir_under_test(),
        }
        fields.update(overrides)
        return PostgresConfig.model_validate(fields)

    def kill_all(self) -> list[int]:
        killed = []
        for d in self.data_dirs:
            pid = kill_postmaster(d)
            if pid is not None:
                killed.append(pid)
        return killed

    def cleanup(self) -> list[int]:
        killed = self.kill_all()
        shutil.rmtree(self.root, ignore_errors=True)
        return killed
