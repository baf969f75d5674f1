"""The etcd contract (tests/support/etcd_contract.py) against the in-memory FakeEtcd.

tests/integration/test_etcd_contract_real.py runs the same list against a real etcd."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from hakeeper.dcs.store import ClusterStore, EtcdLike
from tests.support import etcd_contract
from tests.support.etcd_contract import CASES, Backend, ContractCase
from tests.support.fake_etcd import FakeClock, FakeEtcd


def fake_backend() -> tuple[Backend, FakeEtcd, FakeClock]:
    clock = FakeClock()
    etcd = FakeEtcd(now=clock)

    async def elapse(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    @asynccontextmanager
    async def cut_off() -> AsyncIterator[EtcdLike]:
        etcd.fail = True
        try:
            yield etcd
        finally:
            etcd.fail = False

    return Backend(client=etcd, prefix="/contract", elapse=elapse, cut_off=cut_off), etcd, clock


@pytest.mark.parametrize("case", etcd_contract.params())
async def test_fake_etcd_keeps_the_contract(case: ContractCase) -> None:
    backend, _, _ = fake_backend()
    await case.run(backend)


def test_the_contract_has_cases_and_every_one_is_registered() -> None:
    assert len(CASES) >= 20
    registered = {c.run for c in CASES}
    defined = {
        fn
        for name, fn in vars(etcd_contract).items()
        if inspect.iscoroutinefunction(fn)
        and list(inspect.signature(fn).parameters) == ["b"]
        and not name.startswith("_")
    }
    assert defined == registered, "a case defined without @case would run on neither side"
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_contract_covers_every_cluster_store_operation() -> None:
    operations = {
        name for name, fn in vars(ClusterStore).items() if callable(fn) and not name.startswith("_")
    }
    covered = set().union(*(c.covers for c in CASES))
    assert covered <= operations, f"covers names that are no operation: {covered - operations}"
    assert operations == covered, f"operations no contract case exercises: {sorted(operations - covered)}"


async def test_fail_switch_and_clock_are_the_fakes_only_extras() -> None:
    """What the contract cannot state for both sides: the fake's clock is the only time it knows."""
    _, etcd, clock = fake_backend()
    lease = await etcd.lease_grant(10)
    await etcd.put("/k", "v", lease=lease)
    clock.advance(9.9)
    assert await etcd.get("/k") is not None
    assert await etcd.lease_time_to_live(lease) == 0, "etcd truncates the remaining seconds"
    clock.advance(0.1)
    assert await etcd.get("/k") is None, "expired exactly at the deadline"
    etcd.fail = True
    with pytest.raises(Exception, match="fail switch"):
        await etcd.get("/k")
