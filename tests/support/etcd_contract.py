"""What hakeeper relies on etcd for, written once and run against both etcds.

Each case is an async function taking a :class:`Backend`.  ``tests/unit/test_etcd_contract_fake.py``
runs every case in :data:`CASES` against :class:`~tests.support.fake_etcd.FakeEtcd`,
``tests/integration/test_etcd_contract_real.py`` runs the very same list against a real etcd: a
behaviour the fake gets wrong fails the real side's twin, so the fake cannot drift.

Two kinds of cases: raw etcd semantics (revisions, versions, compares, ops, leases) and every
:class:`~hakeeper.dcs.store.ClusterStore` operation (each guard refuses under a stale term or
revision and applies under the current one).  Revisions are only compared with each other,
never with constants: the real etcd is shared by all cases, each under its own key prefix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

import pytest

from hakeeper.core.cluster import (
    HistoryEntry,
    Member,
    MemberRole,
    MemberState,
    Status,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
    SyncState,
    Upgrade,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import (
    GRPC_INVALID_ARGUMENT,
    CmpOp,
    EtcdRequestError,
    EtcdUnavailable,
    LeaseNotFound,
    cmp_create,
    cmp_lease,
    cmp_mod,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
)
from hakeeper.dcs.store import ClusterStore, EtcdLike


@dataclass(frozen=True)
class Backend:
    """One etcd to run a case on."""

    client: EtcdLike
    prefix: str  # a key prefix of this case alone (cases share one real etcd)
    elapse: Callable[[float], Awaitable[None]]  # let seconds pass: advance the fake clock, or sleep
    cut_off: Callable[[], AbstractAsyncContextManager[EtcdLike]]  # a client that cannot reach etcd

    def keys(self, scope: str = "c1") -> Keys:
        return Keys.of(f"{self.prefix}/ns", scope)

    def store(self, scope: str = "c1") -> ClusterStore:
        return ClusterStore(self.client, self.keys(scope))

    async def eventually(self, check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
        """Poll ``check`` while ``within`` seconds pass (on the backend's clock)."""
        waited = 0.0
        while not await check():
            if waited >= within:
                raise AssertionError(f"not within {within}s: {what}")
            await self.elapse(0.1)
            waited += 0.1


Case = Callable[[Backend], Awaitable[None]]


@dataclass(frozen=True)
class ContractCase:
    run: Case
    covers: frozenset[str]  # the ClusterStore operations it exercises

    @property
    def name(self) -> str:
        return self.run.__name__


CASES: list[ContractCase] = []


def case(*covers: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES.append(ContractCase(fn, frozenset(covers)))
        return fn

    return register


def params() -> list[Any]:
    """``CASES`` as pytest parameters named after the cases (both test files use this)."""
    return [pytest.param(c, id=c.name) for c in CASES]


# Lease TTLs: etcd raises a TTL below its minimum (1.5 election timeouts, 2 s with the test
# server's settings) to the minimum; the fake does not model that, so cases stay above it.
SHORT_TTL = 2
LONG_TTL = 30
EXPIRY_SLACK = 4.0  # real etcd checks lease deadlines every 500 ms and revokes through raft


async def _revision(b: Backend) -> int:
    return (await b.client.get_prefix(b.prefix + "/"))[1]


# ================================================================================ raw etcd


@case()
async def revisions_and_versions_follow_every_write(b: Backend) -> None:
    c, k = b.client, b.prefix + "/k"
    start = await _revision(b)
    assert await c.get(k) is None
    assert await _revision(b) == start, "reads do not move the revision"
    r1 = await c.put(k, "one")
    assert r1 == start + 1
    kv = await c.get(k)
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        k,
        b"one",
        r1,
        r1,
        1,
        0,
    )
    r2 = await c.put(k, b"two")
    assert r2 == r1 + 1
    kv = await c.get(k)
    assert kv is not None and (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (
        b"two",
        r1,
        r2,
        2,
    )
    r3 = await c.put(k, b"two")
    kv = await c.get(k)
    assert r3 == r2 + 1, "a put of the same value is a write"
    assert kv is not None and (kv.mod_revision, kv.version) == (r3, 3)
    assert await c.delete(k) == 1
    assert await _revision(b) == r3 + 1
    r5 = await c.put(k, b"again")
    kv = await c.get(k)
    assert kv is not None and (kv.create_revision, kv.mod_revision, kv.version) == (r5, r5, 1), (
        "a key created again starts over: new create revision, version 1"
    )
    await c.put(b.prefix + "/bin", b"\x00\xff")
    kv = await c.get(b.prefix + "/bin")
    assert kv is not None and kv.value == b"\x00\xff"


@case()
async def deletes_count_what_they_delete_and_only_then_move_the_revision(b: Backend) -> None:
    c, p = b.client, b.prefix
    start = await _revision(b)
    assert await c.delete(p + "/absent") == 0
    assert await c.delete(p + "/nothing/", prefix=True) == 0
    assert await _revision(b) == start, "deleting nothing is no write"
    for key in ("/d/a", "/d/b", "/d/c/deep", "/d0", "/d"):
        await c.put(p + key, "v")
    before = await _revision(b)
    assert await c.delete(p + "/d/", prefix=True) == 3
    assert await _revision(b) == before + 1, "one delete of many keys is one revision"
    kvs, _ = await c.get_prefix(p + "/")
    assert [kv.key for kv in kvs] == [p + "/d", p + "/d0"], "keys outside the prefix stay"


@case()
async def prefix_reads_are_sorted_by_key_and_carry_the_store_revision(b: Backend) -> None:
    c, p = b.client, b.prefix
    kvs, rev = await c.get_prefix(p + "/r/")
    assert kvs == [] and rev == await _revision(b)
    for key in ("/r/b", "/r/a/2", "/r/c", "/r/a/1", "/r/a", "/rr", "/r"):
        await c.put(p + key, key)
    last = await c.put(p + "/other", "x")
    kvs, rev = await c.get_prefix(p + "/r/")
    assert [kv.key for kv in kvs] == [p + k for k in ("/r/a", "/r/a/1", "/r/a/2", "/r/b", "/r/c")]
    assert [kv.value for kv in kvs] == [k.encode() for k in ("/r/a", "/r/a/1", "/r/a/2", "/r/b", "/r/c")]
    assert rev == last, "the header revision is the store's, not the newest key's in the range"


async def _check(c: EtcdLike, compare: dict[str, Any]) -> bool:
    return (await c.txn([compare], [], [])).succeeded


def _outcomes(stored: int | bytes, arg: int | bytes) -> dict[CmpOp, bool]:
    """What each operator answers for ``stored <op> arg`` (etcd compares the stored side)."""
    assert type(stored) is type(arg)
    below, above = stored < arg, stored > arg  # type: ignore[operator]
    return {"=": not below and not above, "!=": below or above, "<": below, ">": above}


@case()
async def compares_on_every_field_and_operator(b: Backend) -> None:
    c, k = b.client, b.prefix + "/cmp"
    lease = await c.lease_grant(LONG_TTL)
    try:
        await c.put(k, "first")
        await c.put(k, "m", lease=lease)
        kv = await c.get(k)
        assert kv is not None and kv.version == 2 and kv.lease == lease
        numeric: dict[Callable[[str, CmpOp, int], dict[str, Any]], int] = {
            cmp_create: kv.create_revision,
            cmp_mod: kv.mod_revision,
            cmp_version: kv.version,
            cmp_lease: kv.lease,
        }
        for build, stored in numeric.items():
            for arg in (stored, stored - 1, stored + 1):
                for op, expected in _outcomes(stored, arg).items():
                    got = await _check(c, build(k, op, arg))
                    assert got is expected, f"{build.__name__}({op} {arg}) on {stored}: {got}"
        for text in ("m", "a", "z", "m\x00", ""):
            for op, expected in _outcomes(b"m", text.encode()).items():
                got = await _check(c, cmp_value(k, op, text))
                assert got is expected, f"value {op} {text!r} on 'm': {got}"
        # every compare must hold
        both = [cmp_value(k, "=", "m"), cmp_version(k, "=", 1)]
        assert not (await c.txn(both, [], [])).succeeded
    finally:
        await c.lease_revoke(lease)


@case()
async def compares_on_an_absent_key(b: Backend) -> None:
    c, k = b.client, b.prefix + "/absent"
    for build in (cmp_create, cmp_mod, cmp_version, cmp_lease):
        assert await _check(c, build(k, "=", 0)), f"{build.__name__}: an absent key has 0"
        assert not await _check(c, build(k, ">", 0))
        assert await _check(c, build(k, "<", 1))
        assert await _check(c, build(k, "!=", 5))
    # a value compare on an absent key is always false, even != and against the empty value
    for op in ("=", "!=", "<", ">"):
        assert not await _check(c, cmp_value(k, op, "")), f"value {op} '' on an absent key"
        assert not await _check(c, cmp_value(k, op, "x")), f"value {op} 'x' on an absent key"
    await c.put(k, "")
    assert await _check(c, cmp_value(k, "=", "")), "an empty value exists"


@case()
async def compares_over_a_prefix_hold_only_if_every_key_passes(b: Backend) -> None:
    c, p = b.client, b.prefix + "/rc/"
    # an empty range compares as one absent key
    assert await _check(c, cmp_create(p, "=", 0, prefix=True))
    assert await _check(c, cmp_mod(p, "<", 1, prefix=True))
    assert not await _check(c, cmp_create(p, ">", 0, prefix=True))
    await c.put(p + "a", "1")
    first = await _revision(b)
    await c.put(p + "b", "2")
    await c.put(b.prefix + "/rc", "beside the prefix")  # not under "<prefix>/rc/"
    await c.put(b.prefix + "/rcx", "a longer name")
    second = await _revision(b)
    assert not await _check(c, cmp_create(p, "=", 0, prefix=True)), "keys exist"
    assert await _check(c, cmp_mod(p, "<", second + 1, prefix=True))
    assert not await _check(c, cmp_mod(p, "<", first + 1, prefix=True)), "b is newer than first"
    assert await _check(c, cmp_mod(p, ">", 0, prefix=True)), "every key passes"
    assert not await _check(c, cmp_mod(p + "a", "=", second, prefix=True)), "only a range"
    await c.delete(p + "b")
    assert await _check(c, cmp_mod(p, "<", first + 1, prefix=True)), "a deleted key is not compared"


@case()
async def txn_branches_apply_at_one_revision_and_ranges_see_them(b: Backend) -> None:
    c, p = b.client, b.prefix
    await c.put(p + "/t/gone", "x")
    start = await _revision(b)
    res = await c.txn(
        [cmp_create(p + "/t/a", "=", 0)],
        [
            op_put(p + "/t/a", "1"),
            op_put(p + "/t/b", "2"),
            op_delete(p + "/t/gone"),
            op_range(p + "/t/", prefix=True),
            op_range(p + "/t/missing"),
        ],
        [op_put(p + "/t/failed", "no")],
    )
    assert res.succeeded and res.revision == start + 1, "a txn is one revision, whatever it writes"
    assert [[kv.key for kv in r] for r in res.ranges] == [[p + "/t/a", p + "/t/b"], []], (
        "a range inside a txn sees the txn's own earlier writes"
    )
    a, bb = await c.get(p + "/t/a"), await c.get(p + "/t/b")
    assert a is not None and bb is not None
    assert a.mod_revision == bb.mod_revision == a.create_revision == start + 1
    assert await c.get(p + "/t/gone") is None and await c.get(p + "/t/failed") is None

    # the failure branch runs when a compare fails, and is a write like any other
    res = await c.txn(
        [cmp_create(p + "/t/a", "=", 0)], [op_put(p + "/t/x", "no")], [op_put(p + "/t/failed", "y")]
    )
    assert not res.succeeded and res.revision == start + 2
    assert await c.get(p + "/t/x") is None
    failed = await c.get(p + "/t/failed")
    assert failed is not None and failed.value == b"y"

    # a txn that writes nothing does not move the revision, and answers the current one
    res = await c.txn([cmp_create(p + "/t/a", "=", 0)], [op_put(p + "/t/x", "no")])
    assert not res.succeeded and res.revision == start + 2 and res.ranges == []
    res = await c.txn([], [op_range(p + "/t/a")])
    assert res.succeeded and res.revision == start + 2
    assert [kv.value for kv in res.ranges[0]] == [b"1"]
    res = await c.txn([], [op_delete(p + "/t/nothing")])
    assert res.succeeded and res.revision == start + 2

    # a prefix delete inside a txn
    res = await c.txn([], [op_delete(p + "/t/", prefix=True), op_range(p + "/t/", prefix=True)])
    assert res.succeeded and res.revision == start + 3 and res.ranges == [[]]
    assert (await c.get_prefix(p + "/t/"))[0] == []


@case()
async def a_txn_branch_naming_one_key_twice_is_rejected(b: Backend) -> None:
    c, k = b.client, b.prefix + "/dup"
    start = await _revision(b)
    for ops in (
        [op_put(k, "1"), op_put(k, "2")],
        [op_delete(k), op_put(k, "2")],
        [op_delete(b.prefix + "/", prefix=True), op_put(k, "2")],
    ):
        with pytest.raises(EtcdRequestError) as e:
            await c.txn([], ops)
        assert e.value.code == GRPC_INVALID_ARGUMENT and "duplicate key" in e.value.message
    assert await _revision(b) == start and await c.get(k) is None


@case()
async def leases_attach_keys_and_a_put_without_lease_detaches(b: Backend) -> None:
    c, p = b.client, b.prefix
    lease = await c.lease_grant(SHORT_TTL)
    await c.put(p + "/l/a", "a", lease=lease)
    await c.put(p + "/l/b", "b", lease=lease)
    await c.put(p + "/l/kept", "k", lease=lease)
    await c.put(p + "/l/kept", "k2")  # no lease: detached
    await c.put(p + "/l/plain", "p")
    kv = await c.get(p + "/l/a")
    assert kv is not None and kv.lease == lease
    kept = await c.get(p + "/l/kept")
    assert kept is not None and kept.lease == 0
    before = await _revision(b)

    async def expired() -> bool:
        return await c.get(p + "/l/a") is None

    await b.eventually(expired, SHORT_TTL + EXPIRY_SLACK, "the lease expired")
    kvs, rev = await c.get_prefix(p + "/l/")
    assert [kv.key for kv in kvs] == [p + "/l/kept", p + "/l/plain"]
    assert rev == before + 1, "an expiry deletes all keys of the lease in one revision"
    with pytest.raises(LeaseNotFound):
        await c.lease_keepalive(lease)
    assert await c.lease_time_to_live(lease) == -1


@case()
async def keepalive_keeps_a_lease_and_answers_its_granted_ttl(b: Backend) -> None:
    c, k = b.client, b.prefix + "/ka"
    ttl = 3
    lease = await c.lease_grant(ttl)
    await c.put(k, "v", lease=lease)
    for _ in range(3):  # 4.5 s in all: past the TTL, kept alive
        await b.elapse(1.5)
        assert await c.lease_keepalive(lease) == ttl
        assert await c.get(k) is not None
    assert 0 < await c.lease_time_to_live(lease) <= ttl
    await c.lease_revoke(lease)
    assert await c.get(k) is None


@case()
async def revoke_deletes_attached_keys_and_unknown_leases_are_not_found(b: Backend) -> None:
    c, p = b.client, b.prefix
    lease = await c.lease_grant(LONG_TTL)
    await c.put(p + "/rv/a", "a", lease=lease)
    await c.put(p + "/rv/b", "b", lease=lease)
    before = await _revision(b)
    await c.lease_revoke(lease)
    assert (await c.get_prefix(p + "/rv/"))[0] == []
    assert await _revision(b) == before + 1
    await c.lease_revoke(lease)  # already gone: no error
    with pytest.raises(LeaseNotFound):
        await c.lease_keepalive(lease)
    assert await c.lease_time_to_live(lease) == -1
    with pytest.raises(LeaseNotFound):
        await c.put(p + "/rv/c", "c", lease=lease)
    with pytest.raises(LeaseNotFound):
        await c.txn([], [op_put(p + "/rv/c", "c", lease=lease)])
    # only the branch taken is checked
    res = await c.txn([cmp_create(p + "/rv/c", "=", 1)], [op_put(p + "/rv/c", "c", lease=lease)])
    assert not res.succeeded
    assert await _revision(b) == before + 1 and await c.get(p + "/rv/c") is None
    empty = await c.lease_grant(LONG_TTL)
    await c.lease_revoke(empty)
    assert await _revision(b) == before + 1, "revoking a lease without keys writes nothing"


@case()
async def every_call_fails_with_unavailable_when_etcd_cannot_be_reached(b: Backend) -> None:
    async with b.cut_off() as c:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: c.get(b.prefix + "/k"),
            lambda: c.get_prefix(b.prefix + "/"),
            lambda: c.put(b.prefix + "/k", "v"),
            lambda: c.delete(b.prefix + "/k"),
            lambda: c.txn([], [op_put(b.prefix + "/k", "v")]),
            lambda: c.lease_grant(LONG_TTL),
            lambda: c.lease_keepalive(1),
            lambda: c.lease_revoke(1),
            lambda: c.lease_time_to_live(1),
            lambda: ClusterStore(c, b.keys()).read_view(),
            lambda: ClusterStore(c, b.keys()).take_leader("n1", 1),
        ]
        for call in calls:
            with pytest.raises(EtcdUnavailable):
                await call()


# ================================================================================ ClusterStore


def _member(name: str, role: MemberRole = MemberRole.REPLICA, **kw: Any) -> Member:
    return Member(name=name, role=role, state=MemberState.RUNNING, host="127.0.0.1", port=5432, **kw)


def _request(leader: str | None = "n1", candidate: str | None = "n2", at: float = 1.0) -> Switchover:
    return Switchover(kind=SwitchoverKind.SWITCHOVER, leader=leader, candidate=candidate, requested_at=at)


async def _leader(b: Backend, s: ClusterStore, name: str = "n1") -> tuple[int, int]:
    lease = await b.client.lease_grant(LONG_TTL)
    term = await s.take_leader(name, lease)
    assert term is not None
    return term, lease


@case("initialize", "read_view", "view_of", "read_keys", "leader_term", "read_config")
async def the_initialize_race_has_exactly_one_winner(b: Backend) -> None:
    s = b.store()
    assert await s.leader_term() is None and await s.read_config() is None
    empty = await s.read_view()
    assert empty.initialized is None and empty.leader is None and empty.members == {}
    leases = [await b.client.lease_grant(LONG_TTL) for _ in range(3)]
    config = DynamicConfig(ttl=20, loop_wait=2)
    results = await asyncio.gather(
        *(
            s.initialize(system_identifier=f"7{i}", leader=f"n{i}", lease=leases[i], config=config)
            for i in range(3)
        )
    )
    winners = [i for i, term in enumerate(results) if term is not None]
    assert len(winners) == 1, f"exactly one winner: {results}"
    w = winners[0]
    term = results[w]
    assert term is not None and await s.leader_term() == term
    view = await s.read_view()
    assert view.initialized == f"7{w}"
    assert view.leader is not None
    assert (view.leader.name, view.leader.term, view.leader.lease) == (f"n{w}", term, leases[w])
    assert view.config == config and view.config_error is None
    stored = await s.read_config()
    assert stored is not None and stored[0] == config.model_dump_json().encode()
    assert stored[1] == view.config_revision == term
    kvs, rev = await s.read_keys()
    assert s.view_of(kvs, rev, DynamicConfig()) == view and view.revision == rev
    # no second initialization, even once the leader key is gone
    await b.client.lease_revoke(leases[w])
    assert await s.leader_term() is None
    again = await s.initialize(system_identifier="9", leader="n9", lease=leases[(w + 1) % 3], config=config)
    assert again is None
    # nor while another member holds the leader key of a cluster without initialize key
    other = b.store("c2")
    await _leader(b, other, "x")
    assert (
        await other.initialize(system_identifier="1", leader="y", lease=leases[(w + 1) % 3], config=config)
        is None
    )


@case("undo_initialize")
async def undo_initialize_only_removes_our_own_claim(b: Backend) -> None:
    s = b.store()
    lease = await b.client.lease_grant(LONG_TTL)
    term = await s.initialize(system_identifier="1", leader="n1", lease=lease, config=DynamicConfig())
    assert term is not None
    await b.client.put(s.keys.member("n1"), _member("n1").to_json())
    assert not await s.undo_initialize(leader="n2", term=term), "not ours"
    assert not await s.undo_initialize(leader="n1", term=term - 1), "stale term"
    assert (await s.read_view()).initialized == "1"
    assert await s.undo_initialize(leader="n1", term=term)
    view = await s.read_view()
    assert view.initialized is None and view.leader is None and view.config_revision == 0
    assert "n1" in view.members, "member records are not part of the claim"
    assert (
        await s.initialize(system_identifier="2", leader="n2", lease=lease, config=DynamicConfig())
        is not None
    )


@case("take_leader", "release_leader")
async def the_leader_key_is_taken_once_and_released_only_by_its_term(b: Backend) -> None:
    s = b.store()
    term, lease = await _leader(b, s, "n1")
    assert await s.take_leader("n2", lease) is None, "the key is held"
    assert await s.take_leader("n1", lease) is None, "even for its holder"
    assert not await s.release_leader("n2", term), "not n2's key"
    assert await s.release_leader("n1", term)
    assert await s.leader_term() is None
    assert not await s.release_leader("n1", term), "nothing left to release"
    term2 = await s.take_leader("n2", lease)
    assert term2 is not None and term2 > term
    term3_holder = await s.read_view()
    assert term3_holder.leader is not None and term3_holder.leader.name == "n2"
    # n1 takes it back later: its old term is still stale
    assert await s.release_leader("n2", term2)
    term3 = await s.take_leader("n1", lease)
    assert term3 is not None and term3 > term2
    assert not await s.release_leader("n1", term), "a stale term never deletes a newer key"
    assert await s.leader_term() == term3


@case("reattach_leader")
async def reattach_moves_the_leader_key_to_a_new_lease_under_the_same_term(b: Backend) -> None:
    s = b.store()
    term, _old_lease = await _leader(b, s, "n1")
    new_lease = await b.client.lease_grant(LONG_TTL)
    assert not await s.reattach_leader("n1", term - 1, new_lease), "stale term"
    assert not await s.reattach_leader("n2", term, new_lease), "not n2's key"
    view = await s.read_view()
    assert view.leader is not None and view.leader.lease == _old_lease
    assert await s.reattach_leader("n1", term, new_lease)
    view = await s.read_view()
    assert view.leader is not None
    assert (view.leader.name, view.leader.term, view.leader.lease) == ("n1", term, new_lease)
    await b.client.lease_revoke(_old_lease)
    assert await s.leader_term() == term, "the old lease no longer holds the key"


@case("take_over_leader")
async def take_over_moves_the_key_only_from_the_lease_it_was_decided_on(b: Backend) -> None:
    s = b.store()
    term, old = await _leader(b, s, "n1")
    other = await b.client.lease_grant(LONG_TTL)
    mine = await b.client.lease_grant(LONG_TTL)
    assert not await s.take_over_leader("n1", term, other, mine), "the key is not on that lease"
    assert not await s.take_over_leader("n1", term - 1, old, mine), "stale term"
    assert not await s.take_over_leader("n2", term, old, mine), "not n2's key"
    # another agent of the same name re-puts the key on its lease: the term stays the same
    assert await s.reattach_leader("n1", term, other)
    assert not await s.take_over_leader("n1", term, old, mine), "moved meanwhile: never taken from it"
    view = await s.read_view()
    assert view.leader is not None and view.leader.lease == other
    assert await s.take_over_leader("n1", term, other, mine)
    view = await s.read_view()
    assert view.leader is not None
    assert (view.leader.name, view.leader.term, view.leader.lease) == ("n1", term, mine)


@case("name_leases", "lease_ttl")
async def the_leases_a_name_is_held_under_and_their_time_to_live(b: Backend) -> None:
    s = b.store()
    assert await s.name_leases("n1") == (None, None)
    lease = await b.client.lease_grant(LONG_TTL)
    await s.put_member(_member("n1"), lease)
    assert await s.name_leases("n1") == (lease, None)
    _term, leader_lease = await _leader(b, s, "n1")
    assert await s.name_leases("n1") == (lease, leader_lease)
    assert await s.name_leases("n2") == (None, None), "the leader key names n1, not n2"
    assert 0 < await s.lease_ttl(lease) <= LONG_TTL
    await b.client.lease_revoke(lease)
    assert await s.lease_ttl(lease) == -1, "revoked: gone"
    assert await s.name_leases("n1") == (None, leader_lease), "the member key went with its lease"


@case("hand_over", "write_request")
async def hand_over_releases_the_key_and_marks_the_request_in_one_step(b: Backend) -> None:
    s = b.store()
    term, _ = await _leader(b, s, "n1")
    req = await s.write_request(None, _request())
    assert req is not None and req.mod_revision > term
    handover = replace(req, stage=SwitchoverStage.HANDOVER, handover_at=2.0)
    assert not await s.hand_over("n1", term - 1, req, handover), "stale term"
    assert not await s.hand_over("n2", term, req, handover), "not n2's key"
    assert not await s.hand_over("n1", term, replace(req, mod_revision=req.mod_revision - 1), handover), (
        "the request changed"
    )
    view = await s.read_view()
    assert view.leader is not None and view.switchover == req
    assert await s.hand_over("n1", term, req, handover)
    view = await s.read_view()
    assert view.leader is None
    assert view.switchover is not None
    assert view.switchover.stage == SwitchoverStage.HANDOVER and view.switchover.candidate == "n2"
    assert view.switchover.to_json() == handover.to_json() and view.switchover.mod_revision > req.mod_revision


@case("drop_switchover")
async def drop_switchover_needs_the_term_and_the_request_read(b: Backend) -> None:
    s = b.store()
    term, _ = await _leader(b, s, "n1")
    req = await s.write_request(None, _request())
    assert req is not None
    assert not await s.drop_switchover(term - 1, req), "stale term"
    assert not await s.drop_switchover(term, replace(req, mod_revision=req.mod_revision + 1)), "other request"
    assert (await s.read_view()).switchover == req
    assert await s.drop_switchover(term, req)
    assert (await s.read_view()).switchover is None


@case("write_status", "write_sync", "drop_sync")
async def status_and_sync_are_written_only_under_the_current_term(b: Backend) -> None:
    s = b.store()
    term, _ = await _leader(b, s, "n1")
    status = Status(lsn=0x3000060, timeline=2, term=term)
    sync = SyncState("n1", ("n2", "n3"), term, 1)
    assert not await s.write_status(term - 1, status)
    assert not await s.write_sync(term + 1, sync)
    view = await s.read_view()
    assert view.status == Status() and view.sync is None
    assert await s.write_status(term, status)
    assert await s.write_sync(term, sync)
    view = await s.read_view()
    assert view.status == status
    assert view.sync is not None and view.sync.mod_revision > term
    assert replace(view.sync, mod_revision=0) == sync and view.sync.is_quorum
    assert not await s.drop_sync(term - 1)
    assert (await s.read_view()).sync is not None
    assert await s.drop_sync(term)
    assert (await s.read_view()).sync is None


@case("append_history")
async def history_is_appended_under_the_term_without_losing_entries(b: Backend) -> None:
    s = b.store()
    term, _ = await _leader(b, s, "n1")
    first = HistoryEntry(1, None, 10.0, "bootstrap", None, "n1")
    assert not await s.append_history(term - 1, first)
    assert (await s.read_view()).history == ()
    assert await s.append_history(term, first)
    concurrent = [HistoryEntry(2, 0x3000000 + i, 11.0 + i, f"promotion {i}", "n1", "n2") for i in range(2)]
    results = await asyncio.gather(*(s.append_history(term, e, attempts=3) for e in concurrent))
    assert results == [True, True], "a concurrent append retries on the history's new revision"
    view = await s.read_view()
    assert view.history[0] == first and set(view.history[1:]) == set(concurrent) and len(view.history) == 3
    raw = await b.client.get(s.keys.history)
    assert raw is not None and json.loads(raw.value)[0] == first.to_dict()
    assert view.history_revision == raw.mod_revision
    assert not await s.append_history(term, first, attempts=0), "no attempt, no write"


@case()  # UpgradeKeys (store.upgrades): the same calls on both sides
async def the_upgrade_key_is_compare_and_swap_and_pauses_the_cluster(b: Backend) -> None:
    s = b.store()
    assert not (await s.read_view()).paused
    rec = Upgrade("u1", 17, 18, "link", 5.0, by="test")
    first = await s.upgrades.write(None, rec)
    assert first is not None and first.mod_revision > 0
    view = await s.read_view()
    assert view.upgrade == first and view.paused, "an upgrade in progress counts as paused"
    assert await s.upgrades.write(None, replace(rec, id="u2")) is None, "one upgrade at a time"
    assert await s.upgrades.write(replace(first, mod_revision=first.mod_revision - 1), rec) is None
    moved = await s.upgrades.write(first, replace(first, phase="primary"))
    assert moved is not None and (await s.read_view()).upgrade == moved
    assert not await s.upgrades.delete("u2"), "another upgrade's key stays"
    assert await s.upgrades.delete("u1")
    assert (await s.read_view()).upgrade is None and await s.upgrades.delete("u1"), "gone: nothing to do"
    await b.client.put(s.keys.upgrade, b"{not json")
    view = await s.read_view()
    assert view.upgrade is None and view.upgrading and view.paused, "an unreadable key still pauses"
    assert await s.upgrades.delete("anything"), "an unreadable key is removed by any upgrade"


@case()  # UpgradeKeys.replace_initialize
async def the_system_identifier_is_replaced_only_from_the_old_one_under_the_term(b: Backend) -> None:
    s = b.store()
    lease = await b.client.lease_grant(LONG_TTL)
    term = await s.initialize(system_identifier="111", leader="n1", lease=lease, config=DynamicConfig())
    assert term is not None
    assert not await s.upgrades.replace_initialize("999", "222", term=term), "not the current identifier"
    assert not await s.upgrades.replace_initialize("111", "222", term=term + 1), "not the leader's term"
    assert (await s.read_view()).initialized == "111"
    assert await s.upgrades.replace_initialize("111", "222", term=term)
    assert (await s.read_view()).initialized == "222"


@case("put_member", "delete_member")
async def member_records_live_on_their_lease(b: Backend) -> None:
    s = b.store()
    lease = await b.client.lease_grant(LONG_TTL)
    m1 = _member("n1", MemberRole.PRIMARY, timeline=2, wal_lsn=100, nofailover=True)
    m2 = _member("n2", lag=5)
    await s.put_member(m1, lease)
    await s.put_member(m2, 0)
    view = await s.read_view()
    assert view.members == {"n1": replace(m1, lease=lease), "n2": m2}
    await s.delete_member("n2")
    await s.delete_member("n9")  # absent: nothing to do, no error
    assert list((await s.read_view()).members) == ["n1"]
    await b.client.lease_revoke(lease)
    assert (await s.read_view()).members == {}


@case("write_request", "cancel_request")
async def switchover_requests_are_compare_and_swap(b: Backend) -> None:
    s = b.store()
    first = await s.write_request(None, _request(at=1.0))
    assert first is not None and first.requested_at == 1.0
    assert replace(first, mod_revision=0) == _request(at=1.0)
    assert await s.write_request(None, _request(at=2.0)) is None, "a request exists"
    stale = replace(first, mod_revision=first.mod_revision - 1)
    assert await s.write_request(stale, _request(at=2.0)) is None
    second = await s.write_request(first, _request(leader=None, at=3.0))
    assert second is not None and second.mod_revision > first.mod_revision and second.leader is None
    assert (await s.read_view()).switchover == second
    assert not await s.cancel_request(first), "the request changed since it was read"
    assert await s.cancel_request(second)
    assert (await s.read_view()).switchover is None
    assert not await s.cancel_request(second), "already gone"


@case("write_config", "read_config")
async def the_dynamic_config_is_compare_and_swap(b: Backend) -> None:
    s = b.store()
    assert await s.write_config(DynamicConfig(), 1) is None, "no config to replace"
    created = await s.write_config(DynamicConfig(ttl=15), 0)
    assert created is not None, "mod revision 0: only while absent"
    stored = await s.read_config()
    assert stored is not None and stored[1] == created
    assert DynamicConfig.model_validate_json(stored[0]).ttl == 15
    new = DynamicConfig(ttl=25, pause=True)
    rev = await s.write_config(new, created)
    assert rev is not None and rev > created
    assert await s.write_config(DynamicConfig(ttl=30), created) is None, "stale revision"
    view = await s.read_view()
    assert view.config == new and view.paused and view.config_revision == rev


@case("write_schedule", "read_schedule", "read_schedules")
async def schedule_records_are_claimed_under_the_term_and_their_revision(b: Backend) -> None:
    s = b.store()
    term, _ = await _leader(b, s, "n1")
    assert await s.read_schedule("daily") is None and await s.read_schedules() == []
    assert await s.write_schedule("daily", '{"v": 1}', 0, term - 1) is None, "stale term"
    r1 = await s.write_schedule("daily", '{"v": 1}', 0, term)
    assert r1 is not None
    assert await s.write_schedule("daily", '{"v": 2}', 0, term) is None, "claimed already"
    assert await s.write_schedule("daily", '{"v": 2}', r1 - 1, term) is None, "stale record"
    assert await s.release_leader("n1", term)
    assert await s.write_schedule("daily", '{"v": 2}', r1, term) is None, "no longer the leader"
    r2 = await s.write_schedule("daily", '{"v": 2}', r1, None)
    assert r2 is not None, "a result is recorded without the term"
    await s.write_schedule("weekly", "{}", 0, None)
    kv = await s.read_schedule("daily")
    assert kv is not None and kv.value == b'{"v": 2}' and kv.mod_revision == r2
    assert [kv.key for kv in await s.read_schedules()] == [
        s.keys.schedule("daily"),
        s.keys.schedule("weekly"),
    ]


@case("leader_member")
async def the_leader_member_of_another_scope(b: Backend) -> None:
    source = b.store("source")
    here = ClusterStore(b.client, Keys.of(f"{b.prefix}/ns", "source"))
    assert await here.leader_member() is None
    _, lease = await _leader(b, source, "p1")
    assert await here.leader_member() is None, "a leader without a member record"
    await source.put_member(_member("p1", MemberRole.PRIMARY), lease)
    await source.put_member(_member("p2"), lease)
    m = await here.leader_member()
    assert m is not None and (m.name, m.role, m.host, m.port, m.lease) == (
        "p1",
        MemberRole.PRIMARY,
        "127.0.0.1",
        5432,
        lease,
    )
    assert await b.store("elsewhere").leader_member() is None


@case("read_view", "view_of")
async def read_view_round_trips_every_key(b: Backend) -> None:
    s = b.store()
    lease = await b.client.lease_grant(LONG_TTL)
    term = await s.initialize(
        system_identifier="6999", leader="n1", lease=lease, config=DynamicConfig(ttl=12)
    )
    assert term is not None
    await s.put_member(_member("n1", MemberRole.PRIMARY), lease)
    await s.write_status(term, Status(lsn=5, timeline=1, term=term))
    await s.append_history(term, HistoryEntry(1, None, 1.0, "bootstrap", None, "n1"))
    await s.write_sync(term, SyncState("n1", ("n2",), term))
    req = await s.write_request(None, _request())
    await b.client.put(b.keys("c1x").leader, "not ours")  # a scope whose name extends ours
    kvs, rev = await s.read_keys()
    view = await s.read_view(DynamicConfig(ttl=99))
    assert view == s.view_of(kvs, rev, DynamicConfig(ttl=99))
    assert view.revision == rev == await _revision(b)
    assert view.initialized == "6999" and view.config.ttl == 12
    assert view.leader is not None and view.leader.name == "n1" and view.leader.term == term
    assert list(view.members) == ["n1"] and view.members["n1"].lease == lease
    assert view.status == Status(lsn=5, timeline=1, term=term)
    assert [h.reason for h in view.history] == ["bootstrap"]
    assert view.sync is not None and view.sync.members == ("n2",) and view.sync.quorum == 1
    assert view.switchover == req
    await b.client.delete(s.keys.config)
    assert (await s.read_view(DynamicConfig(ttl=99))).config.ttl == 99, "the fallback without a config key"


@case("remove_cluster")
async def removing_a_cluster_deletes_what_was_read_and_only_while_no_agent_runs(b: Backend) -> None:
    s, other = b.store(), b.store("c1x")  # a scope whose name extends ours
    lease = await b.client.lease_grant(LONG_TTL)
    term = await s.initialize(system_identifier="7001", leader="n1", lease=lease, config=DynamicConfig())
    assert term is not None
    await s.put_member(_member("n1", MemberRole.PRIMARY), lease)
    await s.append_history(term, HistoryEntry(1, None, 1.0, "bootstrap", None, "n1"))
    await other.put_member(_member("o1"), 0)
    _, rev = await s.read_keys()
    assert not await s.remove_cluster(rev), "a leader and a member key are held"
    assert await s.release_leader("n1", term)
    _, rev = await s.read_keys()
    assert not await s.remove_cluster(rev), "a member key is still held"
    await s.delete_member("n1")
    _, rev = await s.read_keys()
    stored = await s.read_config()
    assert stored is not None
    assert await s.write_config(DynamicConfig(ttl=20), stored[1]) is not None
    assert not await s.remove_cluster(rev), "the config changed after the read"
    kvs, rev = await s.read_keys()
    assert set(kvs) == {s.keys.initialize, s.keys.config, s.keys.history}
    assert await s.remove_cluster(rev)
    assert await s.read_keys() == ({}, await _revision(b))
    assert list((await other.read_view()).members) == ["o1"], "another scope is untouched"
    # while_running: the operator accepted that agents hold keys (still only what was read)
    await s.put_member(_member("n2"), lease)
    _, rev = await s.read_keys()
    assert await s.remove_cluster(rev, while_running=True)
    assert (await s.read_keys())[0] == {}
    await b.client.lease_revoke(lease)
