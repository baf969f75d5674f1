"""The reader of pg_basebackup's tar stream for indexed backups (basebackup._PipeReader): parts
of exactly part_size bytes cut from a pipe into reused buffers, the tar scanner and the index
builder fed on the way, and the zstd level of parts compressed here."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import tarfile
import threading
import time

import pytest
import zstandard

from hakeeper.backup import catalog
from hakeeper.backup.basebackup import BackupError, _part_level, _PartUploader, _PipeReader, _Run
from hakeeper.backup.catalog import BackupRecord, BackupStatus
from hakeeper.backup.errors import RepoError
from hakeeper.backup.repo import PutResult


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _run(stream: bytes, part_size: int, buffers: int = 2) -> tuple[_PipeReader, list[bytes], int]:
    """Feed ``stream`` through a pipe (a writer thread, small writes) and collect the parts."""
    rfd, wfd = os.pipe()

    def write() -> None:
        for i in range(0, len(stream), 3000):
            os.write(wfd, stream[i : i + 3000])
        os.close(wfd)

    writer = threading.Thread(target=write)
    writer.start()
    reader = _PipeReader(rfd, part_size, buffers)
    parts: list[bytes] = []
    ids: set[int] = set()
    ends = 0

    def deliver(buf: bytearray | None, size: int) -> None:
        nonlocal ends
        if buf is None:
            ends += 1
            return
        parts.append(bytes(buf[:size]))
        ids.add(id(buf))
        reader.release(buf)

    try:
        reader.run(time.monotonic(), deliver)
    finally:
        writer.join()
        os.close(rfd)
    assert len(ids) <= max(2, buffers)  # the buffers are reused, not one per part
    return reader, parts, ends


def test_parts_are_exactly_part_size_and_the_scanner_and_index_see_everything() -> None:
    files = {
        "backup_label": b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
        "base/1/1234": os.urandom(70_000),
        "global/pg_control": b"c" * 8192,
        "backup_manifest": b'{"PostgreSQL-Backup-Manifest-Version": 1}',
    }
    stream = _tar(files)
    reader, parts, ends = _run(stream, 16384)
    assert ends == 1
    assert b"".join(parts) == stream
    assert [len(p) for p in parts[:-1]] == [16384] * (len(parts) - 1)
    assert 0 < len(parts[-1]) <= 16384
    assert reader.total == len(stream)
    assert reader.scanner.ended
    assert reader.scanner.files["backup_label"] == files["backup_label"]
    assert reader.scanner.files["backup_manifest"] == files["backup_manifest"]
    assert reader.at_end  # pg_control seen
    index = reader.indexer.finish([len(p) for p in parts])
    by_path = {m.path: m for m in index.members}
    assert by_path["base/1/1234"].size == 70_000
    off = by_path["base/1/1234"].offset
    assert stream[off : off + 70_000] == files["base/1/1234"]
    assert set(reader.marks) >= {"first_byte", "stream_end"}


def test_a_stream_of_exactly_whole_parts_ends_without_an_empty_part() -> None:
    stream = _tar({"a": b"x" * 1000})  # GNU tar pads to 10240 bytes
    assert len(stream) % 2048 == 0
    _reader, parts, ends = _run(stream, 2048)
    assert ends == 1
    assert [len(p) for p in parts] == [2048] * (len(stream) // 2048)


def test_an_empty_stream_gives_one_empty_part() -> None:
    reader, parts, ends = _run(b"", 4096)
    assert (parts, ends, reader.total) == ([b""], 1, 0)


def test_not_a_tar_stream_is_refused() -> None:
    with pytest.raises(BackupError, match="not a valid tar stream"):
        _run(b"\x01" * 4096, 1024)


def test_a_stopped_reader_waiting_for_a_buffer_returns() -> None:
    rfd, wfd = os.pipe()
    os.write(wfd, _tar({"a": b"y" * 5000}))
    reader = _PipeReader(rfd, 1024, 2)
    got: list[int] = []

    def deliver(buf: bytearray | None, size: int) -> None:
        got.append(size)  # never released: the reader runs out of buffers and waits

    t = threading.Thread(target=reader.run, args=(time.monotonic(), deliver))
    t.start()
    time.sleep(0.3)
    assert got == [1024, 1024]
    reader.stop.set()
    t.join(5)
    assert not t.is_alive()
    os.close(rfd)
    os.close(wfd)


@pytest.mark.parametrize(("configured", "used"), [(1, 1), (2, 1), (3, 1), (4, 4), (19, 19), (25, 19)])
def test_part_level(configured: int, used: int) -> None:
    assert _part_level(configured) == used


class _FakeRepo:
    """Records what is stored; ``fail``: every put raises."""

    def __init__(self, fail: bool = False) -> None:
        self.stored: dict[str, bytes] = {}
        self.fail = fail

    async def put(self, name: str, data: bytes, **_kw: object) -> PutResult:
        if self.fail:
            raise RepoError("disk full")
        self.stored[name] = data
        return PutResult(name, len(data), len(data), "")


def _uploader(repo: _FakeRepo) -> _PartUploader:
    now = catalog.utcnow()
    rec = BackupRecord(
        id="b1",
        label="b1",
        status=BackupStatus.RUNNING,
        scope="s",
        repository="r",
        start_time=now,
        updated_at=now,
    )
    run = _Run(repo=repo, scope="s", record=rec, progress=None)  # type: ignore[arg-type]
    return _PartUploader(run, 2, level=1)


def test_part_buffers_are_given_back_once_compressed_and_parts_decompress_to_them() -> None:
    async def go() -> tuple[_FakeRepo, list[int], list[int]]:
        repo = _FakeRepo()
        up = _uploader(repo)
        released: list[int] = []
        for i in range(3):
            buf = bytearray(bytes([i]) * 5000)
            await up.submit(memoryview(buf)[:4000], release=functools.partial(released.append, i))
        await up.finish()
        return repo, released, up.sizes

    repo, released, sizes = asyncio.run(go())
    assert sorted(released) == [0, 1, 2]
    assert sizes == [4000] * 3
    parts = [zstandard.ZstdDecompressor().decompress(repo.stored[k]) for k in sorted(repo.stored)]
    assert parts == [bytes([i]) * 4000 for i in range(3)]


def test_a_failed_store_still_gives_the_buffer_back_and_ends_the_backup() -> None:
    async def go() -> list[int]:
        up = _uploader(_FakeRepo(fail=True))
        released: list[int] = []
        await up.submit(b"x" * 100, release=functools.partial(released.append, 0))
        with pytest.raises(RepoError):
            await up.finish()
        return released

    assert asyncio.run(go()) == [0]


def test_the_wal_wait_starts_with_pg_controls_header() -> None:
    # pg_basebackup's stdio buffer may keep the end of pg_control until the manifest comes: the
    # stream stops inside the member, and the silence must count as the wait for the WAL
    stream = _tar({"base/1/1": b"d" * 3000, "global/pg_control": b"c" * 8192})
    cut = stream.index(b"c" * 100) + 4000  # inside pg_control's data
    reader, _parts, _ends = _run(stream[:cut], 1 << 20)
    assert not reader.scanner.between_members
    assert reader.at_end
    reader, _parts, _ends = _run(stream[: stream.index(b"global/pg_control")], 1 << 20)
    assert not reader.at_end  # before it: the idle timeout applies
