"""Indexed backups (layout zstd-indexed) against real PostgreSQL: restored by parallel workers,
equal to what tar extracts from the same parts; a corrupt part fails naming it and leaves no
usable directory; a delta restore into an older copy with modified, missing and extra files
equals a full restore and fetches less; a server-compressed (older format) backup still
restores and is refused for a delta, saying why.

The helpers (a standalone primary archiving into a filesystem repository) are
test_backup_restore's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup.catalog import BackupRecord, RestoreRefused, Target
from hakeeper.backup.delta import MARKER
from hakeeper.backup.fileindex import STATE_FILE
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreError, RestoreOptions, RestoreResult, restore
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_restore import (
    BIN,
    SCOPE,
    SU,
    Env,
    area,  # noqa: F401  (the fixture)
    backup,
    check_restored,
    fs_env,
    insert,
    sql,
    start_primary,
    stop_restored,
)
from tests.support.pg import PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> kind, mode and the SHA-256 of a file's content (links: their target);
    without the restore's record of what it wrote (backup/restorestate.py), which only a
    restore of an indexed backup leaves and whose stamps differ from copy to copy."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "l " + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"d {st.st_mode & 0o777:o} {st.st_uid}"
            else:
                out[rel] = (
                    f"f {st.st_mode & 0o777:o} {st.st_uid} " + hashlib.sha256(p.read_bytes()).hexdigest()
                )
    out.pop(STATE_FILE, None)
    return out


def run_restore(
    env: Env, dest: Path, *, backup_id: str, start: bool, snap: dict[str, str] | None = None, **kw: Any
) -> RestoreResult:
    """A restore of ``backup_id`` to the latest point; ``snap`` gets the directory's snapshot
    right after the copy (before the recovery settings are written and anything starts)."""

    async def after_copy(_rec: BackupRecord, data_dir: Path) -> None:
        if snap is not None:
            snap.update(await asyncio.to_thread(snapshot, data_dir))

    opts = RestoreOptions(
        data_dir=dest,
        target=Target("latest"),
        bin_dir=BIN,
        run_as=resolve_run_as(dest),
        superuser=SU,
        backup_id=backup_id,
        start=start,
        port=free_ports(1)[0] if start else None,
        wal_timeout=60,
        start_timeout=120,
        serve_wal=True,
        switch_wal=False,
        after_copy=after_copy,
        **kw,
    )

    async def go() -> RestoreResult:
        async with make_repository(env.repo_cfg) as repo:
            return await restore(repo, env.repo_cfg, env.scope, opts)

    return asyncio.run(go())


def tar_extract(env: Env, rec: BackupRecord, dest: Path) -> dict[str, str]:
    """The backup's parts through GNU ``zstd -d | tar -x`` as the PostgreSQL OS user: the
    reference a restore must equal (the parts are zstd frames stored as they are: in order,
    one zstd stream)."""
    dest.mkdir(mode=0o700)
    ra = resolve_run_as(dest)
    ra.chown(dest)

    async def fetch() -> bytes:
        async with make_repository(env.repo_cfg) as repo:
            return b"".join([await repo.get(f"{env.scope}/backup/{rec.id}/{p.name}") for p in rec.parts])

    data = asyncio.run(fetch())
    subprocess.run(
        ["tar", "--zstd", "-x", "-f", "-", "-C", str(dest), "--no-same-owner"],
        input=data,
        check=True,
        user=ra.uid,
        group=ra.gid,
        extra_groups=[] if ra.uid is not None else None,
    )
    return snapshot(dest)


def test_parallel_restore_equals_tar_and_a_corrupt_part_is_named(area: PgArea) -> None:  # noqa: F811
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 100_000)
    b = backup(env, "p", compress_on="client")
    assert b.layout == "zstd-indexed" and b.index is not None
    assert len(b.parts) > 10  # 256 KiB parts: members cross part boundaries
    # the same parts through tar, and through 4 workers: the same files, modes, owners, bytes
    via_tar = tar_extract(env, b, area.data_dir("tar"))
    snap: dict[str, str] = {}
    dest = area.data_dir("par")
    r = run_restore(env, dest, backup_id=b.id, start=True, snap=snap, parallel=4)
    assert snap == via_tar
    assert (dest / STATE_FILE).stat().st_uid == (dest / "PG_VERSION").stat().st_uid
    tar_bytes = sum(
        q.stat().st_size for q in area.data_dir("tar").rglob("*") if q.is_file() and not q.is_symlink()
    )
    assert r.jobs == 4 and r.bytes_total == r.bytes_written == tar_bytes
    assert r.bytes_fetched is not None and r.bytes_fetched <= sum(x.stored_size for x in b.parts)
    check_restored(r, ["a"])
    stop_restored(area, dest)
    # a flipped byte in a stored part: the restore fails naming the object, nothing is left
    part = Path(str(env.repo_cfg.path)) / SCOPE / "backup" / b.id / b.parts[5].name
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    part.write_bytes(bytes(blob))
    bad = area.data_dir("corrupt")
    with pytest.raises(RestoreError) as e:
        run_restore(env, bad, backup_id=b.id, start=False, parallel=4)
    assert f"{SCOPE}/backup/{b.id}/{b.parts[5].name}" in str(e.value)
    assert not bad.exists() or os.listdir(bad) == []


def test_delta_restore_into_a_drifted_older_copy(area: PgArea) -> None:  # noqa: F811
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 50_000)
    server = backup(env, "p")  # the server compresses by default: the older format
    old_b = backup(env, "p", compress_on="client")
    # the older copy: the first backup, restored without starting
    dest = area.data_dir("delta")
    run_restore(env, dest, backup_id=old_b.id, start=False)
    # the cluster moves on; the copy drifts on its own: a modified block, a missing file,
    # extra files, a WAL segment, a stale postmaster.pid
    insert(p, "b", 20_000)
    sql(p, "UPDATE t SET batch = 'a' WHERE id % 1000 = 0 AND batch = 'a'")
    new_b = backup(env, "p", compress_on="client")
    rel = sql(p, "SELECT pg_relation_filepath('t')")[0][0]
    with open(dest / rel, "r+b") as f:
        f.seek(8192 * 3 + 100)
        f.write(b"drift!")
    victim = next(q for q in sorted((dest / "base").rglob("*")) if q.is_file() and q.stat().st_size > 8192)
    victim.unlink()
    (dest / "base" / "extra_file").write_bytes(b"x" * 5000)
    (dest / "extra_dir").mkdir()
    (dest / "pg_wal" / "000000010000000000000099").write_bytes(b"w" * 8192)
    (dest / "postmaster.pid").write_text("999999\n")
    # refusals first: an older-format backup, another cluster's copy
    if server.layout != "zstd-indexed":  # (a build without zstd, e.g. the 18 wheel: indexed anyway)
        with pytest.raises(RestoreRefused, match="no file index"):
            run_restore(env, dest, backup_id=server.id, start=False, delta=True)
    plain = area.data_dir("plain")
    plain.mkdir()
    with pytest.raises(RestoreRefused, match="no readable global/pg_control"):
        run_restore(env, plain, backup_id=new_b.id, start=False, delta=True)
    # the full restore of the newer backup, for comparison
    full_snap: dict[str, str] = {}
    full = run_restore(env, area.data_dir("full"), backup_id=new_b.id, start=False, snap=full_snap)
    assert full.bytes_fetched is not None
    delta_snap: dict[str, str] = {}
    r = run_restore(env, dest, backup_id=new_b.id, start=True, snap=delta_snap, delta=True, parallel=2)
    assert delta_snap == full_snap
    # the files the first restore wrote and nothing touched since were not read again
    unread = [int(m.group(1)) for n in r.notes if (m := re.search(r"\((\d+) unchanged since the last", n))]
    assert unread and unread[0] > 0, r.notes
    assert r.delta and r.bytes_total == full.bytes_total
    assert r.bytes_fetched is not None and r.bytes_written is not None
    assert r.bytes_fetched < full.bytes_fetched / 2, (r.bytes_fetched, full.bytes_fetched)
    assert r.bytes_written < new_b.size / 2
    check_restored(r, ["a", "b"])
    # the restored server runs there now: a second delta is refused, nothing touched
    with pytest.raises(RestoreRefused, match="is running"):
        run_restore(env, dest, backup_id=new_b.id, start=False, delta=True)
    # (the server's own writes go on: checked is that the delta never started)
    assert (dest / "global" / "pg_control").exists() and not (dest / MARKER).exists()
    stop_restored(area, dest)
    # the older format still restores (into an empty directory), replaying the archive to its end
    r0 = run_restore(env, area.data_dir("server"), backup_id=server.id, start=True)
    # through tar: no index, no byte counts (an indexed one on a build without zstd)
    assert (r0.bytes_total is None) == (server.layout != "zstd-indexed")
    check_restored(r0, ["a", "b"])
    stop_restored(area, area.data_dir("server"))
