"""An agent SIGKILLed in the middle of its bootstrap, against real etcd and PostgreSQL 15: the
restarted agent recovers by itself (hakeeper/ha/bootmark.py, docs/decisions.md).

* Killed during initdb: meanwhile the other members initialize the cluster; restarted, node1
  finds a data directory of its own that is not the cluster's, removes it
  (``bootstrap_abandoned``) and clones.  Before, it waited forever ("data directory belongs to
  another cluster; refusing to touch it").
* Killed after winning the initialize race, before the replication role existed: restarted, it
  creates the roles (``bootstrap_completed_after_restart``) and the replica clones.  Before, no
  replica could ("password authentication failed for user replicator").

The kill must land inside its window; each test checks that it did (the data directory exists
and the initialize key does not; the initialize key exists and the role does not) and sets up
again when it did not, failing after three misses rather than passing on a run that did not
test the crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from hakeeper.core.config import load_node_config
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdClient
from hakeeper.ha.bootmark import MARKER_NAME, initdb_running
from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import wait_for
from tests.support.cluster import cluster_tmpdir, free_base_port
from tests.support.probe import streams_from

pytestmark = pytest.mark.integration

ATTEMPTS = 3
POLL = 0.003  # s between looks for the kill point


@contextmanager
def etcd_only(nodes: int) -> Iterator[LocalCluster]:
    """A LocalCluster with etcd running and no agent started; everything stopped after (an
    initdb the killed agent left running is ended too, by PID)."""
    base = cluster_tmpdir()
    c = LocalCluster(base, nodes=nodes, base_port=free_base_port(nodes))
    try:
        with c:
            c.check_ports()
            c.write_configs()
            c.etcd.start(30)
            try:
                yield c
            finally:
                for n in c.nodes.values():
                    pid = initdb_running(n.data_dir)
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                # initdb's password file, which a killed agent cannot remove, stays in the node's
                # private runtime dir (removed with the cluster's directory), never in /tmp
                leaked = []
                for f in Path("/tmp").glob("*pw*"):
                    with contextlib.suppress(OSError):
                        if f.is_file() and f.read_text().strip() == c.superuser_password:
                            leaked.append(f)
                            f.unlink()
                assert not leaked, f"initdb's password file left in /tmp: {leaked}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def marker_path(c: LocalCluster, name: str) -> Path:
    data_dir = c.nodes[name].data_dir
    return data_dir.parent / f".{data_dir.name}.hakeeper" / MARKER_NAME


def marker(c: LocalCluster, name: str) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads(marker_path(c, name).read_text())
    except FileNotFoundError:
        return None
    return data


async def _initialized(client: EtcdClient, keys: Keys) -> str | None:
    kv = await client.get(keys.initialize)
    return None if kv is None else kv.value.decode()


def initialize_key(c: LocalCluster) -> str | None:
    cfg = load_node_config(c.nodes[c.names[0]].config_path)

    async def read() -> str | None:
        client = EtcdClient.from_config(cfg.etcd)
        try:
            return await _initialized(client, Keys(cfg.prefix))
        finally:
            await client.close()

    return asyncio.run(read())


def kill_node1_when(
    c: LocalCluster, due: Callable[[EtcdClient, Keys], Awaitable[bool]], timeout: float
) -> bool:
    """Start node1's agent alone and SIGKILL it the moment ``due`` holds (polled every POLL s on
    one etcd connection); False if it never did within ``timeout``."""
    cfg = load_node_config(c.nodes["node1"].config_path)

    async def watch() -> bool:
        client = EtcdClient.from_config(cfg.etcd)
        keys = Keys(cfg.prefix)
        try:
            await client.get(keys.initialize)  # connected before the agent starts
            c.agents["node1"].start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if await due(client, keys):
                    c.agents["node1"].kill()
                    return True
                await asyncio.sleep(POLL)
            return False
        finally:
            await client.close()

    return asyncio.run(watch())


def replicator_role(c: LocalCluster) -> tuple[bool]:
    """(whether node1's server has the replication role,): a tuple, truthy once it answers."""
    with psycopg.connect(c.dsn("node1"), connect_timeout=3, autocommit=True) as conn:
        return (bool(conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'replicator'").fetchall()),)


def log_events(c: LocalCluster, name: str) -> list[str]:
    events = []
    for line in c.nodes[name].log_path.read_text(errors="replace").splitlines():
        try:
            events.append(str(json.loads(line).get("event")))
        except (ValueError, AttributeError):
            continue
    return events


def test_agent_killed_in_initdb_discards_its_directory_and_clones() -> None:
    for attempt in range(1, ATTEMPTS + 1):
        if _killed_in_initdb(attempt):
            return
    pytest.fail(f"the kill never landed inside initdb in {ATTEMPTS} attempts")


def _killed_in_initdb(attempt: int) -> bool:
    """One set-up and run; False when the kill missed its window (nothing was tested)."""
    with etcd_only(3) as c:
        version = c.nodes["node1"].data_dir / "PG_VERSION"

        async def in_initdb(client: EtcdClient, keys: Keys) -> bool:
            return version.exists()

        assert kill_node1_when(c, in_initdb, 120), "node1's agent never started initdb"
        # the window: initdb had begun, the race not yet
        left = marker(c, "node1")
        if initialize_key(c) is not None or left is None or left["phase"] != "initdb":
            print(f"attempt {attempt}: the kill missed initdb (marker {left}); setting up again")
            return False
        t_kill = time.monotonic()
        # initdb runs on without its agent: wait for it to end, then let the others make the
        # cluster while node1 is down
        wait_for(lambda: initdb_running(c.nodes["node1"].data_dir) is None, 120, "node1's initdb to end")
        for name in ("node2", "node3"):
            c.agents[name].start()
        cluster_sysid = wait_for(lambda: initialize_key(c), 180, "node2 or node3 to initialize")
        assert version.exists(), "node1's abandoned data directory is still there"

        c.agents["node1"].start()
        primary = c.wait_ready(240)

        assert primary in ("node2", "node3")
        events = log_events(c, "node1")
        assert "bootstrap_abandoned" in events, events[-30:]
        assert "refusing to touch it" not in c.nodes["node1"].log_path.read_text(errors="replace")
        wait_for(lambda: streams_from(c, "node1", primary), 60, f"node1 streams from {primary}")
        assert marker(c, "node1") is None
        assert initialize_key(c) == cluster_sysid
        print(f"attempt {attempt}: node1 recovered {time.monotonic() - t_kill:.1f} s after the kill")
        return True


@pytest.mark.parametrize("when", ["race won", "postgres started"])
def test_agent_killed_before_the_roles_existed_creates_them_after_a_restart(when: str) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        if _killed_before_the_roles(attempt, when):
            return
    pytest.fail(f"the kill never landed between the race and the roles in {ATTEMPTS} attempts")


def _killed_before_the_roles(attempt: int, when: str) -> bool:
    """One set-up and run (``when``: the kill as soon as the initialize key exists, or as soon
    as node1's PostgreSQL runs); False when the kill missed its window (nothing was tested)."""
    with etcd_only(2) as c:

        async def due(client: EtcdClient, keys: Keys) -> bool:
            if await _initialized(client, keys) is None:
                return False
            # (initdb's own single-user server counts as a postmaster too: only after the race)
            return when == "race won" or c.postmaster_pid("node1") is not None

        assert kill_node1_when(c, due, 120), f"node1 never got to: {when}"
        # Did the roles exist?  Asked at once: the fence stops the orphaned primary within
        # ttl - fence_margin of the agent's last keepalive.  Without a running server they
        # cannot (the agent creates them on its running primary).
        running = c.postmaster_pid("node1") is not None
        role: bool | None = False
        if running:
            try:
                role = wait_for(lambda: replicator_role(c), 2.0, "node1's server to answer", 0.05)[0]
            except AssertionError:
                role = None  # fenced before it answered: unknown
        time.sleep(3.0)  # a pg_ctl start the agent had begun, and the fence, finish without it
        cluster_sysid = initialize_key(c)
        left = marker(c, "node1")
        missed = role is not False or (when == "postgres started" and not running)
        if left is None or left["system_identifier"] != cluster_sysid or missed:
            print(f"attempt {attempt}: missed (marker {left}, role {role}, running {running})")
            return False

        c.agents["node2"].start()
        c.agents["node1"].start()
        primary = c.wait_ready(240)

        assert primary == "node1"
        assert "bootstrap_completed_after_restart" in log_events(c, "node1")
        assert marker(c, "node1") is None
        assert initialize_key(c) == cluster_sysid
        wait_for(lambda: streams_from(c, "node2", "node1"), 60, "node2 streams from node1")
        print(
            f"attempt {attempt}: killed with the marker {left}, postgres running: {running}; replica streams"
        )
        return True
