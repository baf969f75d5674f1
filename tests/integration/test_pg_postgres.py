"""hakeeper.pg.Postgres against real PostgreSQL servers on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.localcluster import pgbuilds
from hakeeper.pg import LocalState, PgError, Postgres, Role, Upstream
from hakeeper.pg.clone import clone_from
from hakeeper.pg.rewind import rewind
from tests.support.pg import DEFAULT_PARAMS, PgArea

pytestmark = pytest.mark.integration

INITDB_ARGS = ["--data-checksums", "--encoding=UTF8", "--locale=C"]
PARAMS: dict[str, ParamValue] = {**DynamicConfig().cluster_parameters(), **DEFAULT_PARAMS}


@pytest.fixture
async def nodes(area: PgArea) -> AsyncIterator[list[Postgres]]:
    """Postgres objects created by a test; their connections are closed afterwards (the
    postmasters are killed by PID in the ``area`` cleanup)."""
    made: list[Postgres] = []
    try:
        yield made
    finally:
        for pg in made:
            await pg.session.close()


def make_node(area: PgArea, nodes: list[Postgres], name: str, **overrides: Any) -> Postgres:
    pg = Postgres(area.node_config(name, **overrides), member_name=name)
    nodes.append(pg)
    return pg


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}")


async def init_primary(pg: Postgres, params: dict[str, ParamValue] = PARAMS) -> None:
    await pg.initdb(INITDB_ARGS)
    await pg.write_config(params, Role.PRIMARY, None, replication_password=_pw(pg.cfg.replication.password))
    await pg.start(timeout=60)
    await pg.create_roles(
        superuser_password=_pw(pg.cfg.superuser.password),
        replication_user=pg.cfg.replication.username,
        replication_password=_pw(pg.cfg.replication.password),
    )


def _pw(secret: object) -> str | None:
    return None if secret is None else secret.get_secret_value()  # type: ignore[attr-defined]


def upstream_of(pg: Postgres, slot: str | None) -> Upstream:
    host, port = pg.cfg.connect_host_port
    return Upstream(host=host, port=port, slot_name=slot)


async def make_replica(
    source: Postgres, replica: Postgres, slot: str, params: dict[str, ParamValue] = PARAMS
) -> None:
    await clone_from(
        replica,
        upstream_of(source, slot),
        replication_user=replica.cfg.replication.username,
        replication_password=_pw(replica.cfg.replication.password),
        timeout=120,
    )
    await replica.write_config(
        params,
        Role.REPLICA,
        upstream_of(source, slot),
        replication_password=_pw(replica.cfg.replication.password),
    )
    await replica.start(timeout=60)


async def streaming(pg: Postgres, source: Postgres) -> LocalState:
    st: LocalState | None = None

    async def check() -> bool:
        nonlocal st
        st = await pg.probe()
        return st.running and st.streaming_from == upstream_of(source, None).address

    await wait_for(check, what=f"{pg.member_name} streaming from {source.member_name}")
    assert st is not None
    return st


async def test_full_lifecycle_clone_promote_rewind(area: PgArea, nodes: list[Postgres]) -> None:
    n1 = make_node(area, nodes, "node1")
    n2 = make_node(area, nodes, "node2")

    assert not n1.is_initialized()
    assert await n1.system_identifier() is None
    await init_primary(n1)
    assert n1.is_initialized() and n1.is_running()
    assert stat.S_IMODE(n1.data_dir.stat().st_mode) == 0o700
    if n1.run_as.uid is not None:
        assert n1.data_dir.stat().st_uid == n1.run_as.uid
    assert stat.S_IMODE(n1.pgpass_file.stat().st_mode) == 0o600
    sysid = await n1.system_identifier()
    assert sysid and sysid.isdigit()
    assert (await n1.session.execute("SHOW data_checksums")) == [("on",)]
    # create_roles is idempotent
    await n1.create_roles(
        superuser_password="su-secret", replication_user="replicator", replication_password="repl-secret"
    )
    rows = await n1.session.execute(
        "SELECT rolcanlogin, rolreplication, rolpassword LIKE 'SCRAM-SHA-256$%%' FROM pg_authid"
        " WHERE rolname = %s",
        ("replicator",),
    )
    assert rows == [(True, True, True)]

    st = await n1.probe()
    assert st.running and st.error is None
    assert st.in_recovery is False
    assert st.timeline == 1
    assert st.wal_lsn and st.wal_lsn > 0
    assert st.received_lsn is None and st.replayed_lsn is None and st.streaming_from is None
    assert st.replication == ()

    assert await n1.ensure_slots({"node2", "spare"}) == (["node2", "spare"], [])
    assert await n1.ensure_slots({"node2", "spare"}) == ([], [])
    slots = await n1.list_slots()
    assert set(slots) == {"node2", "spare"}
    assert slots["node2"].active is False and slots["node2"].restart_lsn is not None
    # a slot hakeeper did not make is never dropped, whatever its name
    await n1.session.execute("SELECT pg_create_physical_replication_slot('user_tool')")
    assert await n1.ensure_slots({"node2"}, droppable={"node2", "spare"}) == ([], ["spare"])
    assert "user_tool" in await n1.list_slots()
    await n1.session.execute("SELECT pg_drop_replication_slot('user_tool')")

    # ---- clone node2 from node1 over the node2 slot
    await make_replica(n1, n2, "node2")
    assert await n2.system_identifier() == sysid
    assert (n2.data_dir / "standby.signal").exists()
    st2 = await streaming(n2, n1)
    assert st2.in_recovery is True and st2.timeline == 1
    assert st2.wal_lsn is not None
    assert (await n2.session.execute("SHOW port")) == [(str(n2.port),)]

    async def n1_sees_n2() -> bool:
        s = await n1.probe()
        return any(r.application_name == "node2" and r.state == "streaming" for r in s.replication)

    await wait_for(n1_sees_n2, what="node1 pg_stat_replication shows node2")
    assert (await n1.list_slots())["node2"].active is True

    await n1.session.execute("CREATE TABLE t (id int primary key, v text)")
    await n1.session.execute("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 1000) g")
    target = (await n1.probe()).wal_lsn
    assert target is not None and target > st2.wal_lsn
    target_lsn: int = target  # the closure below does not see the narrowing

    async def n2_caught_up() -> bool:
        s = await n2.probe()
        return s.replayed_lsn is not None and s.replayed_lsn >= target_lsn

    await wait_for(n2_caught_up, what="node2 replayed the inserts")
    assert (await n2.session.execute("SELECT count(*) FROM t")) == [(1000,)]
    s1 = await n1.probe()
    (info,) = s1.replication
    assert info.application_name == "node2" and info.sync_state == "async"
    assert info.sent_lsn is not None and info.sent_lsn >= target

    # ---- node1 crashes; node2 is promoted
    await n1.stop("immediate")
    assert not n1.is_running()
    down = await n1.probe()
    assert down.running is False and down.error

    await n2.promote(timeout=30)
    st2 = await n2.probe()
    assert st2.in_recovery is False
    assert st2.timeline == 2
    assert not (n2.data_dir / "standby.signal").exists()
    await n2.write_config(PARAMS, Role.PRIMARY, None, replication_password="repl-secret")
    assert not (n2.data_dir / "standby.signal").exists()
    await n2.session.execute("INSERT INTO t SELECT g, 'after' FROM generate_series(1001, 1500) g")
    assert await n2.ensure_slots({"node1"}) == (["node1"], [])
    # promote is idempotent on a primary
    await n2.promote()

    # ---- node1 rejoins: rewind against node2, then stream from it
    await rewind(n1, upstream_of(n2, None), superuser="postgres", superuser_password="su-secret", timeout=120)
    # pg_rewind copied node2's configuration files; write_config puts node1's back
    assert f"port = {n2.port}" in (n1.data_dir / "postgresql.conf").read_text()
    await n1.write_config(PARAMS, Role.REPLICA, upstream_of(n2, "node1"), replication_password="repl-secret")
    assert (n1.data_dir / "standby.signal").exists()
    await n1.start(timeout=60)
    st1 = await streaming(n1, n2)
    assert st1.in_recovery is True and st1.timeline == 2
    assert (await n1.session.execute("SHOW port")) == [(str(n1.port),)]
    assert (await n1.session.execute("SHOW primary_slot_name")) == [("node1",)]
    conninfo = (await n1.session.execute("SHOW primary_conninfo"))[0][0]
    assert "application_name=node1" in conninfo and f"port={n2.port}" in conninfo
    assert (await n2.list_slots())["node1"].active is True

    target = (await n2.probe()).wal_lsn
    assert target is not None

    async def n1_caught_up() -> bool:
        s = await n1.probe()
        return s.replayed_lsn is not None and s.replayed_lsn >= target

    await wait_for(n1_caught_up, what="node1 replayed node2's WAL")
    assert (await n1.session.execute("SELECT count(*), count(*) FILTER (WHERE v = 'after') FROM t")) == [
        (1500, 500)
    ]
    with pytest.raises(PgError, match="read-only") as ei:
        await n1.session.execute("INSERT INTO t VALUES (9999, 'x')")
    assert ei.value.sqlstate == "25006"

    # ---- node1 (now a replica) crashes: rewind brings it to a clean state first (single-user
    # crash recovery refuses standby.signal), finds nothing to rewind, and it streams again
    await n1.stop("immediate")
    assert (await n1.controldata())["Database cluster state"] == "in archive recovery"
    await rewind(n1, upstream_of(n2, None), superuser="postgres", superuser_password="su-secret", timeout=120)
    assert (await n1.controldata())["Database cluster state"] in ("shut down", "shut down in recovery")
    await n1.write_config(PARAMS, Role.REPLICA, upstream_of(n2, "node1"), replication_password="repl-secret")
    await n1.start(timeout=60)
    st1 = await streaming(n1, n2)
    assert st1.timeline == 2
    assert (await n1.session.execute("SELECT count(*) FROM t")) == [(1500,)]


async def test_stop_modes_and_probe_when_down(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "solo")
    await init_primary(pg)
    for mode in ("smart", "fast", "immediate"):
        assert (await pg.probe()).running
        pid = pg.postmaster_pid()
        assert pid is not None
        await pg.stop(mode, timeout=30)
        assert not pg.is_running()
        assert pg.postmaster_pid() is None
        t0 = time.monotonic()
        st = await pg.probe(timeout=2)
        assert time.monotonic() - t0 < 0.5
        assert st.running is False and st.error and st.in_recovery is None and st.replication == ()
        await pg.stop("fast")  # no-op when stopped
        with pytest.raises(PgError):
            await pg.session.execute("SELECT 1", timeout=2)
        await pg.start(timeout=60)
        assert pg.is_running() and pg.postmaster_pid() != pid
    state = (await pg.controldata())["Database cluster state"]
    assert state == "in production"


async def test_stop_kills_a_stuck_postmaster(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "stuck")
    await init_primary(pg)
    pid = pg.postmaster_pid()
    assert pid is not None
    os.kill(pid, 19)  # SIGSTOP: pg_ctl stop cannot get through
    try:
        t0 = time.monotonic()
        st = await pg.probe(timeout=1.0)  # the kernel accepts, nobody answers
        assert st.running is False and st.error and "timed out" in st.error
        assert time.monotonic() - t0 < 2.0
        await pg.stop("fast", timeout=2)
    finally:
        if pg.is_running():
            os.kill(pid, 18)
    assert not pg.is_running()
    await pg.start(timeout=60)  # the orphaned shared memory is gone: it starts again
    assert (await pg.probe()).running


async def test_probe_connection_is_reused_and_recovers(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "probe")
    await init_primary(pg)
    await pg.probe()
    (pid1,) = (
        await pg.session.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'hakeeper' AND pid <> pg_backend_pid()"
        )
    )[0]
    await pg.probe()
    rows = await pg.session.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'hakeeper' AND pid <> pg_backend_pid()"
    )
    assert rows == [(pid1,)]
    await pg.session.execute("SELECT pg_terminate_backend(%s)", (pid1,))
    st = await pg.probe()  # the dead connection may fail this probe once...
    if not st.running:
        st = await pg.probe()  # ...but the next one reconnects
    assert st.running and st.in_recovery is False
    with pytest.raises(PgError, match="statement timeout") as ei:
        await pg.session.execute("SELECT pg_sleep(5)", timeout=0.3)
    assert ei.value.sqlstate == "57014"
    assert (await pg.session.execute("SELECT 1")) == [(1,)]


async def test_start_failure_reports_the_log(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "clash")
    await pg.initdb(INITDB_ARGS)
    await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password=None)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", pg.port))
        s.listen()
        with pytest.raises(PgError) as ei:
            await pg.start(timeout=20)
    msg = str(ei.value)
    assert "failed to start" in msg
    assert "Address already in use" in msg or "could not create any TCP/IP sockets" in msg
    assert not pg.is_running()
    await pg.start(timeout=60)
    assert (await pg.probe()).running


async def test_another_data_dirs_postmaster_is_not_ours(area: PgArea, nodes: list[Postgres]) -> None:
    a = make_node(area, nodes, "a")
    await init_primary(a)
    b = make_node(area, nodes, "b", listen=a.cfg.listen)
    await b.initdb(INITDB_ARGS)
    assert (await b.probe()).error == "postmaster is not running"
    # a stale postmaster.pid naming a live postgres of another data dir (PID reuse)
    (b.data_dir / "postmaster.pid").write_text(f"{a.postmaster_pid()}\n{b.data_dir}\n")
    assert not b.is_running()
    st = await b.probe()
    assert st.running is False and st.error == "postmaster is not running"
    await b.stop("immediate")  # must not touch a's postmaster
    assert a.is_running()
    (b.data_dir / "postmaster.pid").unlink()


async def test_config_files_and_auto_conf_cleaning(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "cfg", pg_hba=["host all app 10.0.0.0/8 scram-sha-256"])
    await pg.initdb(INITDB_ARGS)
    weird = 'it\'s a \\ "test"\nwith\ttabs and ünïcode'
    (pg.data_dir / "postgresql.auto.conf").write_text(
        "# Do not edit this file manually!\nport = '1'\nprimary_slot_name = 'x'\nwork_mem = '8MB'\n"
    )
    params = {**PARAMS, "hakeeper.weird": weird, "port": 1, "application_name": "x y"}
    await pg.write_config(params, Role.PRIMARY, None, replication_password=None)
    auto = (pg.data_dir / "postgresql.auto.conf").read_text()
    assert "port" not in auto and "primary_slot_name" not in auto and "work_mem = '8MB'" in auto
    assert not pg.pgpass_file.exists()
    for name in ("postgresql.conf", "pg_hba.conf", "postgresql.auto.conf"):
        file_stat = (pg.data_dir / name).stat()
        assert stat.S_IMODE(file_stat.st_mode) == 0o600
        if pg.run_as.uid is not None:
            assert file_stat.st_uid == pg.run_as.uid
    hba = (pg.data_dir / "pg_hba.conf").read_text()
    assert hba.index("10.0.0.0/8") < hba.index("replication")
    await pg.start(timeout=60)
    assert (await pg.session.execute("SELECT current_setting('hakeeper.weird')")) == [(weird,)]
    assert (await pg.session.execute("SHOW port")) == [(str(pg.port),)]
    assert (await pg.session.execute("SHOW work_mem")) == [("8MB",)]
    sock = (await pg.session.execute("SHOW unix_socket_directories"))[0][0]
    assert sock == str(pg.data_dir / "pg_stat_tmp")
    assert (pg.data_dir / "pg_stat_tmp" / f".s.PGSQL.{pg.port}").is_socket()
    # a replica without upstream: standby.signal, no primary_conninfo
    await pg.stop()
    await pg.write_config(PARAMS, Role.REPLICA, None, replication_password="pw")
    assert (pg.data_dir / "standby.signal").exists()
    assert "primary_conninfo" not in (pg.data_dir / "postgresql.conf").read_text()
    assert pg.pgpass_file.read_text() == "*:*:*:replicator:pw\n"
    await pg.start(timeout=60)
    st = await pg.probe()
    assert st.running and st.in_recovery is True and st.streaming_from is None and st.timeline == 1


async def test_clone_failure_removes_partial_data_dir(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "orphan")
    with pytest.raises(PgError, match="pg_basebackup"):
        await clone_from(
            pg,
            Upstream("127.0.0.1", pg.port, "nope"),
            replication_user="replicator",
            replication_password="x",
            timeout=30,
        )
    assert not pg.data_dir.exists()


async def test_rewind_and_initdb_refuse_a_running_server(area: PgArea, nodes: list[Postgres]) -> None:
    pg = make_node(area, nodes, "busy")
    await init_primary(pg)
    with pytest.raises(PgError, match="running"):
        await rewind(pg, upstream_of(pg, None), superuser="postgres", superuser_password="su-secret")
    with pytest.raises(PgError, match="already initialized"):
        await pg.initdb([])
    with pytest.raises(PgError, match="running"):
        await clone_from(pg, upstream_of(pg, None), replication_user="r", replication_password=None)


def test_area_is_usable_by_the_postgres_user(area: PgArea) -> None:
    assert stat.S_IMODE(area.root.stat().st_mode) == 0o755
    assert area.root.name.startswith("hk-pg-")


async def test_replica_keeps_reporting_the_new_timeline_after_its_upstream_dies(
    area: PgArea, nodes: list[Postgres]
) -> None:
    """During a failover the WAL receiver is gone; the replica must not fall back to an old
    timeline (pg_control's lags until the next restartpoint), or it looks ineligible."""
    a = make_node(area, nodes, "tl_a")
    b = make_node(area, nodes, "tl_b")
    c = make_node(area, nodes, "tl_c")
    await init_primary(a)
    await a.ensure_slots({"tl_b", "tl_c"})
    await make_replica(a, b, "tl_b")
    await make_replica(a, c, "tl_c")
    await streaming(b, a)
    await streaming(c, a)
    await a.stop("immediate")
    await b.promote()
    await b.ensure_slots({"tl_c"})
    await c.write_config(
        PARAMS, Role.REPLICA, upstream_of(b, "tl_c"), replication_password=_pw(c.cfg.replication.password)
    )
    await c.reload()
    st = await streaming(c, b)
    assert st.timeline == 2
    await b.stop("immediate")

    async def receiver_gone() -> bool:
        s = await c.probe()
        return s.running and s.streaming_from is None

    await wait_for(receiver_gone, what="tl_c's WAL receiver gone")
    after = await c.probe()
    assert after.timeline == 2, after


@pytest.mark.matrix
async def test_promotion_does_not_wait_for_an_idle_wal_summarizer(
    area: PgArea, nodes: list[Postgres]
) -> None:
    """17+ with summarize_wal and WAL archiving: the end of recovery waits for the WAL summarizer,
    which sleeps longer the longer the WAL is idle (10 s of waiting after 15 s idle on 18.6,
    24 s after 40 s).  Postgres.promote wakes it, so the promotion takes what it takes on 15."""
    if pgbuilds.default_major() < 17:
        pytest.skip("WAL summarization exists on 17+")
    params: dict[str, ParamValue] = {
        **PARAMS,
        "summarize_wal": True,
        "archive_mode": "on",
        "archive_command": "/bin/true",
    }
    a = make_node(area, nodes, "sum_a")
    b = make_node(area, nodes, "sum_b")
    await init_primary(a, params)
    await a.ensure_slots({"sum_b"})
    await make_replica(a, b, "sum_b", params)
    await streaming(b, a)
    await asyncio.sleep(15)  # idle: the summarizer's naps grow
    await a.stop("immediate")
    t0 = time.monotonic()
    await b.promote(timeout=60)
    took = time.monotonic() - t0
    assert (await b.probe()).in_recovery is False
    assert took < 3.0, f"the promotion took {took:.1f}s"
