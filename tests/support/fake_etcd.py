"""An in-memory etcd with etcd's semantics, for unit tests of code that talks to etcd.

:class:`FakeEtcd` implements :class:`hakeeper.dcs.store.EtcdLike` (the calls of
:class:`~hakeeper.dcs.etcd.EtcdClient` that hakeeper makes) and takes the same request shapes
(the dicts of ``cmp_*`` / ``op_*``).  What it models, as etcd 3.4 does:

* one global revision; every write that changes something (a put, a delete that deletes a key, a
  txn whose chosen branch changed a key, a lease expiry or revoke that deleted keys) increments
  it once; reads and writes that change nothing do not;
* per key: value, create_revision, mod_revision, version (reset by a delete), lease;
* txn compares on value, create_revision, mod_revision, version and lease with ``=``, ``!=``,
  ``<``, ``>``; an absent key compares as create/mod/version/lease 0, and a *value* compare on
  an absent key is always false (etcd cannot tell a missing value from an empty one);
* compares over a key range (``range_end``, as ``cmp_create``/``cmp_mod`` with ``prefix=True``
  build them): true when every key in the range passes; an empty range compares as one absent
  key (a value compare on it fails);
* txn success and failure branches of put, delete (prefix too) and range, a range seeing the
  earlier writes of its own txn; a branch naming one key twice is rejected like etcd does;
* leases on an injectable clock (``now``): expiry deletes the keys attached to a lease;
  keepalive answers the granted TTL or raises :class:`LeaseNotFound`; a put on an unknown lease
  raises :class:`LeaseNotFound`;
* ``fail = True``: every call raises :class:`EtcdUnavailable` (an etcd outage).

Not modelled: watches, compaction, auth, nested txns, etcd's
minimum lease TTL.  ``tests/support/etcd_contract.py`` runs the same cases against this fake and
against a real etcd, so what is modelled cannot drift.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from hakeeper.dcs.etcd import (
    GRPC_INVALID_ARGUMENT,
    GRPC_NOT_FOUND,
    KV,
    EtcdRequestError,
    EtcdUnavailable,
    LeaseNotFound,
    TxnResult,
)

__all__ = ["FakeClock", "FakeEtcd"]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass(slots=True)
class _Lease:
    ttl: int  # as granted
    deadline: float  # on the fake's clock


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _decode_key(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", "surrogateescape")


def _int(value: Any) -> int:
    return int(value) if value not in (None, "") else 0


class FakeEtcd:
    """An in-memory etcd (see the module doc).  ``revision`` is the current store revision."""

    def __init__(self, *, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.fail = False
        self.revision = 1  # a new etcd cluster starts at revision 1
        self._kvs: dict[str, KV] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids: Iterator[int] = itertools.count(0x7E57_0000_0001)
        self.closed = False

    def __repr__(self) -> str:
        return f"FakeEtcd(keys={len(self._kvs)}, revision={self.revision}, leases={len(self._leases)})"

    async def close(self) -> None:
        self.closed = True

    # -- every call starts here -----------------------------------------------------------------

    async def _enter(self) -> None:
        # a real call suspends the caller: let other tasks run so that races stay races
        await asyncio.sleep(0)
        if self.fail:
            raise EtcdUnavailable("fake etcd: all endpoints failed (fail switch is on)")
        self._expire_leases()

    def _expire_leases(self) -> None:
        now = self.now()
        for lease_id, lease in sorted(self._leases.items(), key=lambda item: item[1].deadline):
            if lease.deadline <= now:
                self._revoke(lease_id)

    def _revoke(self, lease_id: int) -> None:
        """One revision for all keys of the lease (if it had any), like etcd's revoke txn."""
        del self._leases[lease_id]
        attached = [k for k, kv in self._kvs.items() if kv.lease == lease_id]
        if attached:
            self.revision += 1
            for k in attached:
                del self._kvs[k]

    # -- KV ---------------------------------------------------------------------------------------

    async def get(self, key: str, *, timeout: float | None = None) -> KV | None:
        await self._enter()
        return self._kvs.get(key)

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> tuple[list[KV], int]:
        await self._enter()
        kvs = _in_range(self._kvs, _key_bytes(prefix), _prefix_end(_key_bytes(prefix)))
        return sorted(kvs, key=lambda kv: kv.key), self.revision

    async def put(self, key: str, value: bytes | str, *, lease: int = 0, timeout: float | None = None) -> int:
        await self._enter()
        work = _Txn(self)
        work.put(key, value, lease)
        work.commit()
        return self.revision

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        await self._enter()
        work = _Txn(self)
        start = _key_bytes(key)
        deleted = work.delete(start, _prefix_end(start) if prefix else None)
        work.commit()
        return deleted

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        await self._enter()
        for branch in (success, failure or []):
            _check_no_duplicate_keys(branch)
        succeeded = all(self._compare(c) for c in compare)
        work = _Txn(self)
        ranges: list[list[KV]] = []
        for op in success if succeeded else failure or []:
            if "request_put" in op:
                req = op["request_put"]
                _only(req, {"key", "value", "lease"}, "request_put")
                work.put(
                    _decode_key(req["key"]), base64.b64decode(req.get("value") or ""), _int(req.get("lease"))
                )
            elif "request_delete_range" in op:
                req = op["request_delete_range"]
                _only(req, {"key", "range_end"}, "request_delete_range")
                start, end = _range_of(req)
                work.delete(start, end)
            elif "request_range" in op:
                req = op["request_range"]
                _only(req, {"key", "range_end"}, "request_range")
                start, end = _range_of(req)
                ranges.append(sorted(work.range(start, end), key=lambda kv: kv.key))
            else:
                raise ValueError(f"fake etcd: unsupported txn op {sorted(op)}")
        work.commit()
        return TxnResult(succeeded=succeeded, revision=self.revision, ranges=ranges)

    def _compare(self, c: dict[str, Any]) -> bool:
        if c.get("range_end"):
            start, end = _range_of(c)
            in_range = _in_range(self._kvs, start, end)
            if in_range:
                return all(self._compare_kv(c, kv) for kv in in_range)
            return self._compare_kv(c, None)  # etcd: an empty range compares as an absent key
        return self._compare_kv(c, self._kvs.get(_decode_key(c["key"])))

    def _compare_kv(self, c: dict[str, Any], kv: KV | None) -> bool:
        target = c["target"]
        if target == "VALUE":
            if kv is None:
                return False  # etcd: a value compare on a missing key always fails
            want_value = base64.b64decode(c.get("value") or "")
            sign = (kv.value > want_value) - (kv.value < want_value)
        else:
            field_name = _COMPARE_FIELDS[target]
            have = 0 if kv is None else int(getattr(kv, field_name))
            want = _int(c.get(field_name))
            sign = (have > want) - (have < want)
        try:
            return sign in _COMPARE_RESULTS[c.get("result", "EQUAL")]
        except KeyError:
            raise ValueError(f"fake etcd: bad compare result {c.get('result')!r}") from None

    # -- leases -----------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> int:
        await self._enter()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl=int(ttl), deadline=self.now() + ttl)
        return lease_id

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        await self._enter()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(GRPC_NOT_FOUND, f"lease {lease_id:x} not found (keepalive)", 200)
        lease.deadline = self.now() + lease.ttl
        return lease.ttl

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        await self._enter()
        if lease_id in self._leases:
            self._revoke(lease_id)

    async def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        await self._enter()
        lease = self._leases.get(lease_id)
        if lease is None:
            return -1
        return int(lease.deadline - self.now())  # etcd truncates the remaining seconds


class _Txn:
    """The writes of one request, applied to a copy and committed at one new revision (if any
    key changed), so a range inside the txn sees the txn's own earlier writes."""

    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd = etcd
        self.kvs = dict(etcd._kvs)
        self.rev = etcd.revision + 1
        self.changed = False

    def put(self, key: str, value: bytes | str, lease: int) -> None:
        if not key:
            raise EtcdRequestError(GRPC_INVALID_ARGUMENT, "etcdserver: key is not provided", 400)
        if lease and lease not in self.etcd._leases:
            raise LeaseNotFound(GRPC_NOT_FOUND, "etcdserver: requested lease not found", 404)
        data = value.encode() if isinstance(value, str) else bytes(value)
        old = self.kvs.get(key)
        if old is None:
            self.kvs[key] = KV(key, data, self.rev, self.rev, 1, lease)
        else:
            self.kvs[key] = replace(
                old, value=data, mod_revision=self.rev, version=old.version + 1, lease=lease
            )
        self.changed = True

    def delete(self, start: bytes, end: bytes | None) -> int:
        doomed = [kv.key for kv in _in_range(self.kvs, start, end)]
        for k in doomed:
            del self.kvs[k]
        self.changed = self.changed or bool(doomed)
        return len(doomed)

    def range(self, start: bytes, end: bytes | None) -> list[KV]:
        return _in_range(self.kvs, start, end)

    def commit(self) -> None:
        if not self.changed:
            return
        # a key belongs to the lease its last put named (none: detached), so nothing else to do
        self.etcd._kvs = self.kvs
        self.etcd.revision = self.rev


_COMPARE_FIELDS = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version", "LEASE": "lease"}
# which signs of (stored - wanted) satisfy each compare result
_COMPARE_RESULTS = {"EQUAL": (0,), "NOT_EQUAL": (-1, 1), "LESS": (-1,), "GREATER": (1,)}


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _range_of(req: dict[str, Any]) -> tuple[bytes, bytes | None]:
    start = base64.b64decode(req["key"])
    end = base64.b64decode(req["range_end"]) if req.get("range_end") else None
    return start, end


def _in_range(kvs: dict[str, KV], start: bytes, end: bytes | None) -> list[KV]:
    """Keys in [start, end); ``end`` None: exactly ``start``; ``b"\\0"``: from ``start`` on."""
    if end is None:
        kv = kvs.get(start.decode("utf-8", "surrogateescape"))
        return [kv] if kv is not None else []
    return [kv for k, kv in kvs.items() if _key_bytes(k) >= start and (end == b"\0" or _key_bytes(k) < end)]


def _only(req: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(req) - allowed
    if extra:
        raise ValueError(f"fake etcd: {what} fields {sorted(extra)} are not modelled")


def _check_no_duplicate_keys(ops: list[dict[str, Any]]) -> None:
    """etcd refuses a branch that puts one key twice, or puts a key that it also deletes."""
    puts: list[bytes] = []
    deletes: list[tuple[bytes, bytes | None]] = []
    for op in ops:
        if "request_put" in op:
            puts.append(base64.b64decode(op["request_put"]["key"]))
        elif "request_delete_range" in op:
            deletes.append(_range_of(op["request_delete_range"]))
    dup = len(set(puts)) != len(puts) or any(
        p == start if end is None else (p >= start and (end == b"\0" or p < end))
        for p in puts
        for start, end in deletes
    )
    if dup:
        raise EtcdRequestError(GRPC_INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request", 400)
