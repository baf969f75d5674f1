"""PostgreSQL majors against real servers (issue 14, items 1 and 2): the agent refuses a data
directory initialized by another major (exit 2, the message, PostgreSQL never started), and a
running member reports its server version in `hakeeper list -o json` and /cluster.

Each case pins its majors with ``pg_version=`` (not ``$TEST_PG_VERSION``): they are the point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import yaml

from hakeeper.localcluster import LocalCluster, pgbuilds
from tests.integration.test_ha import sql, wait_for
from tests.support.cluster import cluster_tmpdir, free_base_port, running_cluster

pytestmark = pytest.mark.integration

# the agent's major -> the major its data directory was initialized with
OTHER = {15: 18, 17: 15, 18: 17}


@pytest.mark.parametrize("major", sorted(OTHER))
def test_agent_refuses_a_data_directory_of_another_major(major: int) -> None:
    other = OTHER[major]
    base_dir = cluster_tmpdir()
    cluster = LocalCluster(base_dir, nodes=1, base_port=free_base_port(1), pg_version=major)
    try:
        with cluster:  # stops whatever was started, whatever happens
            cluster.write_configs()
            cluster.etcd.start(30)
            node = cluster.nodes["node1"]
            # no binaries of the data directory's major in the node file (with an entry in
            # postgresql.bin_dirs the agent would run those: the case after a major upgrade)
            doc = yaml.safe_load(node.config_path.read_text())
            doc["postgresql"]["bin_dirs"].pop(other, None)
            node.config_path.write_text(yaml.safe_dump(doc))
            # initdb of the other major, as PostgreSQL's OS user (as the agent would have)
            initdb = pgbuilds.reachable_bin_dir(other, cluster.run_as) / "initdb"
            subprocess.run(
                [str(initdb), "-D", str(node.data_dir), "-U", "postgres", "--auth=trust", "--no-sync"],
                check=True,
                capture_output=True,
                cwd=base_dir,
                timeout=120,
                user=cluster.run_as.uid,
                group=cluster.run_as.gid,
                extra_groups=[] if cluster.run_as.uid is not None else None,
            )
            assert (node.data_dir / "PG_VERSION").read_text().strip() == str(other)
            files_before = sorted(p.name for p in node.data_dir.iterdir())

            agent = cluster.agents["node1"]
            agent.start()
            assert agent.proc is not None
            code = agent.proc.wait(timeout=60)
            log = node.log_path.read_text()
            assert code == 2, log
            assert "Traceback" not in log
            expected = (
                f"{node.config_path}: postgresql.bin_dir: {cluster.bin_dir} is PostgreSQL {major}, but "
                f"postgresql.data_dir {node.data_dir} holds a PostgreSQL {other} cluster (PG_VERSION); "
                f"point bin_dir at PostgreSQL {other} binaries or run a major upgrade"
            )
            assert expected in " ".join(log.split()), log
            # PostgreSQL was never started: no postmaster.pid, no server log, nothing changed
            assert cluster.postmaster_pid("node1") is None
            assert sorted(p.name for p in node.data_dir.iterdir()) == files_before
            assert not (node.data_dir / "log").exists()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_member_reports_its_server_version_on_18() -> None:
    with running_cluster(nodes=1, pg_version=18) as c:
        (version,) = sql(c, "node1", "SHOW server_version_num")[0]
        num = int(version)
        assert num // 10000 == 18
        want = f"18.{num % 10000}"
        api = c.nodes["node1"].api_url

        def published() -> bool:
            (m,) = _get_json(api + "/cluster")["members"]
            return bool(m["server_version"] == want)

        # the member record follows the first probe by at most a loop
        wait_for(published, 15, "server_version in /cluster")
        assert _get_json(api + "/status")["server_version"] == want
        res = subprocess.run(
            [sys.executable, "-m", "hakeeper", "list", "-c", str(c.nodes["node1"].config_path), "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")},
        )
        assert res.returncode == 0, res.stderr
        (row,) = json.loads(res.stdout)["members"]
        assert row["server_version"] == want
        table = subprocess.run(
            [sys.executable, "-m", "hakeeper", "list", "-c", str(c.nodes["node1"].config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert f"PostgreSQL {want})" in table.stdout, table.stdout + table.stderr
