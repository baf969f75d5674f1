"""Issue 13 items 8 and 9: a repository bound to a cluster's system identifier (the archiver
refuses one bound to another cluster instead of jamming on every segment), and the pg_wal cap
on by default with warnings well before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hakeeper.backup.archive.archiver as archiver_module
import hakeeper.backup.binding as binding_module
from hakeeper.backup.archive.plan import auto_pg_wal_cap, cap_level
from hakeeper.backup.binding import BindingMismatch, bind, binding_key, read_binding
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.core.backup_config import ArchiveConfig
from tests.support.sim import capture_events
from tests.unit.test_archiver import SEG, Rig, seg


async def test_bind_writes_once_is_idempotent_and_refuses_another_system_identifier(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path, name="r")
    b, created = await bind(repo, "sc", "7001", "repo create", 0.0)
    assert created and b.system_identifier == "7001"
    again, created2 = await bind(repo, "sc", "7001", "archiver n2", 1.0)
    assert not created2 and again.created_by == "repo create"  # never rewritten
    with pytest.raises(BindingMismatch) as ei:
        await bind(repo, "sc", "7002", "archiver n1", 2.0)
    assert "7001" in str(ei.value) and "7002" in str(ei.value) and "repo create" in str(ei.value)
    # another scope in the same repository is independent
    other, created3 = await bind(repo, "other", "7002", "repo create", 3.0)
    assert created3 and other.scope == "other"
    found = await read_binding(repo, "sc")
    assert found is not None and found.system_identifier == "7001"
    assert json.loads(await repo.get(binding_key("sc")))["format"] == 1


async def test_archiver_binds_an_unbound_repository_on_first_use(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ["a"])

    async def sysid() -> str:
        return "7001"

    rig.arch.system_identifier = sysid
    rig.ready(seg(1))
    await rig.settle()
    assert rig.marker(seg(1))
    b = await read_binding(FilesystemRepository(rig.repo_dirs["a"], name="a"), "sc")
    assert b is not None and (b.system_identifier, b.created_by) == ("7001", "archiver n1")
    await rig.arch.close()


async def test_archiver_refuses_a_repository_of_an_earlier_cluster_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-created cluster: the repository holds segment 1 of the old cluster.  Without the
    binding this is a ContentConflict on every segment; with it, the repository is refused
    (down, with the reason in /status and a metric) and nothing is pushed or quarantined there,
    while the other repository keeps archiving."""
    rig = Rig(tmp_path, ["old", "new"])
    old = FilesystemRepository(rig.repo_dirs["old"], name="old")
    await bind(old, "sc", "6999", "repo create", 0.0)
    await old.put_unique(f"sc/wal/{seg(1)}", b"the old cluster's segment")

    async def sysid() -> str:
        return "7001"

    rig.arch.system_identifier = sysid
    rig.ready(seg(1))
    logs = capture_events(monkeypatch, binding_module)
    await rig.settle()
    st = rig.arch.status()
    by_name = {r["name"]: r for r in st["repositories"]}
    assert not by_name["old"]["up"]
    assert "system identifier 6999" in by_name["old"]["binding_error"]
    assert "6999" in by_name["old"]["last_error"] and by_name["old"]["conflicts"] == 0
    assert by_name["new"]["binding_error"] is None and rig.stored("new", seg(1)) == rig.content[seg(1)]
    assert not (rig.repo_dirs["old"] / "quarantine").exists()
    assert rig.arch.metrics.binding_refused.labels("old")._value.get() == 1
    refusals = [e for e in logs if e["event"] == "repository_binding_refused"]
    assert refusals and refusals[0]["bound_to"] == "6999" and "reason" in refusals[0]
    await rig.arch.close()


def test_pg_wal_cap_default_is_auto_and_explicit_values_stay() -> None:
    assert ArchiveConfig().max_pg_wal_bytes == "auto"
    assert ArchiveConfig(max_pg_wal_bytes=None).max_pg_wal_bytes is None
    assert ArchiveConfig(max_pg_wal_bytes=5).max_pg_wal_bytes == 5
    with pytest.raises(ValueError):
        ArchiveConfig(max_pg_wal_bytes=-1)
    with pytest.raises(ValueError):
        ArchiveConfig(max_pg_wal_bytes="half")
    assert auto_pg_wal_cap(100 * 2**30) == 25 * 2**30


def test_cap_levels() -> None:
    assert [cap_level(b, 100) for b in (0, 49, 50, 79, 80, 99, 100, 500)] == [0, 0, 50, 50, 80, 80, 100, 100]
    assert cap_level(10**12, None) == 0


async def test_auto_cap_is_read_from_pg_wal_filesystem_and_warns_at_50_and_80(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, ["a"])
    rig.arch.tick()
    assert rig.arch.pg_wal_cap is not None and rig.arch.pg_wal_cap > 0  # auto: resolved from statvfs
    rig.arch.pg_wal_cap = 10 * SEG  # as if the filesystem were small
    rig.down("a")
    events: list[tuple[str, object]] = []
    logs = capture_events(monkeypatch, archiver_module)
    for n in range(1, 10):
        rig.ready(seg(n))
        await rig.settle()
        events += [(e["event"], e.get("percent")) for e in logs if e["event"].startswith("pg_wal_cap")]
        logs.clear()
    assert events == [("pg_wal_cap_approaching", 50), ("pg_wal_cap_approaching", 80)]
    st = rig.arch.status()["pg_wal_cap"]
    assert (st["max_bytes"], st["pending_bytes"], st["warning_level"], st["setting"]) == (
        10 * SEG,
        9 * SEG,
        80,
        "auto",
    )
    assert rig.arch.metrics.pg_wal_cap_ratio._value.get() == pytest.approx(0.9)
    await rig.arch.close()


def _segment_head(sysid: int) -> bytes:
    """The first bytes of a WAL segment: a long page header (PostgreSQL 15's magic)."""
    import struct

    return struct.pack("<HHIQIIQII", 0xD110, 0x0002, 1, 0, 0, 0, sysid, 16 << 20, 8192) + bytes(64)


async def test_an_unbound_repository_holding_another_clusters_wal_is_not_bound(tmp_path: Path) -> None:
    """Repositories from before bindings: the newest archived segment's page header tells whose
    WAL it is; binding it to the re-created cluster would only move the jam to every segment."""
    repo = FilesystemRepository(tmp_path, name="r")
    await repo.put_unique(f"sc/wal/{seg(1)}", _segment_head(6999))
    await repo.put_unique(f"sc/wal/{seg(2)}", _segment_head(6999))
    with pytest.raises(BindingMismatch) as ei:
        await bind(repo, "sc", "7001", "archiver n1", 0.0)
    assert f"6999 (from the newest archived segment {seg(2)})" in str(ei.value)
    assert await read_binding(repo, "sc") is None
    # the same cluster's WAL: bound
    b, created = await bind(repo, "sc", "6999", "repo create", 0.0)
    assert created and b.system_identifier == "6999"
