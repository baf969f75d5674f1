"""``query``, ``version``, ``pause/resume --wait`` and ``remove`` against a real cluster, run as
subprocesses the way an operator runs them.  ``remove`` comes last: it ends the cluster (and
shows that agents started again on empty data directories bootstrap a new one)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper import __version__
from hakeeper.dcs.etcd import prefix_range_end
from hakeeper.localcluster import LocalCluster
from tests.support.cluster import etcd_gateway, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as c:
        yield c


def hk(c: LocalCluster, *args: str, node: str = "node1") -> subprocess.CompletedProcess[str]:
    """``hakeeper ARGS -c nodeN/node.yml``, without a terminal on standard input."""
    argv = [sys.executable, "-m", "hakeeper", *args, "-c", str(c.nodes[node].config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    return subprocess.run(argv, input="", capture_output=True, text=True, timeout=120, check=False, env=env)


def ok_json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def node_file(c: LocalCluster) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(Path(c.nodes["node1"].config_path).read_text())
    return doc


def cluster_prefix(c: LocalCluster) -> str:
    cfg = node_file(c)
    return f"{cfg.get('namespace', '/hakeeper')}/{cfg['scope']}/"


def keys_under(c: LocalCluster, prefix: str) -> list[str]:
    """The keys under ``prefix``, read from etcd directly (its JSON gateway, as root)."""
    b64 = base64.b64encode
    ans = etcd_gateway(
        c,
        "/v3/kv/range",
        {"key": b64(prefix.encode()).decode(), "range_end": b64(prefix_range_end(prefix)).decode()},
        user="root",
    )
    return sorted(base64.b64decode(kv["key"]).decode() for kv in ans.get("kvs", []))


def member_records(c: LocalCluster) -> dict[str, dict[str, Any]]:
    prefix = cluster_prefix(c) + "members/"
    b64 = base64.b64encode
    ans = etcd_gateway(
        c,
        "/v3/kv/range",
        {"key": b64(prefix.encode()).decode(), "range_end": b64(prefix_range_end(prefix)).decode()},
        user="root",
    )
    return {
        base64.b64decode(kv["key"]).decode()[len(prefix) :]: json.loads(base64.b64decode(kv["value"]))
        for kv in ans.get("kvs", [])
    }


def system_identifier(c: LocalCluster, name: str) -> int:
    with psycopg.connect(c.dsn(name), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------------- query


def test_query_runs_on_the_role_asked_for(cluster: LocalCluster) -> None:
    primary = cluster.primary()
    assert primary is not None
    on_primary = ok_json(
        hk(cluster, "query", "-r", "primary", "SELECT pg_is_in_recovery() AS r", "-o", "json")
    )
    assert on_primary["member"] == primary and on_primary["role"] == "primary"
    assert on_primary["results"] == [{"columns": ["r"], "rows": [[False]], "status": "SELECT 1"}]
    on_replica = ok_json(hk(cluster, "query", "-r", "replica", "SELECT pg_is_in_recovery()", "-o", "json"))
    assert on_replica["member"] != primary and on_replica["role"] == "replica"
    assert on_replica["results"][0]["rows"] == [[True]]
    # a named member, several statements, and the table output
    other = next(n for n in cluster.nodes if n != primary)
    res = hk(cluster, "query", other, "SELECT 1 AS one; SELECT inet_server_port() AS port")
    assert res.returncode == 0, res.stderr
    assert "one" in res.stdout and str(cluster.nodes[other].pg_port) in res.stdout
    assert other in res.stderr and "replica" in res.stderr


def test_query_from_a_file_on_the_primary_writes(cluster: LocalCluster, tmp_path: Path) -> None:
    sql = tmp_path / "q.sql"
    sql.write_text("CREATE TABLE IF NOT EXISTS admin_verbs (v int); INSERT INTO admin_verbs VALUES (7);\n")
    res = hk(cluster, "query", "--file", str(sql))
    assert res.returncode == 0, res.stderr
    assert "INSERT 0 1" in res.stdout
    doc = ok_json(hk(cluster, "query", "SELECT count(*) FROM admin_verbs WHERE v = 7", "-o", "json"))
    assert doc["results"][0]["rows"][0][0] >= 1


def test_a_sql_error_is_one_line_exit_1(cluster: LocalCluster) -> None:
    res = hk(cluster, "query", "SELECT * FROM no_such_table")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "42P01" in lines[0] and "no_such_table" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    password = node_file(cluster)["postgresql"]["superuser"]["password"]
    assert password not in res.stderr + res.stdout
    bad_user = hk(cluster, "query", "-U", "nobody_here", "SELECT 1")
    assert bad_user.returncode == 1 and "Traceback" not in bad_user.stderr
    assert password not in bad_user.stderr


# --------------------------------------------------------------------------------- version


def test_version_shows_the_server_major_and_every_agent(cluster: LocalCluster) -> None:
    doc = ok_json(hk(cluster, "version", "-o", "json"))
    assert doc["hakeeper"] == __version__
    assert doc["postgresql"]["member"] == "node1"
    assert str(doc["postgresql"]["version"]).split(".")[0] == "15", doc
    assert "running server" in doc["postgresql"]["source"]
    assert doc["agents"] == dict.fromkeys(cluster.nodes, __version__)
    text = hk(cluster, "version")
    assert text.returncode == 0 and "PostgreSQL 15" in text.stdout


# --------------------------------------------------------------------------------- pause --wait


def test_pause_and_resume_wait_until_every_member_follows(cluster: LocalCluster) -> None:
    try:
        doc = ok_json(hk(cluster, "pause", "--wait", "-o", "json"))
        assert doc["paused"] is True and doc["changed"] is True
        assert doc["acknowledged_by"] == sorted(cluster.nodes)
        # the CLI said so: every record in etcd says so, read after it returned
        records = member_records(cluster)
        assert {n: r.get("paused") for n, r in records.items()} == dict.fromkeys(cluster.nodes, True)
        again = ok_json(hk(cluster, "pause", "--wait", "-o", "json"))
        assert again["changed"] is False and again["acknowledged_by"] == sorted(cluster.nodes)
    finally:
        doc = ok_json(hk(cluster, "resume", "--wait", "-o", "json"))
    assert doc["paused"] is False and doc["acknowledged_by"] == sorted(cluster.nodes)
    records = member_records(cluster)
    assert {n: r.get("paused") for n, r in records.items()} == dict.fromkeys(cluster.nodes, False)


# --------------------------------------------------------------------------------- remove (last)


def test_remove_is_refused_while_running_then_wipes_and_a_new_cluster_bootstraps(
    cluster: LocalCluster,
) -> None:
    scope, prefix = node_file(cluster)["scope"], cluster_prefix(cluster)
    before = keys_under(cluster, prefix)
    assert prefix + "initialize" in before and prefix + "leader" in before
    old_sysid = system_identifier(cluster, "node1")

    running = hk(cluster, "remove", scope, "--confirm", scope)
    assert running.returncode == 1 and "refused: the cluster is running" in running.stderr
    assert "Traceback" not in running.stderr
    assert prefix + "initialize" in keys_under(cluster, prefix), "nothing removed"

    for agent in cluster.agents.values():
        agent.stop()
    for name in cluster.nodes:
        assert cluster.postmaster_pid(name) is None, f"{name}'s PostgreSQL still runs"
    left = keys_under(cluster, prefix)
    assert not any("/members/" in k or k.endswith("/leader") for k in left), left

    unconfirmed = hk(cluster, "remove", scope)
    assert unconfirmed.returncode == 1 and "not a terminal" in unconfirmed.stderr
    mistyped = hk(cluster, "remove", scope, "--confirm", scope + "x")
    assert mistyped.returncode == 2 and "not confirmed" in mistyped.stderr
    assert keys_under(cluster, prefix) == left, "nothing removed without the exact scope"

    done = hk(cluster, "remove", scope, "--confirm", scope, "-o", "json")
    doc = ok_json(done)
    assert doc["removed"] == len(left) and doc["prefix"] == prefix
    assert keys_under(cluster, prefix) == []
    nothing = hk(cluster, "remove", scope, "--confirm", scope)
    assert nothing.returncode == 1 and "no key under" in nothing.stderr

    # wipe the data directories (keep the directories: their owner and mode are the harness's)
    for n in cluster.nodes.values():
        for child in Path(n.data_dir).iterdir():
            subprocess.run(["rm", "-rf", "--", str(child)], check=True)
    for agent in cluster.agents.values():
        agent.start()
    cluster.wait_ready(180)
    primary = cluster.primary()
    assert primary is not None
    new_sysid = system_identifier(cluster, primary)
    assert new_sysid != old_sysid, "a new cluster was bootstrapped"
    assert {system_identifier(cluster, n) for n in cluster.nodes} == {new_sysid}
    assert prefix + "initialize" in keys_under(cluster, prefix)
