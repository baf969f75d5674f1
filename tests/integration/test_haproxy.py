"""deploy/haproxy.cfg against a real cluster and a real HAProxy.

The shipped config is used as is, except for addresses (loopback, free ports) and the
daemon/chroot/syslog lines of ``global`` (see ``bench.switchover.haproxy_config``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.switchover import Backend, HAProxy, haproxy_config
from hakeeper.core.config import DynamicConfig
from hakeeper.localcluster import LocalCluster
from tests.support.cluster import cluster_tmpdir, running_cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TTL = DynamicConfig().ttl
CHECK_INTERVAL = 1.0  # inter / downinter of deploy/haproxy.cfg are at most this
SLACK = 15.0


def _haproxy_available() -> bool:
    return shutil.which("haproxy") is not None or os.access("/usr/sbin/haproxy", os.X_OK)


def test_config_rewrite_keeps_checks() -> None:
    text = haproxy_config(
        (REPO / "deploy" / "haproxy.cfg").read_text(),
        [Backend("n1", "127.0.0.1", 5001, 8001), Backend("n2", "127.0.0.1", 5002, 8002)],
        15000,
        15001,
        15002,
    )
    assert "option httpchk GET /primary" in text
    assert "option httpchk GET /replica?lag=16MB" in text
    directives = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("default-server")]
    assert len(directives) == 2
    assert all("on-marked-down shutdown-sessions" in d for d in directives)
    assert "server n2 127.0.0.1:5002 check port 8002" in text
    assert "bind 127.0.0.1:15000" in text and "bind 127.0.0.1:15001" in text
    assert "chroot" not in text and "daemon" not in text
    assert "10.0.0.11" not in text


def server_port(port: int, password: str, timeout: float = 2.0) -> tuple[int, bool] | None:
    """(inet_server_port(), pg_is_in_recovery()) of a new connection through ``port``."""
    try:
        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="postgres",
            password=password,
            dbname="postgres",
            connect_timeout=max(1, int(timeout)),
            autocommit=True,
        ) as conn:
            row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else (int(row[0]), bool(row[1]))


def wait_routed_to(port: int, password: str, want_port: int, timeout: float) -> float:
    """Seconds until 5 successive new connections through ``port`` land on ``want_port``."""
    t0 = time.monotonic()
    streak = 0
    while time.monotonic() - t0 < timeout:
        got = server_port(port, password)
        streak = streak + 1 if got is not None and got[0] == want_port else 0
        if streak >= 5:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"port {port} not routed to {want_port} within {timeout:.0f} s")


def api_status(cluster: LocalCluster, name: str, path: str) -> int | None:
    try:
        with urllib.request.urlopen(cluster.nodes[name].api_url + path, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[LocalCluster, HAProxy]]:
    # scripts/setup.sh (make test) installs haproxy: its absence is a failure, not a skip.
    assert _haproxy_available(), "haproxy is not installed (run scripts/setup.sh)"
    work = cluster_tmpdir("hakeeper-haproxy-")
    with running_cluster() as cluster:
        backends = [Backend(n.name, "127.0.0.1", n.pg_port, n.api_port) for n in cluster.nodes.values()]
        hap = HAProxy(backends, work)
        try:
            hap.start()
            yield cluster, hap
        finally:
            pid = hap.pid
            hap.stop()
            assert pid is None or not Path(f"/proc/{pid}").exists() or _zombie(pid)
            shutil.rmtree(work, ignore_errors=True)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    return True


def test_write_port_reaches_primary(setup: tuple[LocalCluster, HAProxy]) -> None:
    cluster, hap = setup
    primary = cluster.primary()
    assert primary is not None
    pw = cluster.superuser_password
    wait_routed_to(hap.write_port, pw, cluster.nodes[primary].pg_port, timeout=15)
    for _ in range(10):
        got = server_port(hap.write_port, pw)
        assert got == (cluster.nodes[primary].pg_port, False)
    states = hap.server_states()["postgres_write"]
    assert states[primary] == "UP"
    assert all(v.startswith("DOWN") for k, v in states.items() if k != primary)


def _wal_receiver_pid(cluster: LocalCluster, name: str) -> int:
    with psycopg.connect(cluster.dsn(name), autocommit=True, connect_timeout=3) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_wal_receiver").fetchone()
    assert row is not None and row[0], f"{name} has no WAL receiver"
    return int(row[0])


def test_read_port_skips_lagging_replica(setup: tuple[LocalCluster, HAProxy]) -> None:
    cluster, hap = setup
    pw = cluster.superuser_password
    primary = cluster.primary()
    assert primary is not None
    replicas = [n for n in cluster.names if n != primary]
    lagging, healthy = replicas
    ports = {cluster.nodes[n].pg_port: n for n in cluster.names}
    # Both replicas serve reads at first.
    deadline = time.monotonic() + 20
    seen: set[str] = set()
    while seen != set(replicas) and time.monotonic() < deadline:
        got = server_port(hap.read_port, pw)
        if got is not None:
            seen.add(ports[got[0]])
        time.sleep(0.05)
    assert seen == set(replicas)

    receiver = _wal_receiver_pid(cluster, lagging)
    os.kill(receiver, signal.SIGSTOP)
    try:
        with psycopg.connect(cluster.dsn(primary), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS haproxy_lag")
            # ~40MB of WAL: well past the 16MB bound of the read port's check.
            conn.execute(
                "CREATE TABLE haproxy_lag AS "
                "SELECT g, repeat('x', 300) AS pad FROM generate_series(1, 100000) g"
            )
        # The lagging replica's agent reports it behind; its /replica?lag=16MB turns 503 ...
        deadline = time.monotonic() + 30
        while api_status(cluster, lagging, "/replica?lag=16MB") != 503:
            assert time.monotonic() < deadline, "the lagging replica never reported its lag"
            time.sleep(0.2)
        assert api_status(cluster, healthy, "/replica?lag=16MB") == 200
        # ... and after fall x fastinter HAProxy stops sending readers there.
        time.sleep(2 * CHECK_INTERVAL + 0.5)
        landed = []
        for _ in range(30):
            got = server_port(hap.read_port, pw)
            assert got is not None, "the read port refused a connection while a replica was healthy"
            landed.append(ports[got[0]])
        assert lagging not in landed, f"a read connection reached the lagging replica: {landed}"
        assert set(landed) == {healthy}
        assert hap.server_states()["postgres_read"][lagging].startswith("DOWN")
    finally:
        os.kill(receiver, signal.SIGCONT)
    # Once it caught up it gets readers again (rise 2).
    deadline = time.monotonic() + 60
    while lagging not in {ports[g[0]] for g in [server_port(hap.read_port, pw)] if g is not None}:
        assert time.monotonic() < deadline, "the replica never came back into the read pool"
        time.sleep(0.1)


def _switchover_via_api_or_etcd(cluster: LocalCluster, leader: str, candidate: str) -> None:
    """``hakeeper switchover`` needs the agents' POST /switchover; without it, write the same
    request into etcd with the function the API calls (the agents carry it out either way)."""
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "hakeeper",
            "switchover",
            "-c",
            str(cluster.nodes[leader].config_path),
            "--candidate",
            candidate,
            "--force",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    if res.returncode == 0:
        return
    if "does not offer this operation" not in res.stderr:
        raise AssertionError(f"switchover failed: {res.stdout}{res.stderr}")
    from hakeeper.core.keys import Keys
    from hakeeper.dcs.store import ClusterStore
    from hakeeper.ha.requests import request_switchover

    async def go() -> None:
        client = cluster.etcd_client(timeout=2.0)
        try:
            await request_switchover(
                ClusterStore(client, Keys(f"/hakeeper/{cluster.scope}")), leader=leader, candidate=candidate
            )
        finally:
            await client.close()

    asyncio.run(go())


def test_write_port_follows_switchover(setup: tuple[LocalCluster, HAProxy]) -> None:
    cluster, hap = setup
    pw = cluster.superuser_password
    cluster.wait_ready(120)
    old = cluster.primary()
    assert old is not None
    new = next(n for n in cluster.names if n != old)
    t0 = time.monotonic()
    _switchover_via_api_or_etcd(cluster, old, new)
    took = time.monotonic() - t0
    took += wait_routed_to(
        hap.write_port, pw, cluster.nodes[new].pg_port, timeout=TTL + CHECK_INTERVAL + SLACK
    )
    assert took <= TTL + CHECK_INTERVAL + SLACK
    got = server_port(hap.write_port, pw)
    assert got == (cluster.nodes[new].pg_port, False)


def test_write_port_follows_failover(setup: tuple[LocalCluster, HAProxy]) -> None:
    cluster, hap = setup
    pw = cluster.superuser_password
    cluster.wait_ready(120)
    old = cluster.primary()
    assert old is not None
    old_port = cluster.nodes[old].pg_port
    wait_routed_to(hap.write_port, pw, old_port, timeout=10)
    t0 = time.monotonic()
    cluster.agents[old].kill()
    cluster.kill_postgres(old)
    new_port = None
    deadline = t0 + TTL + CHECK_INTERVAL + SLACK
    while time.monotonic() < deadline:
        got = server_port(hap.write_port, pw)
        if got is not None and got[0] != old_port and got[1] is False:
            new_port = got[0]
            break
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert new_port is not None, f"no new primary behind the write port after {took:.1f} s"
    # Every new connection lands there (never on a replica, never on the dead node).
    for _ in range(10):
        assert server_port(hap.write_port, pw) == (new_port, False)
