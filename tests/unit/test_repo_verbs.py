"""Issue 13 item 8: `hakeeper info`, `repo verify` (the checksum scan), `backup list` when one
repository fails, and `report`'s exit code when it read nothing -- on real repository files."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import hakeeper.cli.backup_cmds  # registers the commands on app
import hakeeper.cli.repo_cmds
import hakeeper.cli.verify_cmds  # noqa: F401
from hakeeper.backup import catalog
from hakeeper.backup.info import repository_info, summarize, wal_ranges
from hakeeper.backup.repo import FilesystemRepository, ListEntry
from hakeeper.backup.report import Inputs
from hakeeper.backup.scan import scan_repository
from hakeeper.cli.app import app
from tests.support.ports import free_ports

SCOPE = "c"
T0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


def seg(n: int, tli: int = 1) -> str:
    return f"{tli:08X}{0:08X}{n:08X}"


def test_wal_ranges_per_timeline_with_holes() -> None:
    names = [seg(3), seg(1), seg(2), seg(5), "00000002.history", seg(5, 2), seg(6, 2), f"{seg(4)}.partial"]
    got = [r.to_dict() for r in wal_ranges(names)]
    assert got == [
        {"timeline": 1, "first": seg(1), "last": seg(5), "segments": 4, "missing": 1},
        {"timeline": 2, "first": seg(5, 2), "last": seg(6, 2), "segments": 2, "missing": 0},
    ]


def test_summarize_newest_segment_size_and_backups() -> None:
    listing = [
        ListEntry(f"{SCOPE}/wal/{seg(1)}", 100, T0),
        ListEntry(f"{SCOPE}/wal/{seg(2)}", 200, T0 + dt.timedelta(minutes=1)),
        ListEntry(f"{SCOPE}/wal/00000002.history", 10, T0 + dt.timedelta(minutes=2)),
        ListEntry(f"{SCOPE}/backup/X/base.tar.00000", 1000, T0),
    ]
    info = summarize("r", SCOPE, listing, catalog.Catalog("r")).to_dict()
    assert info["status"] == "ok" and info["last_archived"] == seg(2)  # history files are not segments
    assert info["last_archived_at"].startswith("2026-12-01T10:01:00")
    assert (info["objects"], info["stored_bytes"], info["history_files"]) == (4, 1310, 1)
    assert (info["backups"], info["complete_backups"], info["newest_backup"]) == (0, 0, None)


async def _backup(repo: FilesystemRepository) -> catalog.BackupRecord:
    """A complete backup of two parts and a manifest, and the WAL segment it needs."""
    parts = [
        await repo.put(catalog.object_key(SCOPE, "B1", catalog.part_name(i)), os.urandom(5000))
        for i in (0, 1)
    ]
    man = await repo.put(catalog.object_key(SCOPE, "B1", catalog.MANIFEST_NAME), b'{"Files": []}')
    rec = catalog.BackupRecord(
        id="B1",
        label="t",
        status=catalog.BackupStatus.COMPLETE,
        scope=SCOPE,
        repository=repo.name,
        system_identifier="7001",
        timeline=1,
        stop_timeline=1,
        start_lsn="0/1000028",
        stop_lsn="0/1000100",
        start_time=T0,
        stop_time=T0,
        updated_at=T0,
        parts=[
            catalog.StoredObject(
                name=catalog.part_name(i), size=p.size, stored_size=p.stored_size, sha256=p.sha256
            )
            for i, p in enumerate(parts)
        ],
        manifest=catalog.StoredObject(
            name=catalog.MANIFEST_NAME, size=man.size, stored_size=man.stored_size, sha256=man.sha256
        ),
    )
    await repo.put(catalog.record_key(SCOPE, "B1"), rec.to_json())
    await repo.put_unique(f"{SCOPE}/wal/{seg(1)}", os.urandom(3000))
    await repo.put_unique(f"{SCOPE}/wal/{seg(2)}", os.urandom(3000))
    return rec


def _flip(path: Path, at: int = -60) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


async def test_scan_is_clean_then_names_a_flipped_byte_in_a_backup_part_and_in_wal(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "r", name="r")
    await repo.initialize()
    await _backup(repo)
    clean = await scan_repository(repo, SCOPE)
    assert clean.ok and (clean.objects, clean.backups, clean.wal_files) == (6, 1, 2)
    _flip(repo.root / SCOPE / "backup" / "B1" / "base.tar.00001", 40)  # in the compressed content
    _flip(repo.root / SCOPE / "wal" / seg(2))  # in the trailer's checksum
    bad = await scan_repository(repo, SCOPE)
    assert not bad.ok
    assert [(p.kind, p.object) for p in bad.problems] == [
        ("corrupt", f"{SCOPE}/backup/B1/base.tar.00001"),
        ("corrupt", f"{SCOPE}/wal/{seg(2)}"),
    ]


async def test_scan_reports_missing_parts_needed_wal_and_a_part_replaced_by_other_content(
    tmp_path: Path,
) -> None:
    repo = FilesystemRepository(tmp_path / "r", name="r")
    await repo.initialize()
    await _backup(repo)
    (repo.root / SCOPE / "backup" / "B1" / "base.tar.00000").unlink()
    (repo.root / SCOPE / "wal" / seg(1)).unlink()
    await repo.put(
        catalog.object_key(SCOPE, "B1", catalog.MANIFEST_NAME), b"another manifest"
    )  # valid, but not it
    rep = await scan_repository(repo, SCOPE)
    kinds = {(p.kind, p.object) for p in rep.problems}
    assert kinds == {
        ("missing", f"{SCOPE}/backup/B1/base.tar.00000"),
        ("missing", f"{SCOPE}/wal/{seg(1)}"),
        ("mismatch", f"{SCOPE}/backup/B1/backup_manifest"),
    }


async def test_info_of_an_unreadable_repository_says_why(tmp_path: Path) -> None:
    info = await repository_info(FilesystemRepository(tmp_path / "absent", name="gone"), SCOPE)
    assert not info.ok and "missing" in (info.error or "")


# ---------------------------------------------------------------------------------- the commands


def _node(tmp_path: Path, repos: dict[str, Path]) -> Path:
    conf = tmp_path / "node.yml"
    conf.write_text(
        yaml.safe_dump(
            {
                "scope": SCOPE,
                "name": "n1",
                "etcd": {"hosts": [f"http://127.0.0.1:{free_ports(1)[0]}"], "request_timeout": 0.5},
                "postgresql": {
                    "data_dir": str(tmp_path / "data"),
                    "listen": f"127.0.0.1:{free_ports(1)[0]}",
                    "superuser": {"password": "su-secret"},
                    "replication": {"password": "repl-secret"},
                },
                "backup": {
                    "repositories": [{"name": n, "type": "fs", "path": str(p)} for n, p in repos.items()]
                },
            }
        )
    )
    return conf


def _good(tmp_path: Path) -> FilesystemRepository:
    """A repository with one complete backup (set up on its own event loop: the commands run
    theirs)."""
    good = FilesystemRepository(tmp_path / "good", name="good")

    async def setup() -> None:
        await good.initialize()
        await _backup(good)

    asyncio.run(setup())
    return good


def test_backup_list_shows_the_readable_repository_and_exits_1_for_the_other(tmp_path: Path) -> None:
    good = _good(tmp_path)
    conf = _node(tmp_path, {"good": good.root, "gone": tmp_path / "absent"})
    res = CliRunner().invoke(app, ["backup", "list", "-c", str(conf)])
    assert res.exit_code == 1, res.output
    assert "B1" in res.stdout and "good" in res.stdout  # the readable one's backup is listed
    assert "repository gone could not be read" in res.stderr and "missing" in res.stderr
    res = CliRunner().invoke(app, ["backup", "list", "-c", str(conf), "-o", "json"])
    assert res.exit_code == 1 and '"id": "B1"' in res.stdout


def test_info_exits_1_only_when_no_repository_could_be_read(tmp_path: Path) -> None:
    good = _good(tmp_path)
    conf = _node(tmp_path, {"good": good.root, "gone": tmp_path / "absent"})
    res = CliRunner().invoke(app, ["info", "-c", str(conf), "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.stdout)
    by = {r["repository"]: r for r in doc["repositories"]}
    assert by["gone"]["status"] == "error" and "missing" in by["gone"]["error"]
    assert by["good"]["wal"] == [
        {"timeline": 1, "first": seg(1), "last": seg(2), "segments": 2, "missing": 0}
    ]
    assert by["good"]["newest_backup"]["id"] == "B1" and by["good"]["complete_backups"] == 1
    table = CliRunner().invoke(app, ["info", "-c", str(conf)])
    assert table.exit_code == 0 and seg(1) in table.stdout and "error" in table.stdout
    none = CliRunner().invoke(app, ["info", "-c", str(_node(tmp_path, {"gone": tmp_path / "absent"}))])
    assert none.exit_code == 1


def test_repo_verify_command_exits_1_naming_the_corrupt_object(tmp_path: Path) -> None:
    good = _good(tmp_path)
    conf = _node(tmp_path, {"good": good.root})
    assert CliRunner().invoke(app, ["repo", "verify", "-c", str(conf)]).exit_code == 0
    _flip(good.root / SCOPE / "wal" / seg(1), 30)
    res = CliRunner().invoke(app, ["repo", "verify", "-c", str(conf)])
    assert res.exit_code == 1 and f"{SCOPE}/wal/{seg(1)}" in res.stderr and "corrupt" in res.stderr


def test_report_read_nothing() -> None:
    assert Inputs(now=T0).read_nothing
    assert not Inputs(now=T0, etcd_read=True).read_nothing
    assert not Inputs(now=T0, repositories_read=1).read_nothing


@pytest.mark.parametrize("readable", [False, True])
def test_report_exits_1_when_it_could_read_neither_etcd_nor_a_repository(
    tmp_path: Path, readable: bool
) -> None:
    repo = tmp_path / "r"
    if readable:
        repo.mkdir()
    conf = _node(tmp_path, {"r": repo})
    res = CliRunner().invoke(app, ["report", "-c", str(conf)])
    assert "etcd could not be read" in res.stderr
    if readable:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == 1 and "neither etcd nor any backup repository could be read" in res.stderr


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("id", "../../etc", "names another backup"),
        ("id", "B2", "names another backup"),
        ("parent", "/etc", "invalid parent"),
        ("chain_root", "..", "invalid chain_root"),
    ],
)
async def test_a_record_naming_a_path_is_refused(tmp_path: Path, field: str, value: str, why: str) -> None:
    """Ids from a repository name directories (a chain's staging directories): a tampered record
    is refused when read, listed as a problem, and its backup is not in the catalog."""
    repo = FilesystemRepository(tmp_path / "r", name="r")
    await repo.initialize()
    rec = await _backup(repo)
    doc = json.loads(rec.to_json())
    doc[field] = value
    await repo.put(catalog.record_key(SCOPE, "B1"), json.dumps(doc).encode())
    with pytest.raises(ValueError, match=why):
        await catalog.read_record(repo, SCOPE, "B1")
    cat = await catalog.load_catalog(repo, SCOPE)
    assert cat.records == [] and len(cat.problems) == 1 and why in cat.problems[0]
