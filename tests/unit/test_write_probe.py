"""tests/support/probe.py classifies a node it could not ask: STOPPED only when no postmaster
runs there; otherwise UNKNOWN, and a safety check over it fails instead of passing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import pytest

from hakeeper.localcluster import LocalCluster
from tests.support import ports
from tests.support.probe import Access, ProbeFailed, probe, probe_all, writable_nodes, writable_throughout


@dataclass
class Unreachable:
    """A LocalCluster stand-in: nodes on closed ports, with or without a running postmaster."""

    running: dict[str, bool]

    def __post_init__(self) -> None:
        self.port = ports.free_ports(1)[0]  # nobody listens there

    @property
    def names(self) -> list[str]:
        return list(self.running)

    def dsn(self, name: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=x password=x dbname=x"

    def postmaster_pid(self, name: str) -> int | None:
        return 4242 if self.running[name] else None


def test_a_node_that_cannot_be_asked_is_stopped_only_without_a_postmaster() -> None:
    c = cast(LocalCluster, Unreachable({"up": True, "down": False}))
    assert probe(c, "down").access is Access.STOPPED
    got = probe(c, "up")
    assert got.access is Access.UNKNOWN and "Connection refused" in got.detail


def test_nobody_writes_cannot_pass_over_a_node_that_could_not_be_asked() -> None:
    c = cast(LocalCluster, Unreachable({"n1": False, "n2": True}))
    t0 = time.monotonic()
    with pytest.raises(ProbeFailed, match="n2: unknown"):
        probe_all(c, retry_for=0.5)
    assert time.monotonic() - t0 >= 0.5, "retried before giving up"
    with pytest.raises(ProbeFailed):
        writable_nodes(c)
    with pytest.raises(ProbeFailed):
        writable_throughout(c, [], 1.0)


def test_stopped_nodes_write_nothing_and_the_window_is_probed_throughout() -> None:
    c = cast(LocalCluster, Unreachable({"n1": False, "n2": False}))
    assert writable_nodes(c) == []
    t0 = time.monotonic()
    rounds = writable_throughout(c, [], 1.0, every=0.2)
    assert time.monotonic() - t0 >= 1.0 and rounds >= 4
