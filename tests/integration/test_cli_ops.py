"""The operations CLI against a real cluster, run as subprocesses the way an operator runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper.localcluster import LocalCluster
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as c:
        yield c


def hk(
    c: LocalCluster,
    *args: str,
    node: str = "node1",
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``hakeeper ARGS -c nodeN/node.yml`` (``-c`` omitted when ARGS has --etcd)."""
    argv = [sys.executable, "-m", "hakeeper", *args]
    if "--etcd" not in args:
        argv += ["-c", str(c.nodes[node].config_path)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    if "--etcd" in args:
        full_env.update(c.etcd_env())  # the etcd's CA, client certificate and user
    full_env.update(env or {})
    return subprocess.run(
        argv,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=full_env,
    )


def listed(c: LocalCluster) -> dict[str, Any]:
    res = hk(c, "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def api_has_operations(c: LocalCluster) -> bool:
    """The agents' API answers the mutating endpoints (401 without credentials)."""
    req = urllib.request.Request(c.nodes["node1"].api_url + "/switchover", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=3):
            return True
    except urllib.error.HTTPError as e:
        return e.code not in (404, 405)
    except OSError:
        return False


@pytest.fixture
def api(cluster: LocalCluster) -> LocalCluster:
    assert api_has_operations(cluster), "the agents' API must offer the mutating endpoints"
    return cluster


def assert_clean_error(res: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    for w in words:
        assert w in res.stderr, res.stderr


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def table_row(table: str, first_cell: str) -> str:
    """The line of a rendered table whose first cell is ``first_cell`` (AssertionError if none)."""
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"[\u2502|]", line.strip().strip("\u2502|"))]
        if cells and cells[0] == first_cell:
            return line
    raise AssertionError(f"no row for {first_cell!r} in:\n{table}")


def sql_one(c: LocalCluster, name: str, query: str) -> Any:
    with psycopg.connect(c.dsn(name), connect_timeout=3, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_list_json_and_yaml(cluster: LocalCluster) -> None:
    # Members publish their state once per loop_wait at most: give the records a moment after
    # the cluster became ready (SQL-visible) to say so too.
    wait_for(
        lambda: sorted(m["role"] for m in listed(cluster)["members"]) == ["primary", "replica", "replica"],
        15,
        "list shows 1 primary + 2 replicas",
    )
    doc = listed(cluster)
    primary = cluster.primary()
    assert primary is not None
    assert doc["leader"] == primary
    assert doc["paused"] is False
    assert doc["switchover"] is None
    assert {m["name"] for m in doc["members"]} == set(cluster.names)
    roles = {m["name"]: m["role"] for m in doc["members"]}
    assert roles[primary] == "primary"
    assert sorted(roles.values()) == ["primary", "replica", "replica"]

    res = hk(cluster, "list", "-o", "yaml")
    assert res.returncode == 0, res.stderr
    ydoc = yaml.safe_load(res.stdout)
    assert ydoc["leader"] == primary
    assert len(ydoc["members"]) == 3

    # The same through --etcd/--scope instead of -c.
    res = hk(cluster, "list", "-o", "json", "--etcd", cluster.etcd.url, "--scope", cluster.scope)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["leader"] == primary

    # The table: the primary's own row (not the title, which names the leader too) gives its
    # role and the leader note; each replica's row says replica.
    res = hk(cluster, "list")
    assert res.returncode == 0, res.stderr
    for name in cluster.names:
        row = table_row(res.stdout, name)
        if name == primary:
            assert "primary" in row and "leader" in row, row
        else:
            assert "replica" in row and "leader" not in row, row


def test_list_watch_refreshes_and_ctrl_c_exits_0(cluster: LocalCluster) -> None:
    argv = [sys.executable, "-m", "hakeeper", "list", "-o", "json", "--watch", "0.3"]
    argv += ["-c", str(cluster.nodes["node1"].config_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(json.loads(line)["leader"] for line in lines)
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        rc = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0


def test_history_and_show_config(cluster: LocalCluster) -> None:
    # A freshly bootstrapped cluster (timeline 1) has had no promotion: its history is the one
    # bootstrap entry naming the primary; test_switchover_moves_the_primary checks the entry a
    # promotion adds.
    res = hk(cluster, "history", "-o", "json")
    assert res.returncode == 0, res.stderr
    primary = cluster.primary()
    assert primary is not None
    assert sql_one(cluster, primary, "SELECT timeline_id FROM pg_control_checkpoint()") == 1
    (entry,) = json.loads(res.stdout)
    assert (entry["timeline"], entry["reason"], entry["old_leader"], entry["new_leader"], entry["lsn"]) == (
        1,
        "bootstrap",
        None,
        primary,
        None,
    )
    assert time.time() - 3600 < entry["time"] <= time.time()
    res = hk(cluster, "show-config")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["ttl"] == 5
    res = hk(cluster, "show-config", "-o", "json")
    doc = json.loads(res.stdout)
    assert doc["config"]["ttl"] == 5 and doc["revision"] > 0


def test_dsn_connects(cluster: LocalCluster) -> None:
    primary = cluster.primary()
    assert primary is not None
    env = {**os.environ, "PGPASSWORD": cluster.superuser_password}
    res = hk(cluster, "dsn")
    assert res.returncode == 0, res.stderr
    with psycopg.connect(res.stdout.strip(), password=env["PGPASSWORD"], connect_timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert row == (False, cluster.nodes[primary].pg_port)

    res = hk(cluster, "dsn", "--role", "replica", "-o", "json")
    doc = json.loads(res.stdout)
    with psycopg.connect(doc["dsn"], password=env["PGPASSWORD"], connect_timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row == (True,)
    assert doc["members"][0] != primary

    res = hk(cluster, "dsn", "--multi-host")
    assert "target_session_attrs=read-write" in res.stdout
    with psycopg.connect(res.stdout.strip(), password=env["PGPASSWORD"], connect_timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row == (False,)

    assert_clean_error(hk(cluster, "dsn", "--member", "nosuch"), 1, "nosuch", "not a member")


def test_refusals_are_one_line(cluster: LocalCluster) -> None:
    assert_clean_error(
        hk(cluster, "switchover", "--candidate", "nosuch", "--force"), 1, "candidate 'nosuch' is not a member"
    )
    primary = cluster.primary()
    assert primary is not None
    assert_clean_error(hk(cluster, "switchover", "--candidate", primary, "--force"), 1, "already the leader")
    assert_clean_error(hk(cluster, "failover", "--candidate", "nosuch", "--force"), 1, "not a member")
    assert_clean_error(hk(cluster, "restart", "nosuch", "--force"), 1, "not a member")
    # No terminal and no --force: refuse without asking.
    other = next(n for n in cluster.names if n != primary)
    assert_clean_error(hk(cluster, "switchover", "--candidate", other), 1, "--force")
    # Usage errors: exit 2.
    assert_clean_error(hk(cluster, "edit-config", "--set", "loop_wait", "--force"), 2, "key.path=value")
    assert_clean_error(hk(cluster, "list", "-o", "xml"), 2, "unknown output format")
    assert_clean_error(hk(cluster, "switchover", "--scheduled", "someday", "--force"), 2, "ISO 8601")
    # Unreachable etcd.
    assert_clean_error(
        hk(cluster, "list", "--etcd", "http://127.0.0.1:9", "--scope", "x"), 1, "cannot read the cluster"
    )


def test_bad_credentials_are_refused(api: LocalCluster) -> None:
    res = hk(api, "pause", "--token", "wrong-token")
    assert_clean_error(res, 1, "not authenticated")
    assert listed(api)["paused"] is False


def test_pause_resume_visible_in_list(api: LocalCluster) -> None:
    res = hk(api, "pause")
    assert res.returncode == 0, res.stderr
    assert "paused" in res.stdout
    assert listed(api)["paused"] is True
    table = hk(api, "list").stdout
    assert "paused" in table
    res = hk(api, "pause", "-o", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["changed"] is False
    # Credentials from the environment instead of the YAML file.
    token = yaml.safe_load(api.nodes["node1"].config_path.read_text())["api"]["token"]
    etcd_args = ["--etcd", api.etcd.url, "--scope", api.scope]
    # Without a node file no member API URL from etcd is trusted: refused, nothing sent.
    res = hk(api, "resume", *etcd_args, env={"HAKEEPER_API_TOKEN": token})
    assert_clean_error(res, 1, "--api-url")
    assert listed(api)["paused"] is True
    # The members' API URLs given explicitly.
    urls = [f"--api-url={n.api_url}" for n in api.nodes.values()]
    res = hk(api, "resume", *etcd_args, *urls, env={"HAKEEPER_API_TOKEN": token})
    assert res.returncode == 0, res.stderr
    assert listed(api)["paused"] is False


def test_scheduled_switchover_then_cancel(api: LocalCluster) -> None:
    import datetime as dt

    leader = listed(api)["leader"]
    cand = next(n for n in api.names if n != leader)
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    res = hk(api, "switchover", "--candidate", cand, "--scheduled", when, "--force", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == 202
    pending = listed(api)["switchover"]
    assert pending is not None and pending["candidate"] == cand and pending["scheduled_at"]
    assert "switchover" in hk(api, "list").stdout
    # A second request is refused while this one is pending.
    assert_clean_error(hk(api, "switchover", "--candidate", cand, "--force"), 1, "already pending")
    res = hk(api, "switchover", "--cancel")
    assert res.returncode == 0, res.stderr
    assert listed(api)["switchover"] is None
    assert listed(api)["leader"] == leader
    assert_clean_error(hk(api, "switchover", "--cancel"), 1, "no switchover")


def test_edit_config_set_then_show_config(api: LocalCluster) -> None:
    res = hk(api, "edit-config", "--set", "loop_wait=2", "--pg", "work_mem=8MB", "--force")
    assert res.returncode == 0, res.stderr
    assert "+loop_wait: 2" in res.stdout and "configuration updated" in res.stdout
    shown = yaml.safe_load(hk(api, "show-config").stdout)
    assert shown["loop_wait"] == 2
    assert shown["postgresql"]["parameters"]["work_mem"] == "8MB"
    # Same value again: nothing to do.
    res = hk(api, "edit-config", "--set", "loop_wait=2", "--force")
    assert res.returncode == 0 and "no changes" in res.stdout
    # Invalid value: refused locally, nothing written.
    res = hk(api, "edit-config", "--set", "ttl=1", "--force")
    assert_clean_error(res, 1, "invalid")
    # --apply from stdin, deleting the parameter and restoring loop_wait.
    res = hk(
        api,
        "edit-config",
        "--apply",
        "-",
        "--force",
        stdin="loop_wait: 1.0\npostgresql:\n  parameters:\n    work_mem: null\n",
    )
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(hk(api, "show-config").stdout)
    assert shown["loop_wait"] == 1.0 and "work_mem" not in shown["postgresql"]["parameters"]
    # Without --force and without a terminal: refused, nothing written.
    res = hk(api, "edit-config", "--set", "loop_wait=3")
    assert_clean_error(res, 1, "--force")
    assert yaml.safe_load(hk(api, "show-config").stdout)["loop_wait"] == 1.0


def test_edit_config_with_editor(api: LocalCluster, tmp_path: Any) -> None:
    editor = tmp_path / "ed.sh"
    editor.write_text(
        "#!/bin/sh\nsed -i 's/^maximum_lag_on_failover: .*/maximum_lag_on_failover: 2097152/' \"$1\"\n"
    )
    editor.chmod(0o755)
    res = hk(api, "edit-config", "--force", env={"EDITOR": str(editor)})
    assert res.returncode == 0, res.stderr
    assert "+maximum_lag_on_failover: 2097152" in res.stdout
    assert yaml.safe_load(hk(api, "show-config").stdout)["maximum_lag_on_failover"] == 2097152


def test_switchover_moves_the_primary(api: LocalCluster) -> None:
    api.wait_ready(120)
    old = listed(api)["leader"]
    new = next(n for n in api.names if n != old)
    res = hk(api, "switchover", "--candidate", new, "--force", node=new)
    assert res.returncode == 0, res.stderr + res.stdout
    assert new in res.stdout
    doc = listed(api)
    assert doc["leader"] == new
    roles = {m["name"]: m["role"] for m in doc["members"]}
    assert roles[new] == "primary"
    wait_for(lambda: api.primary() == new, 30, "the new leader's PostgreSQL is not writable")
    hist = json.loads(hk(api, "history", "-o", "json").stdout)
    assert hist and hist[-1]["new_leader"] == new
    assert hist[-1]["old_leader"] == old and hist[-1]["reason"] == f"switchover from {old}"
    assert hist[-1]["timeline"] == sql_one(api, new, "SELECT timeline_id FROM pg_control_checkpoint()")
    table = hk(api, "history").stdout
    assert f"switchover from {old}" in table and table_row(table, str(hist[-1]["timeline"]))
    # --leader that is not the leader: refused.
    assert_clean_error(hk(api, "switchover", "--leader", old, "--force"), 1, f"the leader is {new}")


def test_failover_to_a_replica(api: LocalCluster) -> None:
    api.wait_ready(120)
    old = listed(api)["leader"]
    cand = next(n for n in sorted(api.names) if n != old)
    res = hk(api, "failover", "--candidate", cand, "--force", "-o", "json")
    assert res.returncode == 0, res.stderr + res.stdout
    assert json.loads(res.stdout)["leader"] == cand
    assert listed(api)["leader"] == cand
    api.wait_ready(120)


def test_reload_and_restart_a_replica(api: LocalCluster) -> None:
    api.wait_ready(120)
    leader = listed(api)["leader"]
    replica = next(n for n in api.names if n != leader)
    res = hk(api, "reload", replica)
    assert res.returncode == 0, res.stderr
    assert "no change in the node file. PostgreSQL reloaded." in res.stdout  # re-read, unchanged
    res = hk(api, "restart", replica, "--force")
    assert res.returncode == 0, res.stderr
    api.wait_ready(120)
