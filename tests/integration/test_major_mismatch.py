"""A replica never clones from, or follows, a leader of another PostgreSQL major (issue 14):
a 2-node cluster on 17 whose second node's binaries are 18 (its node file points at them
before it first starts).  Real etcd, real PostgreSQL 17 and 18."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest

from hakeeper.localcluster import LocalCluster, pgbuilds
from tests.integration.test_ha import hk_list, wait_for
from tests.integration.test_slot_failover import events
from tests.support.cluster import cluster_tmpdir, free_base_port

pytestmark = pytest.mark.integration


class NodeTwoOn18(LocalCluster):
    """node2's node file names PostgreSQL 18's binaries; the cluster runs 17."""

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        if name == "node2":
            cfg["postgresql"]["bin_dir"] = str(pgbuilds.reachable_bin_dir(18, self.run_as))
        return cfg


def test_a_node_of_another_major_does_not_clone_and_says_why() -> None:
    base_dir = cluster_tmpdir()
    c = NodeTwoOn18(base_dir, nodes=2, base_port=free_base_port(2), pg_version=17)
    try:
        with c:  # stops whatever was started, whatever happens
            c.check_ports()
            c.write_configs()
            c.etcd.start(30)
            # node1 first, so that it (on 17) initializes the cluster
            c.agents["node1"].start()
            wait_for(lambda: c.primary() == "node1", 120, "node1 leads")
            c.agents["node2"].start()
            expected = "the leader node1 runs PostgreSQL 17.10, this node's binaries are PostgreSQL 18"

            def node2() -> dict[str, Any] | None:
                m = next((m for m in hk_list(c)["members"] if m["name"] == "node2"), None)
                return m if m is not None and m["reason"] else None

            m = wait_for(node2, 60, "node2 publishes why it waits")
            assert m["reason"] == expected, m
            assert m["eligible"] is False and m["state"] == "uninitialized", m
            # several cycles later: still waiting, nothing copied, the refusal logged once
            time.sleep(12)
            assert c.agents["node2"].returncode is None
            assert not (c.nodes["node2"].data_dir / "PG_VERSION").exists()
            ev = events(c, "node2")
            refused = [
                e for e in ev if e.get("event") == "decision_wait" and "clone refused" in e.get("why", "")
            ]
            assert [e["why"] for e in refused] == [f"clone refused: {expected}"], refused
            assert not [e for e in ev if e.get("event") == "decision_clone"]
            assert c.primary() == "node1"
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
