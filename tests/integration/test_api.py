"""The agent HTTP API on real clusters: health checks, status, authentication, operations,
idle/slow connections, TLS with client certificates."""

from __future__ import annotations

import base64
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from hakeeper.localcluster import LocalCluster
from tests.integration.test_ha import sql, wait_for
from tests.support.cluster import cluster_tmpdir, free_base_port

pytestmark = pytest.mark.integration

ALLOWLISTED = "node3"  # its API only accepts mutating requests from 192.0.2.0/24


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 90,
) -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = dict(headers or {})
    if data is not None or method not in ("GET", "HEAD"):
        hdrs.setdefault("Content-Type", "application/json")  # what mutating endpoints require
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return Answer(r.status, dict(r.headers.items()), r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, dict(e.headers.items()), e.read())


def bearer(c: LocalCluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {c.api_token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class ApiTestCluster(LocalCluster):
    """LocalCluster whose nodes get extra ``api`` settings."""

    api_overrides: dict[str, dict[str, Any]] = {}

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        cfg["api"].update(self.api_overrides.get(name, {}))
        return cfg


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    base = cluster_tmpdir()
    c = ApiTestCluster(
        base,
        nodes=3,
        base_port=free_base_port(3),
        tags={ALLOWLISTED: {"nosync": True, "failover_priority": 2}},
    )
    c.api_overrides = {ALLOWLISTED: {"allowlist": ["192.0.2.0/24"]}}
    try:
        with c:
            c.start()
            c.wait_ready(180)
            yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def roles(c: LocalCluster) -> dict[str, tuple[int, int]]:
    """(status of /primary, status of /replica) per node."""
    return {
        n: (call(s.api_url + "/primary").status, call(s.api_url + "/replica").status)
        for n, s in c.nodes.items()
    }


def api_primary(c: LocalCluster, timeout: float = 60) -> str:
    """The one node answering 200 on /primary while every other answers 200 on /replica."""

    def settled() -> str | None:
        r = roles(c)
        prim = [n for n, (p, _) in r.items() if p == 200]
        reps = [n for n, (p, rep) in r.items() if p == 503 and rep == 200]
        return prim[0] if len(prim) == 1 and len(reps) == len(r) - 1 else None

    return str(wait_for(settled, timeout, "one /primary, the rest /replica"))


def replicas(c: LocalCluster, primary: str) -> list[str]:
    return [n for n in c.names if n != primary]


# -- health checks ----------------------------------------------------------------------------------


def test_exactly_one_primary_and_the_others_replicas(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    # a replica's lag is known once it has published a record while streaming (<= loop_wait)
    wait_for(
        lambda: all(call(s.api_url + "/readiness").status == 200 for s in c.nodes.values()),
        15,
        "every node ready",
    )
    for name, spec in c.nodes.items():
        want = 200 if name == prim else 503
        for path in ("/primary", "/leader", "/read-write"):
            a = call(spec.api_url + path)
            assert a.status == want, (name, path, a.body)
            assert a.headers["Content-Type"].startswith("application/json")
            assert a.json()["name"] == name
        head = call(spec.api_url + "/primary", "HEAD")
        assert head.status == want and head.body == b""
        head = call(spec.api_url + "/replica", "HEAD")
        assert head.status == (503 if name == prim else 200) and head.body == b""
        assert call(spec.api_url + "/health").status == 200
        assert call(spec.api_url + "/liveness").status == 200
        assert call(spec.api_url + "/readiness").status == 200
        assert call(spec.api_url + "/read-only").status == 200
        assert call(spec.api_url + "/async").status == (503 if name == prim else 200)
        sync = call(spec.api_url + "/sync")
        assert sync.status == 503 and "no synchronous standbys" in sync.json()["reason"]
        assert call(spec.api_url + "/synchronous").status == 503


def test_replica_lag_and_tag_filters(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    rep = next(n for n in replicas(c, prim) if n != ALLOWLISTED)
    url = c.nodes[rep].api_url
    wait_for(lambda: call(url + "/replica?lag=0").status == 200, 30, "replica caught up")
    assert call(url + "/replica?lag=1GB").status == 200
    assert call(url + "/replica?lag=16MB").status == 200
    assert call(url + "/async?lag=1048576").status == 200
    assert call(url + "/readiness?lag=1kB").status == 200
    assert call(url + "/replica?tag_nofailover=false&tag_noloadbalance=false").status == 200
    no = call(url + "/replica?tag_nofailover=true")
    assert no.status == 503 and "nofailover" in no.json()["reason"]
    tagged = c.nodes[ALLOWLISTED].api_url
    if ALLOWLISTED != prim:
        assert call(tagged + "/replica?tag_nosync=true&tag_failover_priority=2").status == 200
        assert call(tagged + "/replica?tag_nosync=false").status == 503
        assert call(tagged + "/replica?tag_failover_priority=1").status == 503
    for bad in ("lag=abc", "lag=-1", "lag=", "tag_color=red", "tag_nosync=maybe", "color=red", "lag=1&lag=2"):
        a = call(url + "/replica?" + bad)
        assert a.status == 400, (bad, a.body)
        assert "error" in a.json()
    assert call(url + "/health?lag=1").status == 400
    assert call(url + "/readiness?tag_nosync=true").status == 400


# -- status documents ----------------------------------------------------------------------------------


def test_status_cluster_history_config_and_openapi(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    rep = replicas(c, prim)[0]
    st = call(c.nodes[rep].api_url + "/status").json()
    assert st["name"] == rep and st["role"] == "replica" and st["leader"] == prim
    assert st["state"] == "streaming" and st["last_decision"]["action"]
    assert st["wal_lsn"] and "/" in st["wal_lsn"] and st["version"]
    assert call(c.nodes[rep].api_url + "/").json()["name"] == rep
    pst = call(c.nodes[prim].api_url + "/status").json()
    assert pst["role"] == "primary" and pst["writable"] and pst["lease_remaining"] > 0

    cl = call(c.nodes[rep].api_url + "/cluster").json()
    assert cl["leader"] == prim and cl["scope"] == c.scope and cl["paused"] is False
    assert [m["name"] for m in cl["members"]] == sorted(c.names)
    by = {m["name"]: m for m in cl["members"]}
    assert by[prim]["leader"] and by[prim]["role"] == "primary"
    assert all(m["lag_seconds"] is None for m in cl["members"])  # only the primary knows them
    assert by[ALLOWLISTED]["tags"]["nosync"] is True
    assert all(m["api_url"].startswith("http://127.0.0.1:") for m in cl["members"])

    def primary_sees_lag_seconds() -> bool:
        ms = call(c.nodes[prim].api_url + "/cluster").json()["members"]
        return all(m["lag_seconds"] is not None for m in ms if m["name"] != prim)

    # replay_lag in pg_stat_replication is NULL until a replica replayed something; make WAL.
    sql(c, prim, "CREATE TABLE IF NOT EXISTS api_touch (i int); INSERT INTO api_touch VALUES (1)")
    wait_for(primary_sees_lag_seconds, 30, "lag_seconds from the primary")

    hist = call(c.nodes[rep].api_url + "/history").json()["history"]
    assert hist and hist[0]["reason"] and hist[-1]["new_leader"]
    cfg = call(c.nodes[rep].api_url + "/config")
    assert cfg.status == 200 and cfg.json()["config"]["ttl"] > 0
    assert cfg.headers["ETag"] == f'"{cfg.json()["revision"]}"'
    spec = call(c.nodes[rep].api_url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/switchover" in spec["paths"]
    assert call(c.nodes[rep].api_url + "/openapi.yaml").body.startswith(b"#")


def test_metrics(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    a = call(c.nodes[prim].api_url + "/metrics")
    assert a.status == 200 and a.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = a.body.decode()
    for name in (
        "hakeeper_primary 1.0",
        "hakeeper_replica 0.0",
        "hakeeper_postgres_running 1.0",
        "hakeeper_timeline",
        "hakeeper_lease_remaining_seconds",
        "hakeeper_paused",
        "hakeeper_replica_lag_bytes",
        "hakeeper_ha_loop_duration_seconds_bucket",
        "hakeeper_etcd_request_duration_seconds",
        "hakeeper_decisions_total",
    ):
        assert name in text, name


def test_unknown_path_and_wrong_method_are_json(cluster: LocalCluster) -> None:
    url = cluster.nodes["node1"].api_url
    a = call(url + "/nope")
    assert a.status == 404 and a.json()["error"]
    a = call(url + "/primary", "POST", {})
    assert a.status == 405 and a.json()["error"] and "GET" in a.headers["Allow"]
    a = call(url + "/switchover", "PUT", {}, bearer(cluster))
    assert a.status == 405


# -- authentication --------------------------------------------------------------------------------------


def test_mutating_endpoints_need_valid_credentials(cluster: LocalCluster) -> None:
    c = cluster
    url = c.nodes["node1"].api_url
    for path in ("/switchover", "/failover", "/restart", "/reinitialize", "/reload"):
        a = call(url + path, "POST", {})
        assert a.status == 401, path
        assert "Bearer" in a.headers["WWW-Authenticate"] and "Basic" in a.headers["WWW-Authenticate"]
        assert a.json()["error"] == "authentication required"
    assert call(url + "/switchover", "DELETE").status == 401
    assert call(url + "/config", "PATCH", {"pause": True}).status == 401
    assert call(url + "/switchover", "POST", {}, {"Authorization": "Bearer wrong"}).status == 401
    assert call(url + "/switchover", "POST", {}, basic("hakeeper", "wrong")).status == 401
    assert call(url + "/switchover", "POST", {}, basic("someone", c.api_password)).status == 401
    assert call(url + "/switchover", "POST", {}, {"Authorization": "Basic !!!"}).status == 401
    assert call(url + "/switchover", "POST", {}, {"Authorization": "Digest x"}).status == 401
    # From outside the allowlist, even the right token is refused.
    a = call(c.nodes[ALLOWLISTED].api_url + "/switchover", "POST", {}, bearer(c))
    assert a.status == 403 and "allowlist" in a.json()["error"]
    # GETs stay open there.
    assert call(c.nodes[ALLOWLISTED].api_url + "/cluster").status == 200
    # Authenticated but malformed requests are 400s, never 5xx.
    auth = bearer(c)
    for raw in (
        b"{",
        b"[]",
        b'"x"',
        b'{"candidate": 1}',
        b'{"colour": "red"}',
        b'{"scheduled_at": "tomorrow"}',
    ):
        a = call(url + "/switchover", "POST", headers=auth, raw=raw)
        assert a.status == 400, (raw, a.body)
        assert a.json()["error"]
    a = call(url + "/switchover", "POST", {"scheduled_at": "2030-01-01T00:00:00"}, auth)  # no timezone
    assert a.status == 400 and a.json()["errors"][0]["field"] == "scheduled_at"
    assert call(url + "/failover", "POST", {}, auth).status == 400  # candidate is required
    assert call(url + "/failover", "POST", {"candidate": "x", "allow_data_loss": "yes"}, auth).status == 400
    # The old field is refused, not read as something else (it accepted data loss before).
    a = call(url + "/failover", "POST", {"candidate": "x", "force": True}, auth)
    assert a.status == 400 and a.json()["errors"][0] == {"field": "force", "message": "unknown field"}
    assert call(url + "/reload", "POST", {"member": "node1", "now": True}, auth).status == 400
    for path in ("/restart", "/reinitialize", "/reload"):  # the member meant is required
        a = call(url + path, "POST", {}, auth)
        assert a.status == 400 and a.json()["errors"][0]["field"] == "member", (path, a.body)
    a = call(url + "/failover", "POST", {"candidate": "nobody"}, auth)
    assert a.status == 412 and "not a member" in a.json()["error"]
    a = call(url + "/switchover", "POST", headers=auth, raw=b"{" + b" " * 70000 + b"}")
    assert a.status == 413


# -- operations -------------------------------------------------------------------------------------------


def test_switchover_with_token_moves_the_leader(cluster: LocalCluster) -> None:
    c = cluster
    old = api_primary(c)
    cand = next(n for n in replicas(c, old) if n != ALLOWLISTED)
    ask = next(n for n in c.names if n != ALLOWLISTED)
    t0 = time.monotonic()
    a = call(c.nodes[ask].api_url + "/switchover", "POST", {"leader": old, "candidate": cand}, bearer(c))
    assert a.status == 200, a.body
    assert a.json() == {"message": f"switched over to {cand}", "leader": cand}
    assert time.monotonic() - t0 < 30
    other = next(n for n in c.names if n not in (old, cand))
    wait_for(lambda: call(c.nodes[other].api_url + "/cluster").json()["leader"] == cand, 10, "seen elsewhere")
    assert api_primary(c, 90) == cand
    # The same request again names a leader that no longer leads.
    a = call(c.nodes[ask].api_url + "/switchover", "POST", {"leader": old, "candidate": cand}, bearer(c))
    assert a.status == 412 and "the leader is" in a.json()["error"]


def test_scheduled_switchover_is_accepted_and_cancelled(cluster: LocalCluster) -> None:
    c = cluster
    url = c.nodes["node1"].api_url
    auth = basic("hakeeper", c.api_password)
    when = (datetime.now(UTC) + timedelta(hours=1)).astimezone(UTC).isoformat()
    a = call(url + "/switchover", "POST", {"scheduled_at": when}, auth)
    assert a.status == 202, a.body
    assert a.json()["switchover"]["scheduled_at"] is not None
    wait_for(
        lambda: call(c.nodes["node2"].api_url + "/cluster").json()["pending_switchover"] is not None,
        10,
        "pending switchover visible",
    )
    assert call(url + "/switchover", "POST", {}, auth).status == 409  # one at a time
    a = call(url + "/switchover", "DELETE", headers=auth)
    assert a.status == 200 and a.json()["switchover"]["kind"] == "switchover"
    assert call(url + "/switchover", "DELETE", headers=auth).status == 404
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert call(url + "/switchover", "POST", {"scheduled_at": past}, auth).status == 400


def test_config_patch_cas_validation_and_pause(cluster: LocalCluster) -> None:
    c = cluster
    url = c.nodes["node1"].api_url
    auth = bearer(c)
    cur = call(url + "/config").json()
    rev = cur["revision"]
    a = call(url + "/config", "PATCH", {"pause": True}, {**auth, "If-Match": str(rev - 1)})
    assert a.status == 409 and str(rev) in a.json()["error"]
    a = call(url + "/config", "PATCH", {"ttl": "long"}, auth)
    assert a.status == 400 and a.json()["errors"][0]["field"] == "ttl"
    assert call(url + "/config", "PATCH", {"ttl": 1}, auth).status == 400
    assert call(url + "/config", "PATCH", {"no_such_setting": 1}, auth).status == 400
    assert call(url + "/config", "PATCH", [1], auth).status == 400
    assert call(url + "/config", "PATCH", {"pause": True}, {**auth, "If-Match": "abc"}).status == 400
    a = call(url + "/config", "PATCH", {"pause": True}, {**auth, "If-Match": f'"{rev}"'})
    assert a.status == 200 and a.json()["config"]["pause"] is True and a.json()["revision"] > rev
    assert a.headers["ETag"] == f'"{a.json()["revision"]}"'
    try:
        for n in c.nodes.values():
            wait_for(lambda n=n: call(n.api_url + "/cluster").json()["paused"] is True, 10, "paused")
            wait_for(
                lambda n=n: "hakeeper_paused 1.0" in call(n.api_url + "/metrics").body.decode(), 10, "metric"
            )
        assert call(url + "/status").json()["paused"] is True
    finally:
        a = call(url + "/config", "PATCH", {"pause": False}, auth)
    assert a.status == 200 and a.json()["config"]["pause"] is False
    wait_for(lambda: call(url + "/cluster").json()["paused"] is False, 10, "resumed")
    assert "hakeeper_paused 0.0" in call(url + "/metrics").body.decode()


def test_restart_and_reload_on_a_replica(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    rep = next(n for n in replicas(c, prim) if n != ALLOWLISTED)
    url = c.nodes[rep].api_url
    pid = c.postmaster_pid(rep)
    # Meant for another member: refused by this agent, nothing done.
    a = call(url + "/restart", "POST", {"member": prim}, bearer(c))
    assert a.status == 421 and a.json() == {
        "error": f"misdirected: this is {rep}, not {prim}; nothing was done",
        "member": rep,
    }
    assert c.postmaster_pid(rep) == pid and "api_request_misdirected" in c.tail_log(rep, 200)
    a = call(url + "/restart", "POST", {"member": rep}, bearer(c))
    assert a.status == 200 and a.json() == {"message": "postgres restarted"}
    assert c.postmaster_pid(rep) != pid
    wait_for(lambda: call(url + "/replica").status == 200, 30, "replica again")
    a = call(url + "/reload", "POST", {"member": rep}, basic("hakeeper", c.api_password))
    # the node file was re-read (unchanged) and PostgreSQL reloaded
    assert a.status == 200 and a.json() == {"message": "no change in the node file. PostgreSQL reloaded."}
    a = call(c.nodes[prim].api_url + "/reinitialize", "POST", {"member": prim}, bearer(c))
    assert a.status == 409 and "leader" in a.json()["error"]


def test_failover_to_a_lagging_candidate_is_refused_without_force(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    lagger = next(n for n in replicas(c, prim) if n != ALLOWLISTED)
    url = c.nodes[lagger].api_url
    receiver = int(sql(c, lagger, "SELECT pid FROM pg_stat_wal_receiver")[0][0])
    os.kill(receiver, signal.SIGSTOP)
    try:
        sql(
            c,
            prim,
            "CREATE TABLE api_lag AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 30000) g",
        )
        wait_for(lambda: (call(url + "/status").json()["lag"] or 0) > 1048576, 30, "lag published")
        a = call(url + "/replica?lag=0")
        assert a.status == 503 and "exceeds" in a.json()["reason"]
        assert call(url + "/replica?lag=1GB").status == 200
        assert call(url + "/readiness").status == 503  # beyond maximum_lag_on_failover
        a = call(url + "/failover", "POST", {"candidate": lagger}, bearer(c))
        assert a.status == 412, a.body
        assert "maximum_lag_on_failover" in a.json()["error"] and a.json()["reason"]
    finally:
        os.kill(receiver, signal.SIGCONT)
    wait_for(lambda: call(url + "/replica?lag=0").status == 200, 60, "caught up again")
    assert api_primary(c) == prim


# -- connections -------------------------------------------------------------------------------------------


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        pytest.skip(f"RLIMIT_NOFILE {soft} is below {wanted}")


def _timed(url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    a = call(url, timeout=5)
    return a.status, time.monotonic() - t0


def test_a_thousand_idle_and_partial_connections_do_not_block_health_checks(cluster: LocalCluster) -> None:
    c = cluster
    prim = api_primary(c)
    _raise_nofile(4096)
    host, port = "127.0.0.1", c.nodes[prim].api_port
    socks: list[socket.socket] = []
    try:
        for i in range(1000):
            s = socket.create_connection((host, port), timeout=5)
            if i % 3 == 0:
                s.sendall(b"GET /primary HTTP/1.1\r\nHost: x\r\n")  # never finished
            elif i % 3 == 1:
                s.sendall(b"GE")
            socks.append(s)
        # Let the agent accept the burst (about 1,000 accepts queued behind our next request);
        # what matters is that idle connections cost nothing afterwards.
        time.sleep(1.0)
        worst = 0.0
        for _ in range(5):
            for path in ("/primary", "/health"):
                status, took = _timed(c.nodes[prim].api_url + path)
                assert status == 200
                worst = max(worst, took)
        assert worst < 0.5, f"slowest health check took {worst:.3f}s"
        print(f"slowest health check with 1000 idle connections: {worst * 1000:.1f} ms")
        # Slowloris protection: connections that never complete a request are closed after
        # api.request_timeout (5 s by default).
        # Connections beyond api.max_connections_per_client (100) were answered 503 and closed
        # at once: read to the end of each.
        deadline = time.monotonic() + 15
        closed = 0
        for s in socks:
            try:
                while True:
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    if s.recv(4096) == b"":
                        closed += 1
                        break
            except TimeoutError:
                pass
            except OSError:  # reset: closed too
                closed += 1
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
    assert call(c.nodes[prim].api_url + "/primary").status == 200


def _partial(port: int, source: str) -> socket.socket:
    """A connection from ``source`` (any 127/8 address is loopback) that starts a request and
    never finishes it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
    s.setblocking(False)
    return s


def _answered_then_closed(s: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing ``s`` (None: still open after ``timeout``)."""
    s.setblocking(True)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    except TimeoutError:
        return None
    except OSError:
        return got


def test_one_client_gets_its_share_of_connections_and_no_more(cluster: LocalCluster) -> None:
    c = cluster
    node = c.nodes["node1"]
    _raise_nofile(1024)
    socks = [_partial(node.api_port, "127.0.0.2") for _ in range(150)]  # share: 100
    try:
        # Beyond its share, a connection may only carry a health check: these partial requests
        # are closed within HEALTH_GRACE (2 s), well before request_timeout (5 s).
        time.sleep(3)
        closed = sum(1 for s in socks if _answered_then_closed(s, 0.001) is not None)
        assert closed == 50
        # Others are not affected; the client itself still gets its health checks.
        assert call(node.api_url + "/status").status == 200
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", node.api_port), 5, ("127.0.0.2", 0)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            ans = _answered_then_closed(s, 2)
        assert ans is not None and ans.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 0.5
        with socket.create_connection(("127.0.0.1", node.api_port), 5, ("127.0.0.2", 0)) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            ans = _answered_then_closed(s, 2)
        assert ans is not None and ans.startswith(b"HTTP/1.1 503")
    finally:
        for s in socks:
            s.close()


class SlowClients:
    """``per_source`` slow partial requests from each of ``sources``; a connection the agent
    closes (request_timeout) is opened again at once, so the places stay taken."""

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self.port = port
        self.sources = sources
        self.per_source = per_source
        self.sel = selectors.DefaultSelector()
        self.reopened = 0
        self.fill()

    def _open(self, source: str) -> None:
        try:
            s = _partial(self.port, source)
        except OSError:
            return  # refused at accept: tried again by the next fill()
        self.sel.register(s, selectors.EVENT_READ, source)

    def fill(self) -> None:
        held = {source: 0 for source in self.sources}
        for key in self.sel.get_map().values():
            held[key.data] += 1
        for source, n in held.items():
            for _ in range(self.per_source - n):
                self._open(source)

    def _dead(self, s: socket.socket) -> bool:
        try:
            return s.recv(4096) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def pump(self, seconds: float) -> None:
        """Reopen what the agent closed, for ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in self.sel.select(timeout=min(left, 0.05)):
                s = cast(socket.socket, key.fileobj)
                if self._dead(s):
                    self.sel.unregister(s)
                    s.close()
                    self.reopened += 1
            self.fill()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            cast(socket.socket, key.fileobj).close()
        self.sel.close()


def test_health_checks_answer_while_slow_clients_keep_the_pool_full(cluster: LocalCluster) -> None:
    """20 clients cycle slow partial requests to keep all 2,000 places (max_connections) taken,
    for longer than request_timeout (5 s): every health check still answers, within 1 s (half of
    HAProxy's default check interval) even while 2,000 connections expire and come back at once
    on a shared 2-core machine, and typically within 0.1 s."""
    c = cluster
    node = c.nodes["node2"]
    _raise_nofile(8192)
    statuses: list[int] = []
    took: list[float] = []
    status_refused = 0
    slow = SlowClients(node.api_port, [f"127.0.1.{i}" for i in range(1, 21)], 100)
    try:
        end = time.monotonic() + 13
        while time.monotonic() < end:
            slow.pump(0.25)
            for path in ("/health", "/primary", "/replica"):
                status, seconds = _timed(node.api_url + path)
                statuses.append(status)
                took.append(seconds)
            status_refused += call(node.api_url + "/status", timeout=5).status == 503
    finally:
        slow.close()
    took.sort()
    worst, median = took[-1], took[len(took) // 2]
    print(
        f"{len(statuses)} health checks under a full pool: median {median * 1000:.1f} ms, slowest "
        f"{worst * 1000:.1f} ms; {slow.reopened} slow connections cycled, /status refused "
        f"{status_refused} times"
    )
    assert slow.reopened >= 1500  # the slow clients did cycle (request_timeout 5 s, 13 s of it)
    assert status_refused > 0  # the pool was indeed full
    assert set(statuses) <= {200, 503} and statuses.count(200) >= len(statuses) // 3
    assert worst < 1.0, f"slowest health check took {worst:.3f}s"
    assert median < 0.1, f"median health check took {median:.3f}s"
    wait_for(lambda: call(node.api_url + "/status").status == 200, 15, "slots free again")


def _raw(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5, (source, 0)) as s:
        s.sendall(request)
        ans = _answered_then_closed(s, 5)
    assert ans is not None
    return ans


def _post(path: str, *headers: bytes, body: bytes = b'{"member": "node1"}') -> bytes:
    head = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: x",
        b"Connection: close",
        b"Content-Length: %d" % len(body),
    ]
    return b"\r\n".join([*head, *headers]) + b"\r\n\r\n" + body


def test_hostile_requests_to_mutating_endpoints(cluster: LocalCluster) -> None:
    c = cluster
    node = c.nodes["node1"]
    url = node.api_url
    auth = bearer(c)
    json_type = b"Content-Type: application/json"
    # Non-UTF-8 credentials: 401, not 500 (both schemes).
    for raw in (b"Bearer \xff\xfe\x80" + c.api_token.encode(), b"Basic \xc3\x28\xa0\xa1=="):
        ans = _raw(node.api_port, _post("/reload", b"Authorization: " + raw, json_type))
        assert ans.startswith(b"HTTP/1.1 401"), ans
    # Without Content-Type: application/json, nothing happens (a cross-site form cannot send it).
    pid = c.postmaster_pid("node1")
    token = f"Authorization: Bearer {c.api_token}".encode()
    for ctype in (b"", b"Content-Type: text/plain", b"Content-Type: application/x-www-form-urlencoded"):
        ans = _raw(node.api_port, _post("/restart", token, *([ctype] if ctype else []), body=b""))
        assert ans.startswith(b"HTTP/1.1 415") and b"application/json" in ans, ans
    assert c.postmaster_pid("node1") == pid
    # Deeply nested JSON and over-long names are 400s.
    deep = b'{"postgresql": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    a = call(url + "/config", "PATCH", headers=auth, raw=deep)
    assert a.status == 400 and "nested" in a.json()["error"], a.body
    a = call(url + "/failover", "POST", {"candidate": "x" * 10_000}, auth)
    assert a.status == 400 and a.json()["errors"][0]["field"] == "candidate"
    # Failed authentication from one address: 429 with Retry-After after 10 failures, even with
    # the right token; other addresses unaffected.
    wrong = b"Authorization: Bearer wrong"
    for _ in range(10):
        assert _raw(node.api_port, _post("/reload", wrong, json_type), "127.0.0.77").startswith(
            b"HTTP/1.1 401"
        )
    for header in (wrong, token):
        ans = _raw(node.api_port, _post("/reload", header, json_type), "127.0.0.77")
        assert ans.startswith(b"HTTP/1.1 429") and b"Retry-After: " in ans, ans
    assert _raw(node.api_port, _post("/reload", token, json_type), "127.0.0.78").startswith(b"HTTP/1.1 200")
    assert c.tail_log("node1", 400).count("api_auth_throttled") == 1
    assert "api_handler_crashed" not in c.tail_log("node1", 400)
    agent_log = node.log_path.read_text(errors="replace")
    for secret in (c.api_token, c.api_password, c.superuser_password):
        assert secret not in agent_log


# -- TLS --------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hakeeper test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.crt", *ext, cwd=d)  # fmt: skip
    for p in d.iterdir():
        p.chmod(0o644)  # the agent runs as root here; keep it simple


def test_tls_with_required_client_certificates_and_connection_limit() -> None:
    base = cluster_tmpdir()
    pki = base / "pki"
    make_pki(pki)
    c = ApiTestCluster(base, nodes=1, base_port=free_base_port(1))
    c.api_overrides = {
        "node1": {
            "certfile": str(pki / "server.crt"),
            "keyfile": str(pki / "server.key"),
            "cafile": str(pki / "ca.crt"),
            "verify_client": "required",
            "max_connections": 20,
            "request_timeout": 2,
        }
    }
    url = c.nodes["node1"].api_url.replace("http://", "https://")
    anon = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    try:
        with c:
            c.start()
            c.wait_ready(120)
            wait_for(lambda: call(url + "/primary", context=client).status == 200, 30, "TLS primary")
            st = call(url + "/status", context=client).json()
            assert st["api_url"].startswith("https://")
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                call(url + "/primary", context=anon)  # no client certificate: handshake refused
            with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
                call(c.nodes["node1"].api_url + "/primary")  # plain HTTP on the TLS port
            assert call(url + "/switchover", "POST", {}, context=client).status == 401
            a = call(url + "/reload", "POST", {"member": "node1"}, bearer(c), context=client)
            assert a.status == 200, a.body

            # Connection limit: 20 idle connections fill it; the next one is refused at once
            # unless it is a health check (the health reserve answers those, over TLS too).
            # (First let the connections above finish: failed handshakes count until they time out.)
            time.sleep(2.5)
            socks = [socket.create_connection(("127.0.0.1", c.nodes["node1"].api_port)) for _ in range(20)]
            try:
                time.sleep(0.3)
                t0 = time.monotonic()
                try:
                    refused = call(url + "/status", context=client, timeout=5).status
                except (urllib.error.URLError, ssl.SSLError, ConnectionError, http_errors()):
                    refused = 0  # closed before an answer
                assert refused in (0, 503), c.tail_log("node1", 40)
                assert time.monotonic() - t0 < 2
                t0 = time.monotonic()
                a = call(url + "/health", context=client, timeout=5)
                assert a.status == 200 and a.headers["Connection"] == "close", a
                assert time.monotonic() - t0 < 1
                # Idle connections time out after request_timeout (2 s), freeing the slots.
                wait_for(
                    lambda: call(url + "/status", context=client, timeout=5).status == 200, 10, "slots free"
                )
            finally:
                for s in socks:
                    s.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException
