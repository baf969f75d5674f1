"""Hostile or malformed records in etcd (issue 12, findings 4 and 5): every record is validated,
an invalid one is left out of the view and reported, and nothing that reads the view raises."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hakeeper.api.status import cluster_status
from hakeeper.cli.cluster_cmds import list_document, view_warnings
from hakeeper.core.cluster import (
    ClusterView,
    Member,
    MemberRole,
    MemberState,
    Status,
    Switchover,
    SwitchoverKind,
    SyncState,
    build_view,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha import loop as ha_loop
from hakeeper.ha.loop import HaLoop
from hakeeper.ha.metrics import HaMetrics
from hakeeper.ha.policy.candidates import assess
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.observe import Identity, member_record
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.ha.state import NodeState
from tests.support.builders import SYSID, local, primary, replica
from tests.support.sim import capture_events

K = Keys("/hk/c")


def kvs(items: dict[str, bytes]) -> dict[str, tuple[bytes, int, int, int]]:
    """``{key: value}`` as build_view takes it; each key's mod revision is its position + 10."""
    return {
        k: (v, 5, 10 + i, 7 if "/members/" in k or k == K.leader else 0)
        for i, (k, v) in enumerate(items.items())
    }


def good_member(name: str, **kw: Any) -> bytes:
    return replica(name, **kw).to_json()


def test_valid_records_round_trip() -> None:
    m = replica("b", lsn=123, tl=3)
    sync = SyncState("a", ("b",), 42, 1)
    sw = Switchover(SwitchoverKind.SWITCHOVER, "a", "b", requested_at=1.7e9)
    v = build_view(
        K,
        kvs(
            {
                K.initialize: SYSID.encode(),
                K.leader: b"a",
                K.member("b"): m.to_json(),
                K.status: Status(lsn=9, timeline=3, term=42).to_json(),
                K.sync: sync.to_json(),
                K.switchover: sw.to_json(),
                K.config: DynamicConfig(ttl=9).model_dump_json().encode(),
            }
        ),
        99,
        DynamicConfig(),
    )
    assert v.invalid == () and v.config_error is None and not v.sync_invalid
    assert v.members["b"] == Member(**{**_fields(m), "lease": 7})
    assert v.status == Status(lsn=9, timeline=3, term=42)
    assert v.sync is not None and v.sync.members == ("b",) and v.sync.quorum == 1
    assert v.switchover is not None and v.switchover.candidate == "b"
    assert v.config.ttl == 9


def _fields(m: Member) -> dict[str, Any]:
    return {f: getattr(m, f) for f in Member.__dataclass_fields__}


HOSTILE_MEMBERS: dict[str, bytes] = {
    "string timeline": json.dumps({"role": "replica", "timeline": "9"}).encode(),
    "string wal_lsn": json.dumps({"role": "replica", "timeline": 1, "wal_lsn": "0/3000000"}).encode(),
    "not JSON": b"{nope",
    "not an object": b"[1, 2]",
    "NaN": b'{"timeline": 1, "updated_at": NaN}',
    "Infinity": b'{"timeline": 1, "lag": Infinity}',
    "huge int": json.dumps({"timeline": 1, "wal_lsn": 2**70}).encode(),
    "timeline out of range": json.dumps({"timeline": 2**40}).encode(),
    "timeline zero": json.dumps({"timeline": 0}).encode(),
    "negative port": json.dumps({"port": -1}).encode(),
    "bool as int": json.dumps({"failover_priority": True}).encode(),
    "int as bool": json.dumps({"nofailover": 1}).encode(),
    "non-UTF-8": b'{"host": "\xff"}',
    "huge string": json.dumps({"host": "h" * 100_000}).encode(),
}


def test_invalid_member_records_are_absent_and_reported() -> None:
    items = {K.member(f"m{i}"): raw for i, raw in enumerate(HOSTILE_MEMBERS.values())}
    items[K.member("ok")] = good_member("ok")
    v = build_view(K, kvs(items), 50, DynamicConfig())
    assert list(v.members) == ["ok"]
    reported = {p.key: p for p in v.invalid}
    assert set(reported) == {K.member(f"m{i}") for i in range(len(HOSTILE_MEMBERS))}
    assert "timeline" in reported[K.member("m0")].reason  # the reason names the field
    assert all(p.revision >= 10 for p in v.invalid)


def test_member_name_from_the_key_is_validated() -> None:
    v = build_view(
        K, kvs({K.member("bad name\n"): good_member("x"), K.member(""): good_member("y")}), 5, DynamicConfig()
    )
    assert v.members == {} and len(v.invalid) == 2


def test_unknown_role_and_extra_fields_of_a_newer_agent_are_tolerated() -> None:
    raw = json.dumps({"role": "witness", "state": "hibernating", "timeline": 2, "new_field": [1]}).encode()
    m = Member.parse("n", raw)
    assert (m.role, m.state, m.timeline) == (MemberRole.UNKNOWN, MemberState.STOPPED, 2)


def test_fake_member_timeline_is_bounded_but_valid_ones_still_count() -> None:
    # A well-formed fake with a large (but possible) timeline still makes replicas look behind:
    # only etcd authentication prevents that.  What no writer can do is crash max_timeline.
    v = build_view(K, kvs({K.member("fake"): json.dumps({"timeline": 2**32}).encode()}), 5, DynamicConfig())
    assert v.members == {} and v.max_timeline == 0


def test_invalid_status_history_switchover_read_as_absent() -> None:
    v = build_view(
        K,
        kvs(
            {
                K.status: b'{"lsn": "x", "timeline": 1}',
                K.history: b'[{"timeline": "2"}]',
                K.switchover: b'{"kind": "switchover", "requested_at": Infinity}',
            }
        ),
        5,
        DynamicConfig(),
    )
    assert v.status == Status() and v.history == () and v.switchover is None
    assert {p.key for p in v.invalid} == {K.status, K.history, K.switchover}


def test_invalid_leader_value_keeps_the_key_held() -> None:
    v = build_view(K, kvs({K.leader: b"no such\nname"}), 5, DynamicConfig())
    assert v.leader is not None, "the key exists: nobody may campaign"
    assert [p.key for p in v.invalid] == [K.leader]


def test_invalid_sync_key_makes_no_replica_promotable_in_sync_mode() -> None:
    cfg = DynamicConfig(replication_mode="synchronous")
    items = {
        K.config: cfg.model_dump_json().encode(),
        K.member("b"): good_member("b"),
        K.member("c"): good_member("c"),
        K.sync: b'{"leader": "a", "members": ["b"], "term": "42"}',
    }
    v = build_view(K, kvs(items), 5, DynamicConfig())
    assert v.sync is None and v.sync_invalid
    for name in ("b", "c"):
        c = assess(v.members[name], v)
        assert not c.eligible and "sync key" in (c.reason or "")
    # async mode: the sync key does not matter
    items[K.config] = DynamicConfig(replication_mode="async").model_dump_json().encode()
    assert assess(replica("c"), build_view(K, kvs(items), 5, DynamicConfig())).eligible


def test_sync_quorum_larger_than_the_set_is_invalid() -> None:
    v = build_view(
        K, kvs({K.sync: b'{"leader": "a", "members": ["b"], "term": 4, "quorum": 3}'}), 5, DynamicConfig()
    )
    assert v.sync_invalid and v.sync is None


def test_invalid_config_uses_the_fallback_and_says_so() -> None:
    fallback = DynamicConfig(ttl=17, pause=True)
    v = build_view(K, kvs({K.config: b'{"ttl": "lots"}'}), 5, fallback, "the last valid config (revision 3)")
    assert v.config == fallback
    assert v.config_error is not None and "last valid config (revision 3)" in v.config_error
    assert "ttl" in v.config_error
    assert [p.key for p in v.invalid] == [K.config]


def test_stored_config_with_unknown_fields_is_read_ignoring_them() -> None:
    """Forward compatibility (docs/decisions.md): a newer agent's field is ignored, the rest used."""
    doc = json.loads(DynamicConfig(ttl=11).model_dump_json())
    doc["future_knob"] = True
    doc["postgresql"]["future_sub_knob"] = 1
    v = build_view(K, kvs({K.config: json.dumps(doc).encode()}), 5, DynamicConfig())
    assert v.config_error is None and v.config.ttl == 11
    assert set(v.config_ignored) == {"future_knob", "postgresql.future_sub_knob"}
    # ...but an unknown field next to a real error is still an invalid config
    doc["ttl"] = "x"
    v = build_view(K, kvs({K.config: json.dumps(doc).encode()}), 5, DynamicConfig(ttl=4))
    assert v.config_error is not None and v.config.ttl == 4


# -- the agent keeps the last valid config -------------------------------------------------------


def _loop(bootstrap: DynamicConfig) -> tuple[HaLoop, SimpleNamespace]:
    mirror = SimpleNamespace(kvs={}, revision=1)
    state = NodeState(view=ClusterView())
    ctx = SimpleNamespace(
        state=state,
        cfg=SimpleNamespace(bootstrap=SimpleNamespace(dcs=bootstrap)),
        store=ClusterStore(client=None, keys=K),  # type: ignore[arg-type]
    )
    return HaLoop(ctx, mirror, None, None), mirror  # type: ignore[arg-type]


def _kv(key: str, value: bytes, rev: int) -> KV:
    return KV(key, value, 1, rev, 1, 0)


def test_loop_keeps_the_last_valid_config_not_the_bootstrap_values() -> None:
    bootstrap = DynamicConfig(ttl=5, replication_mode="async")
    loop, mirror = _loop(bootstrap)
    # first start with an invalid config: only then the bootstrap values, and it says so
    mirror.kvs = {K.config: _kv(K.config, b'{"ttl": Infinity}', 3)}
    v = loop.view()
    assert v.config == bootstrap and v.config_error and "no valid config seen" in v.config_error
    stored = DynamicConfig(ttl=20, replication_mode="synchronous", pause=True)
    mirror.kvs = {K.config: _kv(K.config, stored.model_dump_json().encode(), 4)}
    assert loop.view().config == stored and loop.view().config_error is None
    mirror.kvs = {K.config: _kv(K.config, b'{"replication_mode": 1}', 5)}
    v = loop.view()
    assert v.config == stored, "an invalid config must not fall back to this node's bootstrap values"
    assert v.config_error is not None and "last valid config (revision 4)" in v.config_error
    mirror.kvs = {}  # the key deleted: still the last valid one
    assert loop.view().config == stored


def test_invalid_records_are_logged_once_per_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    capture_logs = capture_events(monkeypatch, ha_loop)
    loop, mirror = _loop(DynamicConfig())
    mirror.kvs = {K.member("x"): _kv(K.member("x"), b'{"timeline": "9"}', 8)}
    for _ in range(3):
        loop._report(loop.view())
    mirror.kvs = {K.member("x"): _kv(K.member("x"), b'{"timeline": "10"}', 9)}
    loop._report(loop.view())
    events = [e for e in capture_logs if e["event"] == "etcd_record_invalid"]
    assert [(e["key"], e["revision"]) for e in events] == [(K.member("x"), 8), (K.member("x"), 9)]
    assert "timeline" in events[0]["reason"]


# -- reporting: list, /cluster, metrics ----------------------------------------------------------


def _snapshot(v: ClusterView) -> NodeSnapshot:
    return NodeSnapshot(
        name="a",
        scope="c",
        tags={},
        probe=None,
        view=v,
        member=primary("a"),
        activity=None,
        decision=None,
        loop_heartbeat=0.0,
        lease_remaining=1.0,
        writable=False,
        backup=None,
    )


def test_problems_are_shown_by_list_cluster_and_metrics() -> None:
    v = build_view(
        K,
        kvs({K.config: b"{bad", K.member("x"): b'{"wal_lsn": "1"}', K.member("b"): good_member("b")}),
        5,
        DynamicConfig(),
    )
    doc = cluster_status(_snapshot(v))
    assert doc["config_error"] == v.config_error and doc["config_error"]
    assert {r["key"] for r in doc["invalid_records"]} == {K.config, K.member("x")}
    assert [m["name"] for m in doc["members"]] == ["b"]
    lines = view_warnings(v)
    assert len(lines) == 2 and lines[0].startswith("warning: invalid config") and K.member("x") in lines[1]
    assert list_document(v)["config_error"] == v.config_error
    metrics = HaMetrics()
    metrics.refresh(_snapshot(v))
    assert metrics.config_valid._value.get() == 0
    assert metrics.invalid_records._value.get() == 2
    metrics.refresh(_snapshot(ClusterView()))
    assert metrics.config_valid._value.get() == 1


# -- arbitrary JSON in every key: nothing raises -------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**31, max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["a", "b", "replica", "primary", "streaming", "running", "switchover", "failover"])
)
_FIELDS = [
    *Member.__dataclass_fields__,
    "lsn", "term", "members", "leader", "quorum", "kind", "candidate", "requested_at", "stage",
    "time", "reason", "old_leader", "new_leader", "ttl", "pause", "replication_mode",
]  # fmt: skip
_json = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(_FIELDS), c, max_size=8),
    max_leaves=30,
)


def _raw(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


_value = _json.map(_raw) | st.binary(max_size=20) | st.sampled_from([b"", b"a", b"b", SYSID.encode()])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            K.initialize: _value,
            K.config: _value,
            K.leader: _value,
            K.member("a"): _value,
            K.member("b"): _value,
            K.member("c"): _value,
            K.status: _value,
            K.history: _value,
            K.switchover: _value,
            K.sync: _value,
        },
    ),
    st.sampled_from(["a", "b"]),
    st.booleans(),
)
def test_arbitrary_records_never_raise(items: dict[str, bytes], me: str, in_recovery: bool) -> None:
    v = build_view(K, kvs(items), 100, DynamicConfig())
    assert math.isfinite(v.max_timeline)
    facts = local(me, in_recovery=in_recovery, now=1.7e9)
    decide(v, facts)
    cluster_status(_snapshot(v))
    list_document(v)
    view_warnings(v)
    ident = Identity(me, "127.0.0.1", 5432, "http://x", False, 1, False, False, 1, "0")
    member_record(ident, probe=None, activity=None, initialized=True, view=v, now_wall=1.7e9)
    HaMetrics().refresh(_snapshot(v))
