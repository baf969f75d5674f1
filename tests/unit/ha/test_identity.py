"""One live agent per member name (issue 12, finding 2), over FakeEtcd + FakePostgres.

A second agent of the same name -- a copied node file or a cloned VM: its own PostgreSQL, no
record of the lease the first one holds -- must refuse to start; if it runs anyway (both started
at once), neither may write under the name nor take the other's leader key.  The node's own
agent, restarted while its lease still lives, must recognise that lease and carry on.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import cast

import pytest

from hakeeper.dcs.etcd import EtcdClient
from hakeeper.ha import lease as lease_module
from hakeeper.ha import loop as loop_module
from hakeeper.ha.fence import FenceClient
from hakeeper.ha.identity import refusal_at_start
from hakeeper.ha.lease import LeaseFile
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, LeaseOwner
from hakeeper.node import Node
from hakeeper.pg.postgres import Postgres
from tests.support.sim import EtcdLink, FakeFence, MemoryLeaseRecord, Sim, SimNode, capture_events

IMPOSTOR = "a (copy)"


def impostor_of(sim: Sim, name: str) -> SimNode:
    """Another agent configured as ``name`` (its node file copied), with its own PostgreSQL and
    no lease record: added to the simulation's turns under the key IMPOSTOR."""
    original = sim[name]
    pg = sim.world.add(IMPOSTOR, "127.0.0.1", 16999)
    link = EtcdLink(sim.etcd)
    fence = FakeFence()
    record = MemoryLeaseRecord()
    node = Node(
        original.node.cfg,
        client=cast(EtcdClient, link),
        pg=cast(Postgres, pg),
        fence=cast(FenceClient, fence),
        lease_record=record,
    )
    copy = SimNode(IMPOSTOR, node, pg, link, fence, record)
    sim.nodes[IMPOSTOR] = copy
    return copy


async def test_a_copy_of_the_primarys_node_file_refuses_to_start(cluster: Sim) -> None:
    copy = impostor_of(cluster, "a")
    reason = await refusal_at_start(copy.node.store, copy.node.lease, "a")
    assert reason is not None and "member name 'a' is in use" in reason and "member key" in reason
    assert copy.node.lease.lease == 0, "nothing granted, nothing written under the name"


async def test_a_copy_of_a_replicas_node_file_refuses_to_start(cluster: Sim) -> None:
    copy = impostor_of(cluster, "b")
    reason = await refusal_at_start(copy.node.store, copy.node.lease, "b")
    assert reason is not None and "member name 'b' is in use" in reason


async def test_the_nodes_own_agent_restarted_with_its_lease_alive_starts_and_takes_over(cluster: Sim) -> None:
    a_before = cluster["a"].node.lease.lease
    a = await cluster.restart_agent("a")  # like kill -9: the old lease lives on for a ttl
    assert 0 < await cluster.etcd.lease_time_to_live(a_before)
    assert a.node.lease.previous == a_before, "the lease id its predecessor persisted"
    assert await refusal_at_start(a.node.store, a.node.lease, "a") is None

    await a.node.lease.renew()
    view, facts = await a.observe()
    assert facts.leader_lease_owner == LeaseOwner.OURS
    assert decide(view, facts).action == Action.TAKEOVER
    await cluster.run(3)
    kv = await cluster.etcd.get(cluster.keys.leader)
    assert kv is not None and kv.value == b"a" and kv.lease == a.node.lease.lease
    assert cluster.world.writable() == ["a"] and cluster.world.promotions == []


async def test_a_restarted_agent_that_lost_its_record_waits_for_the_old_lease_then_takes_over(
    cluster: Sim,
) -> None:
    old = cluster["a"].node.lease.lease
    a = await cluster.restart_agent("a", lease_record=MemoryLeaseRecord())
    reason = await refusal_at_start(a.node.store, a.node.lease, "a")
    assert reason is not None, "a live lease it cannot tell from another agent's"
    await a.node.lease.renew()
    view, facts = await a.observe()
    assert facts.leader_lease_owner == LeaseOwner.FOREIGN
    assert decide(view, facts).action == Action.DEMOTE, "never writes under a lease it cannot claim"
    ttl = cluster["a"].node.cfg.bootstrap.dcs.ttl
    await cluster.pass_time(ttl + 1, order=["b", "c"])  # nobody renews the old lease
    assert await cluster.etcd.lease_time_to_live(old) == -1
    assert await refusal_at_start(a.node.store, a.node.lease, "a") is None


async def test_takeover_only_of_our_own_or_an_expired_lease(cluster: Sim) -> None:
    """The copy started despite the check: the leader key (our name, the original's live lease)
    is never taken over, and the copy never goes read-write."""
    copy = impostor_of(cluster, "a")
    await copy.node.lease.renew()
    view, facts = await copy.observe()
    assert facts.leader_lease_owner == LeaseOwner.FOREIGN
    d = decide(view, facts)
    assert d.action == Action.WAIT and "another agent runs under our name" in d.why


async def test_two_agents_of_one_name_never_make_two_writers_and_both_stop_writing(
    cluster: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = capture_events(monkeypatch, loop_module)
    copy = impostor_of(cluster, "a")
    await copy.node.lease.renew()
    for _ in range(12):  # the one_writer invariant is checked after every tick and every cycle
        await cluster.step()
    assert "a" not in cluster.world.writable(), "the original stopped writing under the name"
    assert IMPOSTOR not in cluster.world.writable(), "the copy never wrote"
    conflicts = [e for e in events if e["event"] == "member_name_conflict"]
    assert conflicts, "the conflict is logged loudly"
    leader = await cluster.leader()
    assert leader in ("b", "c"), "the name's key was given up and another member was elected"
    assert cluster.world.writable() == [leader]


def test_the_lease_file_is_private_and_bound_to_this_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(lease_module, "BOOT_ID", boot)
    f = LeaseFile(tmp_path / "lease")
    assert f.load() == 0
    f.save(0x1234)
    assert stat.S_IMODE(os.stat(tmp_path / "lease").st_mode) == 0o600
    assert json.loads((tmp_path / "lease").read_text())["lease"] == 0x1234
    assert LeaseFile(tmp_path / "lease").load() == 0x1234
    boot.write_text("boot-2\n")  # a cloned host, or after a reboot
    assert LeaseFile(tmp_path / "lease").load() == 0
    (tmp_path / "lease").write_text("garbage")
    assert LeaseFile(tmp_path / "lease").load() == 0
