"""Authentication of a real PostgreSQL 15 configured by the agent, listening on every address:
no `trust` on any TCP line, the superuser needs its password over TCP, replication is admitted
only from members' addresses, the agent's connections insist on SCRAM, and no secret is left
in a data directory after a clone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.core.hba import hba_tokens
from hakeeper.pg import Postgres, Role, Upstream
from hakeeper.pg.clone import clone_from
from hakeeper.pg.session import conn_kwargs
from tests.support.pg import DEFAULT_PARAMS, PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

PARAMS: dict[str, ParamValue] = {**DynamicConfig().cluster_parameters(), **DEFAULT_PARAMS}
SU_PW = "su-Secret-4711"
REPL_PW = "repl-Secret-0815"
# Where a connection through the proxy comes from: on loopback, but not 127.0.0.1 (not a member).
FOREIGN_SOURCE = "127.0.0.2"


def node(area: PgArea, name: str) -> Postgres:
    (port,) = free_ports(1)
    cfg = area.node_config(
        name,
        port,
        listen=f"0.0.0.0:{port}",
        connect_address=f"127.0.0.1:{port}",
        superuser={"username": "postgres", "password": SU_PW},
        replication={"username": "replicator", "password": REPL_PW},
    )
    return Postgres(cfg, member_name=name)


async def start_primary(pg: Postgres) -> None:
    await pg.initdb(["--encoding=UTF8", "--locale=C"])
    await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password=REPL_PW)
    await pg.start(timeout=60)
    await pg.create_roles(
        superuser_password=SU_PW, replication_user="replicator", replication_password=REPL_PW
    )


@contextlib.asynccontextmanager
async def proxy_from(source: str, port: int) -> AsyncIterator[int]:
    """A TCP forwarder on 127.0.0.1 whose connections reach ``port`` from ``source``: libpq
    cannot choose its source address, a socket bound before connecting can."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def connect(
    port: int, user: str, password: str | None, **extra: str
) -> psycopg.AsyncConnection[object]:
    """A fresh libpq connection with no password from anywhere but ``password``."""
    kw: dict[str, str | int] = {
        "host": "127.0.0.1",
        "port": port,
        "user": user,
        "dbname": "postgres",
        "passfile": "/dev/null",
        "connect_timeout": 5,
        "gssencmode": "disable",
        **extra,
    }
    if password is not None:
        kw["password"] = password
    return await psycopg.AsyncConnection.connect(autocommit=True, **kw)  # type: ignore[arg-type]


def tcp_trust_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        tokens = hba_tokens(line)
        if tokens and tokens[0][0].startswith("host") and any(t == "trust" and not q for t, q in tokens):
            bad.append(line)
    return bad


async def test_no_trust_over_tcp_and_replication_only_from_members(area: PgArea) -> None:
    pg = node(area, "node1")
    try:
        await start_primary(pg)
        assert tcp_trust_lines((pg.data_dir / "pg_hba.conf").read_text()) == []
        rules = await pg.session.execute(
            "SELECT type, database, address, auth_method, error FROM pg_hba_file_rules"
        )
        assert all(r[4] is None for r in rules), rules
        assert not [r for r in rules if r[0] != "local" and r[3] == "trust"], rules
        repl_addrs = {r[2] for r in rules if r[0] == "host" and "replication" in r[1]}
        assert repl_addrs == {"127.0.0.1", "::1"}  # loopback + the node's own 127.0.0.1

        # the superuser over TCP: refused without the password, admitted with it
        with pytest.raises(psycopg.OperationalError, match="password"):
            await connect(pg.port, "postgres", None)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await connect(pg.port, "postgres", "wrong")
        async with await connect(pg.port, "postgres", SU_PW) as conn:
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == ("postgres",)

        async with proxy_from(FOREIGN_SOURCE, pg.port) as via:
            # an ordinary session from a non-member address: with the password, as before
            async with await connect(via, "postgres", SU_PW) as conn:
                cur = await conn.execute("SELECT host(inet_client_addr())")
                assert await cur.fetchone() == (FOREIGN_SOURCE,)
            # replication from a non-member address: no pg_hba.conf line, even with the password
            with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry for replication"):
                await connect(via, "replicator", REPL_PW, replication="true")
            # ... until that address is a member's published host
            await pg.write_config(
                PARAMS, Role.PRIMARY, None, replication_password=REPL_PW, replication_hosts=[FOREIGN_SOURCE]
            )
            await pg.reload()
            await asyncio.sleep(0.5)
            async with await connect(via, "replicator", REPL_PW, replication="true") as conn:
                cur = await conn.execute("IDENTIFY_SYSTEM")
                assert (await cur.fetchone()) is not None
            # and without the password still not
            with pytest.raises(psycopg.OperationalError, match="password"):
                await connect(via, "replicator", None, replication="true")
    finally:
        await pg.session.close()


async def test_agent_connections_refuse_a_server_that_does_not_ask_for_scram(area: PgArea) -> None:
    """require_auth=scram-sha-256 (psycopg's libpq is 16+ here): a server (or an address put in
    etcd) that lets the agent in without SCRAM gets no session and no password."""
    if psycopg.pq.version() < 160000:
        pytest.skip(f"psycopg's libpq {psycopg.pq.version()} has no require_auth")
    pg = node(area, "node1")
    try:
        await start_primary(pg)
        kw = conn_kwargs(pg.cfg, "127.0.0.1", pg.port, statement_timeout_ms=5000, connect_timeout=5)
        async with await psycopg.AsyncConnection.connect(**kw):
            pass  # the agent's own server asks for SCRAM
        hba = pg.data_dir / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        await pg.reload()
        await asyncio.sleep(0.5)
        async with await connect(pg.port, "postgres", None):
            pass  # the server now trusts anyone ...
        with pytest.raises(psycopg.OperationalError, match=r"require_auth|authentication"):
            await psycopg.AsyncConnection.connect(**kw)  # ... but not the agent
    finally:
        await pg.session.close()


def files_containing(root: Path, secret: bytes) -> list[Path]:
    found = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with contextlib.suppress(OSError):
                if secret in f.read_bytes():
                    found.append(f)
    return found


async def test_no_password_in_either_data_directory_after_a_clone(area: PgArea) -> None:
    primary, replica = node(area, "node1"), node(area, "node2")
    try:
        await start_primary(primary)
        # what an older version left in the primary's data directory (and a clone would copy)
        (primary.data_dir / "hakeeper.pgpass").write_text(f"*:*:*:replicator:{REPL_PW}\n")
        await primary.session.execute("SELECT pg_create_physical_replication_slot('node2', true)")
        up = Upstream("127.0.0.1", primary.port, "node2")
        await clone_from(
            replica, up, replication_user="replicator", replication_password=REPL_PW, timeout=120
        )
        await replica.write_config(PARAMS, Role.REPLICA, up, replication_password=REPL_PW)
        await replica.start(timeout=60)
        await primary.write_config(PARAMS, Role.PRIMARY, None, replication_password=REPL_PW)

        async def streaming() -> bool:
            st = await replica.probe()
            return st.running and st.streaming_from == f"127.0.0.1:{primary.port}"

        for _ in range(200):
            if await streaming():
                break
            await asyncio.sleep(0.1)
        assert await streaming(), "the replica streams with its passfile outside the data directory"

        conf = (replica.data_dir / "postgresql.conf").read_text()
        assert f"passfile={replica.pgpass_file}" in conf
        assert ("require_auth=scram-sha-256" in conf) == bool(replica.tools_auth_options)
        assert replica.pgpass_file.read_text() == f"*:*:*:replicator:{REPL_PW}\n"
        assert not replica.pgpass_file.is_relative_to(replica.data_dir)
        for pg in (primary, replica):
            assert files_containing(pg.data_dir, REPL_PW.encode()) == [], pg.member_name
            assert files_containing(pg.data_dir, SU_PW.encode()) == [], pg.member_name
    finally:
        await primary.session.close()
        await replica.session.close()
