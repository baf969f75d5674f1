"""Who compresses a base backup: the server (pg_basebackup --compress=server-zstd) when it can,
else hakeeper.  A server built without zstd (the PyPI build of PostgreSQL 18 the tests use)
refuses the server-side spec, and every backup from it failed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import structlog

from hakeeper.backup import basebackup
from hakeeper.backup.basebackup import Endpoint, SourceFacts, server_compression_possible
from hakeeper.backup.catalog import LAYOUT_STREAM, BackupRecord, BackupStatus

NOW = dt.datetime(2026, 12, 1, 3, 0, 0, tzinfo=dt.UTC)


def facts(version_num: int, zstd: bool) -> SourceFacts:
    return SourceFacts(False, version_num, "7", [], 0, None, zstd=zstd)


@pytest.mark.parametrize(
    ("version_num", "zstd", "server"),
    [
        (150004, True, True),
        (170010, True, True),
        (180006, True, True),
        (180006, False, False),  # built without zstd
        (140010, True, False),  # no server-side compression before 15
    ],
)
def test_the_server_compresses_only_from_15_and_with_zstd(version_num: int, zstd: bool, server: bool) -> None:
    assert server_compression_possible(facts(version_num, zstd)) is server


@pytest.mark.parametrize(("zstd", "expect"), [(True, "server"), (False, "here")])
async def test_a_server_without_zstd_gets_the_copy_compressed_here_and_says_why(
    monkeypatch: pytest.MonkeyPatch, zstd: bool, expect: str
) -> None:
    called: list[str] = []

    async def on_server(*args: Any) -> None:
        called.append("server")

    async def here(*args: Any) -> None:
        called.append("here")

    monkeypatch.setattr(basebackup, "_copy_compressed", on_server)
    monkeypatch.setattr(basebackup, "_copy", here)
    rec = BackupRecord(
        id="b1",
        label="b1",
        status=BackupStatus.RUNNING,
        scope="s",
        repository="r",
        start_time=NOW,
        updated_at=NOW,
    )
    run = basebackup._Run(repo=None, scope="s", record=rec, progress=None)  # type: ignore[arg-type]
    src = Endpoint("p", "127.0.0.1", 5432)
    with structlog.testing.capture_logs() as logs:
        args = basebackup._CopyArgs(
            "server",
            src,
            None,  # type: ignore[arg-type]  # the credentials: not used by the stand-ins
            Path("/bin"),
            1,
            1,
            1.0,
            facts(180006, zstd),
            None,
        )
        await basebackup._copy_either(run, args)
    assert called == [expect]
    assert (rec.layout == LAYOUT_STREAM) is (expect == "server")
    refused = [e for e in logs if e["event"] == "backup_server_compression_unavailable"]
    if zstd:
        assert refused == []
    else:
        assert len(refused) == 1 and "without zstd" in refused[0]["reason"]
