"""The WAL archiver's logic: ordering, the local queue and its cap, the pg_wal cap, conflicts,
the hand-over script, refusal and restart, and walfetch's prefetch helpers.

The archiver runs here against a directory laid out like pg_wal (``archive_status/*.ready``
written by the test) and real filesystem repositories in tmp_path; a repository is taken
"down" by renaming its directory away (root bypasses permissions).  PostgreSQL itself comes
in tests/integration/test_wal_archive.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup import codec
from hakeeper.backup.archive.archiver import Archiver, archive_repository_config
from hakeeper.backup.archive.command import render_script
from hakeeper.backup.archive.gaps import GapBook
from hakeeper.backup.archive.plan import ReadyInfo, archive_order, backoff, plan_give_up, plan_queue_drops
from hakeeper.backup.archive.spool import SpoolQueue
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.walfetch import (
    next_segments,
    prefetch_dir,
    segno_of_name,
    serve_prefetched,
)
from hakeeper.backup.walspool import clear_spool, plan_spool, predict_window, spool_segments
from hakeeper.core.backup_config import ArchiveConfig, RepositoryConfig

SEG = 1 << 20  # small "segments": the archiver does not care about the size


def seg(n: int, tli: int = 1) -> str:
    return f"{tli:08X}{0:08X}{n:08X}"


# ---------------------------------------------------------------------------------- pure logic


def test_archive_order_is_postgresql_order() -> None:
    names = [seg(3), "00000002.history", seg(1), f"{seg(2)}.partial", seg(2), f"{seg(2)}.00000028.backup"]
    assert sorted(names, key=archive_order) == [
        "00000002.history",
        seg(1),
        seg(2),
        f"{seg(2)}.00000028.backup",
        f"{seg(2)}.partial",
        seg(3),
    ]


def test_queue_drops_oldest_segments_first_history_last_and_stops_at_the_cap() -> None:
    sizes = {seg(5): 10, seg(3): 10, "00000002.history": 1, seg(4): 10}
    assert plan_queue_drops(sizes, 31) == []
    assert plan_queue_drops(sizes, 30) == [seg(3)]
    assert plan_queue_drops(sizes, 11) == [seg(3), seg(4)]
    assert plan_queue_drops(sizes, 0) == [seg(3), seg(4), seg(5), "00000002.history"]
    # a file being pushed right now counts but is not dropped
    assert plan_queue_drops(sizes, 11, busy={seg(3)}) == [seg(4), seg(5)]


def test_give_up_only_failed_files_in_postgresql_order_until_under_the_cap() -> None:
    ready = [
        ReadyInfo(seg(3), 10, True),
        ReadyInfo(seg(1), 10, True),
        ReadyInfo(seg(5), 10, True),
        ReadyInfo(seg(2), 10, True),
        ReadyInfo(seg(4), 10, False),  # still being tried: not given up, nor anything after it
    ]
    assert plan_give_up(ready, 50) == []
    assert plan_give_up(ready, 49) == [seg(1)]
    assert plan_give_up(ready, 25) == [seg(1), seg(2), seg(3)]
    assert plan_give_up(ready, 0) == [seg(1), seg(2), seg(3)]
    # handed back already (PostgreSQL not there yet): not counted against the cap...
    given = [ReadyInfo(seg(1), 10, False, done=True), ReadyInfo(seg(2), 10, False, done=True)]
    assert plan_give_up([*given, ReadyInfo(seg(3), 10, True), ReadyInfo(seg(4), 10, True)], 20) == []
    assert plan_give_up([*given, ReadyInfo(seg(3), 10, True), ReadyInfo(seg(4), 10, True)], 10) == [seg(3)]
    # ...unless a file PostgreSQL must archive first cannot be: it blocks them all
    stuck = [
        ReadyInfo("00000002.history", 1, True),  # conflict
        ReadyInfo(seg(7, 2), 10, False, done=True),
        ReadyInfo(seg(8, 2), 10, False, done=True),
    ]
    assert plan_give_up(stuck, 25) == []
    assert plan_give_up(stuck, 20) == ["00000002.history"]


def test_wal_compression_level_overrides_the_repositorys() -> None:
    rc = RepositoryConfig(name="r", type="fs", path=Path("/x"), compression_level=9)
    assert archive_repository_config(rc, ArchiveConfig()).compression_level == 1  # the default
    assert archive_repository_config(rc, ArchiveConfig(compression_level=None)) is rc
    assert rc.compression_level == 9


def test_backoff_doubles_up_to_the_limit() -> None:
    assert [backoff(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


# ---------------------------------------------------------------------------------- the script


def run_script(spool: Path, fname: str, timeout: float = 10) -> tuple[int, float]:
    t0 = time.monotonic()
    rc = subprocess.run(["sh", str(spool / "archive_command.sh"), f"pg_wal/{fname}", fname], timeout=timeout)
    return rc.returncode, time.monotonic() - t0


@pytest.fixture
def script_spool(tmp_path: Path) -> Path:
    (tmp_path / "done").mkdir()
    (tmp_path / "archive_command.sh").write_text(render_script(tmp_path, timeout=0.6))
    return tmp_path


def test_script_exits_0_on_its_marker_and_removes_it(script_spool: Path) -> None:
    (script_spool / "done" / seg(1)).touch()
    assert run_script(script_spool, seg(1))[0] == 0
    assert not (script_spool / "done" / seg(1)).exists()


def test_script_waits_for_the_marker(script_spool: Path) -> None:
    (script_spool / "archive_command.sh").write_text(render_script(script_spool, timeout=10))

    async def later() -> tuple[int, float]:
        proc = asyncio.create_task(asyncio.to_thread(run_script, script_spool, seg(2)))
        await asyncio.sleep(0.3)
        (script_spool / "done" / seg(2)).touch()
        return await proc

    rc, took = asyncio.run(later())
    assert rc == 0 and 0.3 <= took < 5  # the marker ended the wait, not the 10 s timeout


def test_script_fails_after_its_timeout_and_on_bad_names(script_spool: Path) -> None:
    (script_spool / "done" / seg(9)).touch()  # someone else's marker is not ours
    rc, took = run_script(script_spool, seg(3))
    assert rc == 1 and 0.5 <= took < 3
    assert run_script(script_spool, "../x")[0] == 1
    assert run_script(script_spool, "")[0] == 1
    assert (script_spool / "done" / seg(9)).exists()


# ---------------------------------------------------------------------------------- queue and gaps


def test_spool_queue_shares_one_copy_counts_it_once_and_reloads(tmp_path: Path) -> None:
    q = SpoolQueue(tmp_path / "queue", ["a", "b"])
    q.load()
    q.add(seg(1), b"x" * 100, ["a", "b"])
    q.add(seg(2), b"y" * 50, ["b"])
    q.add(seg(2), b"y" * 50, ["a", "b"])  # later: also for a (same file)
    assert q.total_bytes == 150
    assert q.files_for("a") == [seg(1), seg(2)] and q.bytes_for("b") == 150
    assert os.stat(q.path("a", seg(1))).st_ino == os.stat(q.path("b", seg(1))).st_ino
    (tmp_path / "queue" / ".incoming" / "leftover.tmp").write_bytes(b"z")
    (tmp_path / "queue" / "gone").mkdir()
    (tmp_path / "queue" / "gone" / seg(1)).write_bytes(b"z")
    q2 = SpoolQueue(tmp_path / "queue", ["a", "b"])
    removed = q2.load()
    assert {Path(r).name for r in removed} == {"leftover.tmp", "gone"}
    assert {n: (e.size, e.repos) for n, e in q2.entries.items()} == {
        seg(1): (100, {"a", "b"}),
        seg(2): (50, {"a", "b"}),
    }
    q2.remove("a", seg(1))
    assert q2.total_bytes == 150 and q2.files_for("a") == [seg(2)]
    q2.remove("b", seg(1))
    assert q2.total_bytes == 50 and q2.read("b", seg(2)) == b"y" * 50


def test_gap_book_keeps_records_until_published_everywhere(tmp_path: Path) -> None:
    g = GapBook(tmp_path / "gaps", ["a", "b"])
    g.load()
    rec = g.record({"reason": "queue_cap", "files": [seg(1), seg(2)], "repositories": ["b"]})
    assert json.loads(rec.body)["files"] == [seg(1), seg(2)]
    g.published(rec.gap_id, "a")
    g2 = GapBook(tmp_path / "gaps", ["a", "b"])
    g2.load()
    assert g2.count == 1 and g2.records[rec.gap_id].pending == {"b"}
    assert g2.records[rec.gap_id].body == rec.body
    g2.published(rec.gap_id, "b")
    g3 = GapBook(tmp_path / "gaps", ["a", "b"])
    g3.load()
    assert g3.count == 1 and g3.records == {}  # the local record stays, nothing left to publish


# ---------------------------------------------------------------------------------- the archiver


class Rig:
    """A pg_wal-like directory, repositories in tmp_path and an archiver over them."""

    def __init__(self, tmp: Path, repos: list[str], **cfg: Any) -> None:
        self.tmp = tmp
        self.pg_wal = tmp / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)
        self.spool = tmp / "spool"
        self.repo_dirs = {r: tmp / f"repo-{r}" for r in repos}
        for d in self.repo_dirs.values():
            d.mkdir()
        self.allowed = True
        self.reason = "test says no"
        self.cfg = ArchiveConfig(**{"parallel": 2, "poll_interval": 0.01, **cfg})
        self.content: dict[str, bytes] = {}
        self.arch = self.new_archiver()

    def new_archiver(
        self, repo_factory: Callable[[str, Path], FilesystemRepository] | None = None
    ) -> Archiver:
        make = repo_factory or (lambda name, path: FilesystemRepository(path, name=name))
        a = Archiver(
            scope="sc",
            pg_wal=self.pg_wal,
            spool_dir=self.spool,
            repositories=[make(n, d) for n, d in self.repo_dirs.items()],
            cfg=self.cfg,
            may_archive=lambda: self.allowed,
            refusal_reason=lambda: None if self.allowed else self.reason,
            node="n1",
        )
        a.prepare()
        return a

    def ready(self, name: str, size: int = SEG) -> bytes:
        data = os.urandom(min(64, size)) + bytes(max(0, size - 64))
        (self.pg_wal / name).write_bytes(data)
        (self.pg_wal / "archive_status" / f"{name}.ready").touch()
        self.content[name] = data
        return data

    def marker(self, name: str) -> bool:
        return (self.spool / "done" / name).exists()

    def consume(self, name: str) -> None:
        """What PostgreSQL does once archive_command exited 0."""
        (self.spool / "done" / name).unlink()
        (self.pg_wal / "archive_status" / f"{name}.ready").rename(
            self.pg_wal / "archive_status" / f"{name}.done"
        )

    def down(self, repo: str) -> None:
        self.repo_dirs[repo].rename(self.repo_dirs[repo].with_name(f"away-{repo}"))

    def up(self, repo: str) -> None:
        self.repo_dirs[repo].with_name(f"away-{repo}").rename(self.repo_dirs[repo])

    def stored(self, repo: str, name: str) -> bytes | None:
        p = self.repo_dirs[repo] / "sc" / "wal" / name
        return codec.decode(p.read_bytes(), name)[0] if p.exists() else None

    async def settle(self, rounds: int = 400) -> None:
        """Tick until nothing is in flight and a pass starts nothing new."""
        for _ in range(rounds):
            self.arch.tick()
            if not self.arch._tasks:
                self.arch.tick()
                if not self.arch._tasks:
                    return
            await asyncio.gather(*list(self.arch._tasks), return_exceptions=True)
        raise AssertionError("archiver did not settle")


@pytest.fixture
async def rig2(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, ["a", "b"])
    yield r
    await r.arch.close()


async def test_every_file_goes_to_every_repository_then_the_marker(rig2: Rig) -> None:
    for n in (1, 2, 3):
        rig2.ready(seg(n))
    rig2.ready("00000002.history", 42)
    await rig2.settle()
    for name, data in rig2.content.items():
        assert rig2.stored("a", name) == data and rig2.stored("b", name) == data
        assert rig2.marker(name)
    st = rig2.arch.status()
    assert st["archived_files"] == 4 and st["pending_files"] == 0
    assert [r["archived"] for r in st["repositories"]] == [4, 4]


async def test_a_link_in_pg_wal_is_never_read_nor_archived(rig2: Rig, tmp_path: Path) -> None:
    """Root mode: pg_wal belongs to the PostgreSQL user; a link there plus a .ready file must not
    make the archiver (root) upload a file that user cannot read."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root-only secret")
    victim.chmod(0o600)
    (rig2.pg_wal / seg(7)).symlink_to(victim)
    (rig2.pg_wal / "archive_status" / f"{seg(7)}.ready").touch()
    rig2.ready(seg(8))
    await rig2.settle()
    assert rig2.stored("a", seg(7)) is None and rig2.stored("b", seg(7)) is None
    assert not rig2.marker(seg(7)), "never reported archived"
    assert rig2.stored("a", seg(8)) == rig2.content[seg(8)], "the others go on"
    assert victim.read_bytes() == b"root-only secret" and oct(victim.stat().st_mode & 0o777) == "0o600"


async def test_history_files_go_before_any_segment(tmp_path: Path) -> None:
    order: list[str] = []

    class Recording(FilesystemRepository):
        async def put_unique(self, name: str, data: bytes, **kw: Any) -> Any:
            order.append("start " + name.rsplit("/", 1)[1])
            await asyncio.sleep(0.05)
            try:
                return await super().put_unique(name, data, **kw)
            finally:
                order.append("end " + name.rsplit("/", 1)[1])

    rig = Rig(tmp_path, ["a"], parallel=4)
    await rig.arch.close()
    rig.arch = rig.new_archiver(lambda n, p: Recording(p, name=n))
    for n in (5, 3, 4):
        rig.ready(seg(n, 2))
    rig.ready("00000002.history", 42)
    await rig.settle()
    # the segments of timeline 2 start only once its history file is stored
    assert order[:2] == ["start 00000002.history", "end 00000002.history"]
    assert sorted(order[2:]) == sorted([f"{e} {seg(n, 2)}" for n in (3, 4, 5) for e in ("start", "end")])
    await rig.arch.close()


async def test_a_down_repository_gets_a_queue_and_catches_up(rig2: Rig) -> None:
    rig2.down("b")
    rig2.ready(seg(1))
    rig2.ready(seg(2))
    await rig2.settle()
    # handed back: durable in a, durably queued for b
    assert rig2.marker(seg(1)) and rig2.marker(seg(2))
    assert rig2.stored("a", seg(1)) == rig2.content[seg(1)]
    assert rig2.arch.queue.files_for("b") == [seg(1), seg(2)]
    assert rig2.arch.queue.read("b", seg(2)) == rig2.content[seg(2)]
    rs = rig2.arch.repos["b"]
    assert not rs.up and rs.failures >= 1 and "missing" in (rs.last_error or "")
    rig2.consume(seg(1))
    rig2.consume(seg(2))
    rig2.ready(seg(3))  # b is known down: not even tried, straight to the queue
    failures = rs.failures
    await rig2.settle()
    assert rig2.marker(seg(3)) and rs.failures == failures
    rig2.up("b")
    rs.next_probe = 0  # skip the back-off
    await rig2.settle()
    assert rs.up
    for n in (1, 2, 3):
        assert rig2.stored("b", seg(n)) == rig2.content[seg(n)]
    assert rig2.arch.queue.entries == {}


async def test_queue_cap_drops_the_oldest_and_records_the_gap(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ["a", "b"], max_queue_bytes=2 * SEG)
    rig.down("b")
    for n in (1, 2, 3, 4):
        rig.ready(seg(n))
        await rig.settle()
        assert rig.marker(seg(n))
    assert rig.arch.queue.files_for("b") == [seg(3), seg(4)]
    assert rig.arch.queue.total_bytes <= 2 * SEG
    gaps = [json.loads(p.read_text()) for p in sorted((rig.spool / "gaps").glob("*.json"))]
    assert [(g["reason"], g["repositories"], g["files"]) for g in gaps] == [
        ("queue_cap", ["b"], [seg(1)]),
        ("queue_cap", ["b"], [seg(2)]),
    ]
    # published to a at once; to b when it is back, with its queue
    published_a = sorted(p.name for p in (rig.repo_dirs["a"] / "sc" / "wal-gaps").iterdir())
    assert len(published_a) == 2
    rig.up("b")
    rig.arch.repos["b"].next_probe = 0
    await rig.settle()
    assert sorted(p.name for p in (rig.repo_dirs["b"] / "sc" / "wal-gaps").iterdir()) == published_a
    assert rig.stored("b", seg(1)) is None and rig.stored("b", seg(4)) == rig.content[seg(4)]
    assert rig.arch.status()["gaps"] == {"recorded": 2, "unpublished": 0}
    await rig.arch.close()


async def test_nothing_stored_anywhere_means_no_marker_and_pg_wal_grows_by_default(rig2: Rig) -> None:
    rig2.down("a")
    rig2.down("b")
    for n in (1, 2, 3):
        rig2.ready(seg(n))
    await rig2.settle()
    assert not any(rig2.marker(seg(n)) for n in (1, 2, 3))
    assert rig2.arch.status()["pending_files"] == 3 and rig2.arch.given_up_files == 0
    assert rig2.arch.queue.entries == {}  # the queue is for files stored somewhere already


async def test_pg_wal_cap_gives_up_the_oldest_failed_files_with_a_gap_record(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ["a"], max_pg_wal_bytes=2 * SEG)
    rig.down("a")
    for n in (1, 2, 3, 4):
        rig.ready(seg(n))
    await rig.settle()
    assert [rig.marker(seg(n)) for n in (1, 2, 3, 4)] == [True, True, False, False]
    (gap,) = [json.loads(p.read_text()) for p in (rig.spool / "gaps").glob("*.json")]
    assert (gap["reason"], gap["repositories"], gap["files"]) == ("pg_wal_cap", ["a"], [seg(1), seg(2)])
    rig.consume(seg(1))
    rig.consume(seg(2))
    rig.up("a")
    rig.arch.repos["a"].next_probe = 0
    await rig.settle()
    assert rig.marker(seg(3)) and rig.stored("a", seg(3)) == rig.content[seg(3)]
    assert rig.stored("a", seg(1)) is None
    assert len(list((rig.repo_dirs["a"] / "sc" / "wal-gaps").iterdir())) == 1
    await rig.arch.close()


async def test_a_conflict_is_never_handed_back_nor_retried(rig2: Rig) -> None:
    other = os.urandom(SEG)
    await FilesystemRepository(rig2.repo_dirs["b"], name="b").put_unique(f"sc/wal/{seg(7)}", other)
    rig2.ready(seg(7))
    await rig2.settle()
    assert not rig2.marker(seg(7))
    assert rig2.stored("a", seg(7)) == rig2.content[seg(7)]
    assert rig2.stored("b", seg(7)) == other  # never overwritten
    quarantined = list((rig2.repo_dirs["b"] / "quarantine" / "sc" / "wal").iterdir())
    assert len(quarantined) == 1
    st = rig2.arch.status()
    assert st["conflicted_files"] == [seg(7)] and st["recent_conflicts"][0]["repo"] == "b"
    for _ in range(5):  # not retried: no second quarantined copy
        await rig2.settle()
    assert len(list((rig2.repo_dirs["b"] / "quarantine" / "sc" / "wal").iterdir())) == 1


async def test_an_identical_copy_already_there_is_success(rig2: Rig) -> None:
    data = rig2.ready(seg(4))
    await FilesystemRepository(rig2.repo_dirs["a"], name="a").put_unique(f"sc/wal/{seg(4)}", data)
    await rig2.settle()
    assert rig2.marker(seg(4)) and rig2.arch.status()["conflicted_files"] == []


async def test_nothing_is_pushed_while_refused_and_markers_are_withdrawn(rig2: Rig) -> None:
    rig2.ready(seg(1))
    await rig2.settle()
    assert rig2.marker(seg(1))
    rig2.allowed = False
    rig2.ready(seg(2))
    await rig2.settle()
    assert not rig2.marker(seg(1))  # withdrawn: a fenced node vouches for nothing
    assert rig2.stored("a", seg(2)) is None and not rig2.marker(seg(2))
    st = rig2.arch.status()
    assert st["active"] is False and st["refused_reason"] == "test says no"
    rig2.allowed = True
    await rig2.settle()
    assert rig2.marker(seg(1)) and rig2.marker(seg(2))  # re-checked: identical copies


async def test_a_marker_postgresql_used_but_did_not_record_is_put_back(rig2: Rig, monkeypatch: Any) -> None:
    import hakeeper.backup.archive.command as command_mod

    monkeypatch.setattr(command_mod, "MARKER_REWRITE_AFTER", 0.0)
    rig2.ready(seg(1))
    await rig2.settle()
    (rig2.spool / "done" / seg(1)).unlink()  # script ran, then PostgreSQL crashed before .done
    await asyncio.sleep(0.01)
    await rig2.settle()
    assert rig2.marker(seg(1))


async def test_restart_withdraws_old_markers_and_drains_the_saved_queue(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ["a", "b"])
    rig.down("b")
    rig.ready(seg(1))
    await rig.settle()
    assert rig.marker(seg(1))
    await rig.arch.close()
    (rig.spool / "done" / "00000001000000000000FFFF").touch()  # stale marker of an earlier run
    rig.up("b")
    rig.arch = rig.new_archiver()
    assert not rig.marker("00000001000000000000FFFF") and not rig.marker(seg(1))
    assert rig.arch.queue.files_for("b") == [seg(1)]
    await rig.settle()
    assert rig.stored("b", seg(1)) == rig.content[seg(1)] and rig.arch.queue.entries == {}
    assert rig.marker(seg(1))  # still .ready: re-pushed (already present) and handed back again
    await rig.arch.close()


async def test_a_hanging_repository_is_queued_after_repo_timeout(tmp_path: Path) -> None:
    class Hanging(FilesystemRepository):
        async def put_unique(self, name: str, data: bytes, **kw: Any) -> Any:
            await asyncio.sleep(3600)

    rig = Rig(tmp_path, ["a", "b"], repo_timeout=0.2)
    await rig.arch.close()
    rig.arch = rig.new_archiver(
        lambda n, p: Hanging(p, name=n) if n == "b" else FilesystemRepository(p, name=n)
    )
    rig.ready(seg(1))
    t0 = time.monotonic()
    await rig.settle()
    assert rig.marker(seg(1)) and time.monotonic() - t0 < 2
    assert rig.arch.queue.files_for("b") == [seg(1)]
    assert "no answer" in (rig.arch.repos["b"].last_error or "")
    await rig.arch.close()


async def test_a_slow_repository_does_not_hold_the_hand_back_up(tmp_path: Path) -> None:
    class Slow(FilesystemRepository):
        async def put_unique(self, name: str, data: bytes, **kw: Any) -> Any:
            await asyncio.sleep(0.6)
            return await super().put_unique(name, data, **kw)

    rig = Rig(tmp_path, ["a", "b"], queue_slow_after=0.1)
    await rig.arch.close()
    rig.arch = rig.new_archiver(lambda n, p: Slow(p, name=n) if n == "b" else FilesystemRepository(p, name=n))
    rig.ready(seg(1))
    t0 = time.monotonic()
    for _ in range(100):
        rig.arch.tick()
        if rig.marker(seg(1)):
            break
        await asyncio.sleep(0.02)
    assert rig.marker(seg(1)) and time.monotonic() - t0 < 0.5  # durable in a, queued for b
    assert rig.arch.queue.files_for("b") == [seg(1)]
    await asyncio.sleep(0.8)  # the push to b went on and finished: the queue entry is gone
    await rig.settle()
    assert rig.stored("b", seg(1)) == rig.content[seg(1)]
    assert rig.arch.queue.entries == {} and rig.arch.repos["b"].up
    await rig.arch.close()


async def test_after_a_promotion_the_old_timelines_wal_is_checked_up_to_the_switch(rig2: Rig) -> None:
    hist = "1\t0/5000028\tno recovery target specified\n"  # timeline 1 ended in segment 5
    (rig2.pg_wal / "00000002.history").write_text(hist)
    (rig2.pg_wal / "archive_status" / "00000002.history.ready").touch()
    for repo, segnos in (("a", (2, 3, 4)), ("b", (2, 4))):
        r = FilesystemRepository(rig2.repo_dirs[repo], name=repo)
        for n in segnos:
            await r.put_unique(f"sc/wal/{seg(n)}", b"wal")
    await FilesystemRepository(rig2.repo_dirs["b"], name="b").put_unique(f"sc/wal/{seg(9)}", b"after")
    rig2.arch.after_promotion(2)
    for _ in range(200):
        rig2.arch.tick()
        await asyncio.sleep(0.01)
        if rig2.arch.switch_check.report is not None:
            break
    check = rig2.arch.switch_check.report
    assert check is not None and check["switch_lsn"] == "0/5000028"
    assert check["repositories"]["a"] == {"checked": True, "from": seg(2), "to": seg(4), "missing": 0}
    assert check["repositories"]["b"] == {
        "checked": True,
        "from": seg(2),
        "to": seg(4),
        "missing": 1,
        "first_missing": seg(3),
    }
    assert rig2.marker("00000002.history")


async def test_metrics_are_exported(rig2: Rig) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    await rig2.arch.close()
    rig2.arch = Archiver(
        scope="sc",
        pg_wal=rig2.pg_wal,
        spool_dir=rig2.spool,
        repositories=[FilesystemRepository(d, name=n) for n, d in rig2.repo_dirs.items()],
        cfg=rig2.cfg,
        may_archive=lambda: True,
        registry=reg,
    )
    rig2.arch.prepare()
    rig2.ready(seg(1))
    await rig2.settle()
    text = generate_latest(reg).decode()
    assert 'hakeeper_archive_files_total{repo="a"} 1.0' in text
    assert 'hakeeper_archive_last_success_timestamp_seconds{repo="b"}' in text
    assert "hakeeper_archive_pending_files 0.0" in text
    assert "hakeeper_archive_latency_seconds_count 1.0" in text


# ---------------------------------------------------------------------------------- walfetch helpers


def test_next_segments_follow_wal_arithmetic() -> None:
    assert next_segments("0000000300000000000000FE", 16 << 20, 3) == [
        "0000000300000000000000FF",
        "000000030000000100000000",
        "000000030000000100000001",
    ]
    assert next_segments("000000010000000000000003", 1 << 30, 2) == [  # 4 per xlogid
        "000000010000000100000000",
        "000000010000000100000001",
    ]
    assert next_segments("00000002.history", 16 << 20, 3) == []
    assert next_segments("000000010000000000000003", 3 << 20, 3) == []  # not a valid segment size
    assert segno_of_name("000000010000000100000002", 16 << 20) == 258


def test_prefetch_dir_depends_on_the_config_and_serves_only_complete_files(tmp_path: Path) -> None:
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    a, b = prefetch_dir(dest, b'{"scope": "a"}'), prefetch_dir(dest, b'{"scope": "b"}')
    assert a != b and a.parent == tmp_path / "pg_wal" / ".hakeeper-prefetch"
    a.mkdir(parents=True)
    (a / f".{seg(2)}.tmp.{os.getpid()}").write_bytes(b"partial")
    assert serve_prefetched(a, seg(2), dest) is None and not dest.exists()
    (a / seg(2)).write_bytes(b"w" * 100)
    assert serve_prefetched(a, seg(2), dest) == 100 and dest.read_bytes() == b"w" * 100
    assert not (a / seg(2)).exists()


def test_prefetch_cleanup_drops_what_recovery_passed(tmp_path: Path) -> None:
    # The worker's spool plan (walspool) replaced walfetch._cleanup: what recovery passed goes,
    # now the segment just handed over too (recovery never asks for it again).
    for n in (1, 2, 3, 4):
        (tmp_path / seg(n)).write_bytes(b"x")
    (tmp_path / f".{seg(5)}.tmp.999999999").write_bytes(b"x")  # a dead download
    window = predict_window(seg(3), 16 << 20, 4, None)
    plan = plan_spool(window, spool_segments(tmp_path), (), 4, 4)
    assert plan.drop == (seg(1), seg(2), seg(3)) and seg(4) not in plan.start
    for dropped in plan.drop:
        (tmp_path / dropped).unlink()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [seg(4)]
    clear_spool(tmp_path)
    assert list(tmp_path.iterdir()) == []
