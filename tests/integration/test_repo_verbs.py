"""The pgBackRest user's verbs (issue 13 item 8) on a real LocalCluster (etcd, PostgreSQL 15,
the agent archiving) and filesystem repositories, through the command line:

* ``repo create`` makes the directory (given to PostgreSQL's OS user when run as root), binds it
  to the cluster's system identifier, is idempotent, and refuses a repository bound to another;
* the agent's archiver refuses that other repository with the reason (no ContentConflict jam);
* ``check`` switches a segment and finds it in the repository (exit 1 naming the other one);
* ``info`` shows the archive's WAL range;
* ``repo verify`` exits 1 naming a corrupted WAL object.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import pytest

from hakeeper.backup.binding import bind
from hakeeper.backup.repo import FilesystemRepository
from hakeeper.localcluster import LocalCluster, prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_bootstrap import events, q, tail, wait
from tests.integration.test_backup_restore import hk, ok
from tests.support.cluster import cluster_tmpdir, free_base_port

pytestmark = pytest.mark.integration

SCOPE = "verbs"
OTHER_SYSID = "7000000000000000001"


def test_repo_create_check_info_verify_and_a_repository_of_another_cluster() -> None:
    repo_dir = cluster_tmpdir("hk-verbs-repo-")
    base = cluster_tmpdir()
    try:
        ra = resolve_run_as(repo_dir / "x")
        fs = repo_dir / "fs"  # not created: `repo create` does it
        old = repo_dir / "old"  # an earlier cluster of the same scope was bound here
        prepare_fs_repository(old, ra)

        async def bind_old() -> None:
            await bind(FilesystemRepository(old, name="old"), SCOPE, OTHER_SYSID, "repo create", 0.0)

        asyncio.run(bind_old())
        c = LocalCluster(
            base,
            nodes=1,
            base_port=free_base_port(1),
            scope=SCOPE,
            backup={
                "repositories": [
                    {"name": "fs", "type": "fs", "path": str(fs)},
                    {"name": "old", "type": "fs", "path": str(old)},
                ]
            },
        )
        with c:
            c.check_ports()
            c.write_configs()
            c.etcd.start()
            c.agents["node1"].start()
            wait(lambda: c.node_state("node1").role == "primary", 90, "node1 primary", c)
            conf = str(c.nodes["node1"].config_path)
            sysid = str(q(c, "node1", "SELECT system_identifier::text FROM pg_control_system()")[0][0])

            # repo create: fs created, owned by PostgreSQL's OS user, bound; old refused
            res = hk("repo", "create", "-c", conf, "-o", "json")
            assert res.returncode == 1 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
            doc: dict[str, Any] = json.loads(res.stdout)
            assert (doc["system_identifier"], doc["source"]) == (sysid, "etcd (initialize key)")
            by = {r["repository"]: r for r in doc["repositories"]}
            assert by["fs"]["ok"] and by["fs"]["root_created"] and by["fs"]["system_identifier"] == sysid
            assert not by["old"]["ok"] and f"system identifier {OTHER_SYSID}" in by["old"]["error"]
            st = fs.stat()
            assert (st.st_mode & 0o777, st.st_uid) == (0o700, ra.uid if ra.uid is not None else os.geteuid())
            again = ok(hk("repo", "create", "-c", conf, "--repo", "fs", "-o", "json"))
            assert again["repositories"][0]["bound_now"] is False  # idempotent

            # check: the segment is in fs; with every repository, exit 1 naming old
            chk = ok(hk("check", "-c", conf, "--repo", "fs", "--timeout", "60", "-o", "json"))
            assert chk["ok"] and (fs / SCOPE / "wal" / chk["segment"]).exists()
            bad = hk("check", "-c", conf, "--timeout", "5")
            assert bad.returncode == 1 and "not archived in old" in bad.stderr, bad.stderr

            # the archiver refused old with the reason, and stored nothing there
            def refused() -> list[dict[str, Any]]:
                return [
                    e
                    for e in events(c.nodes["node1"].log_path)
                    if e.get("event") == "repository_binding_refused" and e.get("repo") == "old"
                ]

            ev = wait(refused, 60, "the archiver refuses old", c)
            assert ev[0]["bound_to"] == OTHER_SYSID and ev[0]["ours"] == sysid, tail(
                c.nodes["node1"].log_path
            )
            assert not (old / SCOPE / "wal").exists() and not (old / "quarantine").exists()
            assert not [e for e in events(c.nodes["node1"].log_path) if e.get("event") == "archive_conflict"]

            # info: the WAL range of fs holds the checked segment; old still readable
            info = ok(hk("info", "-c", conf, "-o", "json"))
            rows = {r["repository"]: r for r in info["repositories"]}
            (tl1,) = rows["fs"]["wal"]
            assert tl1["first"] <= chk["segment"] <= tl1["last"] and rows["fs"]["system_identifier"] == sysid
            assert rows["fs"]["last_archived"] is not None and rows["old"]["system_identifier"] == OTHER_SYSID

            # repo verify: clean, then a flipped byte in a WAL object is named, exit 1
            ok(hk("repo", "verify", "-c", conf, "--repo", "fs"))
            victim = fs / SCOPE / "wal" / chk["segment"]
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0x40
            victim.write_bytes(bytes(data))
            scan = hk("repo", "verify", "-c", conf, "--repo", "fs")
            assert scan.returncode == 1 and f"{SCOPE}/wal/{chk['segment']}" in scan.stderr, scan.stderr
            assert "corrupt" in scan.stderr and "Traceback" not in scan.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
