"""``hakeeper restore --start``: the restoring process serves the WAL (hakeeper.backup.handover)
with the prefetch window, against real PostgreSQL servers and a filesystem repository.

* PITR across a timeline switch: a backup of timeline 1 from a standby, the standby promoted
  (timeline 2) while the old primary goes on writing on timeline 1 (the archive then holds
  timeline 1's abandoned future), a target on timeline 2, a window of 3 segments: exactly the
  rows up to the target, segments of timeline 2 written ahead, none of timeline 1's abandoned
  segments ever fetched, out/ never above the bound, the statistics in the result's JSON, and
  the handover directory and the spool gone afterwards.
* A segment corrupted in the repository: fetched again, then the restore fails naming it and
  why, and leaves no handover directory or spool behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup import layout, walspool
from hakeeper.backup.catalog import Target
from hakeeper.backup.handover import handover_dir
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.restore import RestoreError, RestoreOptions, RestoreResult, restore
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_restore import (
    BIN,
    SCOPE,
    STAGERS,
    SU,
    Env,
    backup,
    batches,
    check_restored,
    fs_env,
    insert,
    lsn,
    sql,
    start_primary,
    start_standby,
    stop_restored,
    wait,
)
from tests.support.pg import PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

SEG = 16 << 20


@pytest.fixture
def area() -> Any:
    a = PgArea()
    try:
        yield a
    finally:
        while STAGERS:
            st = STAGERS.pop()
            st.stop.set()
            st.thread.join(10)
        a.cleanup()


class Recording(FilesystemRepository):
    """The test's repository: records the WAL files the restore fetches."""

    fetched: list[str]

    async def get(self, name: str) -> bytes:
        self.fetched.append(name.rsplit("/", 1)[-1])
        return await super().get(name)


def _restore(
    env: Env, dest: Path, target: Target, primary: str, **kw: Any
) -> tuple[RestoreResult, list[str]]:
    opts = RestoreOptions(
        data_dir=dest,
        target=target,
        bin_dir=BIN,
        run_as=resolve_run_as(dest),
        superuser=SU,
        start=True,
        port=free_ports(1)[0],
        primary=env.endpoint(primary),
        wal_timeout=60,
        start_timeout=180,
        **kw,
    )
    repo = Recording(str(env.repo_cfg.path), name=env.repo_cfg.name)
    repo.fetched = []

    async def go() -> RestoreResult:
        try:
            return await restore(repo, env.repo_cfg, SCOPE, opts)
        finally:
            await repo.close()

    try:
        return asyncio.run(go()), repo.fetched
    except BaseException as e:
        e.add_note(f"fetched: {repo.fetched}")
        raise


def _segments_batches(port: int, name: str, n: int) -> None:
    """``n`` batches of rows, a WAL segment switch after each."""
    for i in range(n):
        insert(port, f"{name}{i}", 20000)
        sql(port, "SELECT pg_switch_wal()")


class OutWatch:
    """Polls the handover's out/ while the restore runs: the most segments it held at once."""

    def __init__(self, data_dir: Path) -> None:
        self.out = handover_dir(data_dir) / "out"
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                names = os.listdir(self.out)
                self.peak = max(self.peak, sum(1 for n in names if layout.parse_segment_name(n)))
                self.samples += 1
            self.stop.wait(0.003)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def _no_leftovers(dest: Path) -> None:
    assert not handover_dir(dest).exists()
    assert not walspool.spool_root(dest).exists(), os.listdir(walspool.spool_root(dest))


def test_restore_start_pitr_across_a_timeline_switch_with_the_window(area: PgArea) -> None:
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    start_standby(env, "s", "p")
    s = env.port("s")
    insert(p, "a")
    wait(lambda: batches(s) == ["a"], 30, "standby replays a")
    b = backup(env, "s", primary="p")
    _segments_batches(p, "b", 5)  # timeline 1, replayed by the standby
    wait(lambda: len(batches(s)) == 6, 60, "standby replays the b batches")
    fork = lsn(s, "pg_last_wal_replay_lsn()")
    sql(s, "SELECT pg_promote(true, 60)")
    repo_wal = Path(str(env.repo_cfg.path)) / SCOPE / "wal"
    wait(lambda: (repo_wal / "00000002.history").exists(), 60, "00000002.history archived")
    _segments_batches(s, "c", 5)  # timeline 2
    target = lsn(s)
    expected = batches(s)
    _segments_batches(s, "d", 2)  # after the target: must not be there
    # the old primary goes on alone on timeline 1: the abandoned future, in the archive too
    _segments_batches(p, "z", 4)
    last1 = sql(p, "SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")[0][0]
    last2 = sql(s, "SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")[0][0]
    wait(lambda: (repo_wal / last1).exists() and (repo_wal / last2).exists(), 120, "both timelines archived")
    switch_segno = fork // SEG

    dest = area.data_dir("r-window")
    watch = OutWatch(dest)
    try:
        res, fetched = _restore(
            env, dest, Target("lsn", lsn=target), "s", prefetch=16, prefetch_max_bytes=3 * SEG
        )
    finally:
        watch.close()
    try:
        assert res.backup_id == b.id and res.timeline == 2 and res.new_timeline == 3
        port = check_restored(res, expected)  # exactly the rows up to the target on timeline 2
        assert port
        segs = [x for x in (layout.parse_segment_name(f) for f in fetched) if x is not None]
        abandoned = sorted(f"{t}/{n}" for t, n in segs if t == 1 and n > switch_segno)
        assert abandoned == [], f"timeline 1's abandoned future was fetched: {abandoned}"
        assert any(t == 2 for t, _ in segs)
        # once per request; PostgreSQL's WAL prefetcher asks for some again behind the window,
        # which then gives up its furthest segment to stay within 3 (fetched again later); at
        # the target, at most the window is left unused
        assert len(segs) <= 2 * (res.wal_requests or 0) + 3, (fetched, res.wal_requests)
        assert 0 < watch.peak <= 3, (watch.peak, watch.samples)
        d = json.loads(json.dumps(res.to_dict()))
        assert d["wal_requests"] == res.wal_requests and d["wal_prefetch_hits"] == res.wal_prefetch_hits
        assert res.wal_requests is not None and res.wal_prefetch_hits is not None
        assert res.wal_fetch_wait_s is not None and res.seconds_replay
        # every segment recovery replayed was asked for once; most were written ahead
        assert res.wal_requests >= 10
        assert 0 < res.wal_prefetch_hits < res.wal_requests, d  # the first one is always waited for
        assert 0 <= d["wal_fetch_wait_share"] < 1
        print(
            f"restore --start across a timeline switch: {res.wal_requests} segment requests, "
            f"{res.wal_prefetch_hits} written ahead, {res.wal_fetch_wait_s:.2f} s waiting in "
            f"{res.seconds_replay:.1f} s of recovery; out/ peak {watch.peak} (bound 3), "
            f"{watch.samples} samples"
        )
        _no_leftovers(dest)
    finally:
        stop_restored(area, dest)


def test_restore_start_with_a_corrupt_segment_fails_naming_it(area: PgArea) -> None:
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a")
    b = backup(env, "p")
    _segments_batches(p, "b", 6)
    last = sql(p, "SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")[0][0]
    repo_wal = Path(str(env.repo_cfg.path)) / SCOPE / "wal"
    wait(lambda: (repo_wal / last).exists(), 120, "archived")
    assert b.wal_stop
    names = sorted(n.name for n in repo_wal.iterdir() if layout.parse_segment_name(n.name))
    after = [n for n in names if n > b.wal_stop]  # not needed for consistency: replay gets there
    assert len(after) >= 4, names
    bad = after[len(after) // 2]  # in the middle: the ones before it are replayed
    obj = repo_wal / bad
    blob = bytearray(obj.read_bytes())
    blob[len(blob) // 2] ^= 0x5A
    obj.write_bytes(bytes(blob))
    dest = area.data_dir("r-corrupt")
    try:
        with pytest.raises(RestoreError) as e:
            _restore(env, dest, Target("latest"), "p")
        msg = str(e.value)
        assert bad in msg and "corrupt object" in msg, msg
        notes = "\n".join(getattr(e.value, "__notes__", []))
        # fetched again before giving up (the prefetch's rounds, then the request's), bounded
        tries = notes.count(f"'{bad}'")
        assert 2 <= tries <= 6, notes
        print(f"corrupt {bad}: fetched {tries} times; the restore failed with:\n{msg}")
        _no_leftovers(dest)
    finally:
        stop_restored(area, dest)
