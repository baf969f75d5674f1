"""A second agent that must not start, against real etcd and PostgreSQL 15: one started on a data
directory whose agent already runs (the agent.lock), and one whose member name maps to the
replication slot name of a live member (``node2`` and ``NODE2`` both map to slot ``node2``).
Either exits non-zero with the reason, and the cluster does not notice: the running agent and
its PostgreSQL keep going, writes go on, the leader key does not move."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hakeeper.localcluster import LocalCluster
from hakeeper.localcluster.procs import stop_fencers, stop_postmaster
from tests.integration.test_member_identity import agent_env, leader_key, watched
from tests.support import ports
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster(nodes=2) as c:
        yield c


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    """``hakeeper agent -c config`` in the foreground; it must exit by itself within 30 s."""
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", "agent", "-c", str(config)],
        capture_output=True,
        text=True,
        env=agent_env(),
        timeout=30,  # TimeoutExpired (and a killed agent) fails the test
    )


@pytest.mark.parametrize("whose", ["primary", "replica"])
def test_a_second_agent_on_the_same_data_directory_refuses_and_the_first_runs_on(
    cluster: LocalCluster, whose: str
) -> None:
    c = cluster
    c.wait_ready(120)
    primary = c.primary()
    assert primary is not None
    name = primary if whose == "primary" else next(n for n in c.names if n != primary)
    first_agent = c.agents[name].pid
    postmaster = c.postmaster_pid(name)
    assert first_agent is not None and postmaster is not None
    key = leader_key(c)
    data_dir = c.nodes[name].data_dir
    with watched(c, {}) as (sampler, writer):
        time.sleep(1.0)
        out = run_agent(c.nodes[name].config_path)  # the very same node file
        time.sleep(3.0)  # a ttl's worth of keepalives after it: nothing moves
    output = out.stdout + out.stderr
    assert out.returncode == 1, (out.returncode, output)
    assert f"another hakeeper agent already runs for {data_dir}" in out.stderr, output
    assert "Traceback" not in output
    # The first agent and its PostgreSQL are untouched: same processes, same leader key, no
    # failover, writes never failed, one writable node throughout.
    assert c.agents[name].pid == first_agent, c.tail_log(name)
    assert c.postmaster_pid(name) == postmaster, "the second agent touched PostgreSQL"
    assert leader_key(c) == key
    assert writer.ok > 100 and writer.failed == 0, (writer.ok, writer.failed)
    assert sampler.rounds > 50 and sampler.two_writers == []
    assert list(sampler.writable_seen) == [primary], sampler.writable_seen
    lock = c.nodes[name].node_dir / ".data.hakeeper" / "agent.lock"
    assert lock.read_text() == str(first_agent), "the lock still names the first agent"


def test_a_member_whose_slot_name_is_a_live_members_refuses_to_start(cluster: LocalCluster) -> None:
    c = cluster
    c.wait_ready(120)
    primary = c.primary()
    assert primary is not None
    replica = next(n for n in c.names if n != primary)
    clash = replica.upper()  # slot names are lower case: NODE2 -> node2, the replica's slot
    doc = yaml.safe_load(c.nodes[replica].config_path.read_text())
    copy_dir = c.base_dir / f"clash-{clash}"
    copy_dir.mkdir(mode=0o700)
    c.run_as.chown(copy_dir)
    pg_port, api_port = ports.free_ports(2)
    doc["name"] = clash
    doc["postgresql"]["data_dir"] = str(copy_dir / "data")
    doc["postgresql"]["listen"] = f"127.0.0.1:{pg_port}"
    doc["api"]["listen"] = f"127.0.0.1:{api_port}"
    path = copy_dir / "node.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f)
    key = leader_key(c)
    try:
        out = run_agent(path)
    finally:
        stop_postmaster(copy_dir / "data", c.run_as)  # whatever it started if it did not refuse
        stop_fencers(copy_dir)
    output = out.stdout + out.stderr
    assert out.returncode == 1, (out.returncode, output)
    assert f"member name '{clash}' maps to replication slot '{replica}'" in out.stderr, output
    assert f"live member '{replica}'" in out.stderr
    assert "Traceback" not in output
    assert not (copy_dir / "data").exists(), "refused before creating a data directory"
    assert leader_key(c) == key
    c.wait_ready(30)  # the replica still streams on its slot
