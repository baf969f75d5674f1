"""Issue 15, backup side: the binding moved to the upgraded cluster in an S3 repository (a real
SeaweedFS), the old cluster kept in its history; done twice, nothing changes."""

from __future__ import annotations

import json

import pytest

from hakeeper.backup.binding import bind, binding_key, read_binding, rebind_configured
from hakeeper.backup.catalog import load_catalog
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration


def _config(endpoint: str, bucket: str) -> RepositoryConfig:
    return RepositoryConfig.model_validate(
        {
            "name": "seaweed",
            "type": "s3",
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": "cluster1",
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "timeout": 10,
        }
    )


async def test_rebind_on_s3(seaweed: SeaweedS3) -> None:
    rc = _config(seaweed.endpoint, "hk-upgrade-rebind")
    async with make_repository(rc) as repo:
        await repo.initialize()
        await repo.ensure_marker()
        await bind(repo, "sc", "7001", "repo create", 0.0)
        await repo.put_unique("sc/wal/000000030000000000000004", b"old wal")
    kwargs = {
        "old_system_identifier": "7001",
        "new_system_identifier": "7002",
        "old_major": 17,
        "new_major": 18,
        "upgraded_at": 1_800_000_000.0,
        "old_end_lsn": 0x4000028,
        "by": "upgrade n1",
    }
    (first,) = await rebind_configured([rc], "sc", **kwargs)
    assert first.ok, first.error
    (again,) = await rebind_configured([rc], "sc", **{**kwargs, "upgraded_at": 1_800_000_100.0})
    assert again.ok and again.binding == first.binding  # idempotent: not rewritten
    async with make_repository(rc) as repo:
        b = await read_binding(repo, "sc")
        assert b is not None and b.system_identifier == "7002"
        (era,) = b.history
        assert (era.system_identifier, era.until_timeline, era.until_lsn) == ("7001", 3, 0x4000028)
        doc = json.loads(await repo.get(binding_key("sc")))
        assert doc["history"][0]["until_lsn"] == "0/4000028"
        cat = await load_catalog(repo, "sc")
        assert cat.lineage.current == "7002" and cat.lineage.era_of("7001") == era
    wrong = _config(seaweed.endpoint, "hk-upgrade-rebind")
    foreign = {**kwargs, "old_system_identifier": "6000", "new_system_identifier": "6001"}
    (refused,) = await rebind_configured([wrong], "sc", **foreign)
    assert not refused.ok and "7002" in str(refused.error)
