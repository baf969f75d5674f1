"""`hakeeper reload MEMBER` and SIGHUP re-read the node file, on a real 3-node cluster.

The tests share one cluster and run in file order: the refusals and the SIGHUP reload leave it
as it was; the last test fails the primary over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import yaml

from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import hk_list, sql, wait_for
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as c:
        yield c


def hk_reload(c: LocalCluster, member: str, via: str | None = None) -> subprocess.CompletedProcess[str]:
    """``hakeeper reload MEMBER -c <node file>``, as an operator runs it: with the member's own
    file, or with ``via``'s (the CLI finds etcd and the API through it: a file being edited to
    another scope would lead the CLI elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    cfg = c.nodes[via or member].config_path
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", "reload", member, "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def edit(c: LocalCluster, name: str, change: Callable[[dict[str, Any]], None]) -> str:
    """Apply ``change`` to node ``name``'s YAML file in place; returns the text it had."""
    path = c.nodes[name].config_path
    before = path.read_text()
    doc = yaml.safe_load(before)
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # same file: mode and owner stay
    return before


def restore(c: LocalCluster, name: str, text: str) -> None:
    c.nodes[name].config_path.write_text(text)


def show(c: LocalCluster, name: str, parameter: str) -> str:
    return str(sql(c, name, f"SHOW {parameter}")[0][0])


def tags_of(c: LocalCluster, name: str) -> dict[str, Any]:
    members = {m["name"]: m for m in hk_list(c)["members"]}
    tags: dict[str, Any] = members[name]["tags"]
    return tags


def replicas(c: LocalCluster) -> list[str]:
    primary = c.primary()
    assert primary is not None
    return [n for n in c.names if n != primary]


def test_a_change_only_a_restart_applies_is_refused_and_nothing_of_the_file_is_applied(
    cluster: LocalCluster,
) -> None:
    c = cluster
    c.wait_ready(120)
    rep = replicas(c)[0]
    via = next(n for n in c.names if n != rep)
    work_mem = show(c, rep, "work_mem")
    assert work_mem != "7MB"

    def scope_and_more(doc: dict[str, Any]) -> None:
        doc["scope"] = "another-cluster"
        doc["tags"] = {"nofailover": True}
        doc["postgresql"]["parameters"]["work_mem"] = "7MB"

    def data_dir_and_more(doc: dict[str, Any]) -> None:
        doc["postgresql"]["data_dir"] = doc["postgresql"]["data_dir"] + "-moved"
        doc["tags"] = {"nofailover": True}
        doc["postgresql"]["parameters"]["work_mem"] = "7MB"

    for change, field in ((scope_and_more, "scope"), (data_dir_and_more, "postgresql.data_dir")):
        before = edit(c, rep, change)
        try:
            res = hk_reload(c, rep, via)
        finally:
            restore(c, rep, before)
        assert res.returncode == 1, res.stdout
        assert f"{field} cannot change at run time" in res.stderr
        assert "nothing was changed" in res.stderr
        # all or nothing: neither the tag nor the parameter of that file was applied
        assert show(c, rep, "work_mem") == work_mem
        assert tags_of(c, rep)["nofailover"] is False
    assert '"reload_refused"' in c.tail_log(rep, 200)

    # an invalid file: refused with its file and field, the agent runs on unchanged
    before = edit(c, rep, lambda doc: doc.update(tags={"nofailover": "maybe"}))
    try:
        res = hk_reload(c, rep, via)
    finally:
        restore(c, rep, before)
    assert res.returncode == 1
    assert "HTTP 400" in res.stderr and str(c.nodes[rep].config_path) in res.stderr
    assert "tags.nofailover" in res.stderr
    assert c.agents[rep].returncode is None

    # the file as it was: nothing to change
    res = hk_reload(c, rep)
    assert res.returncode == 0, res.stderr
    assert "no change in the node file" in res.stdout and "PostgreSQL reloaded" in res.stdout


def test_sighup_applies_a_changed_parameter_without_restarting_postgres(cluster: LocalCluster) -> None:
    c = cluster
    c.wait_ready(120)
    rep = replicas(c)[0]
    agent_pid = c.agents[rep].pid
    assert agent_pid is not None
    postmaster = c.postmaster_pid(rep)
    assert postmaster is not None
    assert show(c, rep, "work_mem") != "12MB"

    def params(doc: dict[str, Any]) -> None:
        doc["postgresql"]["parameters"]["work_mem"] = "12MB"
        doc["postgresql"]["parameters"]["shared_buffers"] = "48MB"  # only a restart applies it

    before = edit(c, rep, params)
    try:
        os.kill(agent_pid, signal.SIGHUP)
        wait_for(lambda: show(c, rep, "work_mem") == "12MB", 20, "work_mem from the node file")
        pending = sql(c, rep, "SELECT pending_restart FROM pg_settings WHERE name = 'shared_buffers'")
        assert pending == [(True,)]
        assert show(c, rep, "shared_buffers") == "64MB"  # written, not applied by a restart
        log = c.tail_log(rep, 200)
        assert '"reload_done"' in log and "postgresql.parameters.work_mem" in log
        assert c.agents[rep].returncode is None and c.agents[rep].pid == agent_pid
        assert c.postmaster_pid(rep) == postmaster
    finally:
        restore(c, rep, before)
        os.kill(agent_pid, signal.SIGHUP)
    wait_for(lambda: show(c, rep, "work_mem") != "12MB", 20, "work_mem back from the node file")
    wait_for(
        lambda: (
            sql(c, rep, "SELECT pending_restart FROM pg_settings WHERE name = 'shared_buffers'") == [(False,)]
        ),
        20,
        "shared_buffers no longer pending",
    )
    assert c.postmaster_pid(rep) == postmaster and c.agents[rep].returncode is None


def in_recovery(c: LocalCluster, name: str) -> bool:
    """Asked of the node itself: an unreachable node fails the test instead of passing it."""
    return bool(sql(c, name, "SELECT pg_is_in_recovery()")[0][0])


def test_reload_of_nofailover_keeps_that_replica_from_being_promoted(cluster: LocalCluster) -> None:
    c = cluster
    c.wait_ready(120)
    old = c.primary()
    assert old is not None
    keep, other = replicas(c)
    assert tags_of(c, keep)["nofailover"] is False
    edit(c, keep, lambda doc: doc.update(tags={"nofailover": True}))
    res = hk_reload(c, keep)
    assert res.returncode == 0, res.stderr
    assert "reloaded: tags.nofailover false -> true" in res.stdout
    assert tags_of(c, keep)["nofailover"] is True  # published before the answer

    sql(c, old, "CREATE TABLE reload_probe (v int)")
    wait_for(
        lambda: all(sql(c, n, "SELECT to_regclass('reload_probe') IS NOT NULL")[0][0] for n in (keep, other)),
        30,
        "both replicas replayed the table",
    )
    c.agents[old].kill()
    c.kill_postgres(old)

    def promoted() -> str | None:
        for n in (keep, other):
            try:
                if not in_recovery(c, n):
                    return n
            except psycopg.Error:
                pass
        return None

    new = wait_for(promoted, 60, "a new primary")
    assert new == other
    assert in_recovery(c, keep) is True
    sql(c, new, "INSERT INTO reload_probe VALUES (1)")
    members = {m["name"]: m for m in hk_list(c)["members"]}
    assert hk_list(c)["leader"] == other
    assert members[keep]["tags"]["nofailover"] is True
