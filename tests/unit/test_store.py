"""ClusterStore sends exactly the transactions the call sites built by hand before it existed.

The etcd contract (tests/support/etcd_contract.py) proves what each operation *does*; these
tests pin what it *sends*, compare by compare and op by op, so that moving a call site onto the
store cannot change a guard."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hakeeper.core.cluster import (
    HistoryEntry,
    Member,
    Status,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
    SyncState,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import TxnResult, cmp_create, cmp_mod, cmp_value, op_delete, op_put
from hakeeper.dcs.store import ClusterStore
from tests.support.fake_etcd import FakeEtcd

K = Keys("/hakeeper/c1")
TERM = 7


class RecordingEtcd(FakeEtcd):
    """A FakeEtcd that remembers every txn it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.txns: list[tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]] | None]] = []

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        self.txns.append((compare, success, failure))
        return await super().txn(compare, success, failure, timeout=timeout)


def request(mod_revision: int = 12) -> Switchover:
    return Switchover(SwitchoverKind.SWITCHOVER, "n1", "n2", 1.0, mod_revision=mod_revision)


async def sent(call: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]] | None]:
    etcd = RecordingEtcd()
    lease = await etcd.lease_grant(30)
    assert lease == LEASE, "EXPECTED names the first lease a FakeEtcd grants"
    await call(ClusterStore(etcd, K), lease)
    assert len(etcd.txns) >= 1
    return etcd.txns[-1]


CONFIG = DynamicConfig(ttl=20)
HANDOVER = Switchover(
    SwitchoverKind.SWITCHOVER, "n1", "n2", 1.0, stage=SwitchoverStage.HANDOVER, handover_at=2.0
)
STATUS = Status(lsn=1, timeline=2, term=TERM)
SYNC = SyncState("n1", ("n2",), TERM, 1)
LEASE = 0x7E5700000001  # the first lease a FakeEtcd grants

# (store call, the compares and ops the hand-built txn had: agent.py, switchover.py, sync.py,
# ha/ops.py and backup/schedule.py before ClusterStore)
EXPECTED: dict[str, tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]] = {
    "initialize": (
        lambda s, lease: s.initialize(system_identifier="6999", leader="n1", lease=lease, config=CONFIG),
        [cmp_create(K.initialize, "=", 0), cmp_create(K.leader, "=", 0)],
        [
            op_put(K.initialize, "6999"),
            op_put(K.leader, "n1", lease=LEASE),
            op_put(K.config, CONFIG.model_dump_json().encode()),
        ],
    ),
    "undo_initialize": (
        lambda s, lease: s.undo_initialize(leader="n1", term=TERM),
        [cmp_value(K.leader, "=", "n1"), cmp_create(K.leader, "=", TERM)],
        [op_delete(K.initialize), op_delete(K.config), op_delete(K.leader)],
    ),
    "take_leader": (
        lambda s, lease: s.take_leader("n1", lease),
        [cmp_create(K.leader, "=", 0)],
        [op_put(K.leader, "n1", lease=LEASE)],
    ),
    "reattach_leader": (
        lambda s, lease: s.reattach_leader("n1", TERM, lease),
        [cmp_value(K.leader, "=", "n1"), cmp_create(K.leader, "=", TERM)],
        [op_put(K.leader, "n1", lease=LEASE)],
    ),
    "release_leader": (
        lambda s, lease: s.release_leader("n1", TERM),
        [cmp_value(K.leader, "=", "n1"), cmp_create(K.leader, "=", TERM)],
        [op_delete(K.leader)],
    ),
    "hand_over": (
        lambda s, lease: s.hand_over("n1", TERM, request(), HANDOVER),
        [cmp_value(K.leader, "=", "n1"), cmp_create(K.leader, "=", TERM), cmp_mod(K.switchover, "=", 12)],
        [op_delete(K.leader), op_put(K.switchover, HANDOVER.to_json())],
    ),
    "drop_switchover": (
        lambda s, lease: s.drop_switchover(TERM, request()),
        [cmp_create(K.leader, "=", TERM), cmp_mod(K.switchover, "=", 12)],
        [op_delete(K.switchover)],
    ),
    "write_status": (
        lambda s, lease: s.write_status(TERM, STATUS),
        [cmp_create(K.leader, "=", TERM)],
        [op_put(K.status, STATUS.to_json())],
    ),
    "write_sync": (
        lambda s, lease: s.write_sync(TERM, SYNC),
        [cmp_create(K.leader, "=", TERM)],
        [op_put(K.sync, SYNC.to_json())],
    ),
    "drop_sync": (
        lambda s, lease: s.drop_sync(TERM),
        [cmp_create(K.leader, "=", TERM)],
        [op_delete(K.sync)],
    ),
    "write_request(None)": (
        lambda s, lease: s.write_request(None, request(0)),
        [cmp_create(K.switchover, "=", 0)],
        [op_put(K.switchover, request(0).to_json())],
    ),
    "write_request(current)": (
        lambda s, lease: s.write_request(request(12), request(0)),
        [cmp_mod(K.switchover, "=", 12)],
        [op_put(K.switchover, request(0).to_json())],
    ),
    "cancel_request": (
        lambda s, lease: s.cancel_request(request()),
        [cmp_mod(K.switchover, "=", 12)],
        [op_delete(K.switchover)],
    ),
    "write_config": (
        lambda s, lease: s.write_config(CONFIG, 5),
        [cmp_mod(K.config, "=", 5)],
        [op_put(K.config, CONFIG.model_dump_json())],
    ),
    "write_schedule(term)": (
        lambda s, lease: s.write_schedule("daily", '{"a": 1}', 3, TERM),
        [cmp_mod(K.schedule("daily"), "=", 3), cmp_create(K.leader, "=", TERM)],
        [op_put(K.schedule("daily"), '{"a": 1}')],
    ),
    "write_schedule(no term)": (
        lambda s, lease: s.write_schedule("daily", '{"a": 1}', 3, None),
        [cmp_mod(K.schedule("daily"), "=", 3)],
        [op_put(K.schedule("daily"), '{"a": 1}')],
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_each_operation_sends_the_transaction_of_its_old_call_site(name: str) -> None:
    call, compares, ops = EXPECTED[name]
    assert await sent(call) == (compares, ops, None)


async def test_append_history_sends_the_agents_read_modify_write() -> None:
    etcd = RecordingEtcd()
    store = ClusterStore(etcd, K)
    old = HistoryEntry(1, None, 1.0, "bootstrap", None, "n1")
    new = HistoryEntry(2, 100, 2.0, "failover", "n1", "n2")
    rev = await etcd.put(K.history, json.dumps([old.to_dict()]))
    assert not await store.append_history(TERM, new)  # no leader key of TERM: refused 3 times
    assert len(etcd.txns) == 3
    assert etcd.txns[0] == (
        [cmp_create(K.leader, "=", TERM), cmp_mod(K.history, "=", rev)],
        [op_put(K.history, json.dumps([old.to_dict(), new.to_dict()]))],
        None,
    )
    await etcd.delete(K.history)
    etcd.txns.clear()
    await store.append_history(TERM, new, attempts=1)
    assert etcd.txns == [
        (
            [cmp_create(K.leader, "=", TERM), cmp_mod(K.history, "=", 0)],
            [op_put(K.history, json.dumps([new.to_dict()]))],
            None,
        )
    ]


async def test_members_are_put_on_their_lease_and_deleted() -> None:
    etcd = FakeEtcd()
    store = ClusterStore(etcd, K)
    lease = await etcd.lease_grant(30)
    m = Member("n1", host="h", port=1)
    await store.put_member(m, lease)
    kv = await etcd.get(K.member("n1"))
    assert kv is not None and kv.value == m.to_json() and kv.lease == lease
    await store.delete_member("n1")
    assert await etcd.get(K.member("n1")) is None
