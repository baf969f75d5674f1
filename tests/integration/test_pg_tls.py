"""postgresql.tls with a real PostgreSQL 15: a replica clones and streams over TLS with
verify-full, a member's plain replication connection is refused (hostssl), and a server whose
certificate does not name the host dialled is refused by the agent's connections.

The certificates come from the local cluster's CA (hakeeper.localcluster.certs): the server
certificate names 127.0.0.1 and localhost.  A member's address other than loopback is played
by 127.0.0.2 through a forwarder that binds that source address (libpq cannot choose one)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from hakeeper.core.config import DynamicConfig, ParamValue, PostgresTls
from hakeeper.localcluster.certs import TlsFiles, ensure_certificates
from hakeeper.pg import Postgres, Role, Upstream
from hakeeper.pg.clone import clone_from
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.errors import PgError
from hakeeper.pg.remote import wait_received
from hakeeper.pg.session import client_auth_options
from tests.integration.test_pg_auth import connect, proxy_from
from tests.support.pg import DEFAULT_PARAMS, PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

PARAMS: dict[str, ParamValue] = {**DynamicConfig().cluster_parameters(), **DEFAULT_PARAMS}
SU_PW = "su-Secret-4711"
REPL_PW = "repl-Secret-0815"
MEMBER_SOURCE = "127.0.0.2"


def certificates(area: PgArea) -> TlsFiles:
    files = TlsFiles(area.root / "tls")
    ensure_certificates(files)
    return files


def node(area: PgArea, name: str, files: TlsFiles) -> Postgres:
    (port,) = free_ports(1)
    cfg = area.node_config(
        name,
        port,
        listen=f"0.0.0.0:{port}",
        connect_address=f"127.0.0.1:{port}",
        superuser={"username": "postgres", "password": SU_PW},
        replication={"username": "replicator", "password": REPL_PW},
        tls={"certfile": files.server_cert, "keyfile": files.server_key, "cafile": files.ca_cert},
    )
    return Postgres(cfg, member_name=name)


async def start_primary(pg: Postgres, members: list[str]) -> None:
    await pg.initdb(["--encoding=UTF8", "--locale=C"])
    await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password=REPL_PW, replication_hosts=members)
    await pg.start(timeout=60)
    await pg.create_roles(
        superuser_password=SU_PW, replication_user="replicator", replication_password=REPL_PW
    )


async def test_replica_clones_and_streams_over_verified_tls(area: PgArea) -> None:
    files = certificates(area)
    primary, replica = node(area, "node1", files), node(area, "node2", files)
    try:
        await start_primary(primary, [MEMBER_SOURCE])
        rules = await primary.session.execute(
            "SELECT type, address FROM pg_hba_file_rules WHERE 'replication' = ANY(database)"
        )
        assert ("hostssl", MEMBER_SOURCE) in rules and ("host", "127.0.0.1") in rules, rules
        assert (await primary.session.execute("SHOW ssl")) == [("on",)]
        await primary.session.execute("SELECT pg_create_physical_replication_slot('node2', true)")

        async with proxy_from(MEMBER_SOURCE, primary.port) as via:
            # a member's plain replication connection: no line admits it, even with the password
            with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry.*no encryption"):
                await connect(via, "replicator", REPL_PW, replication="true", sslmode="disable")
            # over TLS the same member is admitted
            async with await connect(via, "replicator", REPL_PW, replication="true", sslmode="require"):
                pass

            up = Upstream("127.0.0.1", via, "node2")
            await clone_from(
                replica, up, replication_user="replicator", replication_password=REPL_PW, timeout=120
            )
            await replica.write_config(PARAMS, Role.REPLICA, up, replication_password=REPL_PW)
            await replica.start(timeout=60)
            conf = (replica.data_dir / "postgresql.conf").read_text()
            assert "sslmode=verify-full" in conf and "channel_binding=require" in conf

            query = (
                "SELECT s.ssl, host(r.client_addr) FROM pg_stat_replication r "
                "JOIN pg_stat_ssl s ON s.pid = r.pid WHERE r.application_name = 'node2'"
            )
            rows: list[tuple[object, ...]] = []
            for _ in range(200):
                rows = await primary.session.execute(query)
                if rows:
                    break
                await asyncio.sleep(0.1)
            assert rows == [(True, MEMBER_SOURCE)], "the walsender's connection is TLS, from the member"

            # the agent's own check of a member (switchover) over the same verified TLS
            await primary.session.execute("CREATE TABLE t AS SELECT 1 AS x")
            (lsn_row,) = await primary.session.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
            assert await wait_received(
                name="node2",
                host="127.0.0.1",
                port=replica.port,
                user="postgres",
                password=SU_PW,
                lsn=int(lsn_row[0]) - 1,
                timeout=20,
                tls=replica.cfg.tls,
            )
    finally:
        await primary.session.close()
        await replica.session.close()


async def test_a_server_certificate_for_another_host_is_refused(area: PgArea) -> None:
    """127.0.0.2 reaches the same server, whose certificate names only 127.0.0.1 and localhost:
    with verify-full the agent's connections fail; the same server is fine under its name."""
    files = certificates(area)
    primary, replica = node(area, "node1", files), node(area, "node2", files)
    tls = primary.cfg.tls
    assert isinstance(tls, PostgresTls)
    try:
        await start_primary(primary, [])
        # a TLS connection that does not check the name gets in: the server is up and speaks TLS
        async with await connect(primary.port, "postgres", SU_PW, host=MEMBER_SOURCE, sslmode="require"):
            pass
        with pytest.raises(psycopg.OperationalError, match="does not match host name"):
            agent_conninfo = build_conninfo(
                host=MEMBER_SOURCE,
                port=primary.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=5,
                **client_auth_options(tls),
            )
            await psycopg.AsyncConnection.connect(agent_conninfo, password=SU_PW)
        with pytest.raises(PgError, match="does not match host name"):
            await clone_from(
                replica,
                Upstream(MEMBER_SOURCE, primary.port, None),
                replication_user="replicator",
                replication_password=REPL_PW,
                timeout=60,
            )
        assert not replica.is_initialized()
        # under the name its certificate carries, the same clone works
        await clone_from(
            replica,
            Upstream("127.0.0.1", primary.port, None),
            replication_user="replicator",
            replication_password=REPL_PW,
            timeout=120,
        )
        assert replica.is_initialized()
    finally:
        await primary.session.close()
        await replica.session.close()
