"""The S3 repository against a real SeaweedFS (``weed mini`` on loopback, started per module)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup.errors import CorruptObject, NotFound, RepoUnavailable
from hakeeper.backup.repos import make_repository
from hakeeper.backup.s3repo import S3Repository
from hakeeper.core.backup_config import RepositoryConfig
from tests.support.repo_checks import (
    SEGMENT,
    check_basic_operations,
    check_create_never_replaces,
    check_duplicate_policy,
    check_streaming,
    wal_like,
)
from tests.support.s3_server import SeaweedS3, s3_repository_config

pytestmark = pytest.mark.integration


def _config(endpoint: str, bucket: str) -> RepositoryConfig:
    return s3_repository_config(endpoint, bucket)


@pytest.fixture
async def repo(seaweed: SeaweedS3, request: pytest.FixtureRequest) -> AsyncIterator[S3Repository]:
    bucket = "hk-" + request.node.name.replace("_", "-")[:40].lower()
    r = make_repository(_config(seaweed.endpoint, bucket))
    assert isinstance(r, S3Repository)
    async with r:
        await r.initialize()
        yield r


async def test_operations(repo: S3Repository) -> None:
    await check_basic_operations(repo)
    await check_streaming(repo, size=20 << 20)  # several multipart parts, as big base-backup files


async def test_duplicate_policy_and_conditional_create(repo: S3Repository) -> None:
    await check_duplicate_policy(repo)
    await check_create_never_replaces(repo)  # SeaweedFS enforces If-None-Match: *


async def test_corruption_through_the_s3_api_is_detected(repo: S3Repository, seaweed: SeaweedS3) -> None:
    data = wal_like(2 << 20)
    await repo.put(SEGMENT, data)
    raw: Any = seaweed.client()
    key = f"cluster1/{SEGMENT}"
    blob = bytearray(raw.get_object(Bucket=repo.bucket, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    meta = raw.head_object(Bucket=repo.bucket, Key=key)["Metadata"]
    raw.put_object(Bucket=repo.bucket, Key=key, Body=bytes(blob), Metadata=meta)
    with pytest.raises(CorruptObject):
        await repo.get(SEGMENT)
    with pytest.raises(CorruptObject):
        async for _ in repo.get_stream(SEGMENT):
            pass
    raw.put_object(Bucket=repo.bucket, Key=key, Body=bytes(blob[:1000]), Metadata=meta)  # truncated
    with pytest.raises(CorruptObject):
        await repo.stat(SEGMENT)


async def test_missing_object_vs_missing_bucket(repo: S3Repository, seaweed: SeaweedS3) -> None:
    with pytest.raises(NotFound):
        await repo.get("wal/000000010000000000000099")
    with pytest.raises(NotFound):
        await repo.stat("wal/000000010000000000000099")
    async with make_repository(_config(seaweed.endpoint, "hk-no-such-bucket")) as other:
        for coro in (other.get(SEGMENT), other.stat(SEGMENT)):
            with pytest.raises(RepoUnavailable):
                await coro


async def test_stopped_server_is_unavailable(tmp_path: Path) -> None:
    server = SeaweedS3(tmp_path / "seaweed")
    await asyncio.to_thread(server.start)
    try:
        async with make_repository(_config(server.endpoint, "hk-stopped")) as r:
            await r.initialize()
            await r.put(SEGMENT, b"segment")
            pid = server.pid
            await asyncio.to_thread(server.stop)
            assert pid is not None
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            started = time.monotonic()
            for coro in (r.get(SEGMENT), r.stat(SEGMENT), r.put_unique(SEGMENT, b"x"), r.list_objects()):
                with pytest.raises(RepoUnavailable):
                    await coro
            assert time.monotonic() - started < 30  # refused connections fail fast, not after timeouts
    finally:
        await asyncio.to_thread(server.stop)
