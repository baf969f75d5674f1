"""Logical dumps against a real PostgreSQL 15 and real repositories (a directory and SeaweedFS),
through the ``hakeeper dump`` command line: round trips in every format, table-only and
schema-only restores, globals, and retention."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper.backup.dump import DumpRecord, dump_prefix, load_dumps, record_key
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.pg import Postgres, Role
from tests.integration.test_backup_restore import hk, ok
from tests.integration.test_pg_postgres import INITDB_ARGS, PARAMS
from tests.support.pg import PgArea
from tests.support.ports import free_ports
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration

SCOPE = "dumps"


def sql(port: int, query: str, db: str = "postgres") -> list[tuple[Any, ...]]:
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password="su-secret",
        dbname=db,
        autocommit=True,
        connect_timeout=5,
    ) as c:
        cur = c.execute(query)
        return cur.fetchall() if cur.description else []


@dataclass
class Server:
    area: PgArea
    port: int
    conf: Path
    fs_root: Path
    s3_cfg: RepositoryConfig

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres password=su-secret dbname={db}"


SHOP_SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE items (
    id serial PRIMARY KEY,
    customer int REFERENCES customers (id),
    sku text NOT NULL,
    qty int CHECK (qty > 0),
    touched timestamptz
);
CREATE INDEX items_sku_idx ON items (sku);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.touched := now(); RETURN NEW; END $$;
CREATE TRIGGER items_touch BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION touch();
INSERT INTO customers (name) SELECT 'c' || g FROM generate_series(1, 50) g;
INSERT INTO items (customer, sku, qty)
  SELECT 1 + g % 50, 'sku-' || g, 1 + g % 7 FROM generate_series(1, 3000) g;
CREATE TABLE notes (id int, body text);
INSERT INTO notes SELECT g, repeat('x', 200) FROM generate_series(1, 500) g;
"""


def seaweed_repo(seaweed: SeaweedS3, name: str, bucket: str, **extra: Any) -> RepositoryConfig:
    """A repository in a new bucket of the SeaweedFS fixture (created)."""
    cfg = RepositoryConfig.model_validate(
        {
            "name": name,
            "type": "s3",
            "endpoint": seaweed.endpoint,
            "bucket": bucket,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "timeout": 20,
            **extra,
        }
    )

    async def init() -> None:
        async with make_repository(cfg) as r:
            await r.initialize()

    asyncio.run(init())
    return cfg


@pytest.fixture(scope="module")
def server(seaweed: SeaweedS3) -> Iterator[Server]:
    area = PgArea()
    try:
        cfg = area.node_config("p")

        async def start() -> None:
            pg = Postgres(cfg, member_name="p")
            try:
                await pg.initdb(INITDB_ARGS)
                await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password="repl-secret")
                await pg.start(timeout=60)
                await pg.create_roles(
                    superuser_password="su-secret",
                    replication_user="replicator",
                    replication_password="repl-secret",
                )
            finally:
                await pg.session.close()

        asyncio.run(start())
        port = cfg.listen_host_port[1]
        sql(port, "CREATE DATABASE shop")
        sql(port, SHOP_SCHEMA, "shop")
        sql(port, "CREATE ROLE app_reader LOGIN PASSWORD 'r' CONNECTION LIMIT 7")
        fs_root = area.root / "repo-fs"
        fs_root.mkdir()
        s3_cfg = seaweed_repo(seaweed, "s3", "hk-dump-test")
        (dead,) = free_ports(1)  # no etcd: --from local and restores into the node itself
        repo_s3 = s3_cfg.model_dump(mode="json", exclude_none=True)
        repo_s3["secret_key"] = SECRET_KEY
        doc = {
            "scope": SCOPE,
            "name": "p",
            "etcd": {"hosts": [f"http://127.0.0.1:{dead}"]},
            "postgresql": {
                "data_dir": str(cfg.data_dir),
                "listen": cfg.listen,
                "superuser": {"username": "postgres", "password": "su-secret"},
                "replication": {"username": "replicator", "password": "repl-secret"},
                "bin_dir": str(cfg.bin_dir),
            },
            "backup": {"repositories": [{"name": "fs", "type": "fs", "path": str(fs_root)}, repo_s3]},
        }
        conf = area.root / "node.yml"
        conf.write_text(yaml.safe_dump(doc))
        yield Server(area, port, conf, fs_root, s3_cfg)
    finally:
        area.cleanup()


def dump(srv: Server, *args: str) -> dict[str, Any]:
    rec: dict[str, Any] = ok(
        hk("dump", "create", "-c", str(srv.conf), "--from", "local", *args, "-o", "json")
    )
    assert rec["status"] == "complete", rec
    return rec


def restore(srv: Server, dump_id: str, *args: str) -> dict[str, Any]:
    res: dict[str, Any] = ok(hk("dump", "restore", dump_id, "-c", str(srv.conf), *args, "-o", "json"))
    return res


def shop_state(port: int, db: str) -> dict[str, Any]:
    return {
        "customers": sql(port, "SELECT count(*) FROM customers", db)[0][0],
        "items": sql(port, "SELECT count(*), sum(qty) FROM items", db)[0],
        "notes": sql(port, "SELECT count(*) FROM notes", db)[0][0],
        "indexes": sorted(
            r[0] for r in sql(port, "SELECT indexname FROM pg_indexes WHERE schemaname='public'", db)
        ),
        "triggers": sorted(
            r[0] for r in sql(port, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal", db)
        ),
        "constraints": sorted(
            r[0]
            for r in sql(
                port, "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace", db
            )
        ),
    }


@pytest.mark.parametrize(
    ("fmt", "repo", "extra"),
    [
        # the custom format also runs on PostgreSQL 17 and 18 (`make integration`, docs/testing.md)
        pytest.param("custom", "fs", [], marks=pytest.mark.matrix),
        ("directory", "s3", ["--jobs", "2"]),
        ("plain", "s3", []),
    ],
)
def test_round_trip_in_each_format(server: Server, fmt: str, repo: str, extra: list[str]) -> None:
    rec = dump(server, "--db", "shop", "--format", fmt, "--repo", repo, *extra)
    assert rec["dump_format"] == fmt and rec["repository"] == repo and rec["id"].startswith("D")
    (db,) = rec["databases"]
    assert db["name"] == "shop" and db["size"] > 0 and rec["globals_object"] is not None
    if fmt == "plain":
        assert db["toc_entries"] is None and [o["name"] for o in db["objects"]] == ["dump.sql"]
    else:
        assert db["toc_entries"] > 10  # pg_restore -l read the TOC back
    if fmt == "directory":
        names = [o["name"] for o in db["objects"]]
        assert "dir/toc.dat" in names and len(names) >= 4  # toc + one file per table with rows
    # stored compressed: the repository objects are smaller than what pg_dump wrote
    assert 0 < db["stored_size"] < db["size"]
    target = f"shop_{fmt}"
    res = restore(server, rec["id"], "--create-db", target, *(["--jobs", "2"] if fmt != "plain" else []))
    assert res["created_database"] is True and res["format"] == fmt
    assert shop_state(server.port, target) == shop_state(server.port, "shop")
    listed = ok(hk("dump", "list", "-c", str(server.conf), "-o", "json"))
    assert rec["id"] in [d["id"] for d in listed]
    # restoring into an existing database name with --create-db is refused
    again = hk("dump", "restore", rec["id"], "-c", str(server.conf), "--create-db", target)
    assert again.returncode == 1 and "exists already" in again.stderr and "Traceback" not in again.stderr


def test_table_only_and_schema_only(server: Server) -> None:
    rec = dump(server, "--db", "shop")
    # table only: the rows, but neither the index nor the trigger nor constraints (and it says so)
    res = restore(server, rec["id"], "--create-db", "shop_t1", "--table", "notes")
    assert any("not its indexes" in n for n in res["notes"])
    assert sql(server.port, "SELECT count(*) FROM notes", "shop_t1") == [(500,)]
    assert sql(server.port, "SELECT count(*) FROM pg_tables WHERE schemaname='public'", "shop_t1") == [(1,)]
    # items alone: rows and its CHECK constraint (part of the table), no index, trigger or keys
    restore(server, rec["id"], "--create-db", "shop_t2", "--table", "items")
    st = shop_state_items(server.port, "shop_t2")
    assert st == {"rows": 3000, "indexes": [], "triggers": [], "constraints": ["items_qty_check"]}
    table = ok(
        hk("dump", "restore", rec["id"], "-c", str(server.conf), "--create-db", "shop_t2b", "-t", "items")
    )
    assert "not its indexes" in table
    # ... and with --with-related: the index, the trigger, the check and primary key come along
    # (the trigger's function and the referenced table are other objects: restored first here)
    sql(server.port, "CREATE DATABASE shop_t3")
    sql(
        server.port,
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;"
        " CREATE TABLE customers (id int PRIMARY KEY)",
        "shop_t3",
    )
    sql(server.port, "INSERT INTO customers SELECT generate_series(1, 50)", "shop_t3")
    restore(server, rec["id"], "--dsn", server.dsn("shop_t3"), "--table", "items", "--with-related")
    st = shop_state_items(server.port, "shop_t3")
    assert st["rows"] == 3000
    assert st["indexes"] == ["items_pkey", "items_sku_idx"]
    assert st["triggers"] == ["items_touch"]
    assert st["constraints"] == ["items_customer_fkey", "items_pkey", "items_qty_check"]
    # the owned sequence came along and continues after the restored rows
    sql(server.port, "INSERT INTO items (customer, sku, qty) VALUES (1, 'new', 1)", "shop_t3")
    assert sql(server.port, "SELECT max(id) FROM items", "shop_t3") == [(3001,)]
    # a table the dump does not hold
    bad = hk("dump", "restore", rec["id"], "-c", str(server.conf), "--create-db", "shop_t4", "-t", "nosuch")
    assert bad.returncode == 1 and "no table 'nosuch'" in bad.stderr
    # schema only: every definition, no rows
    srec = dump(server, "--db", "shop", "--schema-only")
    assert srec["options"]["schema_only"] is True
    restore(server, srec["id"], "--create-db", "shop_schema")
    st2 = shop_state(server.port, "shop_schema")
    full = shop_state(server.port, "shop")
    assert (st2["customers"], st2["items"][0], st2["notes"]) == (0, 0, 0)
    assert (st2["indexes"], st2["triggers"], st2["constraints"]) == (
        full["indexes"],
        full["triggers"],
        full["constraints"],
    )


def shop_state_items(port: int, db: str) -> dict[str, Any]:
    return {
        "rows": sql(port, "SELECT count(*) FROM items", db)[0][0],
        "indexes": sorted(
            r[0] for r in sql(port, "SELECT indexname FROM pg_indexes WHERE tablename='items'", db)
        ),
        "triggers": sorted(
            r[0] for r in sql(port, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal", db)
        ),
        "constraints": sorted(
            r[0]
            for r in sql(port, "SELECT conname FROM pg_constraint WHERE conrelid = 'items'::regclass", db)
        ),
    }


def test_globals_and_all_databases(server: Server) -> None:
    rec = dump(server, "--all", "--repo", "s3")
    names = [d["name"] for d in rec["databases"]]
    assert "shop" in names and "postgres" in names and rec["all_databases"] is True
    # several databases: restore needs to be told which
    which = hk("dump", "restore", rec["id"], "-c", str(server.conf), "--create-db", "x")
    assert which.returncode == 1 and "choose one with --db" in which.stderr
    # the role goes away; restoring with --globals brings it back (with its attributes)
    sql(server.port, "DROP ROLE app_reader")
    res = restore(server, rec["id"], "--db", "shop", "--create-db", "shop_all", "--globals")
    assert res["database"] == "shop"
    assert sql(server.port, "SELECT rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname='app_reader'") == [
        (True, 7)
    ]
    assert any("globals" in n for n in res["notes"])  # the postgres role existed: reported, not fatal
    assert shop_state(server.port, "shop_all") == shop_state(server.port, "shop")
    # without globals
    nog = dump(server, "--db", "shop", "--no-globals")
    assert nog["globals_object"] is None
    bad = hk("dump", "restore", nog["id"], "-c", str(server.conf), "--create-db", "y", "--globals")
    assert bad.returncode == 1 and "without globals" in bad.stderr


def test_usage_errors_exit_2(server: Server) -> None:
    c = str(server.conf)
    for args, text in [
        (["dump", "create", "-c", c], "--db NAME"),
        (["dump", "create", "-c", c, "--db", "shop", "--format", "tar"], "--format"),
        (["dump", "create", "-c", c, "--db", "shop", "--jobs", "2"], "--format directory"),
        (["dump", "create", "-c", c, "--db", "shop", "--schema-only", "--data-only"], "exclude"),
        (["dump", "restore", "D20200101T000000Z", "-c", c], "--create-db"),
        (["dump", "restore", "D20200101T000000Z", "-c", c, "--dsn", "host=x", "--with-related"], "--table"),
    ]:
        res = hk(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert text in res.stderr and "Traceback" not in res.stderr
    missing = hk("dump", "restore", "D20200101T000000Z", "-c", c, "--create-db", "z")
    assert missing.returncode == 1 and "no complete dump" in missing.stderr
    nodb = hk("dump", "create", "-c", c, "--from", "local", "--db", "nosuchdb")
    assert nodb.returncode == 1 and "no database 'nosuchdb'" in nodb.stderr


def test_expire_keeps_the_newest_and_running_dumps(server: Server) -> None:
    ids = [dump(server, "--db", "postgres", "--repo", "fs")["id"] for _ in range(3)]
    other = dump(server, "--db", "shop", "--repo", "fs", "--schema-only")["id"]

    async def fake(status: str, did: str, updated: str) -> None:
        rec = DumpRecord.model_validate(
            {
                "id": did,
                "status": status,
                "scope": SCOPE,
                "repository": "fs",
                "dump_format": "custom",
                "start_time": updated,
                "updated_at": updated,
                "error": "test" if status == "failed" else None,
            }
        )
        async with make_repository(RepositoryConfig(name="fs", type="fs", path=server.fs_root)) as r:
            await r.put(record_key(SCOPE, did), rec.to_json())
            await r.put(dump_prefix(SCOPE, did) + "globals.sql", b"x")

    now = "2099-01-01T00:00:00Z"  # a running dump refreshed "now" (in the future: never stale)
    asyncio.run(fake("failed", "D20200101T000000Z", "2020-01-01T00:00:00Z"))
    asyncio.run(fake("running", "D20200101T000001Z", now))
    c = str(server.conf)
    dry = ok(hk("dump", "expire", "-c", c, "--repo", "fs", "--keep", "1", "--dry-run", "-o", "json"))[0]
    gone = sorted(d["id"] for d in dry["dumps"])
    # of the postgres dumps only the newest stays; the lone shop dump stays; failed goes; running stays
    assert set(ids[:-1]) <= set(gone) and "D20200101T000000Z" in gone
    assert ids[-1] not in gone and other not in gone and "D20200101T000001Z" not in gone
    assert "D20200101T000001Z" in dry["running"]
    assert ok(hk("dump", "info", ids[0], "-c", c, "-o", "json"))["status"] == "complete"  # dry run
    done = ok(hk("dump", "expire", "-c", c, "--repo", "fs", "--keep", "1", "-o", "json"))[0]
    assert sorted(d["id"] for d in done["dumps"]) == gone

    async def left() -> list[str]:
        async with make_repository(RepositoryConfig(name="fs", type="fs", path=server.fs_root)) as r:
            return [d.id for d in (await load_dumps(r, SCOPE)).records]

    remaining = asyncio.run(left())
    assert ids[-1] in remaining and other in remaining and "D20200101T000001Z" in remaining
    assert not set(gone) & set(remaining)
    assert not [p for p in (server.fs_root / SCOPE / "dump" / ids[0]).rglob("*") if p.is_file()]
