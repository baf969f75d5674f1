"""LocalCluster helpers for integration tests and benchmarks: a directory PostgreSQL's OS user
can reach, a free block of ports, and a fixture with a started, ready cluster."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hakeeper.localcluster import MAX_NODES, LocalCluster
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


@pytest.fixture
def local_cluster() -> Iterator[LocalCluster]:
    """3-node ready cluster.  Import it into a test module to use it."""
    with running_cluster() as cluster:
        yield cluster
