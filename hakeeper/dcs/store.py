"""ClusterStore: every read and guarded write of the cluster's keys, as named operations.

(Interim version written against the agreed interface; replaced by the full one with its
contract test.)"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from hakeeper.core.cluster import ClusterView, HistoryEntry, Member, Status, Switchover, SyncState, build_view
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV, TxnResult, cmp_create, cmp_mod, cmp_value, op_delete, op_put


class EtcdLike(Protocol):
    async def get(self, key: str, *, timeout: float | None = None) -> KV | None: ...
    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> tuple[list[KV], int]: ...
    async def put(
        self, key: str, value: bytes | str, *, lease: int = 0, timeout: float | None = None
    ) -> int: ...
    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int: ...
    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult: ...


class ClusterStore:
    def __init__(self, client: EtcdLike, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def view_of(self, kvs: Mapping[str, KV], revision: int, fallback: DynamicConfig) -> ClusterView:
        raw = {k: (kv.value, kv.create_revision, kv.mod_revision, kv.lease) for k, kv in kvs.items()}
        return build_view(self.keys, raw, revision, fallback)

    async def read_view(self, fallback: DynamicConfig | None = None) -> ClusterView:
        kvs, rev = await self.client.get_prefix(self.keys.all)
        return self.view_of({kv.key: kv for kv in kvs}, rev, fallback or DynamicConfig())

    async def initialize(
        self, *, system_identifier: str, leader: str, lease: int, config: DynamicConfig
    ) -> int | None:
        k = self.keys
        res = await self.client.txn(
            [cmp_create(k.initialize, "=", 0), cmp_create(k.leader, "=", 0)],
            [
                op_put(k.initialize, system_identifier),
                op_put(k.leader, leader, lease=lease),
                op_put(k.config, config.model_dump_json().encode()),
            ],
        )
        return res.revision if res.succeeded else None

    async def undo_initialize(self, *, leader: str, term: int) -> bool:
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", leader), cmp_create(k.leader, "=", term)],
            [op_delete(k.initialize), op_delete(k.config), op_delete(k.leader)],
        )
        return res.succeeded

    async def take_leader(self, name: str, lease: int) -> int | None:
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", 0)], [op_put(k.leader, name, lease=lease)])
        return res.revision if res.succeeded else None

    async def reattach_leader(self, name: str, term: int, lease: int) -> bool:
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", name), cmp_create(k.leader, "=", term)],
            [op_put(k.leader, name, lease=lease)],
        )
        return res.succeeded

    async def release_leader(self, name: str, term: int) -> bool:
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", name), cmp_create(k.leader, "=", term)], [op_delete(k.leader)]
        )
        return res.succeeded

    async def hand_over(self, name: str, term: int, request: Switchover, handover: Switchover) -> bool:
        k = self.keys
        res = await self.client.txn(
            [
                cmp_value(k.leader, "=", name),
                cmp_create(k.leader, "=", term),
                cmp_mod(k.switchover, "=", request.mod_revision),
            ],
            [op_delete(k.leader), op_put(k.switchover, handover.to_json())],
        )
        return res.succeeded

    async def drop_switchover(self, term: int, request: Switchover) -> bool:
        k = self.keys
        res = await self.client.txn(
            [cmp_create(k.leader, "=", term), cmp_mod(k.switchover, "=", request.mod_revision)],
            [op_delete(k.switchover)],
        )
        return res.succeeded

    async def put_member(self, member: Member, lease: int) -> None:
        await self.client.put(self.keys.member(member.name), member.to_json(), lease=lease)

    async def delete_member(self, name: str) -> None:
        await self.client.delete(self.keys.member(name))

    async def write_status(self, term: int, status: Status) -> bool:
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.status, status.to_json())])
        return res.succeeded

    async def write_sync(self, term: int, state: SyncState) -> bool:
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.sync, state.to_json())])
        return res.succeeded

    async def drop_sync(self, term: int) -> bool:
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_delete(k.sync)])
        return res.succeeded

    async def append_history(self, term: int, entry: HistoryEntry, *, attempts: int = 3) -> bool:
        k = self.keys
        for _ in range(attempts):
            cur = await self.client.get(k.history)
            items = json.loads(cur.value) if cur is not None and cur.value else []
            items.append(entry.to_dict())
            res = await self.client.txn(
                [cmp_create(k.leader, "=", term), cmp_mod(k.history, "=", cur.mod_revision if cur else 0)],
                [op_put(k.history, json.dumps(items))],
            )
            if res.succeeded:
                return True
        return False

    async def leader_term(self) -> int | None:
        kv = await self.client.get(self.keys.leader)
        return kv.create_revision if kv is not None else None
