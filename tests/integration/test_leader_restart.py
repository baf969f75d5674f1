"""``hakeeper restart LEADER``: PostgreSQL of the leader restarts in place, against real etcd and
PostgreSQL 15.  It keeps its role: the leader key is never lost (same holder, term and lease),
no failover is recorded, no other node becomes writable at any moment, the replica streams
from it again and writes resume."""

from __future__ import annotations

import time

import pytest

from tests.integration.test_cli_ops import hk
from tests.integration.test_ha import wait_for
from tests.integration.test_member_identity import leader_key, watched
from tests.integration.test_switchover import history
from tests.support.cluster import running_cluster
from tests.support.probe import streams_from

pytestmark = pytest.mark.integration


def test_restart_of_the_leader_keeps_its_role_and_key_and_writes_resume() -> None:
    with running_cluster(nodes=2) as c:
        leader = c.primary()
        assert leader is not None
        replica = next(n for n in c.names if n != leader)
        key = leader_key(c)
        assert key[0] == leader
        before = history(c)
        postmaster = c.postmaster_pid(leader)
        assert postmaster is not None
        with watched(c, {}) as (sampler, writer):
            time.sleep(1.0)
            t0 = time.monotonic()
            res = hk(c, "restart", leader, "--force", node=leader)
            took = time.monotonic() - t0
            assert res.returncode == 0, res.stdout + res.stderr
            acked_at_return = writer.ok
            wait_for(lambda: writer.ok > acked_at_return + 50, 30, "writes resume after the restart")
            time.sleep(3.0)  # more than a ttl after it: a lost key would have been taken by now
        restarted = c.postmaster_pid(leader)
        assert restarted is not None and restarted != postmaster, "PostgreSQL really restarted"
        assert leader_key(c) == key, "the leader key was kept: same holder, term and lease"
        assert history(c) == before, "no failover recorded"
        assert sampler.two_writers == [], sampler.two_writers
        assert list(sampler.writable_seen) == [leader], f"only the leader wrote: {sampler.writable_seen}"
        wait_for(lambda: streams_from(c, replica, leader), 60, f"{replica} streams from {leader} again")
        assert c.agents[replica].pid is not None and c.agents[leader].pid is not None
        print(
            f"restart of the leader took {took:.2f} s; {writer.ok} writes ok, {writer.failed} failed; "
            f"{sampler.rounds} sampling rounds"
        )
