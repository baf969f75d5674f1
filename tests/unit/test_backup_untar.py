"""Extraction of a backup without a file index (backup/untar.py): the parts of one zstd stream
(a server-compressed backup) or of independent frames (``zstd-parts``), fetched in order from
a real filesystem repository, give the tree ``tarfile`` extracts; a corrupt stream, a path
leaving the directory, a setuid mode, a member type a base backup never holds and a stream cut short fail
naming the backup and leave no pg_control."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from hakeeper.backup import catalog, fileindex, untar
from hakeeper.backup.catalog import BackupRecord, StoredObject
from hakeeper.backup.errors import CorruptObject
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.backup.unpack import UnpackError, compress_part
from hakeeper.util.proc import RunAs
from tests.unit.test_backup_unpack_delta import (
    big_tree,
    complete_record,
    extract,
    make_tar,
    new_repo,
    snapshot,
)


async def store_stream(
    repo: FilesystemRepository, bid: str, stream: bytes, *, frames: bool = False, piece: int = 200_000
) -> BackupRecord:
    """``stream`` as a record without an index: one zstd stream cut in slices (``zstd-stream``)
    or every slice its own frame (``zstd-parts``)."""
    if frames:
        blobs = [compress_part(stream[i : i + piece], 3) for i in range(0, len(stream), piece)]
    else:
        whole = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(stream)
        blobs = [whole[i : i + piece // 20] for i in range(0, len(whole), piece // 20)]
    parts: list[StoredObject] = []
    for i, blob in enumerate(blobs):
        r = await repo.put(catalog.object_key("s", bid, catalog.part_name(i)), blob, as_is=True)
        parts.append(
            StoredObject(name=catalog.part_name(i), size=r.size, stored_size=r.stored_size, sha256=r.sha256)
        )
    return complete_record(bid, catalog.LAYOUT_PARTS if frames else catalog.LAYOUT_STREAM, parts, len(stream))


def run_extract(repo: FilesystemRepository, rec: BackupRecord, out: Path, **kw: object) -> untar.Extracted:
    out.mkdir(exist_ok=True)

    async def go() -> untar.Extracted:
        got, _ = await untar.extract_backup(repo, "s", rec, out, RunAs(), window=3, **kw)  # type: ignore[arg-type]
        return got

    return asyncio.run(go())


@pytest.mark.parametrize("frames", [False, True])
def test_a_stream_backup_extracts_as_tar_does(tmp_path: Path, frames: bool) -> None:
    files = big_tree(7)
    files[fileindex.STATE_FILE] = b'{"format": 1}'  # a backup of a restored cluster's record
    stream = make_tar(files)
    repo = asyncio.run(new_repo(tmp_path / "repo"))
    rec = asyncio.run(store_stream(repo, "b1", stream, frames=frames))
    assert len(rec.parts) > 3
    seen: list[str] = []
    got = run_extract(
        repo,
        rec,
        tmp_path / "out",
        before_control=lambda: seen.append(
            "flushed" if not (tmp_path / "out" / "global" / "pg_control").exists() else "too late"
        ),
    )
    assert seen == ["flushed"]  # pg_control comes after the caller's flush
    extract(stream, tmp_path / "tar")
    assert snapshot(tmp_path / "out", with_state=True) == snapshot(tmp_path / "tar", with_state=True)
    assert got.bytes_written == sum(len(v) for v in files.values())
    assert got.bytes_direct > 4 * 1024 * 1024  # the large files' whole blocks


def test_a_damaged_or_hostile_stream_fails_naming_the_backup(tmp_path: Path) -> None:
    repo = asyncio.run(new_repo(tmp_path / "repo"))
    # a flipped byte: the repository's SHA-256 refuses the part
    rec = asyncio.run(store_stream(repo, "b1", make_tar(big_tree(8))))
    key = tmp_path / "repo" / catalog.object_key("s", "b1", rec.parts[2].name)
    blob = bytearray(key.read_bytes())
    blob[10] ^= 0xFF
    key.write_bytes(bytes(blob))
    with pytest.raises(CorruptObject):
        run_extract(repo, rec, tmp_path / "o1")
    assert not (tmp_path / "o1" / "global" / "pg_control").exists()
    # the record rewritten to match (write access to the repository): zstd's checksum refuses it
    r = asyncio.run(repo.put(catalog.object_key("s", "b1", rec.parts[2].name), bytes(blob), as_is=True))
    rec.parts[2] = StoredObject(
        name=rec.parts[2].name, size=r.size, stored_size=r.stored_size, sha256=r.sha256
    )
    with pytest.raises(UnpackError, match="backup b1: "):
        run_extract(repo, rec, tmp_path / "o2")
    assert not (tmp_path / "o2" / "global" / "pg_control").exists()
    # cut short: the last parts missing from the record
    rec3 = asyncio.run(store_stream(repo, "b3", make_tar(big_tree(8))))
    rec3.parts = rec3.parts[: len(rec3.parts) // 2]
    with pytest.raises(UnpackError, match="backup b3: "):
        run_extract(repo, rec3, tmp_path / "o3")
    # a path leaving the directory, a hard link: refused, nothing written outside
    for bid, member in (("b4", "../escape"), ("b5", "hard"), ("b6", "setuid")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            ti = tarfile.TarInfo(member)
            if member == "hard":
                ti.type = tarfile.LNKTYPE
                ti.linkname = "PG_VERSION"
            else:
                ti.size = 5
                ti.mode = 0o4755 if member == "setuid" else 0o600
            t.addfile(ti, io.BytesIO(b"owned") if ti.size else None)
        rec4 = asyncio.run(store_stream(repo, bid, buf.getvalue()))
        with pytest.raises(UnpackError, match=f"backup {bid}: "):
            run_extract(repo, rec4, tmp_path / bid)
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "b6" / "setuid").exists()
