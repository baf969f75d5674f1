"""walfetch's prefetch spool under real PostgreSQL recoveries (hakeeper.backup.walspool).

* PITR across a timeline switch from a SeaweedFS repository: a base backup of timeline 1, a
  first PITR promoted to timeline 2 (the archive then holds timeline 1's abandoned future too),
  rows on timeline 2, and a second PITR of the same base backup to a restore point on
  timeline 2, with a spool bound of 3 segments: exactly the rows up to the target, segments of
  timeline 2 served from the spool, none of timeline 1's abandoned segments ever fetched, and
  the spool never above its bound (polled during the recovery).
* A segment corrupted in a filesystem repository: recovery stops, and PostgreSQL's log names the
  segment and why.

PostgreSQL runs restore_command (the script ``hakeeper restore`` writes) as its OS user; the
tests skip where that user cannot run this checkout's Python (``hakeeper restore`` then serves
the WAL itself: test_backup_restore).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import hakeeper
from hakeeper.backup import layout, walspool
from hakeeper.backup.catalog import RestoreRefused
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.restore import python_command
from hakeeper.backup.walfetch import fast_path_script
from hakeeper.core.backup_config import RepositoryConfig, WalToolConfig
from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.localcluster import pg_program
from hakeeper.pg import Postgres, Role
from hakeeper.pg.postgres import SOCKET_SUBDIR
from hakeeper.util.proc import RunAs, run
from tests.integration.test_wal_archive import (
    SCOPE,
    Primary,
    _archived_at_least,
    s3_config,
    s3_repo,
    until,
)
from tests.support.pg import DEFAULT_PARAMS, PgArea
from tests.support.s3_server import SeaweedS3

pytestmark = pytest.mark.integration

SEG = 16 << 20
ROWS = "SELECT count(*), md5(string_agg(v, ',' ORDER BY v)) FROM t"


@pytest.fixture
async def primary() -> AsyncIterator[Primary]:
    area = PgArea()
    p = Primary(area)
    try:
        yield p
    finally:
        await p.stop_archiver()
        await p.pg.session.close()
        area.cleanup()


def _python(module: str, ra: RunAs) -> str:
    """``python -m module`` as PostgreSQL's OS user, importing *this* checkout's hakeeper."""
    try:
        cmd = python_command(module, ra)
    except RestoreRefused as e:
        pytest.skip(f"PostgreSQL's OS user cannot run walfetch here: {e}")
    root = Path(hakeeper.__file__).resolve().parent.parent
    return f"PYTHONPATH={root} {cmd}"


async def _base_backup(primary: Primary, name: str) -> Path:
    ra = primary.pg.run_as
    d = primary.area.data_dir(name)
    ra.chown(d.parent)  # pg_basebackup runs as PostgreSQL's OS user
    sock = str(primary.pg.data_dir / SOCKET_SUBDIR)
    cmd = [pg_program("pg_basebackup"), "-h", sock, "-p", str(primary.pg.port), "-U", "postgres"]
    # no WAL in the backup: recovery gets all of it from the archive
    await run([*cmd, "-D", str(d), "-X", "none", "-c", "fast"], run_as=ra, timeout=120)
    return d


def _copy(primary: Primary, src: Path, name: str) -> Path:
    d = primary.area.data_dir(name)
    subprocess.run(["cp", "-a", str(src), str(d)], check=True)  # owners and modes kept (root)
    return d


def _write_conf(primary: Primary, data: Path, conf: WalToolConfig) -> tuple[Path, str]:
    """The walfetch config beside the data directory and the restore script in it, as
    ``hakeeper restore`` writes them; returns (config path, restore_command)."""
    ra = primary.pg.run_as
    conf_path = data.parent / "walfetch.json"
    text = conf.dump()
    conf_path.write_text(text)
    os.chmod(conf_path, 0o600)
    ra.chown(conf_path)
    script = data / "hakeeper-restore-command.sh"
    script.write_text(fast_path_script(_python("hakeeper.backup.walfetch", ra), conf_path, text.encode()))
    os.chmod(script, 0o700)
    ra.chown(script)
    return conf_path, f"{script} %f %p"


async def _recover(
    primary: Primary, data: Path, name: str, extra: dict[str, ParamValue], *, wait: bool = True
) -> Postgres:
    ra = primary.pg.run_as
    pg = Postgres(primary.area.node_config(name, data_dir=data), member_name=name)
    params: dict[str, ParamValue] = {
        **DynamicConfig().cluster_parameters(),
        **DEFAULT_PARAMS,
        "archive_mode": "off",
        "recovery_target_action": "promote",
        **extra,
    }
    await pg.write_config(params, Role.PRIMARY, None, replication_password=None)
    signal = data / "recovery.signal"
    signal.touch()
    ra.chown(signal)
    await pg.start(timeout=300, wait=wait)
    return pg


async def _promoted(pg: Postgres) -> bool:
    try:
        return (await pg.session.execute("SELECT NOT pg_is_in_recovery()"))[0][0] is True
    except Exception:
        return False


async def _batches(pg: Postgres, n: int, rows: int = 60000) -> str:
    """``n`` batches of rows, a segment switch after each; the last segment completed."""
    last = ""
    for _ in range(n):
        await pg.session.execute(f"INSERT INTO t SELECT md5(random()::text) FROM generate_series(1, {rows})")
        last = str((await pg.session.execute("SELECT pg_walfile_name(pg_current_wal_lsn())"))[0][0])
        await pg.session.execute("SELECT pg_switch_wal()")
    return last


def _spool_bytes(data: Path, seen: set[str]) -> int:
    """Bytes of WAL in the spools: segments and downloads being written (their names go to
    ``seen``)."""
    total = 0
    root = walspool.spool_root(data)
    with contextlib.suppress(FileNotFoundError):
        for tag in os.scandir(root):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for e in os.scandir(tag.path):
                    if layout.parse_segment_name(e.name) or walspool.TMP_MARK in e.name:
                        seen.add(e.name.split(walspool.TMP_MARK)[0].lstrip("."))
                        with contextlib.suppress(FileNotFoundError):
                            total += e.stat().st_size
    return total


async def test_pitr_across_a_timeline_switch_from_s3_within_the_spool_bound(
    primary: Primary, seaweed: SeaweedS3
) -> None:
    ra = primary.pg.run_as
    bucket = "hk-prefetch"
    repo = await s3_repo(seaweed, bucket)
    await primary.start([repo])
    base = await _base_backup(primary, "base")
    first, second = _copy(primary, base, "pitr1"), _copy(primary, base, "pitr2")
    await _batches(primary.pg, 6)
    await primary.pg.session.execute("SELECT pg_create_restore_point('cut1')")
    await _batches(primary.pg, 4)  # timeline 1 goes on: the future the first PITR abandons
    last = await _batches(primary.pg, 1, rows=1)
    await until(lambda: _archived_at_least(primary, last), 120, "timeline 1 archived")
    await primary.stop_archiver()
    await primary.pg.stop()

    # the first PITR: promoted at cut1 to timeline 2, which it archives (walpush, as its OS user)
    s3 = s3_config(seaweed, bucket)
    _, rc1 = _write_conf(primary, first, WalToolConfig(scope=SCOPE, repositories=[s3]))
    push_conf = first.parent / "walpush.json"
    push_conf.write_text(WalToolConfig(scope=SCOPE, repositories=[s3]).dump())
    os.chmod(push_conf, 0o600)
    ra.chown(push_conf)
    push = f"{_python('hakeeper.backup.walpush', ra)} --config {push_conf} %p %f"
    pg1 = await _recover(
        primary,
        first,
        "pitr1",
        {
            "restore_command": rc1,
            "recovery_target_name": "cut1",
            "archive_mode": "on",
            "archive_command": push,
        },
    )
    pg2: Postgres | None = None
    try:
        await until(lambda: _promoted(pg1), 300, "the first PITR promoted", 0.5)
        await pg1.session.execute("CHECKPOINT")
        tli = (await pg1.session.execute("SELECT timeline_id FROM pg_control_checkpoint()"))[0][0]
        assert tli == 2
        await _batches(pg1, 6)
        await pg1.session.execute("SELECT pg_create_restore_point('cut2')")
        expected = (await pg1.session.execute(ROWS))[0]
        await _batches(pg1, 2)  # after the target: must not be there
        last2 = await _batches(pg1, 1, rows=1)
        assert last2.startswith("00000002")

        async def archived2() -> bool:
            r = await pg1.session.execute("SELECT last_archived_wal FROM pg_stat_archiver")
            return r[0][0] is not None and str(r[0][0]) >= last2

        await until(archived2, 120, "timeline 2 archived")
        await pg1.stop()
        history = layout.parse_history(
            (await repo.get(layout.wal_key(SCOPE, "00000002.history"))).decode(errors="replace")
        )
        switch_segno = layout.segno_of(history[0].switch_lsn)

        # the second PITR, from the same base backup, to cut2 on timeline 2, spool of 3 segments
        bound = 3 * SEG
        conf2 = WalToolConfig(scope=SCOPE, repositories=[s3], prefetch=16, prefetch_max_bytes=bound)
        _, rc2 = _write_conf(primary, second, conf2)
        peak = 0
        samples = 0
        seen: set[str] = set()
        stop = asyncio.Event()

        async def poll() -> None:
            nonlocal peak, samples
            while not stop.is_set():
                peak = max(peak, await asyncio.to_thread(_spool_bytes, second, seen))
                samples += 1
                await asyncio.sleep(0.005)

        poller = asyncio.ensure_future(poll())
        t0 = time.monotonic()
        try:
            pg2 = p2 = await _recover(
                primary, second, "pitr2", {"restore_command": rc2, "recovery_target_name": "cut2"}, wait=False
            )
            await until(lambda: _promoted(p2), 300, "the second PITR promoted", 0.2)
        finally:
            stop.set()
            await poller
        seconds = time.monotonic() - t0
        got = (await p2.session.execute(ROWS))[0]
        assert got == expected  # exactly the rows up to the target on timeline 2
        await p2.session.execute("CHECKPOINT")
        tli = (await p2.session.execute("SELECT timeline_id FROM pg_control_checkpoint()"))[0][0]
        assert tli == 3

        assert 0 < peak <= bound, (peak, samples)
        hits = [
            ln
            for f in walspool.spool_root(second).glob(f"*/{walspool.HITS_FILE}")
            for ln in f.read_text().split()
        ]
        served = [layout.parse_segment_name(h) for h in hits]
        on_2 = [s for s in served if s is not None and s[0] == 2]
        assert on_2, f"no segment of timeline 2 came from the spool: {hits}"
        fetched = [layout.parse_segment_name(n) for n in seen]
        abandoned = sorted(s for s in fetched if s is not None and s[0] == 1 and s[1] >= switch_segno)
        assert abandoned == [], f"segments of timeline 1's abandoned future were fetched: {abandoned}"
        assert any(s is not None and s[0] == 2 for s in fetched)
        worker_logs = "".join(p.read_text() for p in walspool.spool_root(second).glob("*/worker.log"))
        assert "not prefetched" not in worker_logs, worker_logs
        stats = walspool.prefetch_stats(second)
        # hits: in the spool when asked for; `hits` lists also those waited for while downloading
        assert 0 < stats.hits <= len(hits) <= stats.requests, (stats, hits)
        print(
            f"PITR across a timeline switch: {stats.requests} segment requests, {stats.hits} from the spool, "
            f"{len(hits) - stats.hits} waited for the worker "
            f"({stats.hit_ratio:.0%}), {stats.seconds_waiting:.2f} s waiting in {seconds:.1f} s of recovery; "
            f"spool peak {peak / SEG:.2f} segments (bound 3), {samples} samples"
        )
        # the worker leaves once recovery is over, with the spool emptied
        await until(lambda: _no_spooled(second), 30, "the spool emptied after recovery")
    finally:
        for pg in (pg1, pg2):
            if pg is not None:
                with contextlib.suppress(Exception):
                    await pg.stop(mode="immediate")
        await repo.close()


async def _no_spooled(data: Path) -> bool:
    return not [p for p in walspool.spool_root(data).glob("*/*") if layout.parse_segment_name(p.name)]


async def test_a_corrupt_segment_stops_recovery_naming_it(primary: Primary) -> None:
    root = primary.area.root / "repo"
    repo = FilesystemRepository(root, name="fs")
    await repo.initialize()
    await primary.start([repo])
    base = await _base_backup(primary, "base")
    await _batches(primary.pg, 6)
    last = await _batches(primary.pg, 1, rows=1)
    await until(lambda: _archived_at_least(primary, last), 120, "archived")
    await primary.stop_archiver()
    names = sorted(
        e.name.rsplit("/", 1)[1]
        for e in await repo.list_objects(layout.wal_prefix(SCOPE))
        if layout.parse_segment_name(e.name.rsplit("/", 1)[1])
    )
    first_needed = _first_segment(base)
    bad = [n for n in names if n > first_needed][2]  # one the worker prefetches
    path = root / layout.wal_key(SCOPE, bad)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x5A
    path.write_bytes(bytes(blob))
    for d, _, files in os.walk(root):  # restore_command runs as PostgreSQL's OS user
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    _, rc = _write_conf(
        primary,
        base,
        WalToolConfig(scope=SCOPE, repositories=[RepositoryConfig(name="fs", type="fs", path=root)]),
    )
    pg = Postgres(primary.area.node_config("broken", data_dir=base), member_name="broken")
    offset = pg.log_file.stat().st_size if pg.log_file.exists() else 0  # a copied log: not ours
    try:
        with contextlib.suppress(Exception):  # it must not come up: pg_ctl reports a failure
            await _recover(primary, base, "broken", {"restore_command": rc}, wait=False)

        async def stopped() -> bool:
            return not pg.is_running()

        await until(stopped, 120, "recovery stopped", 0.5)
        logged = pg.log_file.read_bytes()[offset:].decode(errors="replace")
        assert bad in logged and "corrupt object" in logged, logged[-3000:]
        assert f'could not restore file "{bad}" from archive' in logged, logged[-3000:]
        # the segments before it were replayed (it is not the first one asked for)
        assert "redo starts at" in logged
    finally:
        with contextlib.suppress(Exception):
            await pg.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


def _first_segment(data: Path) -> str:
    """The segment of the backup's start (from backup_label)."""
    for line in (data / "backup_label").read_text().splitlines():
        if line.startswith("START WAL LOCATION:"):
            return line.split("(file ", 1)[1].rstrip(")")
    raise AssertionError("no START WAL LOCATION in backup_label")
