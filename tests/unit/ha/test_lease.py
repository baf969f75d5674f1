"""LeaseKeeper: what it persists before a lease is used, and the timeout its keepalives get."""

from __future__ import annotations

import pytest

from hakeeper.core.fencing import FENCER_KILL_GRACE, FENCER_POLL, MIN_KEEPALIVE_TIMEOUT, keepalive_timeout
from hakeeper.ha.lease import LeaseKeeper
from tests.support.fake_etcd import FakeEtcd
from tests.support.sim import MemoryLeaseRecord


class RecordingEtcd(FakeEtcd):
    """FakeEtcd that remembers the timeout of each keepalive."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        self.timeouts.append(timeout)
        return await super().lease_keepalive(lease_id, timeout=timeout)


def keeper(etcd: FakeEtcd, record: MemoryLeaseRecord, *, margin: float, interval: float = 1.0) -> LeaseKeeper:
    return LeaseKeeper(
        etcd,
        ttl=10,
        interval=interval,
        margin=margin,
        on_deadline=lambda d: None,
        on_lost=lambda: None,
        record=record,
    )


async def test_a_granted_lease_is_persisted_and_counts_as_ours_with_the_previous_one() -> None:
    record = MemoryLeaseRecord()
    record.lease = 0xABC  # what the agent before a restart persisted
    k = keeper(FakeEtcd(), record, margin=2.5)
    assert k.previous == 0xABC and k.is_own(0xABC) and not k.is_own(0) and not k.is_own(0xDEF)
    lease = await k.grant()
    assert record.lease == lease, "persisted before anything is written under it"
    assert k.is_own(lease) and k.is_own(0xABC)


@pytest.mark.parametrize(
    ("margin", "interval", "request_timeout", "expected"),
    [
        (2.5, 1.0, 1.0, 1.0),  # the defaults: the request timeout
        (2.5, 0.5, 1.0, 0.5),  # within the keepalive interval
        (1.5, 1.0, 1.0, 1.5 - FENCER_POLL - FENCER_KILL_GRACE),  # what the margin leaves
        (1.25, 1.0, 1.0, MIN_KEEPALIVE_TIMEOUT),  # never below the floor the config enforces
    ],
)
def test_a_keepalive_never_waits_longer_than_the_fence_margin_covers(
    margin: float, interval: float, request_timeout: float, expected: float
) -> None:
    assert keepalive_timeout(margin, interval, request_timeout) == pytest.approx(expected)
    assert (
        FENCER_POLL + FENCER_KILL_GRACE + keepalive_timeout(margin, interval, request_timeout)
        <= max(margin, FENCER_POLL + FENCER_KILL_GRACE + MIN_KEEPALIVE_TIMEOUT) + 1e-9
    )


async def test_keepalives_and_lease_confirmations_use_the_capped_timeout() -> None:
    record = MemoryLeaseRecord()
    etcd = RecordingEtcd()
    k = keeper(etcd, record, margin=1.5)  # e.g. lowered in etcd by PATCH /config
    await k.grant()
    await k.renew()
    await k.refresh()  # WriteGuard.confirm_lease
    await k.refresh(timeout=5.0)
    cap = 1.5 - FENCER_POLL - FENCER_KILL_GRACE
    assert etcd.timeouts == pytest.approx([cap, cap, cap])
