"""The incremental file header parser and the checks of apply_chain on hand-made directories
(the byte-for-byte comparison with pg_combinebackup is tests/integration/test_incremental_apply.py)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from hakeeper.backup.incremental_apply import (
    BLCKSZ,
    INCREMENTAL_MAGIC,
    ApplyError,
    apply_chain,
    check_rel_path,
    combined_label,
    header_length,
    parse_header,
)
from hakeeper.util.proc import RunAs


def incremental(trunc: int, blocks: list[int], *, magic: int = INCREMENTAL_MAGIC) -> bytes:
    head = struct.pack(f"<III{len(blocks)}I", magic, len(blocks), trunc, *blocks)
    if blocks:
        head += b"\0" * (-len(head) % BLCKSZ)
    return head + b"".join(bytes([b % 250 + 1]) * BLCKSZ for b in blocks)


def test_header_lengths() -> None:
    assert header_length(0) == 12
    assert header_length(1) == BLCKSZ
    assert header_length(2045) == BLCKSZ  # 12 + 4 * 2045 = 8192
    assert header_length(2046) == 2 * BLCKSZ


def test_parse_valid() -> None:
    data = incremental(7, [3, 9, 1])
    h = parse_header(data, len(data), "f")
    assert h.blocks == (3, 9, 1)
    assert h.truncation_block_length == 7
    assert h.header_length == BLCKSZ
    assert h.block_offset(1) == 2 * BLCKSZ
    assert h.reconstructed_blocks() == 10
    empty = incremental(4, [])
    h0 = parse_header(empty, len(empty), "f")
    assert (h0.blocks, h0.header_length, h0.reconstructed_blocks()) == ((), 12, 4)


@pytest.mark.parametrize(
    ("data", "size", "message"),
    [
        (b"\x0d\x1f", 2, "too short"),
        (incremental(1, [], magic=0xDEADBEEF), 12, "not an incremental file"),
        (struct.pack("<III", INCREMENTAL_MAGIC, 1 << 20, 0), 12, "more than a segment"),
        (struct.pack("<III", INCREMENTAL_MAGIC, 0, (1 << 19) + 1), 12, "truncation block length"),
        (incremental(2, [1]), 2 * BLCKSZ - 1, "bytes, but a header of 1 blocks means"),
        (incremental(2, [1]), 3 * BLCKSZ, "bytes, but a header of 1 blocks means"),
        (incremental(2, [1])[:8], 2 * BLCKSZ, "too short"),
        (incremental(2, [1, 1]), 3 * BLCKSZ, "appears twice"),
        (incremental(2, [1 << 19]), 2 * BLCKSZ, "exceeds a segment"),
    ],
)
def test_parse_malformed(data: bytes, size: int, message: str) -> None:
    with pytest.raises(ApplyError, match=message) as e:
        parse_header(data, size, "base/5/INCREMENTAL.16384")
    assert "base/5/INCREMENTAL.16384" in str(e.value)


def test_parse_truncated_block_list() -> None:
    # A header claiming 3 blocks, read short (the file was cut inside the block numbers).
    data = struct.pack("<IIII", INCREMENTAL_MAGIC, 3, 0, 5)
    with pytest.raises(ApplyError, match="not read in full"):
        parse_header(data, header_length(3) + 3 * BLCKSZ, "x")


@pytest.mark.parametrize("path", ["", "/etc/passwd", "base/../../x", "base//1", "./x", "a/\0"])
def test_unsafe_paths(path: str) -> None:
    with pytest.raises(ApplyError, match="unsafe path"):
        check_rel_path(path, "m")


def test_combined_label_drops_incremental_lines() -> None:
    label = (
        "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\n"
        "START TIMELINE: 1\nINCREMENTAL FROM LSN: 0/4000028\nINCREMENTAL FROM TLI: 1\n"
    )
    assert (
        combined_label(label)
        == "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\nSTART TIMELINE: 1\n"
    )


# ---------------------------------------------------------------------------- hand-made chains


def write_backup(root: Path, files: dict[str, bytes], label: str) -> None:
    entries = []
    for rel, data in {**files, "backup_label": label.encode()}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        entries.append({"Path": rel, "Size": len(data), "Checksum-Algorithm": "NONE"})
    (root / "backup_manifest").write_text(json.dumps({"System-Identifier": 1, "Files": entries}))


FULL_LABEL = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
INC_LABEL = "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nINCREMENTAL FROM LSN: 0/2000028\n"


def chain(tmp_path: Path, inc_files: dict[str, bytes], inc_label: str = INC_LABEL) -> tuple[Path, Path]:
    data, inc = tmp_path / "data", tmp_path / "inc"
    full = bytes([1]) * BLCKSZ + bytes([2]) * BLCKSZ + bytes([3]) * BLCKSZ
    write_backup(data, {"PG_VERSION": b"18\n", "base/5/100": full, "base/5/200": full}, FULL_LABEL)
    write_backup(inc, inc_files, inc_label)
    return data, inc


def test_apply_rebuilds_moves_removes(tmp_path: Path) -> None:
    data, inc = chain(
        tmp_path,
        {"PG_VERSION": b"18\n", "base/5/INCREMENTAL.100": incremental(2, [4]), "base/6/300": b"new"},
    )
    stats = apply_chain(data, [inc], RunAs())
    got = (data / "base/5/100").read_bytes()
    assert got == bytes([1]) * BLCKSZ + bytes([2]) * BLCKSZ + bytes(2 * BLCKSZ) + bytes([5]) * BLCKSZ
    assert not (data / "base/5/200").exists()  # not in the newest backup: dropped
    assert (data / "base/6/300").read_bytes() == b"new"
    assert (
        data / "backup_label"
    ).read_text() == "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n"
    assert not (data / "backup_manifest").exists()
    assert (stats.files_rebuilt, stats.files_moved, stats.files_removed, stats.dirs_created) == (1, 2, 1, 1)
    assert stats.blocks_written == 1


def test_apply_refuses_a_malformed_incremental_file(tmp_path: Path) -> None:
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.100": incremental(2, [4])[:-1]})
    with pytest.raises(ApplyError, match=r"INCREMENTAL\.100"):
        apply_chain(data, [inc], RunAs())


def test_apply_refuses_a_size_other_than_the_manifests(tmp_path: Path) -> None:
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.100": incremental(2, [4])})
    with open(inc / "base/5/INCREMENTAL.100", "ab") as f:
        f.write(bytes(BLCKSZ))
    with pytest.raises(ApplyError, match="its manifest says"):
        apply_chain(data, [inc], RunAs())


def test_apply_refuses_a_link_of_another_parent(tmp_path: Path) -> None:
    label = "START WAL LOCATION: 0/4000028 (file x)\nINCREMENTAL FROM LSN: 0/3000028\n"
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.100": incremental(2, [])}, label)
    with pytest.raises(ApplyError, match="incremental from LSN 0/3000028"):
        apply_chain(data, [inc], RunAs())


def test_apply_refuses_an_incremental_file_without_older_version(tmp_path: Path) -> None:
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.999": incremental(2, [])})
    with pytest.raises(ApplyError, match="does not have base/5/999"):
        apply_chain(data, [inc], RunAs())


def test_apply_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.100": incremental(2, [4])})
    (data / "base/5/100").unlink()
    os.symlink(outside / "target", data / "base/5/100")
    (outside / "target").write_bytes(bytes(3 * BLCKSZ))
    with pytest.raises(ApplyError, match="link"):
        apply_chain(data, [inc], RunAs())
    assert (outside / "target").read_bytes() == bytes(3 * BLCKSZ)


def test_apply_refuses_unlisted_files(tmp_path: Path) -> None:
    data, inc = chain(tmp_path, {"base/5/INCREMENTAL.100": incremental(2, [])})
    (inc / "base/5/stray").write_bytes(b"?")
    with pytest.raises(ApplyError, match="stray"):
        apply_chain(data, [inc], RunAs())
