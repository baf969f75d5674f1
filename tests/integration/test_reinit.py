"""Reinitializing a replica on a real cluster: the agent answers at once with a handle, runs the
re-clone in the background, refuses a second one and requests meant for another member, and the
job succeeds only once the new copy streams from the leader (`hakeeper reinit --wait` exits 0)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster
from tests.integration.test_api import bearer, call
from tests.integration.test_cli_ops import hk
from tests.support.cluster import running_cluster

pytestmark = pytest.mark.integration

MARKER = "reinit-marker"  # a file only the old copy of the data directory has


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as c:
        yield c


def sql(c: LocalCluster, name: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(name), connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def has_row(c: LocalCluster, name: str, v: int) -> bool:
    try:
        return bool(sql(c, name, f"SELECT 1 FROM reinit_rows WHERE v = {v}"))
    except psycopg.Error:
        return False


def streaming_from_leader(c: LocalCluster, name: str) -> bool:
    try:
        rows = sql(c, name, "SELECT status FROM pg_stat_wal_receiver")
    except psycopg.Error:
        return False
    return rows == [("streaming",)]


def plant_marker(c: LocalCluster, name: str) -> None:
    marker = c.nodes[name].data_dir / MARKER
    marker.write_text("the old copy\n")
    assert marker.exists()


def test_reinit_replaces_the_copy_refuses_a_second_one_and_misdirected_requests(
    cluster: LocalCluster,
) -> None:
    c = cluster
    prim = c.primary()
    assert prim is not None
    rep, other = sorted(n for n in c.names if n != prim)
    sql(c, prim, "CREATE TABLE IF NOT EXISTS reinit_rows (v int)")
    sql(c, prim, "INSERT INTO reinit_rows VALUES (1)")
    wait_for(lambda: has_row(c, rep, 1), 30, "row 1 replicated")
    plant_marker(c, rep)
    pid = c.postmaster_pid(rep)
    url = c.nodes[rep].api_url

    # Meant for another member: refused by rep's agent, nothing done there.
    a = call(url + "/reinitialize", "POST", {"member": other}, bearer(c))
    assert (
        a.status == 421 and a.json()["error"] == f"misdirected: this is {rep}, not {other}; nothing was done"
    )
    assert c.postmaster_pid(rep) == pid and (c.nodes[rep].data_dir / MARKER).exists()
    assert call(url + "/reinitialize").status == 404  # no job was started

    # Accepted at once with a handle; a second request while it runs is refused with it.
    t0 = time.monotonic()
    a = call(url + "/reinitialize", "POST", {"member": rep}, bearer(c))
    answered_in = time.monotonic() - t0
    assert a.status == 202, a.body
    job = a.json()
    assert job["state"] == "running" and job["member"] == rep and job["source"] == prim
    assert a.headers["Location"] == f"/reinitialize/{job['id']}"
    b = call(url + "/reinitialize", "POST", {"member": rep}, bearer(c))
    assert b.status == 409 and b.json()["reinitialize"]["id"] == job["id"], b.body
    assert "already running" in b.json()["error"]

    # Rows written while it runs reach the new copy too.
    sql(c, prim, "INSERT INTO reinit_rows VALUES (2)")

    def finished() -> bool:
        st = call(url + f"/reinitialize/{job['id']}").json()
        return bool(st["state"] != "running")

    wait_for(finished, 120, "reinitialize finished")
    st = call(url + "/reinitialize").json()
    assert st["id"] == job["id"] and st["state"] == "succeeded" and st["error"] is None, st
    assert st["phase"] == "streaming" and st["finished_at"] and st["bytes_copied"] > 1_000_000
    # Succeeded means: the new copy streams from the leader.
    assert streaming_from_leader(c, rep)
    assert not (c.nodes[rep].data_dir / MARKER).exists()  # the old copy is gone
    assert c.postmaster_pid(rep) != pid
    sql(c, prim, "INSERT INTO reinit_rows VALUES (3)")
    for v in (1, 2, 3):
        wait_for(lambda v=v: has_row(c, rep, v), 30, f"row {v} on the new copy")
    log = c.tail_log(rep, 400)
    assert "reinitialize_started" in log and "reinitialize_succeeded" in log
    print(f"reinitialize accepted in {answered_in:.2f}s")
    assert answered_in < 10  # the clone is not in the request


def test_reinit_wait_via_the_cli_exits_0_once_it_streams(cluster: LocalCluster) -> None:
    c = cluster
    c.wait_ready(120)
    prim = c.primary()
    assert prim is not None
    rep = sorted(n for n in c.names if n != prim)[-1]
    plant_marker(c, rep)

    res = hk(c, "reinit", rep, "--force", "--wait", node=rep)

    assert res.returncode == 0, res.stdout + res.stderr
    assert f"of {rep}: succeeded, streaming from {prim}" in res.stdout
    assert "Traceback" not in res.stderr
    assert streaming_from_leader(c, rep) and not (c.nodes[rep].data_dir / MARKER).exists()
    res = hk(c, "reinit", rep, "--status", "-o", "json", node=rep)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "succeeded"
    # The leader is refused, and nothing runs there.
    res = hk(c, "reinit", prim, "--force", node=prim)
    assert res.returncode == 1 and "leader" in res.stderr and "Traceback" not in res.stderr
