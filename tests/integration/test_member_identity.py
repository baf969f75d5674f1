"""One live agent per member name (issue 12, finding 2), against real etcd and PostgreSQL 15.

A fourth agent started from a copy of a member's node file (its own data directory and ports,
the same ``name``) must exit non-zero within 30 s with the reason in its output, while a writer
keeps writing and a sampler looks at ``pg_is_in_recovery()`` on every node every 50 ms: never two
writable servers, and the original primary stays the primary (no failover).  The primary's own
agent, killed with SIGKILL and restarted while its lease still lives, must start normally.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import yaml

from hakeeper.core.config import load_node_config
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdClient
from hakeeper.localcluster import LocalCluster
from hakeeper.localcluster.procs import stop_fencers, stop_postmaster
from tests.support import ports
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration

SAMPLE_EVERY = 0.05  # s


@dataclass
class Sampler:
    """``pg_is_in_recovery()`` on every port every SAMPLE_EVERY seconds, on its own thread."""

    dsns: dict[str, str]
    rounds: int = 0
    writable_seen: dict[str, int] = field(default_factory=dict)  # member -> rounds it was writable
    two_writers: list[tuple[float, list[str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conns: dict[str, psycopg.Connection[tuple[bool]] | None] = dict.fromkeys(self.dsns)
        while not self.stop.is_set():
            started = time.monotonic()
            writable = []
            for name, dsn in self.dsns.items():
                conn = conns[name]
                try:
                    if conn is None or conn.closed:
                        conn = conns[name] = psycopg.connect(dsn, connect_timeout=1, autocommit=True)
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and row[0] is False:
                        writable.append(name)
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conns[name] = None
            self.rounds += 1
            for name in writable:
                self.writable_seen[name] = self.writable_seen.get(name, 0) + 1
            if len(writable) > 1:
                self.two_writers.append((time.time(), writable))
            self.stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))
        for conn in conns.values():
            if conn is not None:
                conn.close()


@dataclass
class Writer:
    """One INSERT after another through the multi-host read-write DSN, on its own thread."""

    dsn: str
    ok: int = 0
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conn: psycopg.Connection[tuple[int]] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=2, autocommit=True)
                conn.execute("INSERT INTO identity_probe VALUES (%s)", (self.ok,))
                self.ok += 1
            except psycopg.Error:
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(0.01)
        if conn is not None:
            conn.close()


@contextmanager
def watched(c: LocalCluster, extra_dsns: dict[str, str]) -> Iterator[tuple[Sampler, Writer]]:
    with psycopg.connect(c.write_dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS identity_probe (v bigint)")
    sampler = Sampler({**{n: c.dsn(n) for n in c.names}, **extra_dsns})
    writer = Writer(c.write_dsn())
    threads = [
        threading.Thread(target=sampler.run, daemon=True),
        threading.Thread(target=writer.run, daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        yield sampler, writer
    finally:
        sampler.stop.set()
        writer.stop.set()
        for t in threads:
            t.join(10)


def copy_node_file(c: LocalCluster, name: str) -> tuple[Path, int]:
    """A copy of ``name``'s node file, as a cloned VM or a copied file would have it: the same
    ``name``, its own data directory, PostgreSQL and API ports.  Returns its path and PG port."""
    doc = yaml.safe_load(c.nodes[name].config_path.read_text())
    copy_dir = c.base_dir / f"copy-of-{name}"
    copy_dir.mkdir(mode=0o700)
    c.run_as.chown(copy_dir)
    pg_port, api_port = ports.free_ports(2)
    doc["postgresql"]["data_dir"] = str(copy_dir / "data")
    doc["postgresql"]["listen"] = f"127.0.0.1:{pg_port}"
    doc["api"]["listen"] = f"127.0.0.1:{api_port}"
    assert doc["name"] == name
    path = copy_dir / "node.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f)
    return path, pg_port


def agent_env() -> dict[str, str]:
    """As LocalCluster starts its agents: PYTHONPATH (this checkout's hakeeper) kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAKEEPER_", "PG"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def leader_key(c: LocalCluster) -> tuple[str, int, int]:
    """(holder, term, lease) of the leader key, read from etcd as the nodes reach it."""
    cfg = load_node_config(c.nodes[c.names[0]].config_path)

    async def read() -> tuple[str, int, int]:
        client = EtcdClient.from_config(cfg.etcd)
        try:
            kv = await client.get(Keys(cfg.prefix).leader)
            assert kv is not None
            return kv.value.decode(), kv.create_revision, kv.lease
        finally:
            await client.close()

    return asyncio.run(read())


@pytest.mark.parametrize("whose", ["primary", "replica"])
def test_an_agent_started_from_a_copied_node_file_refuses_and_nothing_fails_over(whose: str) -> None:
    with running_cluster() as c:
        primary = c.primary()
        assert primary is not None
        name = primary if whose == "primary" else next(n for n in c.names if n != primary)
        holder, term, lease = leader_key(c)
        assert holder == primary
        path, copy_port = copy_node_file(c, name)
        copy_dsn = c.dsn(name).replace(f"port={c.nodes[name].pg_port}", f"port={copy_port}")
        with watched(c, {f"copy of {name}": copy_dsn}) as (sampler, writer):
            time.sleep(1.0)  # the writer writes, the sampler samples
            t0 = time.monotonic()
            try:
                out = subprocess.run(
                    [sys.executable, "-m", "hakeeper", "agent", "-c", str(path)],
                    capture_output=True,
                    text=True,
                    env=agent_env(),
                    timeout=30,  # exits within 30 s, or TimeoutExpired fails the test
                )
            finally:
                # Whatever the copy started if it did not refuse (its agent is killed by run()).
                stop_postmaster(path.parent / "data", c.run_as)
                stop_fencers(path.parent)
            took = time.monotonic() - t0
            time.sleep(3.0)  # a ttl's worth of keepalives after it: nothing moves
        output = out.stdout + out.stderr
        assert out.returncode != 0, output
        assert "member_name_in_use" in output and f"member name '{name}' is in use" in output, output
        assert "hakeeper: refusing to start" in out.stderr, "printed in plain words, whatever the log format"
        assert "Traceback" not in output
        assert not (path.parent / "data").exists(), "the copy created no data directory"
        assert sampler.rounds > 50 and sampler.two_writers == [], sampler.two_writers
        assert list(sampler.writable_seen) == [primary], (
            f"only the original primary wrote: {sampler.writable_seen}"
        )
        assert writer.ok > 100 and writer.failed == 0, (writer.ok, writer.failed)
        assert leader_key(c) == (primary, term, lease), "the key never moved: no failover, no takeover"
        assert c.agents[name].pid is not None, "the original agent still runs"
        print(
            f"copy of the {whose}'s node file exited {out.returncode} after {took:.2f} s; "
            f"{sampler.rounds} sampling rounds, writable seen {sampler.writable_seen}; "
            f"{writer.ok} writes ok, {writer.failed} failed"
        )


def test_the_primarys_own_agent_restarted_after_kill9_starts_and_keeps_the_primary() -> None:
    # ttl 20: the lease (and the fence deadline, ttl - fence_margin after the last keepalive)
    # outlives the agent's restart even on a loaded machine, where starting the agent takes
    # seconds; with the default ttl of 5 the fence may fire first (then PostgreSQL restarts in
    # place, or another node is promoted once the lease is gone): not what this test is about.
    with running_cluster(dynamic={"ttl": 20}) as c:
        primary = c.primary()
        assert primary is not None
        holder, term, old_lease = leader_key(c)
        lease_file = c.nodes[primary].node_dir / ".data.hakeeper" / "lease"
        assert lease_file.exists() and oct(lease_file.stat().st_mode & 0o777) == "0o600"
        log = c.nodes[primary].log_path
        with watched(c, {}) as (sampler, writer):
            time.sleep(1.0)
            c.agents[primary].kill()  # SIGKILL: its lease lives on for up to a ttl
            c.agents[primary].start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if leader_key(c)[2] != old_lease:
                    break
                time.sleep(0.2)
            time.sleep(3.0)
        text = log.read_text()
        assert c.agents[primary].pid is not None, c.tail_log(primary)
        assert "member_name_in_use" not in text and "refusing to start" not in text
        assert "leader_key_reattached" in text, c.tail_log(primary)
        holder, new_term, new_lease = leader_key(c)
        assert (holder, new_term) == (primary, term) and new_lease != old_lease, "same term, our new lease"
        assert sampler.two_writers == [], sampler.two_writers
        assert list(sampler.writable_seen) == [primary], sampler.writable_seen
        assert c.primary() == primary
        print(
            f"restarted agent took its key over; writable seen {sampler.writable_seen} in "
            f"{sampler.rounds} rounds; {writer.ok} writes ok, {writer.failed} failed"
        )
