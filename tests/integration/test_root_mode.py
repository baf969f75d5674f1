"""Root mode (the agent as root, PostgreSQL as ``postgres``): no privileged step follows a link
the PostgreSQL user can plant (issue 12, finding 8).

Each test plants links in a data directory -- what the PostgreSQL OS user (or a DB superuser
through ``COPY ... TO PROGRAM``, or a crafted backup) can do -- pointing at root-owned victims of
known mode and content, runs the operation as root, and checks that the victims are unchanged and
that the operation failed clearly or stepped around the link.  Root only (CI runs as root)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from hakeeper.backup.handover import serving
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.restore import _write_settings
from hakeeper.core.config import NodeConfig
from hakeeper.ha.fence import FenceState
from hakeeper.node import Node
from hakeeper.pg import Postgres
from hakeeper.pg.errors import PgError
from hakeeper.util.fsutil import UnsafePathError
from hakeeper.util.proc import RunAs, resolve_run_as
from tests.integration.test_pg_postgres import init_primary
from tests.support.pg import PgArea

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="root mode: the agent runs as root"),
]


class Victims:
    """A root-owned 0700 directory and a 0600 file in it, with known content."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "victim-dir"
        self.dir.mkdir(mode=0o700)
        os.chmod(self.dir, 0o700)
        self.file = self.dir / "secret"
        self.file.write_text("root only\n")
        os.chmod(self.file, 0o600)
        self.before = self._facts()

    def _facts(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for p in (self.dir, self.file):
            st = p.lstat()
            out.append(
                (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), p.read_bytes() if p.is_file() else b"")
            )
        out.append((0, 0, 0, "\n".join(sorted(os.listdir(self.dir))).encode()))
        return out

    def unchanged(self) -> bool:
        return self._facts() == self.before


def as_postgres(ra: RunAs, *argv: str) -> None:
    """Run a command as the PostgreSQL OS user: what that user can do, not what root can."""
    assert ra.uid is not None
    subprocess.run(["setpriv", f"--reuid={ra.uid}", f"--regid={ra.gid}", "--clear-groups", *argv], check=True)


async def test_postgres_start_refuses_a_log_link(area: PgArea) -> None:
    pg = Postgres(area.node_config("n1"), member_name="n1")
    try:
        await init_primary(pg)
        await pg.stop("fast", timeout=30)
        v = Victims(area.root)
        ra = pg.run_as
        as_postgres(ra, "rm", "-rf", str(pg.data_dir / "log"))
        as_postgres(ra, "ln", "-s", str(v.dir), str(pg.data_dir / "log"))

        with pytest.raises(PgError, match="symbolic link"):
            await pg.start(timeout=30)

        assert v.unchanged(), "root chmod-ed or chown-ed the link's target"
        assert not pg.is_running()
    finally:
        await pg.session.close()


async def test_the_wal_handover_never_writes_through_links(area: PgArea) -> None:
    data = area.data_dir("h")
    data.mkdir(mode=0o700)
    ra = resolve_run_as(data, "postgres")
    ra.chown(data)
    v = Victims(area.root)
    repo = FilesystemRepository(area.root / "repo", name="fs")
    await repo.initialize()
    as_postgres(ra, "mkdir", "-p", str(data / "pg_wal" / ".hakeeper-handover"))
    hdir = data / "pg_wal" / ".hakeeper-handover"
    as_postgres(ra, "ln", "-s", str(v.file), str(hdir / "pid"))
    as_postgres(ra, "ln", "-s", str(v.dir), str(hdir / "out"))

    with pytest.raises(UnsafePathError, match="symbolic link"):
        async with serving(data, repo, "sc", ra):
            pass
    assert v.unchanged()

    # the pid file alone: replaced, never written through
    as_postgres(ra, "rm", str(hdir / "out"))
    async with serving(data, repo, "sc", ra):
        assert not (hdir / "pid").is_symlink() and (hdir / "pid").read_text() == f"{os.getpid()}\n"
        assert (hdir / "req").lstat().st_uid == ra.uid and (hdir / "out").lstat().st_uid == ra.uid
    assert v.unchanged()
    await repo.close()


async def test_the_restore_refuses_links_from_the_backup(area: PgArea) -> None:
    data = area.data_dir("r")
    data.mkdir(mode=0o700)
    ra = resolve_run_as(data, "postgres")
    ra.chown(data)
    v = Victims(area.root)
    as_postgres(ra, "ln", "-s", str(v.file), str(data / "postgresql.auto.conf"))

    with pytest.raises(UnsafePathError, match="symbolic link"):
        await asyncio.to_thread(_write_settings, data, ra, {"port": 5999}, "{}", "test")
    assert v.unchanged(), "root copied a file it can read into one the PostgreSQL user owns"

    as_postgres(ra, "rm", str(data / "postgresql.auto.conf"))
    as_postgres(ra, "ln", "-s", str(v.dir), str(data / "log"))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        await asyncio.to_thread(_write_settings, data, ra, {"port": 5999}, "{}", "test")
    assert v.unchanged()


async def test_the_runtime_dir_is_taken_back_from_the_postgresql_user(area: PgArea) -> None:
    data = area.data_dir("a")
    data.mkdir(mode=0o700)
    ra = resolve_run_as(data, "postgres")
    ra.chown(data)
    v = Victims(area.root)
    runtime = data.parent / f".{data.name}.hakeeper"
    runtime.mkdir(mode=0o700)
    ra.chown(runtime)  # as an older agent left it
    for name in ("agent.lock", "fence.json.tmp", "fencer.pid", "fencer.log"):
        as_postgres(ra, "ln", "-s", str(v.file), str(runtime / name))
    cfg = NodeConfig.model_validate(
        {
            "scope": "rm",
            "name": "a",
            "postgresql": {
                "data_dir": str(data),
                "listen": "127.0.0.1:1",
                "superuser": {"password": "su-secret"},
                "replication": {"password": "repl-secret"},
            },
        }
    )
    node = Node(cfg)
    try:
        node._take_lock()
        st = runtime.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711), "root's, not the PostgreSQL user's"
        assert sorted(os.listdir(runtime)) == ["agent.lock"] and not (runtime / "agent.lock").is_symlink()
        assert (runtime / "agent.lock").read_text() == str(os.getpid())
        FenceState(armed=True, deadline=1.0).write(runtime / "fence.json")  # the fencer's state file
        assert v.unchanged()
        # and the PostgreSQL user can no longer plant anything there
        with pytest.raises(subprocess.CalledProcessError):
            as_postgres(ra, "ln", "-s", str(v.file), str(runtime / "fencer.pid"))
    finally:
        if node._lock_fd is not None:
            os.close(node._lock_fd)
        await node.client.close()
    # a link at the runtime directory itself: the agent refuses to start
    other = area.data_dir("b")
    other.mkdir(mode=0o700)
    (other.parent / f".{other.name}.hakeeper").symlink_to(v.dir)
    node2 = Node(cfg.model_copy(update={"postgresql": cfg.postgresql.model_copy(update={"data_dir": other})}))
    try:
        with pytest.raises(SystemExit, match="refusing to start"):
            node2._take_lock()
    finally:
        await node2.client.close()
    assert v.unchanged()
