"""The restoring process's WAL handover (``restore --start``): the window of segments written
ahead follows the target timeline, stays within its byte bound and full, refetches corrupt
segments, and answers ``.error`` naming the segment when it cannot; statistics and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from hakeeper.backup import layout
from hakeeper.backup.errors import CorruptObject, NotFound
from hakeeper.backup.handover import TAKEN, Handover, handover_dir, serving
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.walfetch import CORRUPT_ATTEMPTS
from hakeeper.backup.walspool import SPOOL_DIR, TimelinePath, stats_line
from hakeeper.util.proc import RunAs

SEG = 1024 * 1024  # the smallest segment size: names of segno < 256 read the same at 16 MiB
SCOPE = "s"


def seg(tli: int, n: int) -> str:
    return layout.segment_name(tli, n, SEG)


class FakeRepo(FilesystemRepository):
    """WAL objects from a dict; records every get and how many ran at once."""

    def __init__(self, root: Path, objects: dict[str, bytes], delay: float = 0.01) -> None:
        super().__init__(root, name="fake")
        self.objects = objects
        self.delay = delay
        self.gets: list[str] = []
        self.running = 0
        self.max_running = 0
        self.corrupt: dict[str, int] = {}  # name -> how many more gets fail their checks

    async def get(self, name: str) -> bytes:
        fname = name.rsplit("/", 1)[-1]
        self.gets.append(fname)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.corrupt.get(fname, 0) > 0:
                self.corrupt[fname] -= 1
                raise CorruptObject(name, "sha256 mismatch")
            if fname not in self.objects:
                raise NotFound(self.name, name)
            return self.objects[fname]
        finally:
            self.running -= 1


def content(name: str) -> bytes:
    # every segment's bytes name it: a segment handed over under another name shows
    return name.encode().ljust(SEG, b".")


class Recovery:
    """What the restore script does, in Python: take out/<f> at once (and say so), else ask
    and wait for the answer."""

    def __init__(self, data_dir: Path) -> None:
        self.h = handover_dir(data_dir)
        self.pg_wal = data_dir / "pg_wal"
        self.hits = 0
        self.out_peak = 0

    def out_segments(self) -> set[str]:
        return {n for n in os.listdir(self.h / "out") if layout.parse_segment_name(n, SEG) is not None}

    async def ask(self, f: str, timeout: float = 10.0) -> tuple[int, bytes]:
        self.out_peak = max(self.out_peak, len(self.out_segments()))
        dest = self.pg_wal / "RECOVERYXLOG"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.h / "out" / f, dest)
            (self.h / "req" / f"{f}{TAKEN}").touch()
            self.hits += 1
            return 0, dest.read_bytes()
        (self.h / "req" / f).touch()
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.h / "out" / f, dest)
                    return 0, dest.read_bytes()
                if (self.h / "out" / f"{f}.missing").exists():
                    return 1, b""
                err = self.h / "out" / f"{f}.error"
                if err.exists():
                    return 200, err.read_bytes()
                await asyncio.sleep(0.005)


def _data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "pg_wal").mkdir(parents=True)
    return d


async def _settle(rec: Recovery, expect: int) -> None:
    async with asyncio.timeout(5):
        while len(rec.out_segments()) < expect:  # noqa: ASYNC110 - files, not an event
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # nothing more comes


async def test_the_window_is_kept_full_within_its_bytes_and_recovery_takes_it(tmp_path: Path) -> None:
    names = [seg(1, n) for n in range(1, 41)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=16, max_bytes=4 * SEG + SEG // 2) as served:
        rc, got = await rec.ask(names[0])
        assert (rc, got) == (0, content(names[0]))
        # 4 segments fit in 4.5 MiB: the next 4 are written ahead, no more
        await _settle(rec, 4)
        assert rec.out_segments() == set(names[1:5])
        for n in names[1:]:
            rc, got = await rec.ask(n)
            assert (rc, got) == (0, content(n)), n
            await asyncio.sleep(0.02)  # replay of a segment
        assert served.peak_segments == 4  # the one asked for included
    # taken from out/ without asking: all but the first (the window was full every time)
    assert rec.hits == len(names) - 1
    assert served.served == len(names) and served.taken_ahead == len(names) - 1
    assert rec.out_peak <= 4
    assert repo.max_running <= 4
    # each fetched once; past the archive's end, one look (found absent: the window stops there)
    assert sorted(repo.gets) == sorted([*names, seg(1, 41)])
    assert not handover_dir(data_dir).exists()


async def test_the_segment_asked_for_counts_in_the_bound(tmp_path: Path) -> None:
    # 16 MiB segments (the size assumed before one is seen): the first request already plans a
    # window, which must leave a slot to the segment being fetched for it
    big = 16 * SEG
    names = [layout.segment_name(1, n) for n in range(1, 9)]
    repo = FakeRepo(tmp_path / "repo", {n: n.encode().ljust(big, b".") for n in names}, delay=0.05)
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=16, max_bytes=3 * big) as served:
        for n in names:
            rc, got = await rec.ask(n)
            assert rc == 0 and got[:24] == n.encode() and len(got) == big
            await asyncio.sleep(0.1)  # replay: slower than a download
    assert served.peak_segments == 3 and repo.max_running <= 3
    assert rec.hits >= len(names) - 2


async def test_no_prefetch_when_not_even_one_segment_fits(tmp_path: Path) -> None:
    names = [seg(1, n) for n in range(1, 5)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), max_bytes=SEG - 1):
        for n in names:
            assert await rec.ask(n) == (0, content(n))
            await asyncio.sleep(0.05)
            assert rec.out_segments() == set()
    assert rec.hits == 0 and repo.gets == names


async def test_the_window_follows_the_target_timeline(tmp_path: Path) -> None:
    # timeline 2 branched from 1 inside segment 3: recovery reads 1..2 on timeline 1, then 3.. on 2
    switch = 3 * SEG + 100
    hist = f"1\t0/{switch:X}\tno recovery target specified\n"
    objs = {seg(1, n): content(seg(1, n)) for n in range(1, 12)}
    objs |= {seg(2, n): content(seg(2, n)) for n in range(3, 12)}
    objs[layout.history_name(2)] = hist.encode()
    repo = FakeRepo(tmp_path / "repo", objs)
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    path = TimelinePath(2, tuple(layout.parse_history(hist)))
    async with serving(data_dir, repo, SCOPE, RunAs(), path=path, prefetch=4):
        assert await rec.ask(seg(1, 1)) == (0, content(seg(1, 1)))
        await _settle(rec, 4)
        assert rec.out_segments() == {seg(1, 2), seg(2, 3), seg(2, 4), seg(2, 5)}
        for want in [seg(1, 2)] + [seg(2, n) for n in range(3, 12)]:
            assert await rec.ask(want) == (0, content(want))
    # no segment of timeline 1 past the switch was ever fetched
    assert not {seg(1, n) for n in range(3, 12)} & set(repo.gets)


async def test_a_history_recovery_fetches_moves_the_window_off_the_abandoned_timeline(tmp_path: Path) -> None:
    switch = 4 * SEG
    hist = f"1\t0/{switch:X}\tbranch\n"
    objs = {seg(1, n): content(seg(1, n)) for n in range(1, 12)}
    objs |= {seg(2, n): content(seg(2, n)) for n in range(4, 12)}
    objs[layout.history_name(2)] = hist.encode()
    repo = FakeRepo(tmp_path / "repo", objs)
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=4):  # no plan: same timeline
        assert (await rec.ask(seg(1, 1)))[0] == 0
        await _settle(rec, 4)
        assert rec.out_segments() == {seg(1, n) for n in range(2, 6)}
        rc, got = await rec.ask(layout.history_name(2))
        assert (rc, got) == (0, hist.encode())
        await _settle(rec, 4)
        # timeline 1's segments 4 and 5 are gone, timeline 2's are there instead
        assert rec.out_segments() == {seg(1, 2), seg(1, 3), seg(2, 4), seg(2, 5)}
        for want in [seg(1, 2), seg(1, 3)] + [seg(2, n) for n in range(4, 12)]:
            assert await rec.ask(want) == (0, content(want)), want


async def test_a_segment_failing_its_checks_is_fetched_again(tmp_path: Path) -> None:
    names = [seg(1, n) for n in range(1, 8)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    repo.corrupt[names[3]] = CORRUPT_ATTEMPTS - 1  # damaged on the way, not in the archive
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=4) as served:
        for n in names:
            assert await rec.ask(n) == (0, content(n))
            await asyncio.sleep(0.05)
    assert repo.gets.count(names[3]) == CORRUPT_ATTEMPTS  # until a copy passed its checks
    assert served.failed == {}


async def test_a_segment_corrupt_in_the_archive_is_an_error_naming_it(tmp_path: Path) -> None:
    names = [seg(1, n) for n in range(1, 8)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    bad = names[3]
    repo.corrupt[bad] = 1000
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=4) as served:
        for n in names[:3]:
            assert await rec.ask(n) == (0, content(n))
            await asyncio.sleep(0.1)
        rc, text = await rec.ask(bad)
    assert rc == 200
    assert bad in text.decode() and "corrupt object: sha256 mismatch" in text.decode()
    assert set(served.failed) == {bad}
    # bounded: the prefetch's rounds and the request's, no more
    assert CORRUPT_ATTEMPTS < repo.gets.count(bad) <= 2 * CORRUPT_ATTEMPTS


async def test_missing_segments_and_other_files(tmp_path: Path) -> None:
    names = [seg(1, n) for n in range(1, 4)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=8):
        for n in names:
            assert (await rec.ask(n))[0] == 0
        assert (await rec.ask(seg(1, 4)))[0] == 1  # the end of the archive
        assert (await rec.ask(layout.history_name(2)))[0] == 1
        assert (await rec.ask("not-a-wal-file"))[0] == 200


async def test_the_stats_are_read_and_the_spool_and_handover_removed(tmp_path: Path) -> None:
    repo = FakeRepo(tmp_path / "repo", {})
    data_dir = _data_dir(tmp_path)
    tag = data_dir / "pg_wal" / SPOOL_DIR / "0123456789abcdef"
    out: Handover | None = None
    async with serving(data_dir, repo, SCOPE, RunAs()) as served:
        out = served
        tag.mkdir(parents=True)
        lines = [
            stats_line(seg(1, 1), True, 0),
            stats_line(seg(1, 2), False, 0.25),
            stats_line(seg(1, 3), True, 0),
        ]
        (tag / "stats").write_text("".join(lines))
        assert handover_dir(data_dir).is_dir()
    assert out is not None and tuple(out.stats) == (3, 2, 0.25)
    assert not handover_dir(data_dir).exists()
    assert not (data_dir / "pg_wal" / SPOOL_DIR).exists()


async def test_a_segment_asked_for_while_in_out_is_neither_fetched_again_nor_dropped(tmp_path: Path) -> None:
    # the request is seen (busy) before its answer moves the cursor: the window still holds it
    from hakeeper.backup.handover import _Server

    names = [seg(1, n) for n in range(1, 8)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names}, delay=0.5)
    server = _Server(
        tmp_path / "h",
        repo,
        SCOPE,
        RunAs(),
        path=None,
        prefetch=4,
        max_bytes=4 * 16 * SEG,
        parallel=4,
        outcome=Handover(),
    )
    server.cursor = names[0]
    server.written = {names[1]}
    server.busy = {names[1]}
    server._pump()
    assert sorted(server.downloads) == names[2:5]  # 3 slots beside the one in out/
    server.cursor = names[1]  # the answer: the file stays until the script took it
    server._pump()
    assert server.written == {names[1]}
    assert sorted(server.downloads) == names[2:5]  # the bound: 4 with the one being handed over
    server.closing = True
    for t in server.downloads.values():
        t.cancel()
    await asyncio.gather(*server.downloads.values(), return_exceptions=True)


async def test_a_segment_asked_for_again_behind_the_window_leaves_the_window_alone(tmp_path: Path) -> None:
    # PostgreSQL's WAL prefetcher reads ahead: a segment may be asked for again after the next
    names = [seg(1, n) for n in range(1, 12)]
    repo = FakeRepo(tmp_path / "repo", {n: content(n) for n in names})
    data_dir = _data_dir(tmp_path)
    rec = Recovery(data_dir)
    async with serving(data_dir, repo, SCOPE, RunAs(), prefetch=16, max_bytes=4 * SEG) as served:
        order = [*names[:4], names[2], *names[4:]]
        for n in order:
            assert await rec.ask(n) == (0, content(n)), n
            await asyncio.sleep(0.05)
            assert len(rec.out_segments()) <= 4
        assert served.peak_segments <= 4
    assert repo.gets.count(names[2]) == 2  # asked for twice: fetched twice
    # the window was not moved back; to stay within 4 segments with the one asked for again,
    # it gave up its furthest segment (fetched again later), nothing else
    assert repo.gets.count(names[7]) == 2
    assert set(repo.gets) == {*names, seg(1, 12)}
    assert len(repo.gets) == len(set(repo.gets)) + 2


async def test_the_clean_up_never_goes_through_links(tmp_path: Path) -> None:
    # the spool belongs to PostgreSQL's OS user; the restore cleans it up as root
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (victim / "stats").write_text(stats_line(seg(1, 1), True, 0) * 5)
    data_dir = _data_dir(tmp_path)
    root = data_dir / "pg_wal" / SPOOL_DIR
    root.mkdir()
    (root / "0123456789abcdef").symlink_to(victim)
    plain = root / "fedcba9876543210"
    plain.mkdir()
    (plain / "stats").symlink_to(victim / "stats")
    async with serving(data_dir, FakeRepo(tmp_path / "repo", {}), SCOPE, RunAs()) as served:
        pass
    assert served.stats.requests == 0  # neither stats file was read through its link
    assert sorted(os.listdir(victim)) == ["keep", "stats"]  # no .lock made there, nothing removed
    assert not plain.exists() and (root / "0123456789abcdef").is_symlink()
