"""Issue 15, backup side: the binding moved to the upgraded cluster in an S3 repository (a real
SeaweedFS), the old cluster kept in its history; done twice, nothing changes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hakeeper.backup.binding import bind, binding_key, read_binding, rebind_configured
from hakeeper.backup.catalog import load_catalog
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.cluster import Succession
from tests.support.s3_server import SeaweedS3, s3_repository_config

pytestmark = pytest.mark.integration


def _config(endpoint: str, bucket: str) -> RepositoryConfig:
    return s3_repository_config(endpoint, bucket)


async def test_rebind_on_s3(seaweed: SeaweedS3) -> None:
    rc = _config(seaweed.endpoint, "hk-upgrade-rebind")
    async with make_repository(rc) as repo:
        await repo.initialize()
        await repo.ensure_marker()
        await bind(repo, "sc", "7001", "repo create", 0.0)
        await repo.put_unique("sc/wal/000000030000000000000004", b"old wal")
    succ = Succession("7001", "7002", 17, 18, 1_800_000_000.0, 0x4000028)
    (first,) = await rebind_configured([rc], "sc", succ, by="upgrade n1")
    assert first.ok, first.error
    later = replace(succ, upgraded_at=1_800_000_100.0)
    (again,) = await rebind_configured([rc], "sc", later, by="upgrade n1")
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
    foreign = replace(succ, old_system_identifier="6000", new_system_identifier="6001")
    (refused,) = await rebind_configured([wrong], "sc", foreign, by="upgrade n1")
    assert not refused.ok and "7002" in str(refused.error)
