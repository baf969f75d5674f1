"""Parallel unpack and delta restore of an indexed backup (backup/unpack.py, backup/delta.py)
against a real filesystem repository and synthetic tar streams: the result equals what tar
extracts, a corrupt part fails naming it and leaves no pg_control, and a delta into an older
copy with modified, missing and extra files gives the same tree while fetching less."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import errno
import hashlib
import io
import os
import random
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from hakeeper.backup import catalog, fileindex, restorestate, unpack
from hakeeper.backup.catalog import BackupRecord, BackupStatus, RestoreRefused, StoredObject
from hakeeper.backup.delta import MARKER, check_backup, check_target, delta_restore
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.unpack import UnpackError, compress_part, load_index, unpack_full
from hakeeper.util.proc import RunAs

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
SYSID = 7212345678901234567
BS = 4096
PART = 3000  # parts far smaller than the files: members cross part boundaries


def control(sysid: int, fill: bytes) -> bytes:
    return struct.pack("<Q", sysid) + fill[: 8192 - 8]


def tree(seed: int, changed: bool = False) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {
        "PG_VERSION": b"15\n",
        "base/1/1259": rnd.randbytes(6 * BS + 77),
        "base/1/2619": rnd.randbytes(3 * BS),
        "base/1/empty": b"",
        "base/5/big": rnd.randbytes(12 * BS),
        "global/pg_control": control(SYSID, rnd.randbytes(8192)),
        "postgresql.auto.conf": b"# Do not edit\n",
        "backup_label": b"START WAL LOCATION: 0/2000028\n",
    }
    if changed:  # the newer backup: one block of one file, a file grown, the control file
        big = bytearray(files["base/5/big"])
        big[5 * BS + 10 : 5 * BS + 20] = b"0123456789"
        files["base/5/big"] = bytes(big)
        files["base/1/2619"] += b"more" * 100
        files["global/pg_control"] = control(SYSID, b"\x01" * 8192)
    return files


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for d in ("base", "base/1", "base/5", "global", "pg_wal", "pg_wal/archive_status"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o700
            t.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o600
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


async def store(repo: FilesystemRepository, bid: str, stream: bytes) -> BackupRecord:
    """A complete indexed backup record with its parts and index in ``repo``."""
    parts: list[StoredObject] = []
    sizes: list[int] = []
    for i, at in enumerate(range(0, len(stream), PART)):
        chunk = stream[at : at + PART]
        sizes.append(len(chunk))
        r = await repo.put(
            catalog.object_key("s", bid, catalog.part_name(i)), compress_part(chunk, 3), as_is=True
        )
        parts.append(
            StoredObject(name=catalog.part_name(i), size=r.size, stored_size=r.stored_size, sha256=r.sha256)
        )
    b = fileindex.IndexBuilder(block_size=BS)
    b.feed(stream)
    r = await repo.put(
        catalog.object_key("s", bid, fileindex.INDEX_NAME), fileindex.to_bytes(b.finish(sizes))
    )
    index = StoredObject(name=fileindex.INDEX_NAME, size=r.size, stored_size=r.stored_size, sha256=r.sha256)
    return complete_record(bid, catalog.LAYOUT_INDEXED, parts, len(stream), index=index)


def complete_record(
    bid: str, layout: str, parts: list[StoredObject], size: int, index: StoredObject | None = None
) -> BackupRecord:
    """A complete full backup's record in scope ``s`` of repository ``fs``."""
    return BackupRecord(
        id=bid,
        label=bid,
        status=BackupStatus.COMPLETE,
        scope="s",
        repository="fs",
        start_time=NOW,
        updated_at=NOW,
        layout=layout,
        parts=parts,
        index=index,
        system_identifier=str(SYSID),
        size=size,
    )


async def new_repo(root: Path) -> FilesystemRepository:
    repo = FilesystemRepository(root, name="fs")
    await repo.initialize()
    return repo


def snapshot(root: Path, *, with_state: bool = False) -> dict[str, tuple[str, str]]:
    """relative path -> (kind and mode, sha256 of a file's content); without the restore's
    record of what it wrote, unless asked."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_file():
                out[rel] = (f"f{st.st_mode & 0o777:o}", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (f"d{st.st_mode & 0o777:o}", "")
    if not with_state:
        out.pop(fileindex.STATE_FILE, None)
    return out


def extract(stream: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(stream)) as t:
        t.extractall(into, filter="tar")


@pytest.mark.parametrize("jobs", [1, 4])
async def test_parallel_unpack_equals_a_tar_extraction(tmp_path: Path, jobs: int) -> None:
    repo = await new_repo(tmp_path / "repo")
    stream = make_tar(tree(1))
    rec = await store(repo, "b1", stream)
    assert len(rec.parts) > 20
    seen: list[int] = []
    (tmp_path / "out").mkdir()
    stats = await unpack_full(
        repo, "s", rec, tmp_path / "out", RunAs(), jobs=jobs, progress=lambda _p, done, _t: seen.append(done)
    )
    extract(stream, tmp_path / "tar")
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "tar")
    # every part up to the last file's data; those holding only the end-of-archive padding
    # hold nothing to write and are not fetched
    files = [m for m in (await load_index(repo, "s", rec)).files() if m.size]
    holding = {
        i
        for i in range(len(rec.parts))
        for m in files
        if m.offset < (i + 1) * PART and m.offset + m.size > i * PART
    }
    assert stats.parts_fetched == len(holding) < len(rec.parts)
    assert stats.bytes_written == sum(len(v) for v in tree(1).values())
    assert seen and seen[-1] == stats.bytes_written - 8192  # pg_control comes last, beside progress


async def test_a_corrupt_part_fails_naming_it_and_leaves_no_control_file(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    rec = await store(repo, "b1", make_tar(tree(1)))
    key = catalog.object_key("s", "b1", rec.parts[3].name)
    path = tmp_path / "repo" / key
    blob = bytearray(path.read_bytes())
    blob[40] ^= 0xFF
    path.write_bytes(bytes(blob))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnpackError, match=key):
        await unpack_full(repo, "s", rec, tmp_path / "out", RunAs(), jobs=3)
    assert not (tmp_path / "out" / "global" / "pg_control").exists()


async def test_a_tampered_index_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    rec = await store(repo, "b1", make_tar(tree(1)))
    raw = (await repo.get(catalog.object_key("s", "b1", fileindex.INDEX_NAME))).replace(
        b'"PG_VERSION"', b'"../PG_VER"'
    )
    r = await repo.put(catalog.object_key("s", "b1", fileindex.INDEX_NAME), raw)
    # the record updated too (an attacker with write access to the repository): still refused
    rec.index = StoredObject(
        name=fileindex.INDEX_NAME, size=r.size, stored_size=r.stored_size, sha256=r.sha256
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(UnpackError, match="not one a backup can have written"):
        await unpack_full(repo, "s", rec, tmp_path / "out", RunAs(), jobs=2)
    assert list((tmp_path / "out").iterdir()) == []


async def test_delta_into_an_older_copy_equals_a_full_unpack_and_fetches_less(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    new_stream = make_tar(tree(1, changed=True))
    rec = await store(repo, "b2", new_stream)
    old = tmp_path / "old"
    extract(make_tar(tree(1)), old)
    # the older copy drifted further: a modified block, a missing file, extra files and dirs,
    # WAL, a stale postmaster.pid, a file where the backup has a directory
    drifted = bytearray((old / "base/1/1259").read_bytes())
    drifted[2 * BS + 1 : 2 * BS + 3] = b"XX"
    (old / "base/1/1259").write_bytes(bytes(drifted))
    (old / "base/1/empty").unlink()
    (old / "base/1/99999").write_bytes(b"extra")
    (old / "extra_dir" / "sub").mkdir(parents=True)
    (old / "pg_wal" / "000000010000000000000001").write_bytes(b"w" * 1000)
    (old / "postmaster.pid").write_text("999999\n")
    (old / "pg_wal" / "archive_status").rmdir()
    (old / "pg_wal" / "archive_status").write_bytes(b"not a dir")
    sysid = check_target(old)
    assert sysid == SYSID
    check_backup(rec, sysid, old)
    st = await delta_restore(repo, "s", rec, old, RunAs(), sysid, jobs=3)
    extract(new_stream, tmp_path / "full")
    assert snapshot(old) == snapshot(tmp_path / "full")
    assert not (old / MARKER).exists()
    assert st.bytes_fetched < sum(p.stored_size for p in rec.parts) / 2
    assert st.parts_fetched < st.parts_total
    assert 0 < st.bytes_written < st.bytes_total / 2
    # a second delta right after: nothing differs but pg_control (always rewritten)
    again = await delta_restore(repo, "s", rec, old, RunAs(), sysid, jobs=2)
    assert again.bytes_written == 8192 and again.entries_removed == 0


async def test_delta_refuses_another_cluster_a_backup_without_index_and_a_plain_dir(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    rec = await store(repo, "b2", make_tar(tree(1)))
    other = tmp_path / "other"
    files = tree(1)
    files["global/pg_control"] = control(SYSID + 1, b"\0" * 8192)
    extract(make_tar(files), other)
    with pytest.raises(RestoreRefused, match="another cluster"):
        check_backup(rec, check_target(other), other)
    old_format = rec.model_copy(update={"index": None, "layout": catalog.LAYOUT_STREAM})
    with pytest.raises(RestoreRefused, match="no file index"):
        check_backup(old_format, SYSID, other)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RestoreRefused, match="no readable global/pg_control"):
        check_target(tmp_path / "plain")


async def test_a_failed_delta_leaves_no_control_file_and_can_be_run_again(tmp_path: Path) -> None:
    repo = await new_repo(tmp_path / "repo")
    new_stream = make_tar(tree(1, changed=True))
    rec = await store(repo, "b2", new_stream)
    old = tmp_path / "old"
    extract(make_tar(tree(1)), old)
    # the part holding pg_control's data is missing: the delta fails after shaping the tree
    idx = fileindex.parse_index(
        await repo.get(catalog.object_key("s", "b2", fileindex.INDEX_NAME)), len(rec.parts)
    )
    ctl = idx.by_path()["global/pg_control"]
    starts = fileindex.part_offsets(idx.part_sizes)
    victim = max(i for i, s in enumerate(starts) if s <= ctl.offset)
    key = catalog.object_key("s", "b2", rec.parts[victim].name)
    moved = (tmp_path / "repo" / key).read_bytes()
    (tmp_path / "repo" / key).unlink()
    with pytest.raises(UnpackError, match=key):
        await delta_restore(repo, "s", rec, old, RunAs(), SYSID, jobs=2)
    assert not (old / "global" / "pg_control").exists()
    assert check_target(old) == SYSID  # the marker still says which cluster this was
    (tmp_path / "repo" / key).write_bytes(moved)
    await delta_restore(repo, "s", rec, old, RunAs(), SYSID, jobs=2)
    extract(new_stream, tmp_path / "full")
    assert snapshot(old) == snapshot(tmp_path / "full")


async def test_delta_never_writes_through_links_planted_in_the_old_copy(tmp_path: Path) -> None:
    """The old copy belongs to the PostgreSQL user: a directory swapped for a link to somewhere
    else, and a link at the marker's name, lead nothing out of the data directory."""
    repo = await new_repo(tmp_path / "repo")
    new_stream = make_tar(tree(1, changed=True))
    rec = await store(repo, "b2", new_stream)
    old = tmp_path / "old"
    extract(make_tar(tree(1)), old)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "big"
    victim.write_bytes(b"precious")
    (outside / "marker-victim").write_bytes(b"precious too")
    shutil.rmtree(old / "base" / "5")
    (old / "base" / "5").symlink_to(outside)
    (old / MARKER).symlink_to(outside / "marker-victim")
    await delta_restore(repo, "s", rec, old, RunAs(), SYSID, jobs=2)
    assert victim.read_bytes() == b"precious"
    assert (outside / "marker-victim").read_bytes() == b"precious too"
    extract(new_stream, tmp_path / "full")
    assert snapshot(old) == snapshot(tmp_path / "full")


def big_tree(seed: int) -> dict[str, bytes]:
    """Files large enough for O_DIRECT runs (>= unpack.DIRECT_MIN), of odd sizes."""
    rnd = random.Random(seed)
    files = tree(seed)
    files["base/5/big"] = rnd.randbytes(3 * 1024 * 1024 + 4096 * 3 + 513)
    files["base/5/big2"] = rnd.randbytes(2 * 1024 * 1024)
    return files


async def store_big(repo: FilesystemRepository, bid: str, stream: bytes, part: int) -> BackupRecord:
    global PART
    saved, PART = PART, part
    try:
        return await store(repo, bid, stream)
    finally:
        PART = saved


@pytest.mark.parametrize("direct_works", [True, False])
async def test_large_files_cut_at_unaligned_part_bounds_are_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_works: bool
) -> None:
    """Slices that start and end inside 4 KiB blocks, shared by parts that different workers
    write at once: whole blocks go with O_DIRECT (when the file system takes it), the shared
    partial blocks through the page cache, and the result equals tar's extraction.  Without
    O_DIRECT (EINVAL, as on a file system lacking it) every write takes the page cache."""
    real_open = unpack.open_under
    direct_opens: list[str] = []

    def spy(root: Path, rel: str, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_DIRECT:
            direct_opens.append(rel)
            if not direct_works:
                raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(root, rel, flags, mode)

    monkeypatch.setattr(unpack, "open_under", spy)
    repo = await new_repo(tmp_path / "repo")
    stream = make_tar(big_tree(2))
    rec = await store_big(repo, "b1", stream, 700_001)
    (tmp_path / "out").mkdir()
    stats = await unpack_full(repo, "s", rec, tmp_path / "out", RunAs(), jobs=3)
    extract(stream, tmp_path / "tar")
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "tar")
    assert stats.bytes_written == sum(len(v) for v in big_tree(2).values())
    assert {"base/5/big", "base/5/big2"} <= set(direct_opens)
    assert "PG_VERSION" not in direct_opens  # small files never try
    if direct_works:  # all but the partial blocks at the slices' ends
        assert stats.bytes_direct > (3 + 2) * 1024 * 1024 - 20 * 4096
    else:
        assert stats.bytes_direct == 0


def test_a_part_whose_content_fails_its_checksum_or_size_fails_naming_it(tmp_path: Path) -> None:
    """The stored bytes passed their SHA-256 but the frame's own content checksum or the size
    the index gives does not hold (a wrong record): the part fails, named."""
    content = random.Random(3).randbytes(600_000)
    blob = bytearray(compress_part(content, 3))
    (tmp_path / "f").write_bytes(b"")
    fileindex_ext = fileindex.Extent("f", 0, 0, 300_000)
    sl = [(fileindex_ext, 0, 0, 300_000)]
    deferred: list[tuple[int, bytes]] = []
    with pytest.raises(UnpackError, match="part P1 is 600000 bytes uncompressed, the index says 600001"):
        unpack._unpack_part(bytes(blob), 600_001, "P1", tmp_path, sl, deferred, True)
    with pytest.raises(UnpackError, match="part P2 holds more than the 599999 bytes"):
        unpack._unpack_part(bytes(blob), 599_999, "P2", tmp_path, sl, deferred, True)
    blob[-1] ^= 0xFF  # the frame's content checksum
    with pytest.raises(UnpackError, match="part P3 does not decompress"):
        unpack._unpack_part(bytes(blob), 600_000, "P3", tmp_path, sl, deferred, True)


async def test_a_delta_skips_reading_files_unchanged_since_the_recorded_restore(tmp_path: Path) -> None:
    """A full restore records what it wrote; a later delta takes those hashes for files still
    the same (inode, size, mtime, ctime) and reads only the others -- among them a file whose
    content was changed with its mtime set back (ctime still moved).  --rehash reads all."""
    repo = await new_repo(tmp_path / "repo")
    old_stream = make_tar(big_tree(4))
    rec1 = await store_big(repo, "b1", old_stream, 500_000)
    new_files = big_tree(4)
    big = bytearray(new_files["base/5/big"])
    big[1000:1010] = b"0123456789"  # the newer backup changed one block of one file
    new_files["base/5/big"] = bytes(big)
    new_stream = make_tar(new_files)
    rec2 = await store_big(repo, "b2", new_stream, 500_000)
    out = tmp_path / "out"
    out.mkdir()
    await unpack_full(
        repo, "s", rec1, out, RunAs(), jobs=2, after=lambda idx: restorestate.record(out, idx, RunAs())
    )
    assert (out / fileindex.STATE_FILE).exists()
    # behind the record's back: same size, content changed, mtime put back as it was
    victim = out / "base/5/big2"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_mtime_ns == st.st_mtime_ns

    st1 = await delta_restore(repo, "s", rec2, out, RunAs(), SYSID, jobs=2)
    extract(new_stream, tmp_path / "full")
    want = snapshot(tmp_path / "full")
    got = snapshot(out, with_state=True)
    assert got.pop(fileindex.STATE_FILE)[0] == "f600"  # the delta's own record
    assert got == want
    # read: only big2 (changed behind the record's back) and what was never recorded
    assert st1.bytes_hashed == len(new_files["base/5/big2"])
    assert st1.bytes_unchanged_since_restore >= len(new_files["base/5/big"])
    assert 0 < st1.bytes_written < st1.bytes_total / 2

    # the delta recorded its result: a second one reads nothing; --rehash reads everything
    st2 = await delta_restore(repo, "s", rec2, out, RunAs(), SYSID, jobs=2)
    assert st2.bytes_hashed == 0 and st2.bytes_written == 8192
    st3 = await delta_restore(repo, "s", rec2, out, RunAs(), SYSID, jobs=2, rehash=True)
    assert st3.bytes_hashed == sum(len(v) for k, v in new_files.items() if k != "global/pg_control")
    assert st3.bytes_unchanged_since_restore == 0 and st3.bytes_written == 8192
    assert snapshot(out) == want


async def test_a_backup_holding_a_restore_state_gets_the_restore_s_own(tmp_path: Path) -> None:
    """A backup of a restored cluster picked up its record: a restore writes it like any file,
    then replaces it with its own when it ends (stamps of another directory match nothing)."""
    files = tree(5)
    files[fileindex.STATE_FILE] = b'{"format": 1, "planted": true}'
    repo = await new_repo(tmp_path / "repo")
    rec = await store(repo, "b1", make_tar(files))
    index = await load_index(repo, "s", rec)
    out = tmp_path / "out"
    out.mkdir()
    await unpack_full(repo, "s", rec, out, RunAs(), jobs=2)
    assert (out / fileindex.STATE_FILE).read_bytes() == files[fileindex.STATE_FILE]
    restorestate.record(out, index, RunAs())
    known = restorestate.load(out, index.block_size)
    assert set(known) == {m.path for m in index.files()} - {fileindex.STATE_FILE}
    assert known["base/1/1259"].stamp == restorestate.Stamp.of((out / "base/1/1259").stat())
    assert restorestate.load(out, index.block_size * 2) == {}  # another block size: not used


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b'{"format": 2, "hash": "xxh3-128", "block_size": 4096, "files": {}}',
        b'{"format": 1, "hash": "md5", "block_size": 4096, "files": {}}',
        b'{"format": 1, "hash": "xxh3-128", "block_size": 4096, "files": {"a": [1, 2, 3]}}',
        b'{"format": 1, "hash": "xxh3-128", "block_size": 4096, "files": {"a": [1, 2, -3, 4, 5, ""]}}',
        b'{"format": 1, "hash": "xxh3-128", "block_size": 4096, "files": {"a": [1, 2, 5000, 4, 5, "AAAA"]}}',
        b'{"format": 1, "hash": "xxh3-128", "block_size": 4096, "files": {"a": [1, 2, 10, 4, 5, "!!"]}}',
    ],
)
def test_a_restore_state_that_is_not_one_a_restore_writes_is_refused(doc: bytes) -> None:
    with pytest.raises(restorestate.BadState):
        restorestate.parse(doc, 4096)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EIO])
async def test_a_refused_or_failed_direct_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """O_DIRECT writes run beside the decompression: one refused for its alignment (EINVAL) is
    written through the page cache, as is the rest, and the result is whole; any other error
    fails the unpack naming the part."""

    class Refusing:
        def submit(self, fn: object, *args: object) -> concurrent.futures.Future[None]:
            f: concurrent.futures.Future[None] = concurrent.futures.Future()
            f.set_exception(OSError(err, "refused"))
            return f

    monkeypatch.setattr(unpack, "_write_pool", lambda: Refusing())
    repo = await new_repo(tmp_path / "repo")
    stream = make_tar(big_tree(9))
    rec = await store_big(repo, "b1", stream, 1_500_001)
    out = tmp_path / "out"
    out.mkdir()
    if err == errno.EIO:
        with pytest.raises(UnpackError, match=r"writing part .*b1/base\.tar"):
            await unpack_full(repo, "s", rec, out, RunAs(), jobs=2)
        assert not (out / "global" / "pg_control").exists()
        return
    stats = await unpack_full(repo, "s", rec, out, RunAs(), jobs=2)
    extract(stream, tmp_path / "tar")
    assert snapshot(out) == snapshot(tmp_path / "tar")
    assert stats.bytes_direct == 0
