"""walfetch's prefetch spool: the window along a timeline history, the byte bound, the request
statistics (pure), and the worker itself against a filesystem repository (no PostgreSQL: the
test plays recovery, taking segments in the order recovery reads them)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from hakeeper.backup import layout, walfetch
from hakeeper.backup.errors import CorruptObject, NotFound
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.walspool import (
    TimelinePath,
    clear_spool,
    parse_stats,
    plan_spool,
    predict_window,
    prefetch_stats,
    read_timeline_path,
    remove_spool,
    spool_segments,
    spool_slots,
    stats_line,
)
from hakeeper.core.backup_config import RepositoryConfig, WalToolConfig
from hakeeper.core.lsn import format_lsn

MB = 1 << 20
SEG16 = 16 * MB


def name(tli: int, segno: int, seg: int = SEG16) -> str:
    return layout.segment_name(tli, segno, seg)


# ---------------------------------------------------------------------------------- window (pure)


def test_the_window_stays_on_the_timeline_without_a_history() -> None:
    assert predict_window(name(1, 0xFE), SEG16, 3, None) == [
        name(1, 0xFF),
        name(1, 0x100),  # next xlogid
        name(1, 0x101),
    ]
    assert predict_window("00000002.history", SEG16, 3, None) == []
    assert predict_window(name(1, 3), SEG16, 0, None) == []
    assert predict_window(name(1, 3), 3 * MB, 2, None) == []  # not a segment size


def test_the_window_crosses_a_switch_point_to_the_new_timeline() -> None:
    # timeline 1 ended inside segment 10, timeline 2 inside segment 14; target 3
    path = TimelinePath(
        3,
        (
            layout.HistoryEntry(1, 10 * SEG16 + 0x1000, "promoted"),
            layout.HistoryEntry(2, 14 * SEG16, "promoted"),  # exactly on a boundary
        ),
    )
    got = predict_window(name(1, 7), SEG16, 9, path)
    assert got == [
        name(1, 8),
        name(1, 9),
        name(2, 10),  # the switch segment is read from the newer timeline, as recovery does
        name(2, 11),
        name(2, 12),
        name(2, 13),
        name(3, 14),  # timeline 2 ended on 14's first byte: 14 is timeline 3's
        name(3, 15),
        name(3, 16),
    ]
    # the same as the segments recovery reads from start to end (layout's own computation)
    assert got == layout.wal_segments(8 * SEG16, 16 * SEG16, 3, list(path.history))[:9]
    # never back to an older timeline once on a newer one
    assert predict_window(name(2, 12), SEG16, 3, path) == [name(2, 13), name(3, 14), name(3, 15)]
    # a timeline that is not on the target's path: same timeline (a history we have not seen)
    assert predict_window(name(5, 20), SEG16, 2, path) == [name(5, 21), name(5, 22)]


def test_the_bound_limits_the_window_in_slots() -> None:
    assert spool_slots(512 * MB, SEG16) == 32
    assert spool_slots(3 * SEG16 + SEG16 - 1, SEG16) == 3
    assert spool_slots(SEG16 - 1, SEG16) == 0  # less than a segment: no prefetch
    assert spool_slots(0, SEG16) == 0


def test_the_plan_counts_running_downloads_and_drops_before_it_starts() -> None:
    w = [name(1, n) for n in range(5, 21)]
    # 3 slots: two present, one downloading -> nothing to start
    p = plan_spool(w, {w[0], w[1]}, {w[2]}, slots=3, parallel=4)
    assert p.start == () and p.drop == ()
    # a download no longer wanted (the window moved) still holds its slot until it ends
    p = plan_spool(w[3:], {w[3]}, {w[0], w[1]}, slots=3, parallel=4)
    assert p.start == (), p
    # files behind the window and of an abandoned timeline are dropped; in order, within parallel
    p = plan_spool(w, {name(1, 4), name(1, 6), name(2, 30)}, set(), slots=8, parallel=3)
    assert p.drop == (name(1, 4), name(2, 30))
    assert p.start == (w[0], w[2], w[3])  # w[1] is present
    # the window ends at the first segment not in the archive; skipped names are passed over
    p = plan_spool(w, set(), set(), slots=8, parallel=8, absent={w[3]}, skip={w[1]})
    assert p.start == (w[0], w[2])


def test_the_plan_never_exceeds_the_bound_while_recovery_takes_segments() -> None:
    """A random interleaving of downloads ending, recovery taking segments and the window
    moving: the files on disk plus the downloads running never exceed the slots."""
    rng = random.Random(7)
    slots, parallel = 3, 2
    present: set[str] = set()
    inflight: set[str] = set()
    want = 10
    for _ in range(2000):
        window = predict_window(name(1, want), SEG16, min(16, slots), None)
        plan = plan_spool(window, present, inflight, slots, parallel)
        present -= set(plan.drop)
        inflight |= set(plan.start)
        assert len(present) + len(inflight) <= slots
        assert len(inflight) <= parallel
        r = rng.random()
        if r < 0.4 and inflight:
            done = rng.choice(sorted(inflight))
            inflight.discard(done)
            present.add(done)  # written under its name, still before the next plan
            assert len(present) + len(inflight) <= slots
        elif r < 0.7:
            nxt = name(1, want + 1)
            present.discard(nxt)  # recovery takes it (or fetched it itself)
            want += 1


# ---------------------------------------------------------------------------------- statistics


def test_stats_lines_sum_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    text = (
        stats_line(name(1, 1), False, 0.61)
        + stats_line(name(1, 2), True, 0.0)
        + f"{name(1, 3)} 1 0\n"  # the shell's hit line
        + "0000000100000000000000"  # torn
        + "\n00000002.history 0 1.0\ngarbage\n"
    )
    s = parse_stats(text)
    assert (s.requests, s.hits) == (3, 2) and s.seconds_waiting == pytest.approx(0.61)
    requests, hits, waiting = s  # unpacks as the restore reads it
    assert (requests, hits, waiting) == (s.requests, s.hits, s.seconds_waiting)
    assert s.hit_ratio == pytest.approx(2 / 3)
    data = tmp_path / "data"
    assert prefetch_stats(data) == (0, 0, 0.0)
    for tag, body in (("a", text), ("b", stats_line(name(2, 9), False, 2.0))):
        d = data / "pg_wal" / ".hakeeper-prefetch" / tag
        d.mkdir(parents=True)
        (d / "stats").write_text(body)
    total = prefetch_stats(data)
    assert (total.requests, total.hits) == (4, 2) and total.seconds_waiting == pytest.approx(2.61)


def test_the_newest_history_is_the_path(tmp_path: Path) -> None:
    pg_wal = tmp_path / "pg_wal"
    pdir = pg_wal / ".hakeeper-prefetch" / "t"
    pdir.mkdir(parents=True)
    assert read_timeline_path(pdir) is None
    (pg_wal / "00000002.history").write_text("1\t0/A001000\tno recovery target specified\n")
    (pdir / "00000003.history").write_text("1\t0/A001000\tx\n2\t0/E000000\ty\n")
    p = read_timeline_path(pdir)
    assert p is not None and p.target == 3 and [e.tli for e in p.history] == [1, 2]
    (pdir / "00000004.history").write_text("garbage")  # unreadable: the older one still holds
    p = read_timeline_path(pdir)
    assert p is not None and p.target == 3


def test_clearing_keeps_the_statistics_and_skips_a_held_spool(tmp_path: Path) -> None:
    import fcntl

    data = tmp_path / "data"
    pdir = data / "pg_wal" / ".hakeeper-prefetch" / "t"
    pdir.mkdir(parents=True)
    for n in (name(1, 4), "00000002.history", f".{name(1, 5)}.tmp.999999999", "stats", "hits"):
        (pdir / n).write_text("x")
    fd = os.open(pdir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        remove_spool(data)  # a worker holds it: it clears it itself
        assert (pdir / name(1, 4)).exists()
    finally:
        os.close(fd)
    remove_spool(data)
    assert sorted(p.name for p in pdir.iterdir()) == [".lock", "hits", "stats"]
    clear_spool(tmp_path / "missing")  # nothing there: no error


# ---------------------------------------------------------------------------------- the worker

SEG = MB  # small segments: the worker takes the size from what recovery was handed
SCOPE = "sp"


def _content(n: str) -> bytes:
    return hashlib.sha256(n.encode()).digest() * (SEG // 32)


async def _repo_with(tmp_path: Path, names: list[str], corrupt: frozenset[str] = frozenset()) -> Path:
    root = tmp_path / "repo"
    repo = FilesystemRepository(root, name="fs", level=1)
    await repo.initialize()
    for n in names:
        await repo.put_unique(layout.wal_key(SCOPE, n), _content(n))
    await repo.close()
    for n in corrupt:  # a bit flipped in the stored object: its checks fail
        p = root / layout.wal_key(SCOPE, n)
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x40
        p.write_bytes(bytes(b))
    return root


def _setup(tmp_path: Path, root: Path, max_bytes: int) -> tuple[Path, Path, WalToolConfig]:
    data = tmp_path / "data"
    (data / "pg_wal").mkdir(parents=True)
    (data / "recovery.signal").touch()
    conf = WalToolConfig(
        scope=SCOPE,
        repositories=[RepositoryConfig(name="fs", type="fs", path=root)],
        prefetch=16,
        prefetch_parallel=2,
        prefetch_max_bytes=max_bytes,
    )
    conf_path = tmp_path / "walfetch.json"
    conf_path.write_text(conf.dump())
    pdir = walfetch.prefetch_dir(data / "pg_wal" / "RECOVERYXLOG", conf_path.read_bytes())
    pdir.mkdir(parents=True)
    return data, pdir, conf


def _want(pdir: Path, n: str) -> None:
    walfetch._write_small(pdir / "want", f'{{"file": "{n}", "seg_size": {SEG}}}')


async def test_the_worker_follows_recovery_across_a_timeline_switch_within_its_bound(tmp_path: Path) -> None:
    switch = 10 * SEG + 0x8000  # timeline 1 ends inside segment 10
    abandoned = [name(1, s, SEG) for s in range(1, 21)]  # the old timeline went on: 10..20 abandoned
    second = [name(2, s, SEG) for s in range(10, 21)]
    root = await _repo_with(tmp_path, abandoned + second)
    data, pdir, conf = _setup(tmp_path, root, max_bytes=3 * SEG)
    # recovery fetched the target's history before its first segment (walfetch keeps a copy)
    (pdir / "00000002.history").write_text(f"1\t{format_lsn(switch)}\tpromoted\n")
    expected = layout.wal_segments(2 * SEG, 20 * SEG, 2, [layout.HistoryEntry(1, switch, "")], SEG)
    seen: set[str] = set()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(FileNotFoundError):
                sizes = 0
                for e in os.scandir(pdir):
                    if layout.parse_segment_name(e.name) or walfetch._TMP_MARK in e.name:
                        seen.add(e.name.split(walfetch._TMP_MARK)[0].lstrip("."))
                        with contextlib.suppress(FileNotFoundError):
                            sizes += e.stat().st_size
                peak = max(peak, sizes)
            await asyncio.sleep(0.001)

    watcher = asyncio.ensure_future(watch())
    _want(pdir, name(1, 1, SEG))  # segment 1 came the slow way
    worker = asyncio.ensure_future(walfetch._worker_loop(conf, pdir, idle_exit=30))
    try:
        for n in expected:
            deadline = time.monotonic() + 20
            while not (pdir / n).exists():
                assert time.monotonic() < deadline, f"{n} never prefetched; spool: {os.listdir(pdir)}"
                assert not worker.done(), worker
                await asyncio.sleep(0.005)
            dest = data / "pg_wal" / "RECOVERYXLOG"
            os.replace(pdir / n, dest)  # what the shell fast path does
            assert dest.read_bytes() == _content(n), n
            _want(pdir, n)
            await asyncio.sleep(0.01)  # replay
        (data / "recovery.signal").unlink()  # recovery ended: the worker leaves
        await asyncio.wait_for(worker, 10)
    finally:
        watcher.cancel()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    assert peak <= 3 * SEG, peak
    parsed = [layout.parse_segment_name(n, SEG) for n in seen]
    wrong = sorted(p for p in parsed if p is not None and p[0] == 1 and p[1] >= 10)
    assert wrong == [], "segments of the abandoned timeline were fetched"
    clear_spool(pdir)
    assert spool_segments(pdir) == set()


async def test_a_corrupt_segment_is_given_up_by_the_worker_and_fails_the_request_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [name(1, s, SEG) for s in range(1, 9)]
    bad = names[3]
    root = await _repo_with(tmp_path, names, corrupt=frozenset({bad}))
    data, pdir, conf = _setup(tmp_path, root, max_bytes=16 * SEG)
    _want(pdir, names[0])
    worker = asyncio.ensure_future(walfetch._worker_loop(conf, pdir, idle_exit=30))
    try:
        deadline = time.monotonic() + 20
        while not all((pdir / n).exists() for n in names[1:] if n != bad):
            assert time.monotonic() < deadline, os.listdir(pdir)
            await asyncio.sleep(0.02)
        await asyncio.sleep(walfetch.FAILED_COOLDOWN * 3 + 1)  # its retries (0.5 s, then 1 s apart)
        assert not (pdir / bad).exists()
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    err = capsys.readouterr().err
    assert err.count(f"{bad}: not prefetched") == walfetch.CORRUPT_ATTEMPTS, err
    conf_path = tmp_path / "walfetch.json"
    code, msg = await walfetch.fetch(conf_path, bad, data / "pg_wal" / "RECOVERYXLOG")
    assert code == walfetch.EXIT_UNKNOWN and code > 125  # PostgreSQL stops recovery
    assert bad in msg and "corrupt" in msg, msg
    assert capsys.readouterr().err.count("fetching again") == walfetch.CORRUPT_ATTEMPTS - 1


class _Flaky:
    """A repository whose first read of an object is damaged on the way."""

    def __init__(self) -> None:
        self.reads = 0

    async def get(self, key: str) -> bytes:
        self.reads += 1
        if self.reads == 1:
            raise CorruptObject(key, "sha256 mismatch")
        if key.endswith("missing"):
            raise NotFound("flaky", key)
        return b"good"

    async def close(self) -> None:
        pass


async def test_a_copy_damaged_on_the_way_is_fetched_again() -> None:
    rc = RepositoryConfig(name="flaky", type="fs", path=Path("/nonexistent"))
    repo = _Flaky()
    data, src, problems = await walfetch._get_any([(rc, repo)], "sp/wal/x", retry=False)  # type: ignore[list-item]
    assert (data, src, repo.reads) == (b"good", "flaky", 2)
    assert problems == []


async def test_each_segment_request_leaves_its_wait_in_the_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [name(1, s, SEG) for s in range(1, 3)]
    root = await _repo_with(tmp_path, names)
    data, pdir, _ = _setup(tmp_path, root, max_bytes=16 * SEG)
    conf = str(tmp_path / "walfetch.json")
    dest = data / "pg_wal" / "RECOVERYXLOG"
    # the script stamps its start: Python's start-up is waiting too
    monkeypatch.setenv(walfetch.T0_ENV, f"{time.time() - 2.0:.6f}")
    # --no-prefetch: no worker forked inside the test process
    code = await asyncio.to_thread(walfetch.main, ["--config", conf, "--no-prefetch", names[0], str(dest)])
    assert code == walfetch.EXIT_OK and dest.read_bytes() == _content(names[0])
    missing = name(1, 9, SEG)
    args = ["--config", conf, "--no-prefetch", missing, str(dest)]
    assert await asyncio.to_thread(walfetch.main, args) == walfetch.EXIT_NOT_FOUND
    (pdir / names[1]).write_bytes(_content(names[1]))  # prefetched earlier
    monkeypatch.delenv(walfetch.T0_ENV)
    args = ["--config", conf, names[1], str(dest)]
    monkeypatch.setattr(walfetch, "request_prefetch", lambda *a: None)
    assert await asyncio.to_thread(walfetch.main, args) == walfetch.EXIT_OK
    lines = (pdir / "stats").read_text().splitlines()
    assert [ln.split()[:2] for ln in lines] == [[names[0], "0"], [names[1], "1"]]  # a miss "not found": none
    assert float(lines[0].split()[2]) >= 2.0 and float(lines[1].split()[2]) < 2.0
    s = prefetch_stats(data)
    assert (s.requests, s.hits) == (2, 1) and s.seconds_waiting >= 2.0
    # after recovery (no signal file) requests are not replay waiting: not counted
    (data / "recovery.signal").unlink()
    args = ["--config", conf, "--no-prefetch", names[0], str(dest)]
    assert await asyncio.to_thread(walfetch.main, args) == walfetch.EXIT_OK
    assert prefetch_stats(data).requests == 2
