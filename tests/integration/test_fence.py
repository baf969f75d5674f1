"""The fencer process stops a primary's writes at the deadline, open sessions included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from hakeeper.core.config import PostgresConfig
from hakeeper.ha.fence import FenceClient
from hakeeper.pg.postgres import Postgres, Role
from hakeeper.util import clock
from hakeeper.util.proc import pid_alive
from tests.support.pg import DEFAULT_PARAMS, PgArea

pytestmark = pytest.mark.integration


@pytest.fixture
def area() -> Iterator[PgArea]:
    a = PgArea()
    try:
        yield a
    finally:
        a.cleanup()


def start_primary(area: PgArea, name: str) -> tuple[Postgres, PostgresConfig]:
    cfg = area.node_config(name)
    pg = Postgres(cfg, member_name=name)

    async def go() -> None:
        await pg.initdb(["--data-checksums"])
        await pg.write_config(dict(DEFAULT_PARAMS), Role.PRIMARY, None, replication_password=None)
        await pg.start(timeout=60)

    asyncio.run(go())
    return pg, cfg


def dsn(cfg: PostgresConfig) -> str:
    host, port = cfg.listen_host_port
    pw = cfg.superuser.password.get_secret_value() if cfg.superuser.password else ""
    return f"host={host} port={port} user={cfg.superuser.username} password={pw} dbname=postgres"


def test_fencer_stops_writes_at_deadline_including_open_sessions(area: PgArea) -> None:
    pg, cfg = start_primary(area, "fenced")
    runtime = cfg.data_dir.parent / "runtime"
    runtime.mkdir()
    fence = FenceClient(runtime, cfg.data_dir)
    fence.start()
    try:
        session = psycopg.connect(dsn(cfg), autocommit=True)
        session.execute("CREATE TABLE t (v int)")
        deadline = clock.boottime() + 1.0
        fence.arm(deadline)
        # Freeze the agent's side entirely: only the separate fencer process can act now.
        session.execute("INSERT INTO t VALUES (1)")
        time.sleep(2.0)
        with pytest.raises(psycopg.OperationalError):
            session.execute("INSERT INTO t VALUES (2)")
        assert not pg.is_running()
        log = (runtime / "fencer.log").read_text()
        assert '"fence_fired"' in log
        session.close()
    finally:
        fence.stop()


def test_fencer_does_nothing_while_the_deadline_keeps_moving(area: PgArea) -> None:
    pg, cfg = start_primary(area, "kept")
    runtime = cfg.data_dir.parent / "runtime"
    runtime.mkdir()
    fence = FenceClient(runtime, cfg.data_dir)
    fence.start()
    try:
        for _ in range(15):
            fence.arm(clock.boottime() + 0.5)
            time.sleep(0.1)
        fence.disarm()
        time.sleep(1.0)
        assert pg.is_running()
        with psycopg.connect(dsn(cfg)) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    finally:
        fence.stop()


def test_fencer_outlives_a_stopped_agent(area: PgArea) -> None:
    """A process that arms the fence and is then SIGSTOPped: the fencer still fires."""
    pg, cfg = start_primary(area, "stopped")
    runtime = cfg.data_dir.parent / "runtime"
    runtime.mkdir()
    script = f"""
import time, sys
from pathlib import Path
from hakeeper.core.config import PostgresConfig
from hakeeper.ha.fence import FenceClient
from hakeeper.util import clock
f = FenceClient(Path({str(runtime)!r}), Path({str(cfg.data_dir)!r}))
f.start()
f.arm(clock.boottime() + 1.0)
print("armed", flush=True)
time.sleep(60)
"""
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "armed"
        os.kill(agent.pid, signal.SIGSTOP)
        end = time.monotonic() + 10
        while pg.is_running() and time.monotonic() < end:
            time.sleep(0.1)
        assert not pg.is_running(), "the fencer must stop PostgreSQL although the agent is frozen"
        fencer_pid = int((runtime / "fencer.pid").read_text())
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        end = time.monotonic() + 5
        while pid_alive(fencer_pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not pid_alive(fencer_pid), "with its agent gone and the fence done, the fencer exits"
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait()
        FenceClient(runtime, cfg.data_dir).stop()


def test_restarted_agent_inherits_an_armed_fence(area: PgArea) -> None:
    """A new agent on the same data dir must not disarm its predecessor's fence."""
    pg, cfg = start_primary(area, "inherit")
    runtime = cfg.data_dir.parent / "runtime"
    runtime.mkdir()
    old = FenceClient(runtime, cfg.data_dir)
    old.start()
    try:
        old.arm(clock.boottime() + 1.0)
        new = FenceClient(runtime, cfg.data_dir)  # the "restarted agent"
        assert new.inherit()
        new.start()  # adopts the running fencer, keeps the old deadline
        end = time.monotonic() + 10
        while pg.is_running() and time.monotonic() < end:
            time.sleep(0.1)
        assert not pg.is_running()
    finally:
        old.stop()
