"""pg_hba.conf admits replication only from the members' published hosts: the set follows the
members as they come and go (rewrite + reload only when it changes), and a member record that
names no single host (whoever can write etcd writes member records) widens nothing."""

from __future__ import annotations

import pytest

from hakeeper.core.cluster import Member
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha import pgconfig
from tests.support.sim import Sim, capture_events


async def test_replication_hosts_follow_the_members(cluster: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    events = capture_events(monkeypatch, pgconfig)
    a, b = cluster["a"].pg, cluster["b"].pg
    assert list(a.hba_hosts) == ["127.0.0.1"]  # every simulated member publishes 127.0.0.1
    writes = a.config_writes
    await cluster.run(3)
    assert a.config_writes == writes, "nothing changed: no rewrite, no reload"

    store = ClusterStore(cluster.etcd, cluster.keys)
    await store.put_member(Member(name="d", host="10.9.9.9", port=5432), lease=0)
    await store.put_member(Member(name="e", host="0.0.0.0/0", port=5432), lease=0)
    await cluster.step()
    assert list(a.hba_hosts) == ["10.9.9.9", "127.0.0.1"]
    assert list(b.hba_hosts) == ["10.9.9.9", "127.0.0.1"]  # a replica is ready to lead with them
    assert a.config_writes == writes + 1
    changed = [e for e in events if e["event"] == "pg_hba_members_changed"]
    assert changed and changed[0]["added"] == ["10.9.9.9"]
    refused = [e for e in events if e["event"] == "member_hosts_refused"]
    assert refused and refused[0]["hosts"] == ["0.0.0.0/0"]

    await cluster.run(2)
    assert a.config_writes == writes + 1
    assert len([e for e in events if e["event"] == "member_hosts_refused"]) == len(refused)

    await store.delete_member("d")
    await cluster.step()
    assert list(a.hba_hosts) == ["127.0.0.1"]
    assert a.config_writes == writes + 2
