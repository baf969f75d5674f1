"""An incremental chain in an S3 repository (a real SeaweedFS): the chain is stored, listed,
restored and drilled from S3 exactly as from a filesystem repository (PostgreSQL 18)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from tests.integration.test_backup_incremental import counts, q, restore
from tests.integration.test_backup_restore import hk, ok
from tests.support.cluster import running_cluster
from tests.support.pg import PgArea
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration


def test_incremental_chain_on_s3(seaweed: SeaweedS3, area: PgArea) -> None:
    repo = {
        "name": "s3",
        "type": "s3",
        "endpoint": seaweed.endpoint,
        "bucket": "hk-incremental",
        "prefix": "incr18",
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "timeout": 20,
    }

    async def init() -> None:
        async with make_repository(RepositoryConfig.model_validate(repo)) as r:
            await r.initialize()

    asyncio.run(init())
    with running_cluster(nodes=1, backup={"repositories": [repo]}, scope="incrs3", pg_version=18) as c:
        node = next(iter(c.nodes))
        conf = str(c.nodes[node].config_path)

        def create(kind: str) -> dict[str, Any]:
            doc: dict[str, Any] = ok(hk("backup", "create", "-c", conf, "--type", kind, "-o", "json"))
            assert doc["status"] == "complete" and doc["repository"] == "s3"
            return doc

        def insert(batch: str) -> None:
            q(c, node, f"INSERT INTO t (batch) SELECT '{batch}' FROM generate_series(1, 100)")

        q(c, node, "CREATE TABLE t (id serial, batch text)")
        insert("a")
        full = create("full")
        insert("b")
        inc1 = create("incremental")
        insert("c")
        inc2 = create("incremental")
        assert (inc1["kind"], inc1["parent"]) == ("incremental", full["id"])
        assert (inc2["kind"], inc2["parent"], inc2["chain_root"]) == ("incremental", inc1["id"], full["id"])
        assert inc2["stored_size"] < full["stored_size"]
        insert("d")

        res, port = restore(conf, area, "from-s3", "--latest", "--include-current-wal")
        assert res["repository"] == "s3" and res["chain"] == [full["id"], inc1["id"], inc2["id"]]
        assert counts(port, c.superuser_password) == {b: 100 for b in "abcd"}
        drill_run = hk("verify", "-c", conf, "--latest", "-o", "json")
        drill = json.loads(drill_run.stdout)
        assert drill_run.returncode == 0 and drill["ok"] is True, drill
        assert drill["backup_id"] == inc2["id"]
