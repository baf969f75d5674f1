"""LocalCluster helpers for integration tests and benchmarks: a directory PostgreSQL's OS user
can reach, a free block of ports, and a fixture with a started, ready cluster."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hakeeper.localcluster import MAX_NODES, LocalCluster, prepare_fs_repository
from hakeeper.util.keyfile import new_key_text
from hakeeper.util.proc import RunAs
from tests.support import ports


def cluster_tmpdir(prefix: str = "hakeeper-it-") -> Path:
    """A fresh directory every user can traverse.

    pytest's tmp_path lives below a 0700 directory, which PostgreSQL's (non-root) OS user cannot
    enter when the tests run as root; this one lives directly in /tmp then."""
    parent = "/tmp" if os.geteuid() == 0 else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def plan_ports(base: int, nodes: int) -> list[int]:
    """Every port LocalCluster(base_port=base, nodes=nodes) uses."""
    return [
        base,
        base + 1,
        *(base + 10 + i for i in range(1, nodes + 1)),
        *(base + 20 + i for i in range(1, nodes + 1)),
    ]


def free_base_port(nodes: int = 3, lo: int = 20000, hi: int = 32000) -> int:
    """A base port whose whole LocalCluster port plan is free (and not handed out before)."""
    for _ in range(2000):
        base = random.randrange(lo, hi - 30 - MAX_NODES)
        wanted = plan_ports(base, nodes)
        if any(p in ports._handed_out for p in wanted):
            continue
        if all(ports.port_is_free(p) for p in wanted):
            ports._handed_out.update(wanted)
            return base
    raise RuntimeError("no free block of ports for a local cluster")


def etcd_gateway(
    c: LocalCluster, path: str, body: dict[str, Any], user: str | None = "hakeeper", timeout: float = 5.0
) -> dict[str, Any]:
    """POST ``body`` to ``path`` of the cluster's etcd JSON gateway: over TLS with the client
    certificate, authenticated as ``user`` ("hakeeper" or "root"; None: no token) when the
    cluster's etcd is secure.  Raises ``urllib.error.HTTPError`` on a 4xx/5xx answer."""
    sec = c.etcd_security
    ctx = sec.ssl_context() if sec is not None else None
    headers = {"Content-Type": "application/json"}
    if sec is not None and user is not None:
        password = sec.root_password if user == "root" else sec.password
        token = _post(
            c.etcd.url + "/v3/auth/authenticate", {"name": user, "password": password}, {}, ctx, timeout
        )
        headers["Authorization"] = str(token["token"])
    return _post(c.etcd.url + path, body, headers, ctx, timeout)


def _post(
    url: str, body: dict[str, Any], headers: dict[str, str], ctx: ssl.SSLContext | None, timeout: float
) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


@contextmanager
def running_cluster(nodes: int = 3, ready_timeout: float = 180.0, **kwargs: Any) -> Iterator[LocalCluster]:
    """A started cluster that is ready (one primary, the rest streaming); always stopped after."""
    base_dir = cluster_tmpdir()
    cluster = LocalCluster(base_dir, nodes=nodes, base_port=free_base_port(nodes), **kwargs)
    try:
        with cluster:
            cluster.start()
            cluster.wait_ready(ready_timeout)
            yield cluster
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def start_first_member(c: LocalCluster, name: str = "node1", timeout: float = 90.0) -> None:
    """etcd and one member's agent of a cluster not started yet, until that member is the
    primary (the other agents are the test's to start)."""
    c.check_ports()
    c.write_configs()
    c.etcd.start()
    c.agents[name].start()
    deadline = time.monotonic() + timeout
    while c.node_state(name).role != "primary":
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not primary after {timeout:.0f}s:\n{c.tail_log(name)}")
        time.sleep(0.3)


def crash_host(c: LocalCluster, name: str) -> None:
    """kill -9 of the agent and every PostgreSQL process of ``name`` at once (a host crash)."""
    pm = c.postmaster_pid(name)
    c.agents[name].kill()
    if pm is not None:
        children = [int(p) for p in open(f"/proc/{pm}/task/{pm}/children").read().split()]
        for pid in (pm, *children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def encrypted_fs_repository(repo_dir: Path, run_as: RunAs, name: str = "fs") -> dict[str, Any]:
    """The config of a filesystem repository at ``repo_dir/repo``, encrypted with a new key in
    ``repo_dir/repo.key`` that PostgreSQL's OS user can read (its restore_command decrypts)."""
    prepare_fs_repository(repo_dir / "repo", run_as)
    key = repo_dir / "repo.key"
    key.write_text(new_key_text() + "\n")
    key.chmod(0o600)
    run_as.chown(key)
    return {"name": name, "type": "fs", "path": str(repo_dir / "repo"), "encryption": {"key_file": str(key)}}


@pytest.fixture
def local_cluster() -> Iterator[LocalCluster]:
    """3-node ready cluster.  Import it into a test module to use it."""
    with running_cluster() as cluster:
        yield cluster
