"""Behaviour every backup repository must show, shared by the filesystem, moto and SeaweedFS tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from hakeeper.backup import codec
from hakeeper.backup.codec import sha256_hex
from hakeeper.backup.errors import ContentConflict, NotFound
from hakeeper.backup.repo import MARKER, Outcome, Repository

SEGMENT = "wal/000000010000000000000001"


def wal_like(size: int, seed: int = 1) -> bytes:
    """Half random, half zeros: compressible like real WAL, but not trivially."""
    rnd = os.urandom(size // 2) if seed else b""
    return (rnd + bytes(size - len(rnd)))[:size]


async def chunked(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def check_basic_operations(repo: Repository) -> None:
    data = wal_like(1 << 20)
    r = await repo.put(SEGMENT, data, meta={"timeline": "1"})
    assert (r.size, r.sha256, r.outcome) == (len(data), sha256_hex(data), Outcome.STORED)
    assert r.stored_size < len(data)  # compressed

    assert await repo.get(SEGMENT) == data
    st = await repo.stat(SEGMENT)
    assert (st.size, st.sha256, st.stored_size, dict(st.meta)) == (
        len(data),
        sha256_hex(data),
        r.stored_size,
        {"timeline": "1"},
    )

    await repo.put("wal/00000002.history", b"1\t0/3000000\tno recovery target specified\n")
    await repo.put("base/20260101T000000/backup_label", b"label")
    names = [e.name for e in await repo.list_objects("wal/")]
    assert names == ["wal/000000010000000000000001", "wal/00000002.history"]
    assert [e.name for e in await repo.list_objects("wal/00000001")] == ["wal/000000010000000000000001"]
    # an encrypted repository also holds its marker object, next to the scopes
    assert len([e for e in await repo.list_objects() if e.name != MARKER]) == 3
    assert [e.stored_size for e in await repo.list_objects(SEGMENT)] == [r.stored_size]

    # put replaces
    await repo.put(SEGMENT, b"other")
    assert await repo.get(SEGMENT) == b"other"

    await repo.delete(SEGMENT)
    await repo.delete(SEGMENT)  # idempotent
    for op in (repo.get, repo.stat):
        with pytest.raises(NotFound):
            await op(SEGMENT)
    with pytest.raises(NotFound):
        async for _ in repo.get_stream(SEGMENT):
            pass
    assert [e.name for e in await repo.list_objects("wal/")] == ["wal/00000002.history"]

    # empty content is a valid object
    await repo.put("empty", b"")
    assert await repo.get("empty") == b""
    assert (await repo.stat("empty")).size == 0


async def check_streaming(repo: Repository, size: int = 3 << 20) -> None:
    data = wal_like(size)
    r = await repo.put_stream("base/big", chunked(data, 300_000), meta={"kind": "file"})
    assert (r.size, r.sha256) == (len(data), sha256_hex(data))
    out = bytearray()
    async for chunk in repo.get_stream("base/big"):
        out += chunk
    assert bytes(out) == data
    assert await repo.get("base/big") == data
    st = await repo.stat("base/big")
    assert (st.size, st.sha256, st.meta) == (len(data), sha256_hex(data), {"kind": "file"})


async def check_duplicate_policy(repo: Repository) -> None:
    first = wal_like(256 * 1024)
    r = await repo.put_unique(SEGMENT, first)
    assert r.outcome is Outcome.STORED
    again = await repo.put_unique(SEGMENT, first)  # a re-push after a crash
    assert again.outcome is Outcome.ALREADY_PRESENT

    other = wal_like(256 * 1024)
    with pytest.raises(ContentConflict) as ei:
        await repo.put_unique(SEGMENT, other)
    conflict = ei.value
    assert (conflict.name, conflict.existing_sha256, conflict.new_sha256) == (
        SEGMENT,
        sha256_hex(first),
        sha256_hex(other),
    )
    assert conflict.quarantined.startswith(f"quarantine/{SEGMENT}.")
    assert await repo.get(SEGMENT) == first  # never overwritten
    assert await repo.get(conflict.quarantined) == other
    assert [e.name for e in await repo.list_objects("quarantine/")] == [conflict.quarantined]


async def check_create_never_replaces(repo: Repository) -> None:
    """The write put_unique relies on refuses to replace an object created meanwhile (the
    window between its existence check and its write)."""
    await repo.put(SEGMENT, b"first")
    blob, trailer = codec.encode(b"second", {})
    assert await repo._store(SEGMENT, blob, trailer, exclusive=True) is False
    assert await repo.get(SEGMENT) == b"first"
