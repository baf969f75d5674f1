from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.etcd_server import EtcdServer

settings.register_profile("hakeeper", deadline=None, database=None)
settings.load_profile("hakeeper")


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd on free loopback ports, stopped after the test."""
    server = EtcdServer(tmp_path / "etcd" / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def running_as_root() -> bool:
    return os.geteuid() == 0
