"""Restoring a dump from a tampered repository (issue 12, finding 11): a record's names never
become paths outside the restore's directory, and nothing psql would run is used unless it is the
object the record describes and holds no meta-command pg_dumpall does not write."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from hakeeper.backup.dump import (
    GLOBALS_NAME,
    DumpedDatabase,
    DumpError,
    DumpRecord,
    RestoreRequest,
    dump_prefix,
    record_key,
    restore_dump,
)
from hakeeper.backup.repo import FilesystemRepository

DID = "D20260601T000000Z"
T = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _obj(name: str, data: bytes) -> dict[str, object]:
    return {"name": name, "size": len(data), "stored_size": 0, "sha256": hashlib.sha256(data).hexdigest()}


def _record(databases: list[dict[str, object]], globals_object: dict[str, object] | None) -> bytes:
    return json.dumps(
        {
            "id": DID,
            "status": "complete",
            "scope": "s",
            "repository": "fs",
            "dump_format": "custom",
            "start_time": T.isoformat(),
            "stop_time": T.isoformat(),
            "updated_at": T.isoformat(),
            "databases": databases,
            "globals_object": globals_object,
        }
    ).encode()


@pytest.mark.parametrize(
    "key,obj",
    [
        ("../../victim", "archive.dump"),
        ("db000", "../../../victim"),
        ("db000", "/etc/victim"),
        ("db000", "dir/../../x"),
        ("db000\n", "archive.dump"),
        ("db000", "archive.dump\n"),
        ("", "archive.dump"),
        ("db000", "dir/sub/x"),
    ],
)
def test_a_record_with_unsafe_names_does_not_load(key: str, obj: str) -> None:
    with pytest.raises(ValidationError, match="unsafe name"):
        DumpedDatabase.model_validate({"name": "shop", "key": key, "objects": [_obj(obj, b"")]})


def test_the_names_hakeeper_writes_load() -> None:
    objs = [_obj(n, b"") for n in ("archive.dump", "dump.sql", "dir/toc.dat", "dir/3341.dat.gz")]
    db = DumpedDatabase.model_validate({"name": "shop", "key": "db000", "objects": objs})
    assert [o.name for o in db.objects][-1] == "dir/3341.dat.gz"


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """psql and pg_restore that leave a mark when run: they must not be."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("psql", "pg_restore"):
        p = d / tool
        p.write_text(f'#!/bin/sh\necho ran >> "{tmp_path}/ran-{tool}"\n')
        p.chmod(0o755)
    return d


async def _repo(tmp_path: Path) -> FilesystemRepository:
    repo = FilesystemRepository(tmp_path / "repo", name="fs")
    await repo.initialize()
    return repo


def _ran(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("ran-*"))


def _req(tmp_path: Path, fake_bin: Path, *, globals: bool = False) -> RestoreRequest:
    (tmp_path / "rt").mkdir(exist_ok=True)
    return RestoreRequest(
        conninfo="host=127.0.0.1 port=1 dbname=x",
        password=None,
        bin_dir=fake_bin,
        tmp_dir=tmp_path / "rt",
        globals=globals,
    )


async def test_restore_of_a_record_with_dotdot_paths_touches_nothing_outside(
    tmp_path: Path, fake_bin: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o600)
    before = victim.stat()
    repo = await _repo(tmp_path)
    # as the restore's temporary directory is tmp_path/rt/<mkdtemp>, ../../victim is the victim
    await repo.put(
        record_key("s", DID),
        _record([{"name": "shop", "key": "..", "objects": [_obj("../victim", b"x")]}], None),
    )
    await repo.put(dump_prefix("s", DID) + "db000/archive.dump", b"x")

    with pytest.raises(DumpError, match="unsafe name"):
        await restore_dump(repo, "s", DID, _req(tmp_path, fake_bin))

    after = victim.stat()
    assert victim.read_text() == "precious"
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (before.st_uid, before.st_gid, 0o600)
    assert not list((tmp_path / "rt").iterdir()), "refused before any file was made"
    assert not _ran(tmp_path)


async def test_a_swapped_globals_file_is_refused_before_psql_runs(tmp_path: Path, fake_bin: Path) -> None:
    repo = await _repo(tmp_path)
    archive = b"PGDMP fake"
    recorded = b"CREATE ROLE app;\n"
    await repo.put(
        record_key("s", DID),
        _record(
            [{"name": "shop", "key": "db000", "objects": [_obj("archive.dump", archive)]}],
            _obj(GLOBALS_NAME, recorded),
        ),
    )
    await repo.put(dump_prefix("s", DID) + "db000/archive.dump", archive)
    await repo.put(dump_prefix("s", DID) + GLOBALS_NAME, b"\\! touch /tmp/owned\n")  # swapped

    with pytest.raises(DumpError, match="not what the dump's record says"):
        await restore_dump(repo, "s", DID, _req(tmp_path, fake_bin, globals=True))

    assert not _ran(tmp_path), "psql never ran"


async def test_a_globals_file_with_a_shell_escape_is_refused_even_if_the_record_matches(
    tmp_path: Path, fake_bin: Path
) -> None:
    repo = await _repo(tmp_path)
    archive = b"PGDMP fake"
    hostile = b"\\restrict k\nCREATE ROLE app;\nSELECT 1; \\! id\n\\unrestrict k\n"
    await repo.put(
        record_key("s", DID),
        _record(
            [{"name": "shop", "key": "db000", "objects": [_obj("archive.dump", archive)]}],
            _obj(GLOBALS_NAME, hostile),
        ),
    )
    await repo.put(dump_prefix("s", DID) + "db000/archive.dump", archive)
    await repo.put(dump_prefix("s", DID) + GLOBALS_NAME, hostile)

    with pytest.raises(DumpError, match="line 3 holds a psql meta-command"):
        await restore_dump(repo, "s", DID, _req(tmp_path, fake_bin, globals=True))

    assert not _ran(tmp_path), "psql never ran"


def test_record_names_in_a_stored_record_are_checked_when_read() -> None:
    raw = _record([{"name": "shop", "key": "../../etc", "objects": []}], None)
    with pytest.raises(ValidationError):
        DumpRecord.model_validate_json(raw)
