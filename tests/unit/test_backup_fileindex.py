"""The file index of an indexed backup (backup/fileindex.py): built from a tar stream fed in any
pieces, it must give every member's data offset and block hashes exactly; a tampered index is
refused; the planning functions cut work at part boundaries and find changed blocks."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from hakeeper.backup import fileindex
from hakeeper.backup.fileindex import (
    BadIndex,
    Extent,
    FileIndex,
    IndexBuilder,
    Member,
    assign_to_parts,
    block_extents,
    block_hash,
    changed_blocks,
    parse_index,
    paths_to_remove,
    to_bytes,
    whole_file_extents,
)

BS = 4096


def make_tar(fmt: int) -> tuple[bytes, dict[str, bytes]]:
    """A tar stream like pg_basebackup's (directories before their files, an empty file, a
    symbolic link) plus a very long name, in the given format (GNU: 'L' headers; PAX: 'x')."""
    rnd = random.Random(7)
    files = {
        "PG_VERSION": b"15\n",
        "base/1/1259": rnd.randbytes(3 * BS + 100),
        "base/1/empty": b"",
        "base/1/exact": rnd.randbytes(2 * BS),
        "global/pg_control": rnd.randbytes(8192),
        "deep/" + "n" * 120 + "/file": rnd.randbytes(BS // 2),
        "backup_manifest": b"{}",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for d in ("base", "base/1", "global", "deep", "deep/" + "n" * 120, "pg_wal"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o700
            t.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o600
            t.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("pg_tblspc_link")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/somewhere/else"
        t.addfile(ti)
    return buf.getvalue(), files


def build(
    stream: bytes, cuts: list[int], block_size: int = BS, part_sizes: tuple[int, ...] = ()
) -> FileIndex:
    b = IndexBuilder(block_size=block_size)
    at = 0
    for c in [*sorted(cuts), len(stream)]:
        b.feed(stream[at:c])
        at = c
    return b.finish(part_sizes or (len(stream),))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])  # long names: 'L' / 'x' headers
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_index_gives_every_members_offset_and_block_hashes(fmt: int, seed: int) -> None:
    stream, files = make_tar(fmt)
    rnd = random.Random(seed)
    cuts = [rnd.randrange(len(stream)) for _ in range(40)] + [511, 512, 513]
    idx = build(stream, cuts)
    assert idx.stream_size == len(stream)
    with tarfile.open(fileobj=io.BytesIO(stream)) as t:
        infos = {ti.name: ti for ti in t.getmembers()}
    by = idx.by_path()
    assert set(by) == set(infos)
    for name, data in files.items():
        m = by[name]
        assert m.kind == "f" and m.size == len(data) and m.mode == 0o600
        assert m.offset == infos[name].offset_data
        assert stream[m.offset : m.offset + m.size] == data
        want = [block_hash(data[i : i + BS]) for i in range(0, len(data), BS)]
        assert list(m.blocks) == want
    assert by["base/1/empty"].blocks == ()
    assert by["pg_wal"].kind == "d" and by["pg_wal"].mode == 0o700
    assert by["pg_tblspc_link"].kind == "l" and by["pg_tblspc_link"].link == "/somewhere/else"


def test_index_round_trips_and_parts_reassemble_every_file() -> None:
    stream, files = make_tar(tarfile.GNU_FORMAT)
    # parts of odd sizes: members cross part boundaries
    sizes, at = [], 0
    while at < len(stream):
        n = min(1500, len(stream) - at)
        sizes.append(n)
        at += n
    idx = build(stream, [100, 5000], part_sizes=tuple(sizes))
    again = parse_index(to_bytes(idx), len(sizes))
    assert again == idx
    with pytest.raises(BadIndex, match="part sizes"):
        parse_index(to_bytes(idx), len(sizes) + 1)
    with pytest.raises(BadIndex, match="the parts hold"):
        build(stream, [], part_sizes=(len(stream) - 512,))
    out = {m.path: bytearray(m.size) for m in again.files()}
    starts = fileindex.part_offsets(sizes)
    for w in assign_to_parts(whole_file_extents(again), sizes):
        part = stream[starts[w.index] : starts[w.index] + sizes[w.index]]
        for e, in_part, in_ext, n in w.slices:
            out[e.path][e.file_offset + in_ext : e.file_offset + in_ext + n] = part[in_part : in_part + n]
    assert {k: bytes(v) for k, v in out.items()} == files
    assert len({w.index for w in assign_to_parts(whole_file_extents(again), sizes)}) > 3


def tampered(doc: dict[str, object], **changes: object) -> bytes:
    return json.dumps({**doc, **changes}).encode()


def test_a_tampered_index_is_refused() -> None:
    stream, _ = make_tar(tarfile.GNU_FORMAT)
    idx = build(stream, [])
    raw = to_bytes(idx)
    doc = json.loads(raw)
    parse_index(raw, 1)  # the untouched one passes
    rows = doc["members"]
    file_i = next(i for i, r in enumerate(rows) if r[1] == "f" and r[3] > 0)

    def with_row(i: int, row: list[object]) -> bytes:
        return tampered(doc, members=[*rows[:i], row, *rows[i + 1 :]])

    bad = {
        "path escapes": with_row(file_i, ["../etc/passwd", *rows[file_i][1:]]),
        "absolute path": with_row(file_i, ["/etc/passwd", *rows[file_i][1:]]),
        "offset beyond the stream": with_row(file_i, [*rows[file_i][:4], len(stream), rows[file_i][5]]),
        "unaligned offset": with_row(file_i, [*rows[file_i][:4], rows[file_i][4] + 1, rows[file_i][5]]),
        "too few hashes": with_row(file_i, [*rows[file_i][:5], rows[file_i][5][:-32]]),
        "size grown": with_row(file_i, [*rows[file_i][:3], rows[file_i][3] + BS, *rows[file_i][4:]]),
        "setuid mode": with_row(file_i, [rows[file_i][0], "f", 0o4755, *rows[file_i][3:]]),
        "unknown kind": with_row(file_i, [rows[file_i][0], "c", *rows[file_i][2:]]),
        "stream size": tampered(doc, stream_size=len(stream) + 512),
        "block size": tampered(doc, block_size=3000),
        "format": tampered(doc, format=99),
        "below a link": tampered(doc, members=[*rows, ["pg_tblspc_link/x", "f", 0o600, 0, 0, ""]]),
        "no parent": tampered(doc, members=[["orphan/x", "d", 0o700], *rows]),
        "twice": tampered(doc, members=[*rows, rows[0]]),
        "not json": b"{",
    }
    for why, raw_bad in bad.items():
        with pytest.raises(BadIndex):
            parse_index(raw_bad, 1)
            pytest.fail(why)
    with pytest.raises(BadIndex, match="parts' total"):
        parse_index(tampered(doc, part_sizes=[len(stream) - 512]), 1)
    with pytest.raises(BadIndex, match="part size is not"):
        parse_index(tampered(doc, part_sizes=[-1]), 1)  # "a part size is not ..."


def test_builder_refuses_hard_links_and_truncated_streams() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo("a")
        ti.size = 1
        t.addfile(ti, io.BytesIO(b"x"))
        ti = tarfile.TarInfo("b")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "a"
        t.addfile(ti)
    b = IndexBuilder(block_size=BS)
    with pytest.raises(BadIndex, match="not supported"):
        b.feed(buf.getvalue())
    stream, _ = make_tar(tarfile.GNU_FORMAT)
    b = IndexBuilder(block_size=BS)
    b.feed(stream[: len(stream) // 2])  # tarfile pads with zero records: cut well before
    with pytest.raises(BadIndex, match="end-of-archive"):
        b.finish()


def test_changed_blocks_compare_size_first_then_hashes() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: blocks of 4096, 4096, 2048
    m = Member("f", "f", 0o600, size=len(data), offset=512, blocks=tuple(
        block_hash(data[i : i + BS]) for i in range(0, len(data), BS)))  # fmt: skip
    same = [block_hash(data[i : i + BS]) for i in range(0, len(data), BS)]
    assert changed_blocks(m, BS, len(data), same) == []
    # a longer local file: its blocks are hashed within the backup's bounds, then truncated
    assert changed_blocks(m, BS, len(data) + 5000, same) == []
    other = list(same)
    other[1] = block_hash(b"x" * BS)
    assert changed_blocks(m, BS, len(data), other) == [1]
    # a shorter local file lacks the blocks it does not cover entirely
    assert changed_blocks(m, BS, 2 * BS + 10, same[:2]) == [2]
    assert changed_blocks(m, BS, 0, []) == [0, 1, 2]
    ext = block_extents(m, [2, 0, 1], BS)
    assert ext == [Extent("f", 0, 512, len(data))]  # adjacent blocks merged
    assert block_extents(m, [0, 2], BS) == [Extent("f", 0, 512, BS), Extent("f", 2 * BS, 512 + 2 * BS, 2048)]


def test_a_delta_removes_what_the_backup_lacks_and_entries_of_another_kind() -> None:
    idx = FileIndex(
        block_size=BS,
        stream_size=0,
        members=(Member("base", "d", 0o700), Member("base/1", "f", 0o600), Member("pg_wal", "d", 0o700)),
    )
    local = {
        "base": "d",
        "base/1": "d",  # a directory where the backup has a file
        "base/1/x": "f",
        "pg_wal": "d",
        "pg_wal/000000010000000000000003": "f",
        "postmaster.pid": "f",
        "sock": "o",
    }
    gone = paths_to_remove(idx, local)
    assert set(gone) == {"base/1", "base/1/x", "pg_wal/000000010000000000000003", "postmaster.pid", "sock"}
    assert gone.index("base/1/x") < gone.index("base/1")  # deepest first
