"""3-2-1: ``hakeeper backup copy`` and ``hakeeper backup policy`` against a real PostgreSQL 15,
two directory repositories and SeaweedFS (the off-site one)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from hakeeper.backup.catalog import Target
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.lsn import parse_lsn
from tests.integration.test_backup_restore import (
    area,  # noqa: F401  (the fixture)
    backup,
    check_restored,
    do_restore,
    fs_env,
    hk,
    insert,
    ok,
    start_primary,
)
from tests.integration.test_dump import seaweed_repo
from tests.support.pg import PgArea
from tests.support.ports import free_ports
from tests.support.s3_server import SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration


def policy(conf: Path) -> tuple[int, dict[str, Any]]:
    import json

    res = hk("backup", "policy", "-c", str(conf), "-o", "json")
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def row(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    (r,) = [i for i in report["items"] if i["id"] == item_id]
    return r


def test_copies_make_the_policy_green_and_a_missing_offsite_copy_turns_it_red(
    area: PgArea,  # noqa: F811
    seaweed: SeaweedS3,
) -> None:
    env = fs_env(area)  # fs1: the repository WAL is archived into
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 2000)
    b = backup(env, "p")
    fs2_root = area.root / "repo2"
    fs2_root.mkdir()
    s3 = seaweed_repo(seaweed, "offsite", "hk-copy-test", offsite=True)
    fs2 = RepositoryConfig.model_validate({"name": "fs2", "type": "fs", "path": str(fs2_root)})
    s3_doc = s3.model_dump(mode="json", exclude_none=True)
    s3_doc["secret_key"] = SECRET_KEY
    cfg = env.servers["p"]
    (dead,) = free_ports(1)
    conf = area.root / "node.yml"
    conf.write_text(
        yaml.safe_dump(
            {
                "scope": env.scope,
                "name": "p",
                "etcd": {"hosts": [f"http://127.0.0.1:{dead}"]},
                "postgresql": {
                    "data_dir": str(cfg.data_dir),
                    "listen": cfg.listen,
                    "superuser": {"username": "postgres", "password": "su-secret"},
                    "replication": {"username": "replicator", "password": "repl-secret"},
                },
                "backup": {
                    "repositories": [
                        env.repo_cfg.model_dump(mode="json", exclude_none=True),
                        fs2.model_dump(mode="json", exclude_none=True),
                        s3_doc,
                    ]
                },
            }
        )
    )
    c = str(conf)
    d = ok(
        hk("dump", "create", "-c", c, "--from", "local", "--db", "postgres", "--repo", "fs1", "-o", "json")
    )
    # one copy each: red, and it says what is missing
    code, rep = policy(conf)
    assert code == 1 and rep["ok"] is False
    assert row(rep, b.id)["missing"] == [
        "1 of 3 copies",
        "1 of 2 storage types (disk)",
        "0 of 1 off-site copies",
    ]
    assert row(rep, d["id"])["repositories"] == ["fs1"]
    assert {r["name"]: (r["storage"], r["offsite"]) for r in rep["repositories"]} == {
        "fs1": ("disk", False),
        "fs2": ("disk", False),
        "offsite": ("object", True),
    }
    # copy the backup (with its WAL) and the dump to the second disk and off-site
    c2 = ok(hk("backup", "copy", b.id, "-c", c, "--to", "fs2", "-o", "json"))
    assert c2["kind"] == "backup" and c2["source"] == "fs1" and c2["objects"] == len(b.parts) + 1
    assert c2["wal_copied"] >= b.wal_segments and c2["already_there"] is False
    c3 = ok(hk("backup", "copy", b.id, "-c", c, "--to", "offsite", "--from", "fs1", "-o", "json"))
    assert c3["objects"] == c2["objects"] and c3["stored_bytes"] == c2["stored_bytes"]
    for to in ("fs2", "offsite"):
        dc = ok(hk("backup", "copy", d["id"], "-c", c, "--to", to, "-o", "json"))
        assert dc["kind"] == "dump" and dc["objects"] == 2  # globals + the archive
    # byte for byte: the stored parts are identical files/objects
    rel = Path(env.scope) / "backup" / b.id / b.parts[0].name
    src_bytes = (Path(str(env.repo_cfg.path)) / rel).read_bytes()
    assert (fs2_root / rel).read_bytes() == src_bytes
    raw: Any = seaweed.client()
    assert raw.get_object(Bucket="hk-copy-test", Key=str(rel))["Body"].read() == src_bytes
    # again: nothing to do
    again = ok(hk("backup", "copy", b.id, "-c", c, "--to", "fs2", "-o", "json"))
    assert again["already_there"] is True and again["objects"] == 0
    # green: 3 copies, 2 storage types, 1 off-site
    code, rep = policy(conf)
    assert code == 0 and rep["ok"] is True, rep
    assert row(rep, b.id)["repositories"] == ["fs1", "fs2", "offsite"]
    assert row(rep, b.id)["storage_types"] == ["disk", "object"] and row(rep, b.id)["offsite"] == ["offsite"]
    table = hk("backup", "policy", "-c", c)
    assert table.returncode == 0 and b.id in table.stdout
    # the copy in fs2 restores by itself (its own WAL), to the backup's end
    env2 = dataclasses.replace(env, repo_cfg=fs2)
    stop = parse_lsn(b.stop_lsn)
    assert stop is not None
    r = do_restore(env2, area.data_dir("from-copy"), Target("lsn", lsn=stop))
    assert r.repository == "fs2" and r.backup_id == b.id
    check_restored(r, ["a"])
    # the dump copy off-site restores too
    res = ok(
        hk("dump", "restore", d["id"], "-c", c, "--repo", "offsite", "--create-db", "copied", "-o", "json")
    )
    assert res["repository"] == "offsite"

    # the off-site copy of the backup goes missing: red for the backup, the dump stays green
    async def drop_offsite_backup() -> None:
        async with make_repository(s3) as r:
            for e in await r.list_objects(f"{env.scope}/backup/{b.id}/"):
                await r.delete(e.name)

    asyncio.run(drop_offsite_backup())
    code, rep = policy(conf)
    assert code == 1 and rep["ok"] is False
    assert row(rep, b.id)["ok"] is False
    assert row(rep, b.id)["missing"] == [
        "2 of 3 copies",
        "1 of 2 storage types (disk)",
        "0 of 1 off-site copies",
    ]
    assert row(rep, d["id"])["ok"] is True
    red = hk("backup", "policy", "-c", c)
    assert red.returncode == 1 and "NO" in red.stdout and "0 of 1 off-site" in red.stdout


def test_a_corrupt_source_object_is_never_copied(area: PgArea) -> None:  # noqa: F811
    env = fs_env(area)
    start_primary(env, "p")
    p = env.port("p")
    insert(p, "a", 2000)
    b = backup(env, "p")
    other = RepositoryConfig.model_validate({"name": "fs2", "type": "fs", "path": str(area.root / "r2")})
    (area.root / "r2").mkdir()
    part = Path(str(env.repo_cfg.path)) / env.scope / "backup" / b.id / b.parts[1].name
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    part.write_bytes(bytes(blob))
    from hakeeper.backup.copy import CopyError, copy_to
    from hakeeper.core.backup_config import BackupConfig

    cfg = BackupConfig(repositories=[env.repo_cfg, other])
    with pytest.raises(CopyError, match=b.parts[1].name):
        asyncio.run(copy_to(cfg, env.scope, b.id, "fs2"))
    assert not (area.root / "r2" / env.scope / "backup" / b.id / b.parts[1].name).exists()
    assert not (area.root / "r2" / env.scope / "backup" / b.id / "backup.json").exists()
    # repaired, the copy goes through
    blob[len(blob) // 2] ^= 0x40
    part.write_bytes(bytes(blob))
    res = asyncio.run(copy_to(cfg, env.scope, b.id, "fs2"))
    assert res.objects == len(b.parts) + 1 and res.wal_copied + res.wal_present == b.wal_segments
