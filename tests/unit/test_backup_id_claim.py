"""Backup ids are claimed, not guessed: two backups started in the same second never share one."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from hakeeper.backup import catalog
from hakeeper.backup.basebackup import claim_backup_id
from hakeeper.backup.catalog import BackupRecord, BackupStatus
from hakeeper.backup.repo import FilesystemRepository, ListEntry

NOW = dt.datetime(2026, 12, 1, 3, 0, 0, tzinfo=dt.UTC)


def _record(label: str) -> Callable[[str], BackupRecord]:
    def make(bid: str) -> BackupRecord:
        return BackupRecord(
            id=bid,
            label=label,
            status=BackupStatus.RUNNING,
            scope="s",
            repository="fs",
            start_time=NOW,
            updated_at=NOW,
        )

    return make


class _BlindListing(FilesystemRepository):
    """A repository whose listing never shows a backup yet (both writers check before either
    writes): only the exclusive create can tell them apart."""

    async def list_objects(self, prefix: str = "") -> list[ListEntry]:
        return []


async def test_two_concurrent_claims_in_the_same_second_get_different_ids(tmp_path: Path) -> None:
    # two repository objects on one root: two processes (the scheduler and the CLI)
    a = _BlindListing(tmp_path / "repo", name="fs")
    b = _BlindListing(tmp_path / "repo", name="fs")
    await a.initialize()
    ra, rb = await asyncio.gather(
        claim_backup_id(a, "s", NOW, _record("a")),
        claim_backup_id(b, "s", NOW, _record("b")),
    )
    assert ra.id != rb.id
    assert {ra.id, rb.id} == {
        catalog.make_backup_id(NOW),
        catalog.make_backup_id(NOW + dt.timedelta(seconds=1)),
    }
    # each id's record is the one its claimant wrote: neither overwrote the other
    for r in (ra, rb):
        stored = BackupRecord.model_validate_json(await a.get(catalog.record_key("s", r.id)))
        assert stored.label == r.label


async def test_create_never_replaces(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "repo", name="fs")
    await repo.initialize()
    assert await repo.create("s/x", b"first")
    assert not await repo.create("s/x", b"second")
    assert await repo.get("s/x") == b"first"
