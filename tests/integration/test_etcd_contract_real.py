"""The etcd contract (tests/support/etcd_contract.py) against a real etcd.

The very same cases as tests/unit/test_etcd_contract_fake.py (one list, ``CASES``): whatever the
fake answers differently from etcd fails here.  One etcd serves every case, each under its own
key prefix; it is stopped at the end of the module."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from hakeeper.dcs.etcd import EtcdClient
from hakeeper.dcs.store import EtcdLike
from tests.support import etcd_contract
from tests.support.etcd_contract import Backend, ContractCase
from tests.support.etcd_server import EtcdServer
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

_case_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("contract") / "etcd" / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def unreachable() -> AsyncIterator[EtcdLike]:
    """A client of an etcd that is not there: a free port nobody listens on."""
    (port,) = free_ports(1)
    async with EtcdClient([f"http://127.0.0.1:{port}"], timeout=0.5) as client:
        yield client


@pytest.mark.parametrize("case", etcd_contract.params())
async def test_real_etcd_keeps_the_contract(shared_etcd: EtcdServer, case: ContractCase) -> None:
    async with EtcdClient([shared_etcd.url], timeout=2.0) as client:
        backend = Backend(
            client=client,
            prefix=f"/contract/{next(_case_numbers)}-{case.name}",
            elapse=asyncio.sleep,
            cut_off=unreachable,
        )
        await case.run(backend)
