"""The ``slots`` key: the permanent slots a primary of this cluster created or adopted
(docs/slots.md, docs/decisions.md).  Every primary reads it once per term and rewrites it under
its term; a slot is dropped only once it is in here and no longer in a valid config."""

from __future__ import annotations

from hakeeper.core.records import InvalidRecord
from hakeeper.core.slots import managed_slots_json, parse_managed_slots
from hakeeper.dcs.etcd import cmp_create, op_put
from hakeeper.dcs.store import ClusterStore
from hakeeper.util.log import get_logger

log = get_logger(__name__)


async def read_managed_slots(store: ClusterStore) -> frozenset[str] | None:
    """The managed permanent slots (empty when no primary ever recorded any); None when the key
    does not validate (then nothing may be dropped)."""
    kv = await store.client.get(store.keys.slots)
    if kv is None:
        return frozenset()
    try:
        return parse_managed_slots(kv.value)
    except InvalidRecord as e:
        log.warning("managed_slots_invalid", key=store.keys.slots, reason=str(e))
        return None


async def write_managed_slots(store: ClusterStore, term: int, slots: frozenset[str]) -> bool:
    """Record the managed permanent slots; only the leader of ``term`` may."""
    k = store.keys
    res = await store.client.txn(
        [cmp_create(k.leader, "=", term)], [op_put(k.slots, managed_slots_json(slots))]
    )
    return res.succeeded
