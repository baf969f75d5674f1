"""Encrypted repositories (issue 12, finding 7) against a real PostgreSQL 15 and directory
repositories, through the command line where an operator would use it: base backups, point in
time recovery, a restore drill, a copy to a repository with another key and expire all work on
encrypted repositories; no byte of a known table row is found in the repository files; a wrong
key and a flipped byte fail with messages that say so and name the object."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from hakeeper.backup import cipher
from hakeeper.backup.catalog import Target
from hakeeper.backup.errors import AuthenticationFailed, WrongKey
from hakeeper.backup.repo import MARKER
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreError, wal_config_path
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.lsn import parse_lsn
from hakeeper.localcluster import LocalCluster
from hakeeper.util.keyfile import new_key_text
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_bootstrap import names, q, tail, wait
from tests.integration.test_backup_restore import (
    SCOPE,
    Env,
    area,  # noqa: F401  (the fixture)
    check_restored,
    do_restore,
    hk,
    insert,
    make_env,
    node_yaml,
    ok,
    sql,
    start_primary,
)
from tests.support.cluster import cluster_tmpdir, encrypted_fs_repository, free_base_port, start_first_member
from tests.support.pg import PgArea
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration

CANARY = "hk-canary-5c0ffee-row"  # in every row of a table: must never be readable in the repository


def _key_file(pga: PgArea, name: str) -> Path:
    path = pga.root / name
    path.write_text(new_key_text() + "\n")
    path.chmod(0o600)
    return path


def _repo_cfg(pga: PgArea, name: str, key: Path | None) -> RepositoryConfig:
    root = pga.root / name
    ra = resolve_run_as(pga.root / "x")
    for d in (root, root / SCOPE, root / SCOPE / "wal"):  # as fs_env: PostgreSQL's user owns it
        d.mkdir(exist_ok=True)
        ra.chown(d)
    doc: dict[str, Any] = {"name": name, "type": "fs", "path": str(root)}
    if key is not None:
        doc["encryption"] = {"key_file": str(key)}
    return RepositoryConfig.model_validate(doc)


def _conf(env: Env, path: Path, repos: list[RepositoryConfig], **backup: Any) -> Path:
    """A node file with ``repos`` (the first is ``env``'s, where WAL is archived)."""
    node_yaml(env, "p", path)
    doc = yaml.safe_load(path.read_text())
    doc["backup"]["repositories"] = [r.model_dump(mode="json", exclude_none=True) for r in repos]
    doc["backup"].update(backup)
    path.write_text(yaml.safe_dump(doc))
    return path


def _env_for_restores(env: Env, repo: RepositoryConfig) -> Env:
    """``env`` restoring from ``repo``; its WAL archiving (the stager's config) stays as it is."""
    return Env(env.area, repo, env.area.root / f"walconf-unused-{repo.name}.json", env.scope, env.servers)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _fails(res: Any, *needles: str) -> str:
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    text = res.stdout + res.stderr
    for n in needles:
        assert n in " ".join(text.split()), (n, text)
    return str(text)


def test_encrypted_repository_backup_pitr_verify_copy_expire(area: PgArea) -> None:  # noqa: F811
    key1, key2 = _key_file(area, "fs1.key"), _key_file(area, "fs2.key")
    fs1, fs2 = _repo_cfg(area, "fs1", key1), _repo_cfg(area, "fs2", key2)
    env = make_env(area, fs1)
    start_primary(env, "p")
    p = env.port("p")
    sql(p, "CREATE TABLE secrets (id int PRIMARY KEY, note text)")
    sql(p, f"INSERT INTO secrets SELECT g, '{CANARY}-' || g FROM generate_series(1, 20000) g")
    insert(p, "a", 1000)
    scratch = area.root / "verify-scratch"
    conf = _conf(
        env,
        area.root / "node.yml",
        [fs1, fs2],
        verify={"scratch_dir": str(scratch), "timeout": 120},
    )
    b1 = ok(hk("backup", "create", "-c", str(conf), "--from", "local", "--part-size", "1", "-o", "json"))
    assert b1["status"] == "complete" and b1["repository"] == "fs1"
    insert(p, "b", 100)
    t_target = sql(p, "SELECT clock_timestamp()")[0][0]
    time.sleep(0.3)
    insert(p, "c", 100)
    time.sleep(1.0)  # one backup id per second
    b2 = ok(hk("backup", "create", "-c", str(conf), "--from", "local", "--part-size", "1", "-o", "json"))
    insert(p, "d", 100)

    # a logical dump (custom format, with the globals) into the same repository
    dumped = ok(hk("dump", "create", "-c", str(conf), "--db", "postgres", "--from", "local", "-o", "json"))
    assert dumped["status"] == "complete", dumped

    # nothing of the rows (nor of anything else) is readable in the repository files
    root1 = Path(str(fs1.path))
    files = _files(root1)
    wal = [f for f in files if f.parent.name == "wal"]
    assert len(files) > 10 and len(wal) >= 3, files
    for f in files:
        blob = f.read_bytes()
        assert CANARY.encode() not in blob, f
        assert f.name == MARKER or blob.startswith(cipher.MAGIC), f
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))  # finding 6: 0600
    for d in (p for p in root1.rglob("*") if p.is_dir()):
        assert d.stat().st_mode & 0o077 == 0 or d in (root1 / SCOPE, root1 / SCOPE / "wal"), d

    # ... though it is there once decrypted: the check above looks where the rows are
    async def decrypted_wal_has_canary() -> bool:
        async with make_repository(fs1) as repo:
            for f in wal:
                if CANARY.encode() in await repo.get(f.relative_to(root1).as_posix()):
                    return True
        return False

    assert asyncio.run(decrypted_wal_has_canary())

    # point in time recovery: b1 and the WAL up to the target
    r = do_restore(env, area.data_dir("r-time"), Target("time", time=t_target), primary="p")
    assert r.backup_id == b1["id"]
    port = check_restored(r, ["a", "b"])
    assert sql(port, "SELECT count(*), min(note) FROM secrets") == [(20000, f"{CANARY}-1")]

    # a restore drill of the newest backup, row counts compared
    res = hk("verify", "-c", str(conf), "--latest", "-o", "json")
    drill = ok(res)
    assert drill["ok"] is True and drill["backup_id"] == b2["id"], drill
    assert drill["row_counts"]["compared"] is True and drill["row_counts"]["differences"] == []
    assert drill["checks"]["dump_restore"]["ok"] is True, drill["checks"]  # the dump, restored
    assert [d["name"] for d in drill["dump"]["databases"]] == ["postgres"], drill["dump"]

    # a copy into a repository with another key: decrypted, sealed again, restorable from there
    copied = ok(hk("backup", "copy", b1["id"], "-c", str(conf), "--to", "fs2", "-o", "json"))
    assert copied["objects"] >= 2 and copied["wal_copied"] >= 1, copied
    root2 = Path(str(fs2.path))
    for f in _files(root2):
        blob = f.read_bytes()
        assert CANARY.encode() not in blob
        if f.name != MARKER:
            assert blob[8:24] == cipher.Key.from_bytes(_raw(key2)).fingerprint, f
    env2 = _env_for_restores(env, fs2)
    stop = parse_lsn(b1["stop_lsn"])
    assert stop is not None
    r = do_restore(env2, area.data_dir("r-copy"), Target("lsn", lsn=stop))
    assert r.backup_id == b1["id"]
    check_restored(r, ["a"])

    # expire on the encrypted repository: keep 1, b1 and the WAL only it needed go
    keep1 = RepositoryConfig.model_validate(
        {**fs1.model_dump(mode="json", exclude_none=True), "retention": {"full_count": 1}}
    )
    conf1 = _conf(env, area.root / "node-keep1.yml", [keep1])
    gone = ok(hk("backup", "expire", "-c", str(conf1), "-o", "json"))[0]
    assert [b["id"] for b in gone["backups"]] == [b1["id"]] and gone["kept"] == [b2["id"]], gone
    assert gone["wal"], gone
    assert not (root1 / SCOPE / "backup" / b1["id"] / "backup.json").exists()
    r = do_restore(env, area.data_dir("r-latest"), Target("latest"), primary="p")
    assert r.backup_id == b2["id"]
    check_restored(r, ["a", "b", "c", "d"])

    # the wrong key: every command says so, with both fingerprints; nothing is written
    wrong = _key_file(area, "wrong.key")
    conf_wrong = _conf(env, area.root / "node-wrong.yml", [_repo_cfg(area, "fs1", wrong)])
    _fails(hk("backup", "list", "-c", str(conf_wrong)), "was encrypted with another key (fingerprint")
    before = _files(root1)
    _fails(
        hk("backup", "create", "-c", str(conf_wrong), "--from", "local"),
        "repository fs1 is encrypted with another key",
    )
    assert _files(root1) == before
    env_wrong = _env_for_restores(env, _repo_cfg(area, "fs1", wrong))
    with pytest.raises(WrongKey, match=r"repository fs1: object .* was encrypted with another key"):
        do_restore(env_wrong, area.data_dir("r-wrong"), Target("latest"), start=False)
    # no key at all
    conf_plain = _conf(env, area.root / "node-plain.yml", [_repo_cfg(area, "fs1", None)])
    _fails(hk("backup", "list", "-c", str(conf_plain)), "is encrypted", "no encryption key is configured")
    # a key file others can read is refused when the configuration is loaded (exit 2)
    key1.chmod(0o644)
    res = hk("backup", "list", "-c", str(conf))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "backup.repositories.0.encryption.key_file (repository fs1)" in res.stderr, res.stderr
    assert "accessible by group or others (mode 0644)" in res.stderr
    key1.chmod(0o600)

    # a flipped byte in a stored part of b2: restore and the drill fail, naming the object
    assert len(b2["parts"]) >= 2, b2["parts"]
    part = root1 / SCOPE / "backup" / b2["id"] / b2["parts"][1]["name"]
    flipped = bytearray(part.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    part.write_bytes(bytes(flipped))
    name = part.relative_to(root1).as_posix()
    dest = area.data_dir("r-flipped")
    with pytest.raises(RestoreError) as ei:
        do_restore(env, dest, Target("latest"), primary="p", start=False)
    assert name in str(ei.value) and "authentication failed" in str(ei.value), ei.value
    assert isinstance(ei.value.__cause__, AuthenticationFailed)
    assert not dest.exists() or os.listdir(dest) == []
    res = hk("verify", "-c", str(conf), "--latest", "-o", "json")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "authentication failed" in res.stdout and name in res.stdout, res.stdout

    # a tampered backup record is refused, not believed
    record = root1 / SCOPE / "backup" / b2["id"] / "backup.json"
    rec_blob = bytearray(record.read_bytes())
    rec_blob[cipher.HEADER_LEN + 10] ^= 0x01
    record.write_bytes(bytes(rec_blob))
    listing = hk("backup", "list", "-c", str(conf), "-o", "json")
    assert "Traceback" not in listing.stderr
    assert listing.returncode == 0 and b2["id"] not in listing.stdout, listing.stdout
    assert f"{b2['id']}/backup.json: corrupt object: authentication failed" in listing.stderr


def _raw(key_file: Path) -> bytes:
    from hakeeper.util.keyfile import read_key_file

    return read_key_file(key_file)


def test_encrypted_s3_repository_backup_and_restore_through_the_cli(area: PgArea) -> None:  # noqa: F811
    server = SeaweedS3(area.root / "seaweed")
    server.start()
    try:
        key = _key_file(area, "s3.key")
        s3 = RepositoryConfig.model_validate(
            {
                "name": "s3",
                "type": "s3",
                "endpoint": server.endpoint,
                "bucket": "hk-enc-test",
                "prefix": "prod",
                "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY,
                "timeout": 20,
                "encryption": {"key_file": str(key)},
            }
        )

        async def init() -> None:
            async with make_repository(s3) as r:
                await r.initialize()

        asyncio.run(init())
        env = make_env(area, s3)
        start_primary(env, "p")
        p = env.port("p")
        sql(p, "CREATE TABLE secrets (id int PRIMARY KEY, note text)")
        sql(p, f"INSERT INTO secrets SELECT g, '{CANARY}-' || g FROM generate_series(1, 20000) g")
        insert(p, "a", 1000)
        conf = node_yaml(env, "p", area.root / "node.yml")
        doc = yaml.safe_load(conf.read_text())
        assert doc["backup"]["repositories"][0]["encryption"] == {"key_file": str(key)}
        for layout_opt in ("server", "client"):  # parts stored as they come, and compressed here
            created = ok(
                hk(
                    "backup",
                    "create",
                    "-c",
                    str(conf),
                    "--from",
                    "local",
                    "--part-size",
                    "8",
                    "--compress-on",
                    layout_opt,
                    "-o",
                    "json",
                )
            )
            assert created["status"] == "complete", created
            time.sleep(1.0)  # one backup id per second
        insert(p, "b", 10)
        dest = area.data_dir("restored")
        (port,) = free_ports(1)
        argv = [
            "restore",
            "-c",
            str(conf),
            "--data-dir",
            str(dest),
            "--latest",
            "--include-current-wal",
            "--start",
        ]
        res = ok(hk(*argv, "--port", str(port), "-o", "json"))
        assert res["started"] is True and res["backup"] == created["id"], res
        assert sql(port, "SELECT batch, count(*) FROM t GROUP BY 1 ORDER BY 1") == [("a", 1000), ("b", 10)]
        assert sql(port, "SELECT count(*) FROM secrets") == [(20000,)]
        # no file of the restored data directory holds the key or the S3 secret (the WAL config
        # lives beside it, names the key file and is gone once recovery ended)
        secrets = (key.read_text().strip().encode(), SECRET_KEY.encode())
        for f in dest.rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                assert not any(s in data for s in secrets), f
        walconf = wal_config_path(dest)
        if walconf.exists():
            text = walconf.read_text()
            assert not text or (str(key) in text and key.read_text().strip() not in text)
        # every object in the bucket is sealed; no row is readable; no plaintext checksum beside it
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="hk-enc-test", Prefix="prod/")["Contents"]]
        assert len(keys) > 8, keys
        for k in keys:
            obj = client.get_object(Bucket="hk-enc-test", Key=k)
            body = obj["Body"].read()
            assert CANARY.encode() not in body, k
            if not k.endswith(MARKER):
                assert body.startswith(cipher.MAGIC), k
                assert "hk-sha256" not in obj.get("Metadata", {}), k
    finally:
        server.stop()


def test_agents_archive_into_an_encrypted_repository_and_seed_a_replica_from_it() -> None:
    """The agent's archiver, ``backup create`` and a replica created from the backup
    (``replica_from_backup``: its restore and ``restore_command``), all on an encrypted
    repository whose key file belongs to PostgreSQL's OS user; nothing readable stored."""
    repo_dir = cluster_tmpdir("hk-enc-repo-")
    base = cluster_tmpdir()
    try:
        ra = resolve_run_as(repo_dir / "x")
        doc = encrypted_fs_repository(repo_dir, ra)
        c = LocalCluster(
            base,
            nodes=2,
            base_port=free_base_port(2),
            scope="enc",
            backup={"repositories": [doc], "replica_from_backup": True},
        )
        with c:
            start_first_member(c)
            q(c, "node1", "CREATE TABLE secrets (id int PRIMARY KEY, note text)")
            q(c, "node1", f"INSERT INTO secrets SELECT g, '{CANARY}-' || g FROM generate_series(1, 5000) g")
            conf = str(c.nodes["node1"].config_path)
            bk = ok(hk("backup", "create", "-c", conf, "--part-size", "8", "-o", "json"))
            assert bk["status"] == "complete"
            q(c, "node1", "INSERT INTO secrets VALUES (0, 'after the backup')")
            c.agents["node2"].start()

            def replica_rows() -> bool:
                return q(c, "node2", "SELECT count(*) FROM secrets") == [(5001,)]

            wait(replica_rows, 120, "node2 has every row", c)
            ev2 = names(c.nodes["node2"].log_path)
            assert "clone_from_backup_finished" in ev2, tail(c.nodes["node2"].log_path)
            # the closed segment on every major, as basebackup.switch_wal
            seg = str(q(c, "node1", "SELECT pg_walfile_name(pg_switch_wal() - 1)")[0][0])
            wal = repo_dir / "repo" / "enc" / "wal" / seg
            wait(wal.exists, 60, f"{seg} archived by the agent", c)
        files = _files(repo_dir / "repo")
        assert len([f for f in files if f.parent.name == "wal"]) >= 3, files
        for f in files:
            blob = f.read_bytes()
            assert CANARY.encode() not in blob, f
            assert f.name == MARKER or blob.startswith(cipher.MAGIC), f
            st = f.stat()
            assert (st.st_mode & 0o077, st.st_uid) == (0, ra.uid if ra.uid is not None else os.geteuid()), f
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
